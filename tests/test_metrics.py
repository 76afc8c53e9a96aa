"""ncpipe.metrics: known answers, invariances, agreement with the reference (tests/reference_metrics.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from ncpipe import metrics

sys.path.insert(0, str(Path(__file__).parent))
from reference_metrics import reference_neural_collapse, reference_simplex_alignment  # noqa: E402

NC_KEYS = ["nc1", "nc1_over_c", "nc2_equinorm_means", "nc2_equiangular_means", "nc2_equinorm_weights",
           "nc2_equiangular_weights", "nc3", "nc4", "accuracy", "ncc_accuracy"]


def random_orthonormal_rows(k: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """k x d with orthonormal rows (k <= d)."""
    q, _ = np.linalg.qr(rng.normal(size=(d, k)))
    return q.T


def simplex_etf(c: int, d: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """C x D rows forming a simplex ETF (norm ``scale``, pairwise cosine -1/(C-1), sum 0); any D >= C-1."""
    centred = np.eye(c) - 1.0 / c  # rows: the standard basis minus its centroid, in a (C-1)-dim subspace
    basis = np.linalg.qr(centred.T @ rng.normal(size=(c, c - 1)))[0]  # C x (C-1), orthonormal, spans it
    coords = centred @ basis  # C x (C-1)
    etf = coords @ random_orthonormal_rows(c - 1, d, rng)
    return scale * etf / np.linalg.norm(etf, axis=1, keepdims=True)


def balanced_labels(c: int, per_class: int) -> np.ndarray:
    return np.repeat(np.arange(c), per_class)


def random_problem(n: int, d: int, c: int, seed: int, absent: tuple[int, ...] = ()):
    rng = np.random.default_rng(seed)
    present = np.array([k for k in range(c) if k not in absent])
    y = present[rng.integers(0, len(present), n)]
    y[: len(present)] = present  # every listed class occurs
    centres = rng.normal(size=(c, d)) * 0.3  # overlapping classes: NCC, network and labels all disagree
    h = centres[y] + rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=d)  # anisotropic noise
    w = rng.normal(size=(c, d))
    b = rng.normal(size=c)
    return h.astype(np.float32), y, w.astype(np.float32), b.astype(np.float32)


def assert_close_dict(got: dict, want: dict, rtol: float, atol: float = 0.0, keys: list[str] | None = None):
    for k in keys or want:
        assert k in got, k
        assert got[k] == pytest.approx(want[k], rel=rtol, abs=atol), (k, got[k], want[k])


# --------------------------------------------------------------------------------------------- known answers
@pytest.mark.parametrize("c,d", [(2, 1), (3, 2), (4, 50), (10, 9), (10, 10), (10, 512), (100, 99)])
def test_simplex_etf_is_perfect_collapse(c: int, d: int) -> None:
    rng = np.random.default_rng(c * 1000 + d)
    etf = simplex_etf(c, d, rng, scale=3.0)
    offset = rng.normal(size=d) * 5.0  # uncentred means: the global mean is not at the origin
    means = etf + offset
    y = balanced_labels(c, 3)
    h = means[y]  # every sample exactly at its class mean: Sigma_W = 0
    w = 0.7 * etf  # classifier rows = centred means (any positive scale)
    b = -w @ offset  # makes argmax(W h + b) = argmax <mt_c, mt_y> = y
    res = metrics.neural_collapse(h, y, weight=w, bias=b)
    for k in ["nc1", "nc1_over_c", "nc2_equinorm_means", "nc2_equinorm_weights", "nc2_equiangular_means",
              "nc2_equiangular_weights", "nc3", "nc4"]:
        assert abs(res[k]) < 1e-9, (k, res[k])
    assert res["accuracy"] == 1.0 and res["ncc_accuracy"] == 1.0


@pytest.mark.parametrize("c,d", [(3, 2), (10, 30)])
def test_nc1_known_value_with_symmetric_noise(c: int, d: int) -> None:
    # samples at mu_c +- sigma u: the means stay on the ETF and Sigma_W = sigma^2 u u^T exactly. On an ETF of
    # norm s, Sigma_B = s^2/(C-1) P (P: projector on its span), so
    # Tr(Sigma_W Sigma_B^+) = sigma^2 (C-1)/s^2 |P u|^2.
    rng = np.random.default_rng(7)
    s, sigma = 2.0, 0.3
    etf = simplex_etf(c, d, rng, scale=s)
    u = etf[0] / np.linalg.norm(etf[0])  # a unit vector inside the span
    y = balanced_labels(c, 2)
    signs = np.tile([1.0, -1.0], c)
    h = etf[y] + 4.0 + sigma * signs[:, None] * u[None, :]
    res = metrics.neural_collapse(h, y)
    assert res["nc1"] == pytest.approx(sigma**2 * (c - 1) / s**2, rel=1e-10)
    assert res["nc1_over_c"] == pytest.approx(res["nc1"] / c, rel=1e-12)
    # a direction orthogonal to the span is invisible to Sigma_B^+ (the pinv discards it): NC1 = 0
    if d > c - 1:
        v = rng.normal(size=d)
        v -= etf.T @ np.linalg.lstsq(etf.T, v, rcond=None)[0]
        h2 = etf[y] + sigma * signs[:, None] * (v / np.linalg.norm(v))[None, :]
        assert abs(metrics.neural_collapse(h2, y)["nc1"]) < 1e-9


@pytest.mark.parametrize("c", [3, 10, 100])
def test_orthogonal_frame(c: int) -> None:
    rng = np.random.default_rng(c)
    frame = random_orthonormal_rows(c, c + 5, rng) * 2.5
    y = balanced_labels(c, 2)
    res = metrics.neural_collapse(frame[y], y, weight=frame)
    # uncentred classifier rows are orthogonal: cosines 0, so the mean |cos + 1/(C-1)| is 1/(C-1)
    assert res["nc2_equiangular_weights"] == pytest.approx(1.0 / (c - 1), rel=1e-10)
    assert res["nc2_equinorm_weights"] == pytest.approx(0.0, abs=1e-12)
    # but the *centred* means of an orthogonal frame are a simplex ETF: a missing centring would fail here
    assert res["nc2_equiangular_means"] == pytest.approx(0.0, abs=1e-12)
    assert res["nc2_equinorm_means"] == pytest.approx(0.0, abs=1e-12)


def test_identical_directions_equiangularity_is_c_over_c_minus_1() -> None:
    c = 6
    w = np.outer(np.arange(1, c + 1), np.ones(4))  # all rows parallel, cos = 1
    y = balanced_labels(c, 1)
    h = np.random.default_rng(0).normal(size=(c, 4))
    res = metrics.neural_collapse(h, y, weight=w)
    assert res["nc2_equiangular_weights"] == pytest.approx(c / (c - 1), rel=1e-12)
    norms = np.arange(1, c + 1) * 2.0
    assert res["nc2_equinorm_weights"] == pytest.approx(norms.std(ddof=1) / norms.mean(), rel=1e-12)


def test_nc3_and_nc4_known_answers() -> None:
    rng = np.random.default_rng(3)
    c, d = 5, 12
    etf = simplex_etf(c, d, rng)
    y = balanced_labels(c, 4)
    h = etf[y]
    # W = -M~: antipodal, ||a/|a| + a/|a| ||^2 = 4; the network then always predicts a wrong class, NCC the
    # right one
    res = metrics.neural_collapse(h, y, weight=-etf)
    assert res["nc3"] == pytest.approx(4.0, rel=1e-12)
    assert res["nc4"] == 1.0 and res["accuracy"] == 0.0 and res["ncc_accuracy"] == 1.0


# ----------------------------------------------------------------------------------------------- invariances
def test_permutation_and_scaling_invariance() -> None:
    h, y, w, b = random_problem(400, 30, 7, seed=1)
    base = metrics.neural_collapse(h, y, w, b)
    perm = np.random.default_rng(5).permutation(len(y))
    assert_close_dict(metrics.neural_collapse(h[perm], y[perm], w, b), base, rtol=1e-10, atol=1e-14)
    scaled = metrics.neural_collapse(h.astype(np.float64) * 7.3, y)
    for k in ["nc1", "nc1_over_c", "nc2_equinorm_means", "nc2_equiangular_means", "ncc_accuracy"]:
        assert scaled[k] == pytest.approx(base[k], rel=1e-10), k
    # relabelling classes (permuting class ids together with W's rows) changes nothing either
    relabel = np.random.default_rng(6).permutation(7)
    inv = np.argsort(relabel)
    assert_close_dict(metrics.neural_collapse(h, relabel[y], w[inv], b[inv]), base, rtol=1e-10, atol=1e-14)


def test_torch_and_numpy_inputs_agree() -> None:
    # numpy inputs run the numpy-only path, tensors the torch path: equal up to rounding
    h, y, w, b = random_problem(300, 40, 6, seed=2, absent=(3,))
    a = metrics.neural_collapse(h, y, w, b)
    t = metrics.neural_collapse(*(torch.from_numpy(a) for a in (h, y, w, b)))
    assert_close_dict(t, a, rtol=1e-12, atol=1e-15)
    for pinv in ("float32", "float64"):
        assert_close_dict(metrics.neural_collapse(torch.from_numpy(h), torch.from_numpy(y), pinv_cutoff=pinv),
                          metrics.neural_collapse(h, y, pinv_cutoff=pinv), rtol=1e-12, atol=1e-15)
    means_np, counts_np = metrics.class_means(h, y, 6)
    means_t, counts_t = metrics.class_means(torch.from_numpy(h), torch.from_numpy(y), 6)
    assert np.array_equal(counts_np, counts_t) and np.isnan(means_np[3]).all()
    np.testing.assert_allclose(means_np, means_t, rtol=1e-12, atol=1e-15)
    assert metrics.ncc_accuracy(h, y, means_np) == metrics.ncc_accuracy(torch.from_numpy(h), y, means_t)
    assert np.array_equal(metrics.ncc_predict(h, means_np), metrics.ncc_predict(torch.from_numpy(h), means_t))
    # float16 / float64 / integer labels as float tensors: all computed in float64
    h16 = h.astype(np.float16)
    assert_close_dict(metrics.neural_collapse(torch.from_numpy(h16), y.astype(np.float32)),
                      metrics.neural_collapse(h16.astype(np.float64), y), rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------- agreement with reference
@pytest.mark.parametrize("n,d,c,absent", [
    (200, 10, 3, ()),
    (150, 300, 10, ()),  # D > N
    (1000, 64, 100, ()),  # C = 100, D < C: Sigma_B has full rank D
    (400, 600, 100, ()),  # C = 100 and D > N
    (300, 40, 12, (4, 11)),  # classes absent from the labels
])
@pytest.mark.parametrize("scatter", ["samples", "classes"])
def test_agrees_with_reference(n: int, d: int, c: int, absent: tuple[int, ...], scatter: str) -> None:
    h, y, w, b = random_problem(n, d, c, seed=n + d + c, absent=absent)
    fast = metrics.neural_collapse(h, y, w, b, num_classes=c)
    ref = reference_neural_collapse(h, y, w, b, num_classes=c, scatter=scatter)
    assert set(fast) == set(NC_KEYS)
    assert_close_dict(fast, ref, rtol=1e-8, keys=NC_KEYS)


def test_without_weight_only_data_keys() -> None:
    h, y, *_ = random_problem(100, 8, 4, seed=0)
    res = metrics.neural_collapse(h, y)
    assert set(res) == {"nc1", "nc1_over_c", "nc2_equinorm_means", "nc2_equiangular_means", "ncc_accuracy"}
    assert_close_dict(res, reference_neural_collapse(h, y), rtol=1e-8)


def test_low_rank_nc1_matches_explicit_pinv_and_runs_at_65536() -> None:
    rng = np.random.default_rng(11)
    c, n = 5, 40
    y = balanced_labels(c, n // c)

    def gram_reference(h: np.ndarray) -> float:
        # paper.md 2.2 written independently: C Tr(G^{+2} Mt Sigma_W Mt^T), G = Mt Mt^T (C x C), numpy pinv
        mu = np.stack([h[y == k].mean(0) for k in range(c)])
        mt = mu - h.mean(0)
        z = h - mu[y]
        proj = z @ mt.T  # N x C
        g_pinv = np.linalg.pinv(mt @ mt.T, rcond=1e-12)
        return float(c * np.trace(g_pinv @ g_pinv @ (proj.T @ proj / len(h))))

    for d in (64, 1024):  # the explicit D x D pinv is affordable here
        h = rng.normal(size=(n, d)) + rng.normal(size=(c, d))[y] * 3
        mu = np.stack([h[y == k].mean(0) for k in range(c)])
        mt = mu - h.mean(0)
        z = h - mu[y]
        explicit = np.trace((z.T @ z / n) @ scipy.linalg.pinv(mt.T @ mt / c))
        fast = metrics.neural_collapse(h, y)["nc1"]
        assert fast == pytest.approx(explicit, rel=1e-8)
        assert fast == pytest.approx(gram_reference(h), rel=1e-8)
    d = 65_536  # a D x D matrix would take 32 GiB
    h = (rng.normal(size=(n, d)) + rng.normal(size=(c, d))[y] * 0.5).astype(np.float32)
    fast = metrics.neural_collapse(h, y)
    assert math.isfinite(fast["nc1"]) and fast["nc1"] > 0
    assert fast["nc1"] == pytest.approx(gram_reference(h.astype(np.float64)), rel=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pinv_cutoff_matches_scipy_on_a_matrix_of_that_dtype(dtype) -> None:
    d = 50
    # singular values of Mt whose squares straddle scipy's cutoff d * eps * s_max^2 for this dtype
    eps = np.finfo(dtype).eps
    s = np.array([1.0, math.sqrt(2 * d * eps), math.sqrt(0.5 * d * eps)])
    keep = metrics.pinv_keep(s, d, np.dtype(dtype).name)
    assert keep.tolist() == [True, True, False]
    sigma_b = (np.diag(np.concatenate([s**2, np.zeros(d - 3)])) / 3).astype(dtype)
    sv = np.linalg.svd(scipy.linalg.pinv(sigma_b), compute_uv=False)
    assert int((sv > 0).sum()) == int(keep.sum())
    if dtype is np.float64:  # the authors' float32 cutoff drops the second one too
        assert metrics.pinv_keep(s, d).tolist() == [True, False, False]
    with pytest.raises(ValueError, match="allowed values"):
        metrics.pinv_keep(s, d, "float16")


def _badly_conditioned(ratio: float, d: int = 512, c: int = 10, per_class: int = 30, seed: int = 5):
    """Features whose Sigma_B has one eigenvalue ``ratio`` times the largest (class means exact)."""
    rng = np.random.default_rng(seed)
    y = balanced_labels(c, per_class)
    # c - 1 orthonormal directions in R^d, and a C x (C-1) simplex code (columns orthonormal, sum to zero)
    v = np.linalg.qr(rng.normal(size=(d, c - 1)))[0]
    a = np.linalg.qr(np.hstack([np.ones((c, 1)), rng.normal(size=(c, c - 1))]))[0][:, 1:]
    scales = np.ones(c - 1)
    scales[-1] = math.sqrt(ratio)
    means = 3.0 * (a * scales) @ v.T
    noise = rng.normal(size=(len(y), d)) * 0.3
    noise -= np.stack([noise[y == k].mean(0) for k in range(c)])[y]  # exact class means
    return means[y] + noise, y


def test_nc1_default_cutoff_is_the_authors_float32_pinv() -> None:
    """paper.md 2.2: the authors call scipy.linalg.pinv on a float32 Sigma_B. Where Sigma_B's eigenvalue
    ratio (5e-5) lies between the float32 cutoff (D eps32 = 6.1e-5 at D = 512) and the float64 one, the two
    differ."""
    h, y = _badly_conditioned(5e-5)
    default = metrics.neural_collapse(h, y)["nc1"]
    wide = metrics.neural_collapse(h, y, pinv_cutoff="float64")["nc1"]
    assert default == pytest.approx(reference_neural_collapse(h, y, scatter="classes")["nc1"], rel=1e-8)
    assert wide == pytest.approx(
        reference_neural_collapse(h, y, scatter="classes", pinv_cutoff="float64")["nc1"], rel=1e-8)
    assert wide > 1.5 * default  # the weak direction's within-class spread counts only with float64
    # the authors' computation itself, float32: the same directions kept, the same value to float32 accuracy
    mu = np.stack([h[y == k].mean(0) for k in range(10)])
    mt, z = mu - h.mean(0), h - mu[y]
    authors = np.trace((z.T @ z / len(h)) @ scipy.linalg.pinv((mt.T @ mt / 10).astype(np.float32)))
    assert default == pytest.approx(authors, rel=1e-3)
    stats = metrics.ClassStats.from_batches(lambda: [(h, y)], 10, pinv_cutoff="float64")
    assert stats.nc1()["nc1"] == pytest.approx(wide, rel=1e-10)
    with pytest.raises(ValueError, match="allowed values"):
        metrics.ClassStats(10, pinv_cutoff="double")


# ----------------------------------------------------------------------------------------------- streaming
def test_classstats_streaming_equals_in_memory() -> None:
    h, y, w, b = random_problem(1000, 50, 10, seed=9, absent=(3,))
    mem = metrics.neural_collapse(h, y, num_classes=10)
    stats = metrics.ClassStats(10)
    for i in range(0, 1000, 137):
        stats.update(torch.from_numpy(h[i : i + 137]), torch.from_numpy(y[i : i + 137]))
    means, counts = metrics.class_means(h, y, 10)
    np.testing.assert_allclose(stats.means, means, rtol=1e-12)
    assert np.array_equal(stats.counts, counts)
    # pass 2 in a different order and chunking: only the set of samples matters
    order = np.random.default_rng(0).permutation(1000)
    for i in range(0, 1000, 301):
        idx = order[i : i + 301]
        stats.update_within(h[idx], y[idx])
    assert stats.nc1()["nc1"] == pytest.approx(mem["nc1"], rel=1e-10)
    assert stats.nc1()["nc1_over_c"] == pytest.approx(mem["nc1_over_c"], rel=1e-10)
    assert stats.ncc_accuracy == pytest.approx(mem["ncc_accuracy"], abs=0)
    with pytest.raises(RuntimeError):
        stats.update(h[:5], y[:5])  # pass 1 is over


def test_classstats_from_batches_and_pass_mismatch() -> None:
    h, y, *_ = random_problem(300, 20, 5, seed=1)

    def batches():
        for i in range(0, 300, 64):
            yield h[i : i + 64], y[i : i + 64]

    stats = metrics.ClassStats.from_batches(batches, 5)
    assert stats.nc1()["nc1"] == pytest.approx(metrics.neural_collapse(h, y)["nc1"], rel=1e-10)
    bad = metrics.ClassStats(5)
    bad.update(h, y)
    bad.update_within(h[:100], y[:100])  # pass 2 sees only a third of the data
    with pytest.raises(RuntimeError, match="different per-class counts"):
        bad.nc1()


def test_ncc_accuracy_streaming_with_fixed_means() -> None:
    h, y, *_ = random_problem(500, 16, 4, seed=2)
    means = metrics.class_means(h, y, 4)[0] + 0.3  # some other set of means
    acc = metrics.NCCAccuracy(means)
    for i in range(0, 500, 99):
        acc.update(h[i : i + 99], y[i : i + 99])
    assert acc.accuracy == pytest.approx(float((metrics.ncc_predict(h, means) == y).mean()), abs=0)


# ------------------------------------------------------------------------------------------ small functions
def test_class_means_and_ncc_predict_known_answers() -> None:
    h = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [12.0, 10.0], [5.0, 5.0]])
    y = np.array([0, 0, 2, 2, 0])
    means, counts = metrics.class_means(h, y, 3)
    assert counts.tolist() == [3, 0, 2] and counts.dtype == np.int64 and means.dtype == np.float64
    np.testing.assert_array_equal(means[0], [7 / 3, 5 / 3])
    assert np.isnan(means[1]).all()
    np.testing.assert_array_equal(means[2], [11.0, 10.0])
    # the NaN row (absent class) never wins, even for a point where it "would" be
    pred = metrics.ncc_predict(np.array([[0.0, 0.0], [11.0, 9.0], [7.0, 6.0]]), means)
    assert pred.tolist() == [0, 2, 2]
    assert metrics.ncc_predict(torch.tensor([[0.0, 0.0]]), torch.from_numpy(means)).tolist() == [0]


def test_class_sums_one_hot_path_equals_index_add() -> None:
    # the one-hot matmul is what accelerators use (deterministic); check it here on the CPU
    rng = np.random.default_rng(0)
    x, y = torch.from_numpy(rng.normal(size=(50, 6))), torch.from_numpy(rng.integers(0, 4, 50))
    a, b = torch.zeros(5, 6, dtype=torch.float64), torch.zeros(5, 6, dtype=torch.float64)
    metrics._add_class_sums(a, x, y, matmul=False)
    metrics._add_class_sums(b, x, y, matmul=True)
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    assert float(a[4].abs().sum()) == 0.0


def test_ncc_predict_chunked_matches_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 1000)  # 15 rows per chunk, a ragged last one
    rng = np.random.default_rng(0)
    h, means = rng.normal(size=(500, 64)), rng.normal(size=(7, 64))
    brute = np.argmin(((h[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert np.array_equal(metrics.ncc_predict(h, means), brute)


@pytest.mark.parametrize("numpy_blas", [True, False])
def test_backends_and_blocking_agree(monkeypatch: pytest.MonkeyPatch, numpy_blas: bool) -> None:
    # pass 2 runs through numpy's BLAS or through torch (the code path of accelerators), over cache-sized
    # blocks that are cast to float64 one at a time: all must agree with the reference, ragged blocks included
    h, y, w, b = random_problem(700, 48, 9, seed=5)
    ref = reference_neural_collapse(h, y, w, b)
    monkeypatch.setattr(metrics, "_numpy_blas_ok", lambda: numpy_blas)
    assert_close_dict(metrics.neural_collapse(h, y, w, b), ref, rtol=1e-8, keys=NC_KEYS)
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 1000)  # 64-row blocks (the floor), a ragged last one
    assert_close_dict(metrics.neural_collapse(h, y, w, b), ref, rtol=1e-8, keys=NC_KEYS)
    h32 = h.astype(np.float32)  # cast per block vs cast up front
    assert_close_dict(metrics.neural_collapse(h32, y, w, b),
                      metrics.neural_collapse(h32.astype(np.float64), y, w, b), rtol=1e-12, keys=NC_KEYS)
    assert_close_dict(metrics.neural_collapse(torch.from_numpy(h32), torch.from_numpy(y), w, b),
                      reference_neural_collapse(h32, y, w, b), rtol=1e-8, keys=NC_KEYS)


def test_errors() -> None:
    h = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match=">= 2 classes"):
        metrics.neural_collapse(h, np.zeros(10, dtype=int), num_classes=5)
    with pytest.raises(ValueError):
        metrics.neural_collapse(h, np.full(10, 7), num_classes=5)
    with pytest.raises(ValueError):
        metrics.neural_collapse(h, np.arange(10) % 2, weight=np.ones((3, 3)), num_classes=2)
    with pytest.raises(ValueError):
        metrics.neural_collapse(h[:, 0], np.arange(10) % 2)


def test_all_means_equal_gives_nan_nc1() -> None:
    h = np.tile([1.0, 2.0], (6, 1)) + np.array([[0.1, 0], [-0.1, 0]] * 3)
    y = np.array([0, 0, 1, 1, 2, 2])
    assert math.isnan(metrics.neural_collapse(h, y)["nc1"])


# ----------------------------------------------------------------------------------------- simplex alignment
def test_alignment_identical_means() -> None:
    m = np.random.default_rng(0).normal(size=(10, 32))
    res = metrics.simplex_alignment(m, m.copy())
    for k in ["angle_centred", "dist_centred", "angle_uncentred", "dist_uncentred", "global_mean_angle",
              "global_mean_dist"]:
        assert res[k] == 0.0, k
    assert res["angle_centred_per_class"].shape == (10,)


def block_rotation(d: int, theta: float) -> np.ndarray:
    """Rotates *every* vector of R^d (d even) by exactly theta: one 2-D rotation per coordinate pair."""
    r = np.zeros((d, d))
    for i in range(0, d, 2):
        r[i : i + 2, i : i + 2] = [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]
    return r


@pytest.mark.parametrize("theta", [0.05, 0.7, 2.5])
def test_alignment_rotated_copy_known_angle(theta: float) -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(10, 16)) + 3.0
    b = a @ block_rotation(16, theta).T
    b[4] = np.nan  # an absent class: ignored in the means and the centring
    res = metrics.simplex_alignment(a, b)
    valid = np.arange(10) != 4
    for k in ["angle_centred", "angle_uncentred", "global_mean_angle"]:
        assert res[k] == pytest.approx(theta, rel=1e-9), k
    assert np.isnan(res["angle_centred_per_class"][4])
    np.testing.assert_allclose(res["angle_centred_per_class"][valid], theta, rtol=1e-9)
    np.testing.assert_allclose(res["dist_uncentred_per_class"][valid],
                               2 * math.sin(theta / 2) * np.linalg.norm(a[valid], axis=1), rtol=1e-9)
    ref = reference_simplex_alignment(a, b)
    for k, v in ref.items():
        np.testing.assert_allclose(res[k], v, rtol=1e-8, atol=1e-12)


def test_alignment_translation_only_moves_uncentred_quantities() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(5, 8))
    t = rng.normal(size=8)
    res = metrics.simplex_alignment(torch.from_numpy(a), a + t)
    assert res["angle_centred"] == pytest.approx(0.0, abs=1e-7) and res["dist_centred"] < 1e-12
    assert res["dist_uncentred"] == pytest.approx(np.linalg.norm(t), rel=1e-12)
    assert res["global_mean_dist"] == pytest.approx(np.linalg.norm(t), rel=1e-12)
    assert res["angle_uncentred"] > 0.01


def test_ncc_accuracy_matches_predictions_and_streams_in_chunks():
    rng = np.random.default_rng(7)
    means = rng.normal(size=(5, 8))
    y = rng.integers(0, 5, size=3001)
    h = means[y] + rng.normal(scale=1.5, size=(3001, 8))
    expected = float((metrics.ncc_predict(h, means) == y).mean())
    assert 0.2 < expected < 1.0  # a case where the rule makes mistakes, so the comparison means something
    assert metrics.ncc_accuracy(h, y, means) == pytest.approx(expected, abs=1e-12)
    assert metrics.ncc_accuracy(torch.from_numpy(h).float(), torch.from_numpy(y), means) == pytest.approx(
        expected, abs=2e-3)
