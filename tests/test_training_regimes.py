"""The train rule's three regimes (ncpipe.train): AT and TRADES train to completion on the CPU and are robust
on their training points where the standard-trained model is not; TRADES' BN quirk freezes BN statistics."""

from __future__ import annotations

import copy
import csv
import math

import pytest
import torch

from ncpipe import attacks
from ncpipe.checkpoint import load_checkpoint
from ncpipe.data import load_data, to_float
from ncpipe.train import run_training

# 100 train images, 12 epochs of batch 25 (48 steps); the training threat is half config.yaml's l_inf budget
# (32/255 instead of 64/255) with 3 attack steps, which this short run can learn to resist.
TINY = {
    "data": {"name": "mnist5k", "dir": "data", "train_per_class": 10, "test_per_class": 5, "download": False},
    "arch": "vgg11bn",
    "width": 0.25,
    "seed": 0,
    "optim": {"epochs": 12, "batch_size": 25, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
              "lr_milestones": [0.5, 0.75], "lr_decay": 0.1},
    "checkpoints": [12],
    "runtime": {"device": "cpu", "deterministic": True},
}
ADVERSARY = {"norm": "linf", "epsilon": 32, "step": 12, "steps": 3}


def make_spec(method: str, **over) -> dict:
    spec = copy.deepcopy(TINY)
    spec["method"] = method
    if method != "st":
        spec["adversary"] = dict(ADVERSARY)
    if method == "at":
        spec["at_attack_mode"] = "train"
    if method == "trades":
        spec["trades"] = {"beta": 6.0, "bn_quirk": False}
    for k, v in over.items():
        spec[k] = v
    return spec


def train(spec: dict, tmp_path) -> tuple[torch.nn.Module, list[dict]]:
    e = spec["optim"]["epochs"]
    out = tmp_path / spec["method"]
    run_training(spec, {e: str(out / f"epoch{e}.pt")}, str(out / "log.csv"), str(out / ".resume"))
    model, _ = load_checkpoint(out / f"epoch{e}.pt")
    with open(out / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert not (out / ".resume").exists()  # a finished run cleans its resume state
    return model, rows


def robust_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Eval-mode PGD-10 at the training threat, with a fixed seed."""
    eps = ADVERSARY["epsilon"] / 255
    xa = attacks.pgd(model, x, y, norm="linf", epsilon=eps, step=eps / 4, steps=10,
                     generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (model(xa).argmax(1) == y).float().mean().item()


@pytest.mark.slow
def test_at_and_trades_are_far_more_robust_than_st(tmp_path, trained_mnist_model):
    st_model = trained_mnist_model[0]  # ST in the same train rule (the shared fixture), on a superset of x
    data = load_data(make_spec("st"))
    x, y = to_float(data.x_train), data.y_train
    st_robust = robust_accuracy(st_model, x, y)
    assert st_robust <= 0.1
    for method in ("at", "trades"):
        model, rows = train(make_spec(method), tmp_path)
        assert [int(r["epoch"]) for r in rows] == list(range(1, 13))
        assert all(math.isfinite(float(r["loss"])) and 0 <= float(r["robust_acc"]) <= 1 for r in rows)
        with torch.no_grad():
            clean = (model(x).argmax(1) == y).float().mean().item()
        robust = robust_accuracy(model, x, y)
        assert clean >= 0.7, (method, clean)
        assert robust >= st_robust + 0.3, (method, robust, st_robust)


def test_trades_bn_quirk_freezes_bn_statistics_through_training(tmp_path):
    spec = make_spec("trades")
    spec["optim"] = {**spec["optim"], "epochs": 1}
    spec["checkpoints"] = [1]
    spec["data"] = {**spec["data"], "train_per_class": 5}
    spec["trades"] = {"beta": 6.0, "bn_quirk": True}
    quirk, _ = train(spec, tmp_path / "quirk")
    spec["trades"] = {"beta": 6.0, "bn_quirk": False}
    fixed, _ = train(spec, tmp_path / "fixed")
    bns = [n for n, m in quirk.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    q, f = dict(quirk.named_modules()), dict(fixed.named_modules())
    for n in bns:
        # the authors' TRADES never updates BN statistics: they stay at their initial mean 0 / var 1
        assert torch.equal(q[n].running_mean, torch.zeros_like(q[n].running_mean))
        assert torch.equal(q[n].running_var, torch.ones_like(q[n].running_var))
        assert int(q[n].num_batches_tracked) == 0
        # the default (correct) TRADES does update them
        assert int(f[n].num_batches_tracked) > 0
        assert not torch.equal(f[n].running_mean, torch.zeros_like(f[n].running_mean))
