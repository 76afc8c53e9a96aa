"""Synthetic tidy tables with the exact columns of results/metrics.csv, layerwise.csv and train_logs.csv.

Values follow the paper's qualitative claims (ST: perturbed data do not collapse; AT: both collapse and
align), so drawn figures can be looked at; they are fabricated inputs for the plotting code, never results.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ncpipe import evaluate, layerwise

# The real tables' own column lists, so the synthetic tables cannot drift from them.
METRICS_COLUMNS = evaluate.COLUMNS
LAYERWISE_COLUMNS = layerwise.COLUMNS

ALIGN = [
    "align_angle_centred",
    "align_dist_centred",
    "align_angle_uncentred",
    "align_dist_uncentred",
    "align_global_mean_angle",
    "align_global_mean_dist",
]


def _nc_values(collapse: float, rng: np.random.Generator) -> dict[str, float]:
    """collapse in [0, 1]: 1 = fully collapsed."""
    noise = 1 + 0.05 * rng.standard_normal()
    return {
        "accuracy": 0.1 + 0.9 * collapse,
        "nc1": 10 ** (1 - 3 * collapse) * noise,
        "nc1_over_c": 10 ** (-3 * collapse) * noise,
        "nc2_equinorm_means": 0.4 * (1 - collapse) * noise,
        "nc2_equiangular_means": 0.12 * (1 - 0.8 * collapse) * noise,
        "nc3": 1.5 * (1 - collapse) * noise,
        "nc4": 0.5 * (1 - collapse) * noise,
        "ncc_accuracy": 0.1 + 0.9 * collapse,
    }


def metrics_frame(
    datasets=("cifar10",),
    archs=("vgg11bn",),
    regimes=("st", "at_linf8", "trades_linf8"),
    seeds=(1, 2, 3),
    epochs=(1, 5, 10, 20, 40),
    threat=("linf", 8.0),
) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    last = max(epochs)
    for d in datasets:
        for a in archs:
            for regime in regimes:
                method = regime.split("_")[0]
                robust = method != "st"
                for s in seeds:
                    for e in epochs:
                        t = e / last
                        ident = {
                            "dataset": d,
                            "arch": a,
                            "method": method,
                            "norm": threat[0],
                            "epsilon": threat[1],
                            "seed": s,
                            "epoch": e,
                            "regime": regime,
                        }
                        for split in ("train", "test"):
                            gen = 1.0 if split == "train" else 0.8
                            level = {
                                "clean": t * gen,
                                "gaussian": 0.95 * t * gen,
                                "sign": 0.93 * t * gen,
                                "pgd": (0.8 * t if robust else 0.05) * gen,
                                "targeted": (0.7 * t if robust else 0.02) * gen,
                            }
                            if robust and split == "train":  # recorded by AT/TRADES training: train split
                                level["train_adv"] = 0.85 * t
                            for kind, lvl in level.items():
                                groups = (
                                    ["true"]
                                    + (["target"] if kind == "targeted" else [])
                                    + (["predicted"] if kind != "clean" else [])
                                )
                                for g in groups:
                                    c = t if g in ("target", "predicted") and not robust else lvl
                                    for k, v in _nc_values(c, rng).items():
                                        rows.append(
                                            {
                                                **ident,
                                                "split": split,
                                                "perturbation": kind,
                                                "grouping": g,
                                                "metric": k,
                                                "value": v,
                                            }
                                        )
                                    if kind != "clean":
                                        ang = (
                                            (0.1 if robust else 1.2) * (1.2 - t)
                                            if g == "true"
                                            else 0.2 * (1 - t)
                                        )
                                        for k in ALIGN:
                                            v = ang * (1 + 0.1 * rng.standard_normal())
                                            rows.append(
                                                {
                                                    **ident,
                                                    "split": split,
                                                    "perturbation": kind,
                                                    "grouping": g,
                                                    "metric": k,
                                                    "value": abs(v),
                                                }
                                            )
                                rows.append(
                                    {
                                        **ident,
                                        "split": split,
                                        "perturbation": kind,
                                        "grouping": "true",
                                        "metric": "ncc_train_means_accuracy",
                                        "value": min(1.0, lvl + 0.02 * rng.standard_normal() ** 2),
                                    }
                                )
    return pd.DataFrame(rows, columns=METRICS_COLUMNS)


def layerwise_frame(
    dataset="cifar10",
    arch="vgg11bn",
    regimes=("st", "at_linf8", "trades_linf8"),
    seeds=(1, 2, 3),
    epoch=40,
    layers=8,
    threat=("linf", 8.0),
) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for regime in regimes:
        robust = not regime.startswith("st")
        for s in seeds:
            for li in range(layers):
                depth = li / (layers - 1)
                for kind in ("clean", "pgd"):
                    fall = depth**3 if kind == "pgd" and not robust else 0.0
                    vals = {
                        "nc1": 10 ** (1.5 - 2.5 * depth + 3 * fall) * (1 + 0.1 * rng.standard_normal()),
                        "nc1_over_c": 10 ** (0.5 - 2.5 * depth + 3 * fall),
                        "ncc_accuracy_clean_means": (0.4 + 0.6 * depth) * (1 - 0.95 * fall),
                        "ncc_accuracy_own_means": 0.4 + 0.6 * depth,
                    }
                    for k, v in vals.items():
                        rows.append(
                            {
                                "dataset": dataset,
                                "arch": arch,
                                "method": regime.split("_")[0],
                                "regime": regime,
                                "norm": threat[0],
                                "epsilon": threat[1],
                                "seed": s,
                                "epoch": epoch,
                                "split": "train",
                                "perturbation": kind,
                                "layer": f"block{li}",
                                "layer_index": li,
                                "metric": k,
                                "value": v,
                            }
                        )
    return pd.DataFrame(rows, columns=LAYERWISE_COLUMNS)


def train_logs_frame(dataset="cifar10", arch="vgg11bn", regimes=("st", "at_linf8"), seeds=(1, 2), epochs=40):
    rng = np.random.default_rng(2)
    rows = []
    for regime in regimes:
        robust = not regime.startswith("st")
        for s in seeds:
            for e in range(1, epochs + 1):
                t = e / epochs
                rows.append(
                    {
                        "dataset": dataset,
                        "arch": arch,
                        "regime": regime,
                        "method": regime.split("_")[0],
                        "seed": s,
                        "epoch": e,
                        "lr": 0.1 * 0.1 ** ((t > 0.25) + (t > 0.375)),
                        "loss": 2.3 * (1 - t) + 0.01 + 0.02 * rng.random(),
                        "train_acc": 0.1 + 0.9 * t,
                        "robust_loss": 2.3 * (1 - 0.5 * t) if robust else np.nan,
                        "robust_acc": 0.1 + 0.5 * t if robust else np.nan,
                        "test_acc": 0.1 + 0.7 * t,
                        "seconds": 1.0,
                    }
                )
    return pd.DataFrame(rows)
