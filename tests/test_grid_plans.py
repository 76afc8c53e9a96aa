"""Every shipped config, planned from the repository root exactly as the README launches it.

``snakemake -n --configfile config/<file>.yaml`` must plan that file's grid and nothing else (no entry merged
in from the demo config), and ``ncpipe plan`` must count the same jobs.  The dry runs need no dataset (the
dataset check runs only before real jobs).  In a clone with a results/ directory they plan with --forceall,
i.e. from scratch.  About 10 s per paper grid on a quiet 2-core machine.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections import Counter
from functools import cache
from pathlib import Path

import pytest
import torch

from ncpipe import families, grid, plan
from ncpipe.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# external_example.yaml reads a checkpoint the user writes first (its file is checked at parse time):
# tests/test_external.py writes it and compares that config's plan with its dry run
CONFIGS = sorted(p.name for p in (ROOT / "config").glob("*.yaml") if p.name != "external_example.yaml")
# the acceptance counts of issue 13: one features job per checkpoint of each run, at the grid's one threat;
# the paper grids' storage policy (features.keep) splits them between the kept dumps' rule and features_temp
FEATURES = {"paper.yaml": 2448, "paper_l2.yaml": 2448, "imagenette.yaml": 1224, "config.yaml": 15,
            "autoattack.yaml": 15}
KEPT = {"paper.yaml": 36 * 3, "paper_l2.yaml": 36 * 3, "imagenette.yaml": 18 * 3, "config.yaml": 15,
        "autoattack.yaml": 15}
FEATURE_RULES = ("features", "features_temp")
THREAT = {"paper.yaml": "linf", "paper_l2.yaml": "l2", "imagenette.yaml": "linf", "config.yaml": "linf",
          "autoattack.yaml": "linf"}


def _run(*cmd: str) -> str:
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    return out


def job_table(out: str) -> dict[str, int]:
    block = out.split("Job stats:", 1)[1].split("\ntotal", 1)[0]
    return {m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)\s*$", block, flags=re.M)}


@cache
def dry_run(name: str, *extra: str) -> str:
    """The dry run's output; ``--verbose`` also lists every job with its wildcards and shell command."""
    # a clone that has run something plans only what is missing: plan it from scratch there
    force = ["--forceall"] if (ROOT / "results").exists() else []
    return _run(str(BIN / "snakemake"), "-n", *force, *extra, "--configfile", f"config/{name}")


def jobs_of(out: str) -> list[tuple[str, dict[str, str], str]]:
    """(rule, wildcards, shell command) of every job listed by a verbose dry run."""
    jobs: list[tuple[str, dict[str, str], str]] = []
    for line in out.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            jobs.append((m.group(1), {}, ""))
        elif (m := re.match(r"^\s+wildcards: (.*)$", line)) and jobs:
            jobs[-1][1].update(kv.split("=", 1) for kv in m.group(1).split(", "))
        elif line.startswith("Shell command: ") and jobs:
            jobs[-1] = (jobs[-1][0], jobs[-1][1], line.removeprefix("Shell command: "))
    return jobs


