"""A realistic feature dump, made by the real extraction code from a tiny untrained model (seconds on CPU).

Used by tests/test_io.py and tests/test_inspect.py: 3 train and 2 test MNIST digits per class, a 1/16-width
VGG11-BN (32 penultimate features), every perturbation kind, a 1-step PGD.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ncpipe import grid, paths
from ncpipe.checkpoint import checkpoint_payload, save_atomic
from ncpipe.config import validate_config
from ncpipe.data import load_data
from ncpipe.extract import extract_features
from ncpipe.train import model_from_data
from ncpipe.utils import seed_everything

TRAIN_PER_CLASS, TEST_PER_CLASS, NUM_CLASSES, FEATURE_DIM = 3, 2, 10, 32
KINDS = ["clean", "pgd", "targeted", "gaussian", "sign"]
WILDCARDS = {"dataset": "mnist5k", "arch": "vgg11bn", "regime": "st", "seed": 1, "epoch": 0, "norm": "linf",
             "eps": "64"}


def tiny_config(dtype: str = "float32") -> dict[str, Any]:
    return validate_config({
        "datasets": ["mnist5k"], "archs": ["vgg11bn"], "methods": ["st"], "seeds": [1],
        "data": {"train_per_class": TRAIN_PER_CLASS, "test_per_class": TEST_PER_CLASS},
        "model": {"width": 0.0625},
        "train": {"epochs": 1, "checkpoints": [0, 1]},
        "attack": {"threats": {"linf": {"epsilons": [64], "step": 16, "steps": 1}}, "batch_size": 64,
                   "kinds": KINDS},
        "features": {"dtype": dtype},
        "runtime": {"device": "cpu"},
    })


def make_checkpoint(root: Path, seed: int = 1) -> Path:
    """An untrained (freshly initialised, seeded) checkpoint at the workflow's own path under ``root``."""
    config = tiny_config()
    spec = json.loads(grid.train_spec(config, WILDCARDS))
    seed_everything(seed)
    data = load_data(spec)
    model = model_from_data(spec, data)
    ckpt = root / paths.format_path(paths.CHECKPOINT, **WILDCARDS)
    save_atomic(checkpoint_payload(model, spec, data, 0), ckpt)
    return ckpt


def make_dump(root: Path, ckpt: Path, dtype: str = "float32") -> Path:
    config = tiny_config(dtype)
    out = root / paths.format_path(paths.FEATURES, **WILDCARDS)
    if dtype != "float32":
        out = out.with_name(out.stem + f"_{dtype}.h5")
    extract_features(json.loads(grid.features_spec(config, WILDCARDS)), str(ckpt), str(out))
    return out


def make_layerwise(root: Path, ckpt: Path) -> Path:
    """A layerwise file of ``ckpt`` (2 samples per class, pooled to 2 x 2) at the workflow's own path."""
    from ncpipe.layerwise import run_layerwise

    spec = json.loads(grid.layerwise_spec(tiny_config(), WILDCARDS))
    spec["layerwise"].update(per_class=2, pool=2)
    out = root / paths.format_path(paths.LAYERWISE_H5, **WILDCARDS)
    run_layerwise(spec, str(ckpt), str(out.with_suffix(".csv")), str(out))
    return out
