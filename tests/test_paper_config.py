"""The paper's grid configs, the missing-data check, and the paper chain run end to end on a fake CIFAR-10."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ncpipe import grid
from ncpipe.config import load_config, validate_config
from ncpipe.families import TABLES, figure_rule, table_families, table_rule
from ncpipe.figures import FAMILIES, figure_targets, parse_stem
from ncpipe.tables import table_targets
from ncpipe.train import lr_at

sys.path.insert(0, str(Path(__file__).parent))
from fake_datasets import write_cifar10  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def paper(name: str = "paper") -> dict[str, Any]:
    return load_config(ROOT / "config" / f"{name}.yaml")


def test_main_grid_is_the_papers():
    c = paper()
    assert c["datasets"] == ["cifar10", "cifar100"] and c["archs"] == ["vgg11bn", "preactresnet18"]
    assert c["methods"] == ["st", "at", "trades"] and c["seeds"] == [1, 2, 3]
    assert len(grid.runs(c)) == 36
    t = c["train"]
    assert (t["epochs"], t["batch_size"], t["lr"], t["momentum"], t["weight_decay"]) == (
        400,
        128,
        0.1,
        0.9,
        5e-4,
    )
    assert t["adversary"] == {"norm": "linf", "epsilon": 8, "step": 2, "steps": 10}
    assert grid.threats(c) == [("linf", "8")] and c["attack"]["threats"]["linf"]["step"] == 2
    assert c["data"]["train_per_class"] is None and c["model"]["width"] == 1.0
    # drops x0.1 after epochs 100 and 150 (milestones are fractions of the run)
    args = (400, 0.1, t["lr_milestones"], t["lr_decay"])
    assert [round(lr_at(e, *args), 6) for e in (99.9, 100.1, 149.9, 150.1, 400)] == [
        0.1,
        0.01,
        0.01,
        0.001,
        0.001,
    ]
    ck = t["checkpoints"]
    assert ck[:10] == list(range(1, 11)) and ck[-1] == 400 and len(ck) == 68
    assert {100, 150, 200}.issubset(ck) and all(b - a <= 10 for a, b in zip(ck, ck[1:], strict=False))


def test_l2_and_imagenette_grids():
    l2 = paper("paper_l2")
    assert grid.threats(l2) == [("l2", "128")] and l2["train"]["adversary"]["norm"] == "l2"
    assert {r.regime for r in grid.runs(l2)} == {"st", "at_l2128", "trades_l2128"}
    main = paper()
    # everything but the threat is the main grid's
    for key in ("datasets", "archs", "methods", "seeds"):
        assert l2[key] == main[key]
    # ... but the threat and the authors' l_2 TRADES step 2 * 128 / 10 (l_inf: --pgd-alpha, 2)
    assert l2["train"]["trades_step"] == 25.6 and main["train"]["trades_step"] == 2
    assert {k: v for k, v in l2["train"].items() if k not in ("adversary", "trades_step")} == {
        k: v for k, v in main["train"].items() if k not in ("adversary", "trades_step")
    }
    im = paper("imagenette")
    assert im["datasets"] == ["imagenette"] and len(grid.runs(im)) == 18
    assert im["train"]["checkpoints"] == main["train"]["checkpoints"]


# --------------------------------------------------------------------------------------------- workflow runs
def _tiny(tmp: Path, **over: Any) -> Path:
    """config/paper.yaml with epochs, widths, seeds, checkpoints and image counts made tiny."""
    c = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    c["data"].update(dir="data", train_per_class=3, test_per_class=2)
    c["datasets"], c["archs"], c["seeds"] = ["cifar10"], ["vgg11bn"], [1]
    c["model"]["width"] = 0.0625
    c["train"].update(epochs=2, checkpoints=[1, 2], batch_size=30)
    c["features"]["keep"] = "final"  # the grid's [1, 100, 400] names epochs this tiny run does not have
    c["attack"]["batch_size"] = 64
    c["attack"]["threats"]["linf"]["steps"] = 2
    c["train"]["adversary"]["steps"] = 2
    c["layerwise"]["per_class"] = 3
    c["figures"]["formats"] = ["png"]
    c["runtime"] = {"device": "cpu"}
    c.update(over)
    validate_config(yaml.safe_load(yaml.safe_dump(c)))  # fail here, not inside snakemake, on a bad override
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(c))
    return path


def _snakemake(workdir: Path, config: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [
            SNAKEMAKE,
            "-s",
            str(ROOT / "workflow" / "Snakefile"),
            "--directory",
            str(workdir),
            "--configfile",
            str(config),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def _job_counts(out: str) -> dict[str, int]:
    block = out.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)\s*$", block, flags=re.M)}


def test_full_paper_grid_plans_with_no_dataset_present(tmp_path):
    """`snakemake -n` on the paper grid (all datasets, archs, methods; fewer seeds/checkpoints: fast)."""
    c = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    c["seeds"] = [1]
    c["train"]["checkpoints"] = [200, 400]
    c["features"]["keep"] = [400]
    cfg = tmp_path / "plan.yaml"
    cfg.write_text(yaml.safe_dump(c))
    assert not (tmp_path / "data").exists()
    res = _snakemake(tmp_path, cfg, "-n", "-q", "rules")
    assert res.returncode == 0, res.stderr[-3000:]
    counts = _job_counts(res.stdout + res.stderr)
    cfg_full = load_config(cfg)
    assert counts["train"] == len(grid.runs(cfg_full)) == 12
    # features.keep [400] plus the simplex figure's first dump (epoch 200): every dump kept here
    assert counts["features"] == len(grid.cells(cfg_full)) == 24 and "features_temp" not in counts
    assert counts["accuracy_table"] == 2
    for fam in FAMILIES:
        n = sum(1 for t in figure_targets(cfg_full) if f"/{fam}/" in t) // len(cfg_full["figures"]["formats"])
        if FAMILIES[fam].table not in TABLES:  # a job per figure
            assert counts.get(figure_rule(fam), 0) == n, fam
    for table in TABLES:  # one job draws every family read from an aggregated table
        if table != "layerwise" or table_rule(table) in counts:
            assert counts.get(table_rule(table), 0) == int(bool(table_families(cfg_full, table))), table


def test_missing_dataset_fails_before_any_job_starts(tmp_path):
    res = _snakemake(tmp_path, _tiny(tmp_path), "--cores", "1")
    assert res.returncode != 0
    err = res.stdout + res.stderr
    assert "cifar-10-batches-py" in err and "data_batch_1" in err and "download: true" in err, err[-3000:]
    assert str((tmp_path / "data").resolve()) in err
    assert not (tmp_path / "results").exists(), "a job ran although the dataset is missing"


@pytest.mark.slow
def test_fake_cifar10_paper_chain_draws_every_figure_and_the_report(tmp_path):
    write_cifar10(tmp_path / "data", per_batch=6, test=20)
    cfg = _tiny(tmp_path)
    res = _snakemake(tmp_path, cfg, "--cores", "2", "-q", "rules")
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    c = load_config(cfg)
    figs = figure_targets(c)
    fams = {Path(f).parent.name for f in figs}
    assert fams == set(FAMILIES) - (
        {"layerwise_nc1", "layerwise_ncc_accuracy"} - {Path(f).parent.name for f in figs}
    )
    for f in [*figs, *table_targets(c)]:
        p = tmp_path / f
        assert p.is_file() and p.stat().st_size > 0, f
        if f.endswith(".png"):
            assert p.read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / table_targets(c)[0]).read_text()
    assert table.startswith("dataset,arch,method,regime,threat,epoch,seeds,") and table.count("\n") == 4

    rep = _snakemake(tmp_path, cfg, "--report", "report.html")
    assert rep.returncode == 0, rep.stderr[-3000:]
    html = (tmp_path / "report.html").read_text()
    for f in figs:
        assert Path(f).name in html, f"{f} missing from the report"
    for fam in fams:
        title = re.search(r"\*\*(.+?)\*\*", (ROOT / "workflow" / "report" / f"{fam}.rst").read_text())[1]
        assert title in html, f"caption of {fam} missing"
    stem = parse_stem("nc_vs_epoch", Path(figs[0]).stem) if "/nc_vs_epoch/" in figs[0] else None
    assert stem is None or stem["dataset"] in html
    assert "Produced by the configuration with datasets cifar10" in html
