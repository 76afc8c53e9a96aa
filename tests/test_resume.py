"""Resumable training: a run killed at any moment and started again ends with an uninterrupted run's weights.

Every run here is tiny (100 MNIST digits, a 0.1-width VGG, a few epochs of 4 batches) so that a whole training
takes well under a second; the subprocess test pays mostly for importing torch.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import ncpipe.train
from ncpipe import grid
from ncpipe.checkpoint import load_checkpoint
from ncpipe.config import validate_config
from ncpipe.stages import code_digest
from ncpipe.train import run_training

EPOCHS = 6
CHECKPOINTS = [0, 2, EPOCHS]


def make_spec(epochs: int = EPOCHS, checkpoints: list[int] | None = None, **train: Any) -> dict[str, Any]:
    cfg = validate_config({
        "datasets": ["mnist5k"], "archs": ["vgg11bn"], "methods": ["st"], "seeds": [3],
        "data": {"train_per_class": 10, "test_per_class": 2}, "model": {"width": 0.1},
        "train": {"epochs": epochs, "checkpoints": checkpoints or CHECKPOINTS, "batch_size": 25, "lr": 0.05,
                  "lr_milestones": [0.5], **train},
        "runtime": {"device": "cpu", "deterministic": True},
    })
    wildcards = {"dataset": "mnist5k", "arch": "vgg11bn", "regime": "st", "seed": 3}
    return json.loads(grid.train_spec(cfg, wildcards))


def outputs(root: Path, spec: dict[str, Any]) -> dict[int, str]:
    return {e: str(root / f"epoch{e}.pt") for e in spec["checkpoints"]}


@pytest.fixture(scope="module", autouse=True)
def _cached_data():
    """Parse the MNIST csv once per module rather than once per training run (training never mutates it)."""
    cache: dict[str, Any] = {}

    def cached(spec: Any) -> Any:
        key = spec.data.to_json()  # run_training passes its typed TrainSpec
        if key not in cache:
            cache[key] = original(spec)
        return cache[key]

    original = ncpipe.train.load_data
    ncpipe.train.load_data = cached
    yield
    ncpipe.train.load_data = original


@pytest.fixture(autouse=True)
def _one_thread_and_restore(torch_global_state):
    """Every test here runs under conftest's torch_global_state."""


def train(root: Path, spec: dict[str, Any], **kw: Any) -> dict[int, str]:
    outs = outputs(root, spec)
    run_training(spec, outs, str(root / "log.csv"), str(root / ".resume"), **kw)
    return outs


def assert_same_weights(a: str, b: str) -> None:
    sa = torch.load(a, map_location="cpu", weights_only=False)["model"]
    sb = torch.load(b, map_location="cpu", weights_only=False)["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs between {a} and {b}"


def log_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[int, str]]:
    """One uninterrupted run, shared by every comparison in this module."""
    root = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outs = train(root, make_spec())
    finally:
        torch.set_num_threads(threads)
    return root, outs


def assert_matches_reference(root: Path, outs: dict[int, str],
                             reference: tuple[Path, dict[int, str]]) -> None:
    ref_root, ref = reference
    for e in CHECKPOINTS:
        assert_same_weights(outs[e], ref[e])
    assert log_rows(root / "log.csv") == log_rows(ref_root / "log.csv")
    assert not (root / ".resume").exists(), "a finished run must remove its resume state"


