"""The speed switches (runtime.amp, runtime.channels_last) are safe: on the CPU they fall back to the exact
baseline computation, so the fast path's results equal the baseline's bit for bit."""

from __future__ import annotations

import copy

import torch

from ncpipe.checkpoint import load_checkpoint
from ncpipe.runtime import runtime_setup
from ncpipe.train import run_training

SPEC = {
    "data": {"name": "mnist5k", "dir": "data", "train_per_class": 8, "test_per_class": 4, "download": False},
    "arch": "vgg11bn",
    "width": 0.0625,
    "method": "at",
    "seed": 3,
    "optim": {"epochs": 2, "batch_size": 20, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
              "lr_milestones": [0.5], "lr_decay": 0.1},
    "checkpoints": [2],
    "adversary": {"norm": "linf", "epsilon": 32, "step": 8, "steps": 2},
    "at_attack_mode": "train",
    "runtime": {"device": "cpu", "deterministic": True, "amp": False, "channels_last": False},
}


def _train(spec: dict, root) -> dict[str, torch.Tensor]:
    ckpt = root / "epoch2.pt"
    run_training(spec, {2: str(ckpt)}, str(root / "log.csv"), str(root / ".resume"))
    return load_checkpoint(ckpt)[0].state_dict()


def test_switches_fall_back_cleanly_on_cpu(tmp_path):
    device, amp = runtime_setup({"device": "cpu", "amp": True, "channels_last": True})
    assert device.type == "cpu" and amp is None  # bf16 autocast is a GPU-only speed-up


def test_fast_path_switches_give_identical_results_on_cpu(tmp_path):
    fast = copy.deepcopy(SPEC)
    fast["runtime"].update(amp=True, channels_last=True)
    (tmp_path / "base").mkdir()
    (tmp_path / "fast").mkdir()
    base_w, fast_w = _train(SPEC, tmp_path / "base"), _train(fast, tmp_path / "fast")
    assert base_w.keys() == fast_w.keys()
    for k in base_w:
        assert torch.equal(base_w[k], fast_w[k]), k