def spec_of(command: str) -> dict:
    args = shlex.split(command)
    return json.loads(args[args.index("--spec") + 1])


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_a_config_file_plans_exactly_its_own_grid(name: str):
    out = dry_run(name, "--verbose")
    counts = job_table(out)
    config = load_config(ROOT / "config" / name)  # the file alone, as the tests of the configs read it
    assert counts["features"] + counts.get("features_temp", 0) == FEATURES[name]
    assert counts["features"] == KEPT[name]
    assert counts == plan.jobs(config), "ncpipe plan disagrees with snakemake's dry run"
    jobs = jobs_of(out)
    assert Counter(rule for rule, _, _ in jobs) == counts
    assert {wc["norm"] for rule, wc, _ in jobs if rule in FEATURE_RULES} == {THREAT[name]}
    kept = set(families.kept_dump_epochs(config))
    assert all((int(wc["epoch"]) in kept) == (rule == "features") for rule, wc, _ in jobs
               if rule in FEATURE_RULES)
    # every spec a job receives is the one of the file alone: nothing merged in from config/config.yaml
    for rule, wc, cmd in jobs:
        if rule in FEATURE_RULES:
            assert spec_of(cmd) == json.loads(grid.features_spec(config, wc))
        elif rule == "layerwise":
            spec = spec_of(cmd)
            assert spec == json.loads(grid.layerwise_spec(config, wc))
            if name not in ("config.yaml", "autoattack.yaml"):  # autoattack.yaml is the demo plus AutoAttack
                assert spec["layerwise"]["per_class"] != 20, "the demo config's layerwise.per_class leaked in"
        elif rule == "train":
            assert spec_of(cmd) == json.loads(grid.train_spec(config, wc))


@pytest.mark.slow
def test_dry_run_of_a_grid_prints_the_job_table_not_every_job():
    out = dry_run("imagenette.yaml")  # 2,536 jobs
    assert job_table(out) == job_table(dry_run("imagenette.yaml", "--verbose"))
    assert len(out.splitlines()) < 200, len(out.splitlines())
    assert "Shell command" not in out and "rule features:" not in out
    # a small plan still lists its jobs (with their reasons), but never the shell commands
    demo = dry_run("config.yaml")
    assert "rule features:" in demo and "reason:" in demo and "Shell command" not in demo


@pytest.mark.slow
def test_ncpipe_plan_json_counts_the_dry_runs_jobs():
    res = json.loads(_run(str(BIN / "ncpipe"), "plan", "--configfile", "config/paper.yaml", "--json"))
    assert res["jobs"] == job_table(dry_run("paper.yaml", "--verbose"))
    assert res["jobs_total"] == 4998
    kinds = res["storage"]
    assert res["storage_bytes"] == sum(a["bytes"] for a in kinds.values())
    assert {"checkpoints", "feature dumps", "layerwise dumps", "metrics tables",
            plan.RECORDED} == set(kinds)
    assert kinds["feature dumps"]["dtype"] == "float32" and kinds["checkpoints"]["files"] == 36 * 68
    # the shipped policy keeps every checkpoint and metrics table, the dumps of 3 epochs, under 300 GB
    assert kinds["checkpoints"]["kept"] == kinds["metrics tables"]["kept"] == 36 * 68
    assert kinds["feature dumps"]["kept"] == 36 * 3 and kinds[plan.RECORDED]["kept"] == 24 * 68
    assert res["storage_bytes"] <= 300e9, res["storage_bytes"] / 1e9


def test_storage_follows_the_config():
    """Sizes from the models and the dtype: float16 halves the features; no recording, no recorded ones."""
    c = load_config(ROOT / "config" / "config.yaml")
    base = {a.kind: a for a in plan.storage(c)}
    sh = plan.model_shape("vgg11bn", "mnist5k", c["model"]["width"])
    n = plan.split_sizes(c, "mnist5k")
    assert n == {"train": 500, "test": 200}
    assert base["checkpoints"].bytes == 3 * 5 * sh.checkpoint_bytes
    # AT and TRADES record 500 training examples' features (float32) and predictions per checkpoint
    recorded = base[plan.RECORDED]
    assert recorded.bytes == 2 * 5 * 500 * (sh.feature_dim * 4 + 8)
    c16 = load_config(ROOT / "config" / "config.yaml")
    c16["features"]["dtype"] = "float16"
    c16["train"]["record_adversarial"] = False
    half = {a.kind: a for a in plan.storage(c16)}
    assert plan.RECORDED not in half
    assert half["feature dumps"].bytes < 0.6 * base["feature dumps"].bytes
    # 20 epochs x 500 images x (ST 1, AT 4 PGD steps + the update, TRADES 4 steps + the two-branch loss)
    # features.keep: only the kept epochs' dumps count; the record's dtype halves it
    c16["features"]["keep"] = "final"
    c16["train"]["record_adversarial"], c16["train"]["record_dtype"] = True, "float16"
    final = {a.kind: a for a in plan.storage(c16)}
    # the final dumps and the first ones, which the simplex figure reads
    assert final["feature dumps"].kept == 3 * 2 and final["feature dumps"].files == 15
    assert final[plan.RECORDED].bytes == 2 * 5 * 500 * (sh.feature_dim * 2 + 8)
    assert plan.passes(c)["train"]["backward"] == 20 * 500 * (1 + (4 + 1) + (4 + 2))


