"""External checkpoints (config `external`): a model written by plain PyTorch, analysed without training."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from ncpipe import grid, plan
from ncpipe.config import ConfigError, validate_config
from ncpipe.data import load_dataset, per_class_subset, to_float
from ncpipe.examples import train_and_save
from ncpipe.external import validate_external
from ncpipe.utils import sha256_file

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config" / "external_example.yaml"
SNAKEMAKE = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or "snakemake"


@pytest.fixture(scope="module")
def ext_ckpt(tmp_path_factory) -> Path:
    """A state dict written by a plain PyTorch training loop and torch.save (ncpipe only supplies pixels)."""
    data = load_dataset("mnist5k")
    idx = per_class_subset(data.y_train, 20)
    out = tmp_path_factory.mktemp("ext") / "external_example" / "tiny.pt"
    return train_and_save(out, to_float(data.x_train[idx]), data.y_train[idx], epochs=3)


def example_config(ckpt: Path, **entry) -> dict:
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["external"][0].update({"checkpoint": str(ckpt), **entry})
    cfg["attack"]["kinds"] = ["clean", "pgd", "targeted"]  # a fast chain; the kinds are the trained runs'
    cfg["layerwise"]["per_class"] = 5
    return cfg


def _bad(ckpt: Path, **entry) -> str:
    cfg = validate_config(example_config(ckpt, **entry))
    with pytest.raises(ConfigError) as err:
        validate_external(cfg)
    return str(err.value)


def test_external_cells_have_no_train_job(ext_ckpt):
    cfg = validate_config(example_config(ext_ckpt))
    validate_external(cfg)
    assert grid.trained_runs(cfg) == [] and [r.regime for r in grid.runs(cfg)] == ["ext_tiny"]
    assert [c.epoch for c in grid.cells(cfg)] == [0] and len(grid.layerwise_cells(cfg)) == 1
    assert "train" not in plan.jobs(cfg)
    # without probes a factory model has no layerwise job
    cfg2 = validate_config(example_config(ext_ckpt, probes=[]))
    assert grid.layerwise_cells(cfg2) == []


@pytest.mark.parametrize(("entry", "key", "text"), [
    ({"checkpoint": "/nonexistent/tiny.pt"}, "external[0].checkpoint", "does not exist"),
    ({"factory_kwargs": {"width": 4}}, "external[0].factory", "does not load"),
    ({"factory": "ncpipe.examples:nothing"}, "external[0].factory", "cannot import"),
    ({"factory": "no_such_package.mod:make"}, "external[0].factory", "cannot import"),
    ({"feature_module": "fc2"}, "external[0].feature_module", "no module 'fc2'"),
    ({"feature_module": "conv1"}, "external[0].feature_module", "not an nn.Linear"),
    ({"feature_module": "fc"}, "external[0].feature_module", "not the classifier"),
    ({"probes": ["conv1", "conv9"]}, "external[0].probes", "conv9"),
    ({"state_dict_key": "model"}, "external[0].state_dict_key", "not a key"),
    ({"format": "model"}, "external[0].format", "nn.Module"),
    ({"mean": [0.1, 0.1, 0.1], "std": [0.3, 0.3, 0.3]}, "external[0].mean", "1 channel"),
    ({"factory": None, "arch": "vgg11bn"}, "external[0].arch", "does not load"),
])
def test_bad_external_entry_names_its_key(ext_ckpt, entry, key, text):
    msg = _bad(ext_ckpt, **entry)
    assert key in msg and text in msg, msg


def test_malformed_checkpoint_names_its_key(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    msg = _bad(junk)
    assert "external[0].checkpoint" in msg and "not a readable torch file" in msg
    tensors = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], tensors)
    assert "not a state dict" in _bad(tensors)


@pytest.mark.parametrize(("change", "key"), [
    (lambda c: c["external"][0].update(dataset="cifar10"), "external[0].dataset"),
    (lambda c: c["external"][0].update(arch="vgg11bn"), "external[0].arch"),
    (lambda c: c["external"][0].pop("std"), "external[0].std"),
    (lambda c: c["external"][0].update(name="Tiny Net"), "external[0].name"),
    (lambda c: c["external"].append(copy.deepcopy(c["external"][0])), "external[1].name"),
    (lambda c: c.update(external=[]), "methods"),
])
def test_bad_external_config_names_its_key(ext_ckpt, change, key):
    cfg = example_config(ext_ckpt)
    change(cfg)
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        validate_config(cfg)


def _snakemake(workdir: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([SNAKEMAKE, "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory",
                           str(workdir), "--configfile", str(config), *args],
                          capture_output=True, text=True, env=env, timeout=900)


def test_bad_checkpoint_fails_before_any_job(ext_ckpt, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(example_config(ext_ckpt, feature_module="nope")))
    res = _snakemake(tmp_path, cfg, "--cores", "1")
    assert res.returncode != 0 and "external[0].feature_module" in res.stdout + res.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_external_checkpoint_through_the_chain_to_figures(ext_ckpt, tmp_path):
    from ncpipe.inspect import verify_dump

    cfg_path = tmp_path / "external.yaml"
    cfg = example_config(ext_ckpt)
    cfg_path.write_text(yaml.safe_dump(cfg))
    dry = _snakemake(tmp_path, cfg_path, "-n")
    assert dry.returncode == 0, dry.stderr[-3000:]
    block = dry.stdout.split("Job stats:")[1].split("\ntotal")[0].splitlines()
    table = dict(line.split()[:2] for line in block
                 if line.strip() and line.split()[-1].isdigit() and not line.startswith("job"))
    assert "train" not in table
    assert {k: int(v) for k, v in table.items()} == plan.jobs(validate_config(cfg))
    res = _snakemake(tmp_path, cfg_path, "--cores", "2")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    results = tmp_path / "results"
    figs = {p.relative_to(results / "figures").as_posix() for p in (results / "figures").rglob("*.png")}
    assert "nc_vs_epoch/mnist5k__custom__ext_tiny__linf32.png" in figs
    assert {"layerwise_nc1/mnist5k__custom__linf32.png", "leap_matrix/mnist5k__custom__linf32.png"} <= figs
    assert not list(results.rglob("*/checkpoints/*.pt"))  # nothing was trained
    m = pd.read_csv(results / "metrics.csv")
    assert set(m["regime"]) == {"ext_tiny"}
    assert {"nc1", "accuracy", "ncc_train_means_accuracy"} <= set(m["metric"])
    acc = m[(m["split"] == "train") & (m["perturbation"] == "clean") & (m["metric"] == "accuracy")]["value"]
    assert float(acc.iloc[0]) > 0.5  # the trained weights were loaded (chance is 0.1)
    lw = pd.read_csv(results / "layerwise.csv")
    assert set(lw["layer"]) == {"conv1", "conv2", "fc"}
    dump = results / "mnist5k/custom/ext_tiny/seed0/features/epoch0_linf_eps32.h5"
    from ncpipe.io import attrs_dict, open_dump

    with open_dump(dump) as f:
        assert attrs_dict(f)["checkpoint_sha256"] == sha256_file(ext_ckpt)
    assert verify_dump(dump)["ok"]
    acc_table = pd.read_csv(results / "tables" / "accuracy_final__mnist5k__linf32.csv")
    assert list(acc_table["regime"]) == ["ext_tiny"]
