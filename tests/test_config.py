"""Bad input: each malformed config is rejected with a message naming the key (and the allowed values)."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ncpipe.config import ConfigError, load_config, load_schema, schema_enum, validate_config

REPO = Path(__file__).resolve().parents[1]
DELETE = object()
BASE: dict[str, Any] = {
    "datasets": ["mnist5k"], "archs": ["vgg11bn"], "methods": ["st", "at"], "seeds": [1],
    "train": {"epochs": 2, "checkpoints": [1, 2]},
}


def mutate(config: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of ``config`` with the dotted ``key`` set to ``value`` (or removed for DELETE)."""
    config = copy.deepcopy(config)
    *parents, last = key.split(".")
    node = config
    for k in parents:
        node = node.setdefault(k, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return config


ADV = {"norm": "linf", "epsilon": 8, "step": 2, "steps": 10}
THREAT = {"epsilons": [8], "step": 2, "steps": 10}
# (key to set, bad value, substrings the message must hold: the offending key; for enums the allowed values)
MALFORMED = [
    ("datasets", ["mnist"], ["'datasets[0]'", "'mnist'", "mnist5k", "cifar10", "cifar100", "imagenette"]),
    ("archs", ["resnet50"], ["'archs[0]'", "vgg11bn", "preactresnet18"]),
    ("methods", ["st", "sgd"], ["'methods[1]'", "'sgd'", "'st', 'at', 'trades'"]),
    ("datasets", DELETE, ["'datasets'", "missing"]),
    ("datasets", [], ["'datasets'", "non-empty"]),
    ("seeds", [-1], ["'seeds[0]'", "minimum of 0"]),
    ("seeds", [1, 1], ["'seeds'", "non-unique"]),
    ("seeds", "1", ["'seeds'", "wrong type", "array"]),
    ("train.epochs", 0, ["'train.epochs'", "minimum of 1"]),
    ("train.epochs", 2.5, ["'train.epochs'", "integer"]),
    ("train.epochs", True, ["'train.epochs'", "integer"]),
    ("train.lr", 0, ["'train.lr'", "minimum of 0"]),
    ("train.lr", float("nan"), ["'train.lr'", "finite"]),
    ("train.momentum", 1.5, ["'train.momentum'", "maximum of 1"]),
    ("train.batch_size", "64", ["'train.batch_size'", "integer"]),
    ("train.checkpoints", [1, 5], ["'train.checkpoints'", "[5]", "0..2"]),
    ("train.checkpoints", [1], ["'train.checkpoints'", "last epoch (2)"]),
    ("train.checkpoints", [-1, 2], ["'train.checkpoints[0]'", "minimum of 0"]),
    ("train.checkpoints", DELETE, ["'train.checkpoints'", "missing"]),
    ("train.lr_milestones", [0.75, 0.5], ["'train.lr_milestones'", "increasing"]),
    ("train.lr_milestones", [1.5], ["'train.lr_milestones[0]'", "maximum of 1"]),
    ("train.adversary", {**ADV, "norm": "l3"}, ["'train.adversary.norm'", "'l3'", "'linf', 'l2'"]),
    ("train.adversary", {**ADV, "epsilon": -8}, ["'train.adversary.epsilon'", "minimum of 0"]),
    ("train.adversary", {k: v for k, v in ADV.items() if k != "steps"},
     ["'train.adversary.steps'", "missing"]),
    ("train.at_attack_mode", "test", ["'train.at_attack_mode'", "'train', 'eval'"]),
    ("train.trades_step", 0, ["'train.trades_step'"]),
    ("features.keep", [1, 7], ["'features.keep'", "[7]", "all, final", "[1, 2]"]),
    ("features.keep", "some", ["'features.keep'"]),
    ("train.nepochs", 3, ["['nepochs']", "'train'", "'epochs'"]),
    ("attack.threats", {"linf": {**THREAT, "epsilons": [-8]}},
     ["'attack.threats.linf.epsilons[0]'", "minimum"]),
    ("attack.threats", {"linf": {**THREAT, "epsilons": [8, float("inf")]}},
     ["'attack.threats.linf.epsilons[1]'", "finite"]),
    ("attack.threats", {"linf": {**THREAT, "steps": 0}}, ["'attack.threats.linf.steps'", "minimum of 1"]),
    ("attack.threats", {"l1": THREAT}, ["['l1']", "'attack.threats'", "'l2', 'linf'"]),
    ("attack.threats", {}, ["'attack.threats'", "non-empty"]),
    ("attack.kinds", ["clean", "fgsm"],
     ["'attack.kinds[1]'", "'clean', 'pgd', 'targeted', 'gaussian', 'sign'"]),
    ("attack.splits", ["val"], ["'attack.splits[0]'", "'train', 'test'"]),
    ("attack.target_rule", "prev", ["'attack.target_rule'", "'next', 'random'"]),
    ("attack.restarts", 0, ["'attack.restarts'", "minimum of 1"]),
    ("figures.dpi", 10, ["'figures.dpi'", "minimum of 50"]),
    ("figures.context", "huge", ["'figures.context'", "'paper', 'notebook', 'talk', 'poster'"]),
    ("figures.formats", ["jpg"], ["'figures.formats[0]'", "'png', 'pdf', 'svg'"]),
    ("runtime.device", "tpu", ["'runtime.device'", "'auto', 'cpu', 'cuda'"]),
    ("runtime.amp", "yes", ["'runtime.amp'", "boolean"]),
    ("data.train_per_class", 0, ["'data.train_per_class'", "minimum of 1"]),
    ("data.test_per_class", 1000, ["'data.test_per_class'", "100 per class"]),
    ("model.width", 0, ["'model.width'", "minimum of 0"]),
    ("features.dtype", "float64", ["'features.dtype'", "'float32', 'float16'"]),
    ("layerwise.per_class", -1, ["'layerwise.per_class'", "minimum of 0"]),
    ("trian", {"epochs": 3}, ["['trian']", "top level", "'train'"]),
    ("train", 5, ["'train'", "object"]),
]


IDS = [f"{k}={v!r:.30}" if v is not DELETE else f"{k}-missing" for k, v, _ in MALFORMED]


@pytest.mark.parametrize(("key", "value", "expected"), MALFORMED, ids=IDS)
def test_malformed_config_names_the_key(key, value, expected):
    assert len(MALFORMED) >= 15
    with pytest.raises(ConfigError) as info:
        validate_config(mutate(BASE, key, value))
    msg = str(info.value)
    for part in expected:
        assert part in msg, f"{part!r} missing from: {msg}"


def test_base_config_is_valid_and_gets_the_schema_defaults():
    cfg = validate_config(copy.deepcopy(BASE))
    schema = load_schema()["properties"]
    train = schema["train"]["properties"]
    assert cfg["train"]["lr"] == train["lr"]["default"] == 0.1
    assert cfg["train"]["batch_size"] == 128
    assert cfg["train"]["adversary"] == {"norm": "linf", "epsilon": 8, "step": 2, "steps": 10}
    assert cfg["attack"]["threats"] == {"linf": {"epsilons": [8], "step": 2, "steps": 10}}
    assert cfg["attack"]["kinds"] == ["clean", "pgd", "targeted", "gaussian", "sign", "train_adv"]
    assert cfg["runtime"] == {"device": "auto", "amp": False, "channels_last": False, "compile": False,
                              "deterministic": True}
    # defaults never overwrite given values
    assert validate_config(mutate(BASE, "train.lr", 0.5))["train"]["lr"] == 0.5


@pytest.mark.parametrize("ok", [
    ("train.checkpoints", [0, 2]),  # epoch 0 = the initialisation
    ("attack.threats", {"linf": {**THREAT, "epsilons": [0, 8]}}),  # epsilon 0 is allowed (>= 0)
    ("train.adversary", {**ADV, "epsilon": 0}),
    ("data.train_per_class", 400),
])
def test_boundary_values_are_accepted(ok):
    validate_config(mutate(BASE, *ok))


@pytest.mark.parametrize("path", sorted((REPO / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg["datasets"] and cfg["train"]["epochs"] in cfg["train"]["checkpoints"]


def test_snakemake_command_line_rejects_bad_config(tmp_path):
    """The same message reaches the user of ``snakemake -n`` as a WorkflowError, before any job is planned."""
    bad = mutate(BASE, "methods", ["st", "sgd"])
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    # the snakemake of this interpreter's environment, whether or not the venv is activated
    exe = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or "snakemake"
    res = subprocess.run([exe, "-n", "--cores", "1", "-s", str(REPO / "workflow" / "Snakefile"),
                          "--configfile", "bad.yaml"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "WorkflowError" in out and "invalid configuration" in out
    assert "'methods[1]'" in out and "'sgd'" in out and "['st', 'at', 'trades']" in out
    assert not (tmp_path / "results").exists()


def test_names_come_from_the_schema():
    # the schema is the one list of names: modules read theirs from it; the code's registries must match it
    from ncpipe import attacks, data, models
    from ncpipe import io as nio

    assert nio.KIND_ORDER == schema_enum("attack", "kinds")
    # attacks makes every kind but the one training records
    assert attacks.KINDS == tuple(k for k in nio.KIND_ORDER if k != "train_adv")
    assert set(schema_enum("attack", "kinds")) == {*attacks.KINDS, attacks.TRAIN_ADV}
    assert nio.SPLITS == schema_enum("attack", "splits") == ("train", "test")
    assert tuple(load_schema()["$defs"]["threat"]["properties"]["norm"]["enum"]) == attacks.NORMS
    assert set(schema_enum("datasets")) == set(data.LOADERS)
    assert set(schema_enum("archs")) == set(models.ARCHS)
    assert schema_enum("methods") == ("st", "at", "trades")
    with pytest.raises(KeyError):
        schema_enum("no_such_key")


def test_library_calls_default_to_the_schemas_pinv_cutoff():
    # direct library calls (a notebook, not the workflow) compute NC1 as a config without the key would
    import inspect

    from ncpipe import evaluate, layerwise, metrics

    pinv = load_schema()["properties"]["metrics"]["properties"]["pinv_cutoff"]
    assert pinv["default"] == metrics.AUTHORS_PINV_CUTOFF and set(pinv["enum"]) == set(metrics.PINV_CUTOFFS)
    defaults = {}
    for mod in (metrics, evaluate, layerwise):
        calls = inspect.getmembers(mod, inspect.isfunction) + [("ClassStats", metrics.ClassStats.__init__)]
        for name, fn in calls:
            for p in inspect.signature(fn).parameters.values():
                if p.name in ("cutoff", "pinv_cutoff") and p.default is not inspect.Parameter.empty:
                    defaults[f"{mod.__name__}.{name}"] = p.default
    assert len(defaults) >= 6, defaults  # pinv_keep, ClassStats, evaluate_dump/_table, the layerwise probe...
    assert set(defaults.values()) == {metrics.AUTHORS_PINV_CUTOFF}, defaults