def test_weights_really_change(reference):
    """Guards the comparisons below against being vacuous: training moves the weights."""
    a = torch.load(reference[1][0], weights_only=False)["model"]
    b = torch.load(reference[1][EPOCHS], weights_only=False)["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_sigkill_mid_run_then_rerun_is_bit_identical(tmp_path, reference, caplog):
    spec = make_spec()
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    outs = outputs(tmp_path, spec)
    cmd = [sys.executable, "-m", "ncpipe", "--threads", "1", "train", "--spec", f"@{spec_file}",
           "--log-csv", str(tmp_path / "log.csv"), "--resume-dir", str(tmp_path / ".resume"),
           *(outs[e] for e in spec["checkpoints"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = tmp_path / ".resume" / "state.pt"
    deadline = time.monotonic() + 120
    try:
        while not state.exists():
            assert proc.poll() is None, f"training ended without a state: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no epoch state appeared within 120 s"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    saved = torch.load(state, weights_only=False)["epoch"]
    assert 1 <= saved < EPOCHS, f"the kill came too late to test anything (state at epoch {saved})"
    assert not any(Path(p).exists() for p in outs.values()), "nothing may be published by a killed run"
    assert not (tmp_path / "log.csv").exists()

    with caplog.at_level(logging.INFO, logger="ncpipe.train"):
        train(tmp_path, spec, code_digest=code_digest("train"))  # the code `ncpipe train` keys its state by
    assert f"from the end of epoch {saved}" in caplog.text
    assert_matches_reference(tmp_path, outs, reference)


@pytest.mark.parametrize("stop", [EPOCHS - 1])
def test_interrupt_at_epoch_boundary(tmp_path, reference, stop):
    spec = make_spec()
    train(tmp_path, spec, stop_after_epoch=stop)
    assert (tmp_path / ".resume" / "state.pt").exists()
    assert not (tmp_path / "log.csv").exists()
    outs = train(tmp_path, spec)
    assert_matches_reference(tmp_path, outs, reference)


def test_killed_between_checkpoint_and_state_write(tmp_path, reference):
    """Epoch 2's checkpoint is written but the state still says epoch 1: the rerun redoes epoch 2 the same."""
    spec = make_spec()
    resume = tmp_path / ".resume"
    train(tmp_path, spec, stop_after_epoch=1)
    shutil.copy(resume / "state.pt", tmp_path / "state_epoch1.pt")
    train(tmp_path, spec, stop_after_epoch=2)
    assert (resume / "checkpoints" / "epoch2.pt").exists()
    shutil.copy(tmp_path / "state_epoch1.pt", resume / "state.pt")
    # a write that was cut short by the kill leaves its temporary file behind
    (resume / ".state.pt.tmp-99999").write_bytes(b"partial")
    outs = train(tmp_path, spec)
    assert_matches_reference(tmp_path, outs, reference)


def test_config_change_invalidates_resume_state(tmp_path, caplog):
    """A state made with another learning rate must not be continued: the run starts again from scratch."""
    train(tmp_path, make_spec(lr=0.2), stop_after_epoch=3)
    with caplog.at_level(logging.WARNING, logger="ncpipe.train"):
        outs = train(tmp_path, make_spec())
    assert "another configuration" in caplog.text
    fresh = tmp_path / "fresh"
    ref = train(fresh, make_spec())
    for e in CHECKPOINTS:
        assert_same_weights(outs[e], ref[e])
    assert torch.load(outs[EPOCHS], weights_only=False)["spec"]["optim"]["lr"] == 0.05


@pytest.mark.parametrize("damage", ["truncated_state", "flipped_state_bytes", "missing_checkpoint"])
def test_damaged_resume_state_restarts_from_scratch(tmp_path, reference, caplog, damage):
    spec = make_spec()
    resume = tmp_path / ".resume"
    train(tmp_path, spec, stop_after_epoch=3)
    data = (resume / "state.pt").read_bytes()
    if damage == "truncated_state":
        (resume / "state.pt").write_bytes(data[: len(data) // 2])
    elif damage == "flipped_state_bytes":  # torch.load accepts it; only the stored digest notices
        w = torch.load(resume / "state.pt", weights_only=False)["model"]["linear.weight"].numpy().tobytes()
        at = data.find(w)
        assert at > 0
        (resume / "state.pt").write_bytes(data[:at] + b"\x7f" * 8 + data[at + 8:])
    else:
        (resume / "checkpoints" / "epoch2.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="ncpipe.train"):
        outs = train(tmp_path, spec)
    assert "training from scratch" in caplog.text
    assert_matches_reference(tmp_path, outs, reference)


def test_published_checkpoint_loads(reference):
    model, ckpt = load_checkpoint(reference[1][EPOCHS])
    assert ckpt["epoch"] == EPOCHS and ckpt["meta"]["dataset"] == "mnist5k"
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
