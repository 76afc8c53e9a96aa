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
    assert re.search(r"^total +50$", capsys.readouterr().out, flags=re.M)  # the demo's 50 jobs
