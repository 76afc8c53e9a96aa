"""Progress output: plain lines in log files (what Snakemake's `> {log} 2>&1` makes of stderr), bars on a
terminal, and a clear start-up error for a GPU that was asked for and is not there."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ncpipe import grid, paths, progress
from ncpipe.config import validate_config
from ncpipe.runtime import EXIT_NO_GPU

sys.path.insert(0, str(Path(__file__).parent))
from tiny_dump import WILDCARDS, tiny_config  # noqa: E402

AT_WILDCARDS = {**WILDCARDS, "regime": "at_linf64"}


def _at_config(device: str = "auto") -> dict:
    return validate_config({
        "datasets": ["mnist5k"], "archs": ["vgg11bn"], "methods": ["at"], "seeds": [1],
        "data": {"train_per_class": 3, "test_per_class": 2},
        "model": {"width": 0.0625},
        "train": {"epochs": 2, "batch_size": 10, "checkpoints": [1, 2],
                  "adversary": {"norm": "linf", "epsilon": 64, "step": 32, "steps": 1}},
        "attack": {"threats": {"linf": {"epsilons": [64], "step": 16, "steps": 1}}},
        "runtime": {"device": device},
    })


def _ncpipe(args: list[str], log: Path, env: dict | None = None) -> int:
    """Run the CLI as a rule does: stdout and stderr into one log file (not a terminal)."""
    env = {**os.environ, "NCPIPE_PROGRESS": "", **(env or {})}
    with open(log, "w") as fh:
        return subprocess.run([sys.executable, "-m", "ncpipe", *args], stdout=fh, stderr=subprocess.STDOUT,
                              env=env, timeout=300).returncode


def _train_args(tmp_path: Path, device: str = "auto") -> list[str]:
    spec = grid.train_spec(_at_config(device), AT_WILDCARDS)
    ckpts = [str(tmp_path / f"epoch{e}.pt") for e in (1, 2)]
    return ["--threads", "1", "train", "--spec", spec, "--log-csv", str(tmp_path / "train_log.csv"),
            "--resume-dir", str(tmp_path / ".resume"), *ckpts]


def test_training_log_file_has_plain_lines_device_rate_eta_and_checkpoints(tmp_path):
    log = tmp_path / "train.log"
    assert _ncpipe(_train_args(tmp_path), log) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "\r" not in text
    assert "WARNING" in text and "runtime.device: auto chose cpu" in text  # loud about the choice
    assert "device cpu (1 threads)" in text and f"torch {torch.__version__}" in text
    assert "amp off" in text and "compile False" in text
    epoch_lines = [ln for ln in text.splitlines() if " | " in ln and "epoch 2/2 " in ln and "loss=" in ln]
    assert epoch_lines, text
    # the regime, not the method, names the run; every epoch line has the rate, elapsed time and ETA
    assert "train mnist5k/vgg11bn/at_linf64/seed1 epoch 1/2" in text
    for ln in epoch_lines:
        assert "images/s" in ln and "ETA" in ln and "elapsed" in ln and "robust_acc=" in ln and "lr=" in ln
    assert text.count("checkpoint of epoch") == 2


def test_features_log_file_has_a_line_per_split_and_kind(tmp_path, tiny_dump):
    log = tmp_path / "features.log"
    spec = grid.features_spec(tiny_config(), WILDCARDS)
    rc = _ncpipe(["--threads", "1", "features", "--spec", spec, "--checkpoint", str(tiny_dump["checkpoint"]),
                  "--out", str(tmp_path / "f.h5")], log)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "\r" not in text
    assert "device cpu (1 threads)" in text
    for split in ("train", "test"):
        for kind in ("clean", "pgd", "targeted"):
            (line,) = [ln for ln in text.splitlines() if f" {split}/{kind} done" in ln]
            assert "images/s" in line and "elapsed" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_fails_at_start_with_exit_75(tmp_path):
    log = tmp_path / "train.log"
    assert _ncpipe(_train_args(tmp_path, device="cuda"), log) == EXIT_NO_GPU == 75
    text = log.read_text()
    assert "runtime.device: cuda" in text and "refusing to run on the CPU" in text
    assert "Traceback" not in text and not (tmp_path / ".resume").exists()  # before any work


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_resources_of_a_slurm_job_without_cuda_fail_at_start(tmp_path):
    args = ["--gpus", "1", *_train_args(tmp_path)]
    log = tmp_path / "train.log"
    assert _ncpipe(args, log, env={"SLURM_JOB_ID": "12345"}) == EXIT_NO_GPU
    assert "scheduled with 1 GPU(s)" in log.read_text()
    # outside a scheduler's allocation the gpu resource is a concurrency token: device auto runs on the CPU
    assert _ncpipe(args, log, env={"SLURM_JOB_ID": ""}) == 0, log.read_text()[-2000:]


def test_meter_lines_and_terminal_choice(monkeypatch, caplog):
    monkeypatch.setenv("NCPIPE_PROGRESS", "lines")
    assert not progress.on_terminal()
    monkeypatch.setenv("NCPIPE_PROGRESS", "bars")
    assert progress.on_terminal()
    with caplog.at_level(logging.INFO, logger="ncpipe.progress"):
        m = progress.Meter("job", 4, unit="epoch", bars=False, interval=0.0)
        m.update(1, 100, loss=0.5)  # interval 0: every update is a heartbeat line
        m.update(1, 100, heartbeat=False)
        m.line("epoch 2/4", loss=0.25)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("job 1/4 epoch | loss=0.5 | images/s")
    assert lines[1].startswith("job epoch 2/4 | loss=0.25 | images/s") and "ETA" in lines[1]
    assert progress.duration(5.0) == "5.0s" and progress.duration(125) == "2m05s"
    assert progress.duration(7300) == "2h01m" and progress.duration(float("nan")) == "?"


def test_the_rules_pass_their_gpu_resource():
    root = Path(__file__).resolve().parents[1] / "workflow" / "rules"
    text = "".join((root / f).read_text() for f in ("train.smk", "features.smk", "metrics.smk"))
    assert text.count("--gpus {resources.gpu}") == 3
    assert json.loads(grid.train_spec(_at_config(), AT_WILDCARDS))["runtime"]["device"] == "auto"
    assert paths.CHECKPOINT  # the spec is the workflow's own
