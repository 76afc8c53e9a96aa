"""Where perturbed features land: the nearest clean class mean of each perturbed point (numpy only).

The paper's "leap" (claim 2) says that an adversarial feature does not drift to a generic place but lands at
(near) the vertex of another class of the clean simplex.  Operationally: take the clean class means of the
*train* split (the simplex's vertices), send each perturbed feature to its nearest mean (Euclidean, uncentred,
the NCC rule of paper.md 2.5), and count, per true class, where the points land.

* :func:`landing_classes`: the nearest-mean class of every row.
* :func:`leap_matrix`: the C x C row-normalised matrix true class -> landing class.
* :func:`leap_shares`: the three scalar summaries ``leap_share_own`` (lands at its own class's mean),
  ``leap_share_target`` (lands at the attack's target; only for a targeted attack, whose targets are given)
  and ``leap_share_other`` (any other class).  With targets the three sum to 1; without, own + other = 1 and
  the target share is not defined (absent from the result), because an untargeted attack has no target.
"""

from __future__ import annotations

import numpy as np

SHARE_OWN = "leap_share_own"
SHARE_TARGET = "leap_share_target"
SHARE_OTHER = "leap_share_other"


def landing_classes(features: np.ndarray, means: np.ndarray, block: int = 4096) -> np.ndarray:
    """Index of the nearest row of ``means`` (C, D) for each row of ``features`` (N, D); NaN means never win.

    Ties go to the lower class index (``argmin``).  Blocks of ``block`` rows bound the (block, C) distance
    matrix.
    """
    h = np.asarray(features)
    m = np.asarray(means, dtype=np.float64)
    if h.ndim != 2 or m.ndim != 2:
        raise ValueError(f"features and means must be 2-D; got {h.shape} and {m.shape}")
    if h.shape[1] != m.shape[1]:
        raise ValueError(f"means have dimension {m.shape[1]}, features {h.shape[1]}")
    valid = np.isfinite(m).all(axis=1)
    if not valid.any():
        raise ValueError("no finite class mean")
    classes = np.flatnonzero(valid)
    mv = m[valid]
    sq = (mv**2).sum(axis=1)
    out = np.empty(h.shape[0], dtype=np.int64)
    for i in range(0, h.shape[0], block):
        x = h[i : i + block].astype(np.float64)
        # ||x - mu||^2 = ||x||^2 - 2 x.mu + ||mu||^2; ||x||^2 does not change the argmin
        out[i : i + block] = classes[np.argmin(sq[None, :] - 2.0 * x @ mv.T, axis=1)]
    return out


def leap_counts(labels: np.ndarray, landed: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: row = true class, column = landing class."""
    y = np.asarray(labels, dtype=np.int64)
    z = np.asarray(landed, dtype=np.int64)
    if y.shape != z.shape or y.ndim != 1:
        raise ValueError(f"labels and landing classes must be 1-D of one length; got {y.shape}, {z.shape}")
    for name, v in (("labels", y), ("landing classes", z)):
        if v.size and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{name} must lie in 0..{num_classes - 1}")
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (y, z), 1)
    return counts


def leap_matrix(labels: np.ndarray, landed: np.ndarray, num_classes: int) -> np.ndarray:
    """Row-normalised (C, C) matrix: entry (c, k) = share of class-c points that land at class k's mean.

    Rows of classes with no point are NaN.
    """
    counts = leap_counts(labels, landed, num_classes).astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts / np.where(totals > 0, totals, 1.0), np.nan)


def leap_shares(
    labels: np.ndarray, landed: np.ndarray, targets: np.ndarray | None = None
) -> dict[str, float]:
    """Shares of points landing at their own class, at the attack's target (if ``targets``), elsewhere.

    A point whose target equals its own label (cannot happen with the paper's (y+1) mod C rule) counts as
    ``own``.  Empty input gives NaN shares.
    """
    y = np.asarray(labels, dtype=np.int64)
    z = np.asarray(landed, dtype=np.int64)
    if y.shape != z.shape:
        raise ValueError(f"labels and landing classes differ in shape: {y.shape}, {z.shape}")
    n = y.size
    if n == 0:
        nan = float("nan")
        return {SHARE_OWN: nan, **({SHARE_TARGET: nan} if targets is not None else {}), SHARE_OTHER: nan}
    own = z == y
    if targets is None:
        return {SHARE_OWN: float(own.mean()), SHARE_OTHER: float((~own).mean())}
    t = np.asarray(targets, dtype=np.int64)
    if t.shape != y.shape:
        raise ValueError(f"targets and labels differ in shape: {t.shape}, {y.shape}")
    target = (z == t) & ~own
    return {
        SHARE_OWN: float(own.mean()),
        SHARE_TARGET: float(target.mean()),
        SHARE_OTHER: float((~own & ~target).mean()),
    }
