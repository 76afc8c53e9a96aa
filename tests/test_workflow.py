"""End to end: the miniature config (.test/config/config.yaml) through the whole workflow in a temporary
directory.

It has every training method and every perturbation kind, so one run exercises every rule and figure family.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pandas as pd
import pytest
import yaml

from ncpipe import grid, paths
from ncpipe.config import validate_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
MINI = REPO / ".test" / "config" / "config.yaml"
SNAKEMAKE = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or "snakemake"


def run_snakemake(workdir: Path, *args: str, config: Path = MINI, check: bool = True
                  ) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [SNAKEMAKE, "--snakefile", str(SNAKEFILE), "--directory", str(workdir), "--configfile", str(config),
           *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    if check:
        assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    return res


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mini_run")
    run_snakemake(root, "--cores", "2")
    return root


def mini_config() -> dict:
    return validate_config(yaml.safe_load(MINI.read_text()))


def test_outputs_of_every_stage(mini_run: Path):
    config = mini_config()
    cells = grid.cells(config)
    runs = grid.runs(config)
    for p in grid.expand(paths.CHECKPOINT.replace("{epoch}", str(grid.final_epoch(config))), runs):
        assert (mini_run / p).is_file(), p
    dumps = grid.expand(paths.FEATURES, cells)
    assert len(dumps) == len(runs) * len(config["train"]["checkpoints"])  # one HDF5 per checkpoint and threat
    for p in dumps:
        with h5py.File(mini_run / p, "r") as f:
            assert f.attrs["complete"]
            for split in config["attack"]["splits"]:
                for kind in config["attack"]["kinds"]:
                    # the examples AT/TRADES trained on: train split of robust runs (the threats match here)
                    if kind == "train_adv" and (split != "train" or f.attrs["method"] == "st"):
                        assert kind not in f[split]
                        continue
                    feats = f[f"{split}/{kind}/features"]
                    assert feats.dtype == "float32" and feats.shape[0] == f[f"{split}/{kind}/labels"].shape[0]
            assert len(f.attrs["checkpoint_sha256"]) == 64
    table = pd.read_csv(mini_run / paths.ALL_METRICS)
    expected = ["dataset", "arch", "method", "norm", "epsilon", "seed", "epoch", "split", "perturbation",
                "metric", "value"]
    assert set(expected) <= set(table.columns)
    assert set(table["method"]) == set(config["methods"])
    assert set(table["perturbation"]) == set(config["attack"]["kinds"])
    assert {"nc1", "nc1_over_c", "nc2_equinorm_means", "nc2_equiangular_means", "nc3", "nc4",
            "accuracy"} <= set(table["metric"])
    figures = list((mini_run / paths.FIGURE_DIR).rglob("*.png"))
    assert figures and all(f.stat().st_size > 5000 for f in figures)
    assert list((mini_run / "logs").rglob("*.log")), "every rule writes a log under logs/"


def test_second_run_does_nothing(mini_run: Path):
    res = run_snakemake(mini_run, "-n")
    assert "Nothing to be done" in res.stdout + res.stderr


def test_dry_run_lists_the_chain(tmp_path: Path):
    out = run_snakemake(tmp_path, "-n").stdout
    for rule in ("train", "features", "metrics", "aggregate"):
        assert f"rule {rule}:" in out or f"localrule {rule}:" in out, rule
    assert "rule figure_" in out or "rule figures:" in out


def test_changing_epsilon_does_not_retrain(mini_run: Path, tmp_path: Path):
    config = yaml.safe_load(MINI.read_text())
    config["attack"]["threats"]["linf"]["epsilons"] = [32]
    changed = tmp_path / "eps32.yaml"
    changed.write_text(yaml.safe_dump(config))
    out = run_snakemake(mini_run, "-n", config=changed).stdout
    assert "rule features:" in out and "rule metrics:" in out
    assert "rule train:" not in out


def test_lint_is_clean(tmp_path: Path):
    res = run_snakemake(tmp_path, "--lint", check=False)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