def test_plan_of_a_bad_config_names_the_key(tmp_path, capsys):
    from ncpipe.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "config" / "config.yaml").read_text().replace("methods: [st, at, trades]",
                                                                          "methods: [st, sgd]"))
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--configfile", str(bad)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'methods[1]'" in err and "'sgd'" in err and "['st', 'at', 'trades']" in err
    main(["plan", "--configfile", str(ROOT / "config" / "config.yaml")])
    total = sum(plan.jobs(load_config(ROOT / "config" / "config.yaml")).values())
    assert re.search(rf"^total\s+{total}$", capsys.readouterr().out, flags=re.M)


# ------------------------------------------------------------------------------------- AutoAttack passes
class _Robust(torch.nn.Module):
    """Class 0 by a margin no input in [0, 1] can close: every point survives every attack and iteration."""

    def __init__(self, classes: int, numel: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(numel, classes)
        with torch.no_grad():
            self.lin.weight.mul_(1e-3)
            self.lin.bias.copy_(torch.tensor([10.0] + [0.0] * (classes - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))


def _counted_autoattack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, opts: dict,
                        classes: int) -> tuple[float, float]:
    """(forward, backward) image passes per image that ``attacks.autoattack`` really makes (module hooks)."""
    from ncpipe import attacks

    n = {"f": 0, "b": 0}
    hf = model.register_forward_hook(lambda _m, i, _o: n.__setitem__("f", n["f"] + len(i[0])))
    hb = model.register_full_backward_hook(lambda _m, _gi, go: n.__setitem__("b", n["b"] + len(go[0])))
    try:
        attacks.autoattack(model, x, y, norm="linf", epsilon=8 / 255, options=opts, num_classes=classes)
    finally:
        hf.remove()
        hb.remove()
    return n["f"] / len(x), n["b"] / len(x)


@pytest.mark.parametrize("version,members,classes", [("standard", [], 4), ("plus", [], 4), ("rand", [], 5),
                                                     ("custom", ["fab", "apgd-dlr"], 4)])
def test_autoattack_passes_are_exact_for_points_that_stay_robust(version, members, classes):
    """The plan's per-image count equals the passes torchattacks makes on a point no attack fools."""
    opts = {"version": version, "attacks": members, "steps": 3, "square_queries": 7, "seed": 0}
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    got = _counted_autoattack(_Robust(classes, 16), x, torch.zeros(5, dtype=torch.long), opts, classes)
    assert got == plan.autoattack_passes(opts, classes)


def test_autoattack_passes_bound_a_model_that_is_fooled():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1).detach()  # every point starts robust, and the 8/255 ball fools some
    opts = {"version": "standard", "steps": 3, "square_queries": 7}
    f, b = _counted_autoattack(model, x, y, opts, 4)
    bound = plan.autoattack_passes(opts, 4)
    assert f <= bound[0] and b <= bound[1] and (f, b) != bound


