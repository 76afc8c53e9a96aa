"""The metrics stage: one HDF5 dump in, one tidy long table out.

Every number comes from ``ncpipe.metrics``.  The stage builds its table without pandas (``utils.Table``,
written by ``utils.write_csv_verified``): importing pandas was a third of each metrics job.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from . import leap, metrics
from .io import SPLITS, DumpError, NotSupportedError, attrs_dict, is_layerwise, open_dump
from .utils import Table, UsageError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

log = logging.getLogger("ncpipe.evaluate")

# The metrics table (``paths.METRICS``; concatenated into ``paths.ALL_METRICS`` by ``ncpipe.tidy``, whose
# METRICS_KEYS are the ID columns, grouping and metric)
ID_COLUMNS = ["dataset", "arch", "method", "norm", "epsilon", "seed", "epoch", "split", "perturbation"]
COLUMNS = [*ID_COLUMNS, "grouping", "metric", "value", "regime"]
# AutoAttack on a fixed subset (``attack.autoattack.per_class`` > 0) is compared with the other kinds on the
# same images, not on the whole split: these kinds' accuracies are also measured on the autoattack group's
# ``indices`` (``metrics.on_autoattack_images`` names them; perturbation names the kind they measure).
SUBSET_KINDS = ("clean", "pgd")


def _rows(ident: dict[str, Any], split: str, kind: str, grouping: str, values: dict[str, Any]) -> list[dict]:
    return [
        {**ident, "split": split, "perturbation": kind, "grouping": grouping, "metric": k, "value": float(v)}
        for k, v in values.items()
        if np.ndim(v) == 0
    ]


def _nc(features: np.ndarray, labels: np.ndarray, w: np.ndarray, b: np.ndarray, c: int,
        pinv_cutoff: str) -> dict[str, float]:
    try:
        return metrics.neural_collapse(features, labels, weight=w, bias=b, num_classes=c,
                                       pinv_cutoff=pinv_cutoff)
    except ValueError as err:  # e.g. a grouping by predictions in which fewer than two classes occur
        log.warning("neural collapse not defined here: %s", err)
        return {}


def _align(clean_means: np.ndarray, other_means: np.ndarray) -> dict[str, float]:
    res = metrics.simplex_alignment(clean_means, other_means)
    return {f"align_{k}": v for k, v in res.items() if np.ndim(v) == 0}


def _means(features: np.ndarray, labels: np.ndarray, c: int) -> np.ndarray:
    return metrics.class_means(features, labels, c)[0]


def _leap(features: np.ndarray, labels: np.ndarray, targets: np.ndarray | None,
          train_clean_means: np.ndarray) -> dict[str, float]:
    """Where perturbed points land (nearest clean train mean): own class / the attack's target / elsewhere."""
    return leap.leap_shares(labels, leap.landing_classes(features, train_clean_means), targets)


def _subset_rows(split: str, data: dict[tuple[str, str], dict[str, np.ndarray]]) -> np.ndarray | None:
    """The rows of ``split`` that its autoattack group covers (None: no group, or one of the whole split)."""
    aa = data.get((split, "autoattack"))
    if aa is None or "indices" not in aa:
        return None
    idx = aa["indices"].astype(np.int64)
    for kind in SUBSET_KINDS:
        d = data.get((split, kind))
        if d is None:
            continue
        n = len(d["labels"])
        # the subset must be rows of this split, in the same image order (docs/hdf5-format.md, row alignment)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise DumpError(f"{split}/autoattack/indices point outside {split}/{kind}, which has {n} rows")
        if not np.array_equal(d["labels"][idx], aa["labels"]):
            raise DumpError(f"{split}/autoattack/labels differ from {split}/{kind}/labels at its indices: "
                            "the subset is not rows of this split")
    return idx


def evaluate_dump(path: str | os.PathLike, regime: str | None = None,
                  pinv_cutoff: str = metrics.AUTHORS_PINV_CUTOFF) -> pd.DataFrame:
    """All measures of one dump as a tidy pandas table (columns ``COLUMNS``); ``pinv_cutoff``: see metrics."""
    import pandas as pd

    table = evaluate_table(path, regime, pinv_cutoff)
    df = pd.DataFrame(table.rows, columns=table.columns)
    df["value"] = df["value"].astype(float)
    return df


