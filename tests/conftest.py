"""Shared pytest fixtures.

Add fixtures with small, targeted edits: several engineers share this file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ncpipe.checkpoint import load_checkpoint
from ncpipe.data import load_data, to_float
from ncpipe.train import run_training

# A standard-trained default-architecture model on the embedded MNIST subset: 500 train images, 6 epochs of
# batch 50 (60 SGD steps), ~1 s per epoch on one thread; it reaches ~99 % train / ~95 % test accuracy.
TRAINED_MNIST_SPEC = {
    "data": {"name": "mnist5k", "dir": "data", "train_per_class": 50, "test_per_class": 10,
             "download": False},
    "arch": "vgg11bn",
    "width": 0.25,
    "method": "st",
    "seed": 0,
    "optim": {"epochs": 6, "batch_size": 50, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
              "lr_milestones": [0.5, 0.75], "lr_decay": 0.1},
    "checkpoints": [6],
    "runtime": {"device": "cpu", "deterministic": True},
}


@pytest.fixture(scope="session")
def trained_mnist_model(tmp_path_factory: pytest.TempPathFactory
                        ) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, int]:
    """(model, x_train in [0, 1] float32 (500, 1, 28, 28), y_train (500,), num_classes) of a trained ST model.

    Trained once per session by the pipeline's own ``run_training``; the model is on the CPU in eval mode.
    Tests must not modify it in place (attacks restore the modes they change).
    """
    d = tmp_path_factory.mktemp("trained_mnist")
    epochs = TRAINED_MNIST_SPEC["optim"]["epochs"]
    ckpt = d / f"epoch{epochs}.pt"
    run_training(TRAINED_MNIST_SPEC, {epochs: str(ckpt)}, str(d / "train_log.csv"), str(d / ".resume"))
    model, payload = load_checkpoint(ckpt)
    # the checkpoint carries the spec, so the data come back exactly as the model was trained on them
    data = load_data(payload["spec"])
    return model.eval(), to_float(data.x_train), data.y_train, int(payload["meta"]["num_classes"])


@pytest.fixture(scope="session")
def tiny_dump(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"checkpoint": Path, "dump": Path}``: a real feature dump written by ``extract_features`` from a tiny
    untrained VGG (tests/tiny_dump.py: 30 train / 20 test MNIST digits, every perturbation kind, D = 32).

    Shared by the whole session: copy the files before modifying them.
    """
    from tiny_dump import make_checkpoint, make_dump

    root = tmp_path_factory.mktemp("tiny_dump")
    ckpt = make_checkpoint(root)
    return {"checkpoint": ckpt, "dump": make_dump(root, ckpt)}


@pytest.fixture(scope="session")
def tiny_layerwise(tmp_path_factory: pytest.TempPathFactory, tiny_dump: dict[str, Path]) -> Path:
    """A real layerwise file written by ``run_layerwise`` from ``tiny_dump``'s checkpoint (every probe of the
    tiny VGG, clean and PGD, 2 train samples per class pooled to 2 x 2). Shared: copy before modifying."""
    from tiny_dump import make_layerwise

    return make_layerwise(tmp_path_factory.mktemp("tiny_layerwise"), tiny_dump["checkpoint"])


@pytest.fixture
def torch_global_state():
    """One torch thread (as the `--threads 1` subprocesses use) and, afterwards, the global switches that
    training flips (deterministic algorithms) restored, so a test cannot leak them into the next."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det, warn_only=warn)