def test_autoattack_plan_exceeds_the_pgd_only_plan_by_its_passes():
    """config/autoattack.yaml: the standard version on the 3 final checkpoints' 200 test images."""
    c = load_config(ROOT / "config" / "autoattack.yaml")
    pgd_only = load_config(ROOT / "config" / "autoattack.yaml")
    pgd_only["attack"]["kinds"] = [k for k in c["attack"]["kinds"] if k != "autoattack"]
    aa = c["attack"]["autoattack"]
    assert (aa["version"], aa["splits"], aa["per_class"], aa["final_only"]) == ("standard", ["test"], 0, True)
    s, q, t = aa["steps"], aa["square_queries"], 10 - 1  # 100 iterations, 5000 queries, 9 target classes
    # each attack: its own clean pass + its passes + ncpipe's check of its candidates; APGD-CE: the start's
    # gradient and one per iteration; APGD-T, per target: a clean pass choosing it, then as APGD; FAB-T, per
    # target: 2 clean passes, a gradient and a check per iteration, a final check; Square: a query each + 2
    members_f = [1 + (s + 1) + 1, 1 + t * (1 + s + 1) + 1, 1 + t * (3 + 2 * s) + 1, 1 + (q + 2) + 1]
    members_b = [s + 1, t * (s + 1), t * s, 0]
    per_image = (1 + sum(members_f) + 1, sum(members_b))  # + the clean selection pass, + the features pass
    assert per_image == (7858, 1910)
    images = 3 * 200  # ST, AT, TRADES at epoch 20, the test split only
    got, base = plan.passes(c)["features"], plan.passes(pgd_only)["features"]
    assert got["forward"] - base["forward"] == images * per_image[0]
    assert got["backward"] - base["backward"] == images * per_image[1]
    p = plan.plan(c)
    assert p["passes"]["train"] == plan.passes(pgd_only)["train"]
    assert len(p["passes_notes"]) == 1 and "upper bound" in p["passes_notes"][0]
    assert "upper bound" in plan.format_plan(p).split("storage")[0]
    assert plan.plan(load_config(ROOT / "config" / "config.yaml"))["passes_notes"] == []
    # its dumps: the autoattack group of the final epochs' test split only, beside the PGD-only plan's
    dumps = {a.kind: a for a in plan.storage(c)}["feature dumps"]
    base_dumps = {a.kind: a for a in plan.storage(pgd_only)}["feature dumps"]
    dim = plan.model_shape("vgg11bn", "mnist5k", c["model"]["width"]).feature_dim
    assert dumps.bytes - base_dumps.bytes == images * (dim * 4 + 2 * 8)


def test_external_cells_count_their_dumps_in_storage():
    """config/external_example.yaml: no checkpoint of ncpipe's; its one cell's dumps and metrics table."""
    c = load_config(ROOT / "config" / "external_example.yaml")
    kinds = {a.kind: a for a in plan.storage(c)}
    assert set(kinds) == {"feature dumps", "metrics tables", "layerwise dumps"}
    n = plan.split_sizes(c, "mnist5k")
    assert n == {"train": 100, "test": 100}
    # TinyNet's classifier reads a 32-d feature; 5 kinds x 2 splits, labels and predictions; targeted: targets
    assert kinds["feature dumps"].files == 1
    assert kinds["feature dumps"].bytes == 5 * 200 * (32 * 4 + 2 * 8) + 200 * 8
    assert kinds["metrics tables"].bytes == 10 * plan._METRIC_ROWS_PER_GROUP * plan._CSV_ROW_BYTES
    # layerwise: clean and PGD train features at conv1 (8 x 28 x 28), conv2 (16 x 14 x 14), fc (32)
    pool = int(c["layerwise"].get("pool", 0))
    assert pool == 0
    dims = [8 * 28 * 28, 16 * 14 * 14, 32]
    assert kinds["layerwise dumps"].bytes == 2 * sum(100 * (d * 4 + 2 * 8) for d in dims)
    p = plan.plan(c)
    assert p["storage_bytes"] == sum(a.bytes for a in kinds.values()) > 0
    assert "feature dumps" in plan.format_plan(p)