def evaluate_table(path: str | os.PathLike, regime: str | None = None,
                   pinv_cutoff: str = metrics.AUTHORS_PINV_CUTOFF) -> Table:
    """:func:`evaluate_dump` as a ``utils.Table`` (what the metrics stage writes; no pandas import)."""
    with open_dump(path) as f:
        if is_layerwise(f):
            raise NotSupportedError(f"{path} is a layerwise file; its metrics come from the layerwise stage "
                                    "(layerwise/*.csv); `ncpipe metrics` reads feature dumps")
        root = attrs_dict(f)
        # the regime id starts with the training method (grid.regime_id: st, at_linf8, trades_l2128, ...)
        if regime is not None and regime.split("_", 1)[0] != root["method"]:
            raise UsageError(f"--regime {regime} contradicts {path}, whose checkpoint was trained with "
                             f"method {root['method']}")
        c = int(root["num_classes"])
        w, b = f["classifier/weight"][:], f["classifier/bias"][:]
        ident = {"dataset": root["dataset"], "arch": root["arch"], "method": root["method"],
                 "norm": root["norm"],
                 "epsilon": root["epsilon_255"], "seed": root["seed"], "epoch": root["epoch"],
                 "regime": regime or root["method"]}
        data = {(s, k): {n: f[f"{s}/{k}/{n}"][:] for n in f[f"{s}/{k}"]} for s in SPLITS if s in f
                for k in f[s]}
    rows: list[dict] = []
    train_clean_means = None
    if ("train", "clean") in data:
        d = data[("train", "clean")]
        train_clean_means = _means(d["features"], d["labels"], c)
    subsets = {split: _subset_rows(split, data) for split, _ in data}  # checked once per split
    for (split, kind), d in data.items():
        h, y, pred = d["features"], d["labels"], d["predictions"]
        rows += _rows(ident, split, kind, "true", _nc(h, y, w, b, c, pinv_cutoff))
        if kind == "targeted":
            rows += _rows(ident, split, kind, "target", _nc(h, d["targets"], w, b, c, pinv_cutoff))
        if kind != "clean":
            rows += _rows(ident, split, kind, "predicted", _nc(h, pred, w, b, c, pinv_cutoff))
        clean = data.get((split, "clean"))
        if kind != "clean" and clean is not None:
            clean_means = _means(clean["features"], clean["labels"], c)
            rows += _rows(ident, split, kind, "true", _align(clean_means, _means(h, y, c)))
            rows += _rows(ident, split, kind, "predicted", _align(clean_means, _means(h, pred, c)))
            if kind == "targeted":
                rows += _rows(ident, split, kind, "target", _align(clean_means, _means(h, d["targets"], c)))
        if train_clean_means is not None:
            # the paper's robust nearest-class-centre classifier: clean *train* means, any split/perturbation
            acc = metrics.ncc_accuracy(h, y, train_clean_means)
            rows += _rows(ident, split, kind, "true", {"ncc_train_means_accuracy": acc})
            if kind != "clean":
                rows += _rows(ident, split, kind, "true", _leap(h, y, d.get("targets"), train_clean_means))
        idx = subsets[split] if kind in SUBSET_KINDS else None
        if idx is not None and len(idx):
            hs, ys = h[idx], y[idx]
            # the network's accuracy by the very computation of the whole-split ``accuracy`` (the NC pass),
            # so that the subset and whole-split numbers differ by the images alone
            sub = {"accuracy": _nc(hs, ys, w, b, c, pinv_cutoff).get("accuracy")}
            if train_clean_means is not None:
                sub["ncc_train_means_accuracy"] = metrics.ncc_accuracy(hs, ys, train_clean_means)
            rows += _rows(ident, split, kind, "true",
                          {metrics.on_autoattack_images(m): v for m, v in sub.items() if v is not None})
    return Table(list(COLUMNS), [[r.get(c) for c in COLUMNS] for r in rows])
