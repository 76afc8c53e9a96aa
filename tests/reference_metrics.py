"""A deliberately plain reference for ``ncpipe.metrics``: the definitions of paper.md section 2, written out.

Explicit D x D covariance matrices, ``scipy.linalg.pinv`` with the authors' cutoff (that of their float32
Sigma_B, ``D * eps_float32 * lambda_max``; ``pinv_cutoff="float64"``: scipy's float64 default), and Python
loops: Sigma_W sums one outer product ``z_i z_i^T`` per sample, literally as the definition (and the authors'
code, which forms the per-sample outer products of each batch) writes it; the NCC and network predictions are
taken one sample at a time, as in the authors' code; NC2 loops over class pairs. It is the yardstick the fast
code is tested against (tests/test_metrics.py) and timed against (benchmarks/metrics_speed.py). Same
conventions as the fast code: absent classes are left out.

``scatter="classes"`` builds Sigma_W instead with one BLAS product ``Z_c^T Z_c`` per class: the same matrix,
the fastest way to form it explicitly; the benchmark shows that baseline too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg


def reference_neural_collapse(features: Any, labels: Any, weight: Any = None, bias: Any = None,
                              num_classes: int | None = None, scatter: str = "samples",
                              pinv_cutoff: str = "float32") -> dict[str, float]:
    h = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    n, d = h.shape
    c_all = int(num_classes if num_classes is not None else y.max() + 1)
    classes = [c for c in range(c_all) if np.any(y == c)]
    c_num = len(classes)
    if c_num < 2:
        raise ValueError("fewer than two classes")

    means = {c: h[y == c].mean(axis=0) for c in classes}
    mu_g = h.mean(axis=0)  # equals the count-weighted mean of the class means
    sw = np.zeros((d, d))
    if scatter == "samples":
        for i in range(n):
            z = h[i] - means[int(y[i])]
            sw += np.outer(z, z)
    elif scatter == "classes":
        for c in classes:
            z = h[y == c] - means[c]
            sw += z.T @ z
    else:
        raise ValueError(f"scatter must be 'samples' or 'classes', not {scatter!r}")
    sw /= n
    mt = np.stack([means[c] - mu_g for c in classes])  # C x D
    sb = mt.T @ mt / c_num
    eps = np.finfo(np.float32 if pinv_cutoff == "float32" else np.float64).eps
    nc1 = float(np.trace(sw @ scipy.linalg.pinv(sb, atol=0.0, rtol=d * eps)))

    def equinorm(vs: np.ndarray) -> float:
        norms = [np.linalg.norm(v) for v in vs]
        return float(np.std(norms, ddof=1) / np.mean(norms))

    def equiangular(vs: np.ndarray) -> float:
        k = len(vs)
        total = 0.0
        for i in range(k):
            for j in range(k):
                if i != j:
                    cos = vs[i] @ vs[j] / (np.linalg.norm(vs[i]) * np.linalg.norm(vs[j]))
                    total += abs(cos + 1.0 / (k - 1))
        return total / (k * (k - 1))

    out = {"nc1": nc1, "nc1_over_c": nc1 / c_num,
           "nc2_equinorm_means": equinorm(mt), "nc2_equiangular_means": equiangular(mt)}

    m_raw = np.stack([means[c] for c in classes])
    ncc = np.empty(n, dtype=np.int64)
    for i in range(n):
        ncc[i] = classes[int(np.argmin(np.linalg.norm(m_raw - h[i], axis=1)))]
    if weight is not None:
        w = np.asarray(weight, dtype=np.float64)
        b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
        out["nc2_equinorm_weights"] = equinorm(w)
        out["nc2_equiangular_weights"] = equiangular(w)
        wp = w[classes]
        out["nc3"] = float(np.linalg.norm(wp / np.linalg.norm(wp) - mt / np.linalg.norm(mt)) ** 2)
        net = np.empty(n, dtype=np.int64)
        for i in range(n):
            net[i] = int(np.argmax(w @ h[i] + b))
        out["nc4"] = float(1.0 - np.mean(ncc == net))
        out["accuracy"] = float(np.mean(net == y))
    out["ncc_accuracy"] = float(np.mean(ncc == y))
    return out


def reference_simplex_alignment(means_a: Any, means_b: Any) -> dict[str, Any]:
    a = np.asarray(means_a, dtype=np.float64)
    b = np.asarray(means_b, dtype=np.float64)
    valid = [c for c in range(len(a)) if np.all(np.isfinite(a[c])) and np.all(np.isfinite(b[c]))]
    ga = np.mean([a[c] for c in valid], axis=0)
    gb = np.mean([b[c] for c in valid], axis=0)

    def angle(u: np.ndarray, v: np.ndarray) -> float:
        return float(np.arccos(np.clip(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)), -1.0, 1.0)))

    per = {k: np.full(len(a), np.nan) for k in ("angle_centred", "dist_centred", "angle_uncentred",
                                                 "dist_uncentred")}
    for c in valid:
        per["angle_centred"][c] = angle(a[c] - ga, b[c] - gb)
        per["dist_centred"][c] = np.linalg.norm((a[c] - ga) - (b[c] - gb))
        per["angle_uncentred"][c] = angle(a[c], b[c])
        per["dist_uncentred"][c] = np.linalg.norm(a[c] - b[c])
    out: dict[str, Any] = {}
    for k, v in per.items():
        out[k] = float(np.mean(v[valid]))
        out[f"{k}_per_class"] = v
    out["global_mean_angle"] = angle(ga, gb)
    out["global_mean_dist"] = float(np.linalg.norm(ga - gb))
    return out
