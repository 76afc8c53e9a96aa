"""The autoattack perturbation kind: torchattacks' ensemble behind ncpipe's kind registry and dumps."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from ncpipe import attacks, grid
from ncpipe.evaluate import evaluate_dump
from ncpipe.io import attrs_dict, open_dump
from ncpipe.tables import accuracy_table

# cheap enough for a test (seconds), strong enough to beat 10-step PGD: AutoAttack's two APGD attacks
CHEAP = {"version": "custom", "attacks": ["apgd-ce", "apgd-t"], "steps": 10}


def _first_per_class(y: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([torch.nonzero(y == c).reshape(-1)[:n] for c in torch.unique(y)])


def test_autoattack_is_no_weaker_than_pgd(trained_mnist_model):
    model, x, y, c = trained_mnist_model
    idx = _first_per_class(y, 2)
    x, y = x[idx], y[idx]
    eps = 12 / 255  # where 10-step PGD leaves a good part of the ST model's accuracy (not 0 == 0)
    pgd = attacks.perturb("pgd", model, x, y, norm="linf", epsilon=eps, step=3 / 255, steps=10,
                          generator=torch.Generator().manual_seed(0))
    rng = torch.get_rng_state()
    aa = attacks.perturb("autoattack", model, x, y, norm="linf", epsilon=eps, options=CHEAP, num_classes=c)
    assert torch.equal(torch.get_rng_state(), rng)  # the attacks reseed the global RNG; it is restored
    assert not model.training
    with torch.no_grad():
        clean_acc = (model(x).argmax(1) == y).float().mean().item()
        pgd_acc = (model(pgd).argmax(1) == y).float().mean().item()
        aa_acc = (model(aa).argmax(1) == y).float().mean().item()
    assert pgd_acc > 0.2, pgd_acc  # the comparison below is not the trivial 0 <= 0
    assert aa_acc <= pgd_acc < clean_acc, (aa_acc, pgd_acc, clean_acc)
    assert float((aa - x).abs().max()) <= eps and float(aa.min()) >= 0 and float(aa.max()) <= 1
    # l_2: inside the ball exactly too
    aa2 = attacks.perturb("autoattack", model, x[:10], y[:10], norm="l2", epsilon=1.0,
                          options={"version": "custom", "attacks": ["apgd-ce"], "steps": 5})
    assert float((aa2 - x[:10]).flatten(1).norm(dim=1).max()) <= 1.0


def test_autoattack_options_are_checked_and_recorded():
    p = attacks.kind_params("autoattack", norm="linf", epsilon=8 / 255)
    assert p["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"] and p["steps"] == 100
    assert p["implementation"].startswith("torchattacks 3.5")
    with pytest.raises(ValueError, match="custom.*non-empty"):
        attacks.autoattack_sequence({"version": "custom"})
    with pytest.raises(ValueError, match="unknown autoattack version"):
        attacks.autoattack_sequence({"version": "strong"})


def _config(kinds: list[str]) -> dict:
    from tiny_dump import tiny_config

    cfg = tiny_config()
    cfg["attack"]["kinds"] = kinds
    cfg["attack"]["autoattack"].update(version="custom", attacks=["apgd-ce", "fab-t", "square"], steps=3,
                                       square_queries=20, per_class=1)
    return cfg


def test_autoattack_features_metrics_and_table(tiny_dump, tmp_path):
    from tiny_dump import WILDCARDS

    from ncpipe.extract import extract_features

    cfg = _config(["clean", "pgd", "autoattack"])
    # final_only: the first checkpoint's spec has no autoattack, the final one's has it
    assert "autoattack" not in grid.features_spec_of(cfg, {**WILDCARDS, "epoch": 0}).kinds
    spec = grid.features_spec_of(cfg, {**WILDCARDS, "epoch": 1})
    assert "autoattack" in spec.kinds and spec.autoattack.per_class == 1
    plain_spec = json.loads(grid.features_spec(_config(["clean", "pgd"]), {**WILDCARDS, "epoch": 1}))
    assert "autoattack" not in plain_spec and "external" not in plain_spec  # other jobs keep their params
    out = tmp_path / "aa.h5"
    extract_features(spec, str(tiny_dump["checkpoint"]), str(out))
    with open_dump(out) as f:
        assert "autoattack" not in f["train"] and "autoattack" in f["test"]  # splits: [test]
        g = f["test/autoattack"]
        at = attrs_dict(g)
        assert at["num_samples"] == 10 and json.loads(at["attacks"]) == ["apgd-ce", "fab-t", "square"]
        idx = g["indices"][:]
        assert np.array_equal(g["labels"][:], f["test/clean/labels"][:][idx])
        clean_pred = f["test/clean/predictions"][:][idx]
        # a point the model misclassifies clean is left as it is; a fooled point stays fooled
        wrong = clean_pred != g["labels"][:]
        assert np.all(g["predictions"][:][wrong] != g["labels"][:][wrong])
    from ncpipe.io import to_xarray

    ds = to_xarray(out, split="test")  # the subset's rows at their places, NaN elsewhere
    aa_feats = ds["features"].sel(perturbation="autoattack").values
    assert np.isfinite(aa_feats[idx]).all() and np.isnan(np.delete(aa_feats, idx, axis=0)).all()
    df = evaluate_dump(out, regime="st")
    aa = df[df["perturbation"] == "autoattack"]
    assert {"nc1", "accuracy", "ncc_train_means_accuracy"} <= set(aa["metric"])
    assert any(m.startswith("align_") for m in aa["metric"])
    # per_class 1: PGD is also measured on AutoAttack's 10 images (a plain argmax of W h + b there)
    with open_dump(out) as f:
        h = f["test/pgd/features"][:][idx].astype(np.float64)
        logits = h @ f["classifier/weight"][:].astype(np.float64).T + f["classifier/bias"][:]
        pgd_right = logits.argmax(1) == f["test/pgd/labels"][:][idx]
    sub = df[(df["perturbation"] == "pgd") & (df["metric"] == "accuracy_autoattack_images")]
    assert sub["split"].tolist() == ["test"] and sub["value"].iloc[0] == pytest.approx(pgd_right.mean())
    table = accuracy_table(df, "mnist5k", "linf", "64")
    assert "test_autoattack_mean" in table.columns and np.isfinite(table["test_autoattack_mean"]).all()
    assert np.isfinite(table["test_pgd_autoattack_images_mean"]).all()
    plain = accuracy_table(df[df["perturbation"] != "autoattack"], "mnist5k", "linf", "64")
    assert "test_autoattack_mean" not in plain.columns
    assert isinstance(table, pd.DataFrame)
