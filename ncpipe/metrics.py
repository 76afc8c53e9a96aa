"""Neural-Collapse measures (paper.md section 2), exact and fast.

Conventions (they follow the authors' ``neural_collapse()``; paper.md 2.1-2.6):

* Everything is computed in float64 whatever the input dtype; inputs may be numpy arrays or torch tensors
  (any device). Results are Python floats / numpy arrays.
* ``Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T`` (pooled over the *total* N),
  ``Sigma_B = Mt^T Mt / C`` with the centred means ``Mt`` (rows ``mu_c - mu_G``), ``mu_G`` count-weighted.
  ``nc1 = Tr(Sigma_W Sigma_B^+)`` (the code's normalisation, no 1/C), ``nc1_over_c = nc1 / C`` (Papyan's).
* **Classes absent from the labels** are left out: C is the number of classes *present*, every mean-based
  quantity (Sigma_B, NC2 on means, NC3, the NCC rule) uses only those classes, and NC3 compares them with the
  matching rows of W. The classifier-only quantities (``nc2_*_weights``) use all rows of W. Fewer than two
  classes present raises ``ValueError``.

NC1 without a D x D matrix (paper.md 2.2). With the thin SVD ``Mt = U S V^T`` (Mt is C x D),
``Sigma_B = V S^2 V^T / C`` and ``Sigma_B^+ = C V S^-2 V^T`` over the kept singular values, so

    Tr(Sigma_W Sigma_B^+) = (C / N) * sum_k  sum_i <z_i, v_k>^2 / s_k^2,      z_i = h_i - mu_{y_i}.

Only the C numbers ``sum_i <z_i, v_k>^2`` must be accumulated. This is the low-rank identity of the paper
written in the orthonormal basis V = Mt^T U S^-1 rather than with ``(Mt^T Mt)^{+2}``: the same value, but
better conditioned, because the singular values of Mt are accurate to eps * s_max whereas the eigenvalues of
the Gram matrix are only accurate to eps * s_max^2, which can push a structural zero above the cutoff.

Pseudo-inverse cutoff (``pinv_cutoff``): by default the authors' (paper.md 2.2). They call
``scipy.linalg.pinv`` with default arguments on a *float32* Sigma_B, whose cutoff is relative to float32's
machine epsilon: an eigenvalue ``s_k^2 / C`` of Sigma_B is kept iff ``s_k^2 > D * eps_float32 * s_max^2``
(D = feature dimension; 6.1e-5 * s_max^2 at D = 512). The comparison is made in float64 here.
``pinv_cutoff="float64"`` uses ``eps_float64`` instead (scipy's default on a float64 matrix), which keeps weak
between-class directions down to ~1e-13 of the strongest; the two differ only on a badly conditioned Sigma_B
(early epochs, wide layerwise probes), where NC1 can change by a factor of two (docs/deviations.md).

Because the projections need the centred means, a streaming computation needs two passes over the data
(``ClassStats``: ``update`` for pass 1, ``update_within`` for pass 2); the in-memory ``neural_collapse`` runs
the same two passes over row chunks of its input, so both give identical numbers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from .utils import lazy_import

# torch is loaded on first use, not at import: `ncpipe aggregate` imports the metrics stage (ncpipe.evaluate)
# and never computes a metric, and the torch import was most of that job's time.
if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")

ArrayLike = Any  # numpy array or torch tensor

# Rows per chunk are chosen so that one float64 chunk holds about this many elements (32 MiB).
_CHUNK_ELEMENTS = 1 << 22
# Rows per pass-2 block of in-memory float64 data: about this many elements (4 MiB).
_BLOCK_ELEMENTS = 1 << 19


# --------------------------------------------------------------------------------------------------- helpers
def _tensor(x: ArrayLike, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    else:
        arr = np.asarray(x)
        if not arr.dtype.isnative or any(st < 0 for st in arr.strides) or not arr.flags.writeable:
            # torch.from_numpy rejects these (or warns); one copy in native byte order fixes all three
            arr = np.array(arr, dtype=arr.dtype.newbyteorder("="))
        t = torch.from_numpy(arr)
    if device is not None and t.device != device:
        t = t.to(device)
    return t


def _features64(x: ArrayLike, device: torch.device | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = np.asarray(x, dtype=np.float64)  # numpy's cast is ~3x faster than torch's .to(float64) on CPU
    t = _tensor(x, device).detach()
    if t.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D); got shape {tuple(t.shape)}")
    return t.to(torch.float64)


def _labels(y: ArrayLike, n: int, num_classes: int, device: torch.device) -> torch.Tensor:
    t = _tensor(y).detach().reshape(-1)
    if t.is_floating_point():
        if not bool(torch.all(t == torch.round(t))):
            raise ValueError("labels must be integers")
    t = t.to(device=device, dtype=torch.long)
    if t.numel() != n:
        raise ValueError(f"{t.numel()} labels for {n} feature rows")
    if n and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got [{int(t.min())}, {int(t.max())}]")
    return t


def _is_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor, without importing torch (the numpy path must never load it)."""
    return type(x).__module__.split(".", 1)[0] == "torch"


def _numpy_inputs(*xs: Any) -> bool:
    """True when no input is a torch tensor: the metrics then run in numpy alone (``_neural_collapse_np``)."""
    return not any(_is_tensor(x) for x in xs if x is not None)


def _as_array(x: ArrayLike) -> ArrayLike:
    """Torch tensors stay; anything else becomes a numpy array (its chunks are then cast by numpy: faster)."""
    return x if _is_tensor(x) else np.asarray(x)


def _device_of(x: ArrayLike) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _numpy_blas_ok() -> bool:
    """Whether numpy's BLAS may run our CPU matmuls without oversubscribing the cores.

    It measured ~2x faster than torch's for these float64 products, but it ignores ``torch.set_num_threads``
    (Snakemake's ``threads:``). So it is used only when torch may use every core anyway, or when the
    environment pins numpy's pool to torch's thread count.
    """
    n = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return n >= cores or str(n) in (os.environ.get("OPENBLAS_NUM_THREADS"), os.environ.get("OMP_NUM_THREADS"))


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b; on CPU through numpy's BLAS (zero-copy views) when that cannot oversubscribe."""
    if a.device.type == "cpu" and b.device.type == "cpu" and _numpy_blas_ok():
        return torch.from_numpy(a.numpy() @ b.numpy())
    return a @ b


def _add_class_sums(sums: torch.Tensor, x: torch.Tensor, y: torch.Tensor, matmul: bool | None = None) -> None:
    """sums[c] += sum of the rows of x labelled c, in place, deterministically.

    ``index_add_`` on the CPU; on accelerators it uses atomics (run-to-run differences, and a warning under
    ``torch.use_deterministic_algorithms``), so there a one-hot matmul is used: deterministic, and cheap.
    """
    if matmul is None:
        matmul = x.device.type != "cpu"
    if not matmul:
        sums.index_add_(0, y, x)
        return
    onehot = torch.zeros(sums.shape[0], len(y), dtype=x.dtype, device=x.device)
    onehot[y, torch.arange(len(y), device=x.device)] = 1.0
    sums += onehot @ x


def _chunk_rows(dim: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, dim))


def _block_rows(dim: int) -> int:
    # blocks of in-memory input: 1,024 rows at D = 512 measured fastest (the float64 cast, the product and its
    # N x C results stay in cache), but never fewer than 64 rows, or per-block overhead dominates
    return max(64, _BLOCK_ELEMENTS // max(1, dim))


def _row_chunks(features: ArrayLike, labels: ArrayLike,
                step: int | None = None) -> Iterator[tuple[ArrayLike, ArrayLike]]:
    n, d = features.shape[0], features.shape[1]
    step = step or _chunk_rows(d)
    for i in range(0, n, step):
        yield features[i : i + step], labels[i : i + step]


def _num_classes(labels: ArrayLike, weight: ArrayLike | None, num_classes: int | None) -> int:
    if num_classes is not None:
        return int(num_classes)
    if weight is not None:
        return int(weight.shape[0])
    y = _tensor(labels).reshape(-1)
    if y.numel() == 0:
        raise ValueError("no samples")
    return int(y.max()) + 1


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if _is_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# The machine epsilon of each ``pinv_cutoff``: "float32" is the authors' (their Sigma_B is float32), the
# schema's default for ``metrics.pinv_cutoff`` and every library call's default (a test checks both).
PINV_CUTOFFS: dict[str, float] = {"float32": float(np.finfo(np.float32).eps),
                                  "float64": float(np.finfo(np.float64).eps)}
AUTHORS_PINV_CUTOFF = "float32"

# A measure of a whole-split kind restricted to the images AutoAttack attacked where it attacked a fixed
# subset (``attack.autoattack.per_class`` > 0): ``accuracy`` -> ``accuracy_autoattack_images``, so that the
# AutoAttack gap is read off the same images.  The metrics stage writes these names; the accuracy table and
# ``ncpipe summary`` read them (each imports this library module, none imports another stage).
AUTOATTACK_IMAGES_SUFFIX = "_autoattack_images"


def on_autoattack_images(metric: str) -> str:
    """``metric`` restricted to AutoAttack's images (see :data:`AUTOATTACK_IMAGES_SUFFIX`)."""
    return metric + AUTOATTACK_IMAGES_SUFFIX


def pinv_keep(singular_values: np.ndarray | torch.Tensor, dim: int,
              cutoff: str = AUTHORS_PINV_CUTOFF) -> np.ndarray | torch.Tensor:
    """Mask of the singular values ``s`` of Mt whose eigenvalue ``s^2/C`` of Sigma_B (D x D) pinv keeps.

    ``scipy.linalg.pinv`` discards singular values ``<= atol + rtol * max`` with ``atol = 0`` and
    ``rtol = max(shape) * eps``, ``eps`` that of the matrix's dtype (``cutoff``: float32 as the authors'
    Sigma_B, or float64); Sigma_B is ``dim x dim``, and its singular values are ``s^2 / C``.
    """
    if cutoff not in PINV_CUTOFFS:
        raise ValueError(f"pinv cutoff {cutoff!r} is not allowed; allowed values: {list(PINV_CUTOFFS)}")
    s2 = singular_values**2
    if s2.shape[0] == 0:
        return s2 > 0
    return s2 > dim * PINV_CUTOFFS[cutoff] * s2.max()


def _coherence(vectors: np.ndarray) -> float:
    """Mean over ordered pairs c != c' of |cos(v_c, v_c') + 1/(C-1)| (paper.md 2.3)."""
    c = vectors.shape[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cos = unit @ unit.T
    off = ~np.eye(c, dtype=bool)
    return float(np.abs(cos[off] + 1.0 / (c - 1)).mean())


def _equinorm(vectors: np.ndarray) -> float:
    norms = np.linalg.norm(vectors, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(norms.std(ddof=1) / norms.mean())  # unbiased std, as torch.std (paper.md 5.12)


# ------------------------------------------------------------------------------------------------ class means
def class_means(features: ArrayLike, labels: ArrayLike, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class means (C, D) float64 and counts (C,) int64. Rows of absent classes are NaN."""
    if _numpy_inputs(features, labels):
        h = np.asarray(features)
        if h.ndim != 2:
            raise ValueError(f"features must be 2-D (N, D); got shape {h.shape}")
        if h.shape[0] == 0:
            raise ValueError("no samples")
        sums, counts = _class_totals_np(h, _labels_np(labels, h.shape[0], num_classes), num_classes)
        return _means_np(sums, counts), counts
    stats = ClassStats(num_classes)
    for xs, ys in _row_chunks(features, labels):
        stats.update(xs, ys)
    if stats.num_samples == 0:
        raise ValueError("no samples")
    return stats.means, stats.counts


# ------------------------------------------------------------------------------------------------------- NCC
def _ncc_argmin(x64: torch.Tensor, means: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    # ||h - mu||^2 = ||h||^2 - 2 h.mu + ||mu||^2; ||h||^2 does not change the argmin.
    return torch.argmin(sq_norms[None, :] - 2.0 * _mm(x64, means.T), dim=1)


class _NCCRule:
    """Nearest (uncentred) class mean, Euclidean; NaN rows of ``means`` (absent classes) never win."""

    def __init__(self, means: ArrayLike, device: torch.device) -> None:
        m = _tensor(means).detach().to(device=device, dtype=torch.float64)
        if m.ndim != 2:
            raise ValueError("means must be 2-D (C, D)")
        valid = torch.isfinite(m).all(dim=1)
        if not bool(valid.any()):
            raise ValueError("no finite class mean")
        self.classes = torch.nonzero(valid).reshape(-1)
        self.means = m[valid]
        self.sq_norms = (self.means**2).sum(dim=1)

    def predict64(self, x64: torch.Tensor) -> torch.Tensor:
        return self.classes[_ncc_argmin(x64, self.means, self.sq_norms)]


def ncc_predict(features: ArrayLike, means: ArrayLike) -> np.ndarray:
    """Nearest-class-centre labels (int64) of ``features`` (N, D) to ``means`` (C, D); NaN rows skipped."""
    feats = _as_array(features)
    if feats.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D); got shape {tuple(feats.shape)}")
    if _numpy_inputs(features, means):
        return _ncc_predict_np(feats, means)
    rule = _NCCRule(means, _device_of(feats))
    if rule.means.shape[1] != feats.shape[1]:
        raise ValueError(f"means have dimension {rule.means.shape[1]}, features {feats.shape[1]}")
    step = _chunk_rows(feats.shape[1])
    out = [rule.predict64(_features64(feats[i : i + step])) for i in range(0, feats.shape[0], step)]
    if not out:
        return np.zeros(0, dtype=np.int64)
    return torch.cat(out).cpu().numpy().astype(np.int64)


class NCCAccuracy:
    """Streaming accuracy of the NCC rule with *fixed* means (e.g. a layer's clean means, perturbed data)."""

    def __init__(self, means: ArrayLike) -> None:
        self._means = means
        self._rule: _NCCRule | None = None
        self.correct = 0
        self.total = 0

    def update(self, features: ArrayLike, labels: ArrayLike) -> None:
        x = _features64(features)
        if self._rule is None:
            self._rule = _NCCRule(self._means, x.device)
        y = _labels(labels, x.shape[0], int(_tensor(self._means).shape[0]), x.device)
        self.correct += int((self._rule.predict64(x) == y).sum())
        self.total += x.shape[0]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")


def ncc_accuracy(features: ArrayLike, labels: ArrayLike, means: ArrayLike) -> float:
    """Accuracy of the nearest-class-centre rule with the given (fixed) ``means`` against ``labels``.

    With the clean *train* means of the final network this is the paper's robust NCC classifier, for any
    split and perturbation.
    """
    if _numpy_inputs(features, labels, means):
        h = np.asarray(features)
        if h.ndim != 2:
            raise ValueError(f"features must be 2-D (N, D); got shape {h.shape}")
        if h.shape[0] == 0:
            return float("nan")
        y = _labels_np(labels, h.shape[0], int(np.shape(means)[0]))
        return float(np.count_nonzero(_ncc_predict_np(h, means) == y)) / h.shape[0]
    acc = NCCAccuracy(means)
    for xs, ys in _row_chunks(_as_array(features), labels):
        acc.update(xs, ys)
    return acc.accuracy


# ------------------------------------------------------------------------------------------------ ClassStats
class ClassStats:
    """Streaming per-class statistics of one feature set; exact NC1 in two passes, never a D x D matrix.

    Pass 1: ``update(features_chunk, labels_chunk)`` any number of times (class sums and counts).
    Pass 2: ``update_within(...)`` over the *same* samples (any order / chunking): the projections of
    ``z_i = h_i - mu_{y_i}`` onto the right singular vectors of the centred means, and the NCC accuracy with
    the set's own means. ``freeze()`` (called implicitly by the first ``update_within``) ends pass 1.
    Then ``nc1()`` and ``ncc_accuracy``. Passes are checked: pass 2 must see the same per-class counts.
    Tensors stay on the device of the first chunk (accumulated in float64). ``pinv_cutoff``: see the module
    docstring ("float32", the authors', or "float64").
    """

    def __init__(self, num_classes: int, pinv_cutoff: str = AUTHORS_PINV_CUTOFF) -> None:
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        pinv_keep(np.ones(1), 1, pinv_cutoff)  # a bad name fails here, not after pass 1
        self.num_classes = int(num_classes)
        self.pinv_cutoff = pinv_cutoff
        self.device: torch.device | None = None
        self._sums: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None
        self._frozen = False
        # set by freeze()
        self._means_t: torch.Tensor | None = None
        self._present: torch.Tensor | None = None
        self._basis: torch.Tensor | None = None  # D x r, orthonormal columns (right singular vectors of Mt)
        self._sv: torch.Tensor | None = None  # r singular values of Mt
        # pass 2
        self._proj_sq: torch.Tensor | None = None
        self._counts2: torch.Tensor | None = None
        self._ncc_correct = 0
        self._net_correct = 0  # with a classifier given to _within64
        self._net_agree = 0
        self._means_basis: torch.Tensor | None = None
        self._classes: torch.Tensor | None = None
        self._keep: torch.Tensor | None = None
        self._ncc_rhs: torch.Tensor | None = None
        self._ncc_const: torch.Tensor | None = None
        self._np: tuple[np.ndarray, ...] | None = None  # zero-copy numpy views of the pass-2 tensors (CPU)
        self._rhs: torch.Tensor | None = None
        self._rhs_weight: torch.Tensor | None = None

    # ------------------------------------------------------------------ pass 1
    def update(self, features: ArrayLike, labels: ArrayLike) -> None:
        x = _features64(features, self.device)
        self._update64(x, _labels(labels, x.shape[0], self.num_classes, x.device))

    def _update64(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Pass-1 update on a float64 chunk with checked labels on its device."""
        if self._frozen:
            raise RuntimeError("ClassStats is frozen (pass 2 started); create a new one for new data")
        if self.device is None:
            self.device = x.device
            self._sums = torch.zeros(self.num_classes, x.shape[1], dtype=torch.float64, device=x.device)
            self._counts = torch.zeros(self.num_classes, dtype=torch.long, device=x.device)
        if x.shape[1] != self._sums.shape[1]:
            raise ValueError(f"feature dimension changed from {self._sums.shape[1]} to {x.shape[1]}")
        _add_class_sums(self._sums, x.to(self.device), y.to(self.device))
        self._counts += torch.bincount(y.to(self.device), minlength=self.num_classes)

    @property
    def dim(self) -> int:
        return 0 if self._sums is None else int(self._sums.shape[1])

    @property
    def num_samples(self) -> int:
        return 0 if self._counts is None else int(self._counts.sum())

    @property
    def counts(self) -> np.ndarray:
        if self._counts is None:
            return np.zeros(self.num_classes, dtype=np.int64)
        return self._counts.cpu().numpy().astype(np.int64)

    def _means_tensor(self) -> torch.Tensor:
        if self._sums is None:
            raise ValueError("no samples")
        cnt = self._counts.to(torch.float64)[:, None]
        return torch.where(cnt > 0, self._sums / cnt.clamp_min(1), torch.full_like(self._sums, float("nan")))

    @property
    def means(self) -> np.ndarray:
        """(C, D) float64 class means; NaN rows for absent classes."""
        return (self._means_t if self._frozen else self._means_tensor()).cpu().numpy()

    # ------------------------------------------------------------------ freeze
    def freeze(self) -> None:
        """End pass 1: fix the means and the basis of the centred means (thin SVD of a C x D matrix)."""
        if self._frozen:
            return
        if self.num_samples == 0:
            raise ValueError("no samples")
        present = self._counts > 0
        if int(present.sum()) < 2:
            raise ValueError(f"neural collapse needs >= 2 classes with samples; {int(present.sum())} present")
        means = self._means_tensor()
        global_mean = self._sums.sum(dim=0) / self.num_samples  # count-weighted mu_G
        centred = means[present] - global_mean
        # LAPACK via numpy: torch's CPU SVD is erratically slow with several threads; the matrix is only C x D
        _, s, vh = np.linalg.svd(centred.cpu().numpy(), full_matrices=False)
        basis = torch.from_numpy(np.ascontiguousarray(vh.T)).to(self.device)  # D x r, r = min(C, D)
        s = torch.from_numpy(s).to(self.device)
        self._means_t, self._present = means, present
        self._classes = torch.nonzero(present).reshape(-1)
        self._basis, self._sv, self._keep = basis, s, pinv_keep(s, centred.shape[1], self.pinv_cutoff)
        # absent classes have NaN rows here; pass 2 only indexes them if the data differ (_check_pass2 raises)
        self._means_basis = means @ basis
        # NCC from the projections: ||h - mu_c||^2 = ||h - mu_G||^2 - 2 <h - mu_G, mt_c> + ||mt_c||^2, and
        # every centred mean mt_c lies in span(basis), so <h - mu_G, mt_c> = <B^T h - B^T mu_G, B^T mt_c>.
        # argmin_c ||mt_c||^2 - 2 <p - B^T mu_G, B^T mt_c> as one product plus a constant row (no copy of p)
        centred_basis = centred @ basis  # C_present x r
        self._ncc_rhs = (-2.0 * centred_basis.T).contiguous()
        self._ncc_const = (centred_basis**2).sum(dim=1) + 2.0 * centred_basis @ (global_mean @ basis)
        self._proj_sq = torch.zeros(s.shape[0], dtype=torch.float64, device=self.device)
        self._rhs, self._rhs_weight = None, None
        self._counts2 = torch.zeros_like(self._counts)
        self._frozen = True

    # ------------------------------------------------------------------ pass 2
    def _within64(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        """Pass 2 on a float64 chunk; returns the NCC predictions. Given a classifier (``weight``, C x D,
        and ``bias``), also counts where the network's argmax(W h + b) is right and agrees with the NCC."""
        self.freeze()
        if self._rhs is None or self._rhs_weight is not weight:
            # one matmul gives the projections (hence NC1 and the NCC scores) and the logits
            parts = [self._basis] + ([weight.T] if weight is not None else [])
            self._rhs, self._rhs_weight, self._np = torch.cat(parts, dim=1).contiguous(), weight, None
        r = self._basis.shape[1]
        if weight is not None and bias is None:
            bias = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
        if x.device.type == "cpu" and _numpy_blas_ok():
            return self._within_numpy(x, y, r, bias)
        prod = x @ self._rhs
        p = prod[:, :r]
        # <z_i, v> = <h_i, v> - <mu_{y_i}, v>: cancellation costs eps * |h| / |z| relative, harmless
        q = p - self._means_basis[y]
        self._proj_sq += (q * q).sum(dim=0)
        self._counts2 += torch.bincount(y, minlength=self.num_classes)
        pred = self._classes[torch.argmin(p @ self._ncc_rhs + self._ncc_const, dim=1)]
        self._ncc_correct += int((pred == y).sum())
        if bias is not None:
            net = torch.argmax(prod[:, r:] + bias, dim=1)
            self._net_correct += int((net == y).sum())
            self._net_agree += int((net == pred).sum())
        return pred

    def _within_numpy(self, x: torch.Tensor, y: torch.Tensor, r: int,
                      bias: torch.Tensor | None) -> torch.Tensor:
        """``_within64`` on the CPU through numpy: its BLAS and ufuncs took half the time of torch's here
        (tall-skinny float64 products, gathers), and staying in one thread pool keeps torch's OpenMP workers
        from spinning against OpenBLAS's between calls (that alone doubled the time at C = 100)."""
        if self._np is None:
            self._np = tuple(t.numpy() for t in (self._rhs, self._means_basis, self._ncc_rhs, self._ncc_const,
                                                  self._classes, self._proj_sq, self._counts2))
        rhs, means_basis, ncc_rhs, ncc_const, classes, proj_sq, counts2 = self._np
        xn, yn = x.numpy(), y.numpy()
        prod = xn @ rhs
        p = prod[:, :r]
        q = p - means_basis[yn]
        proj_sq += np.einsum("ij,ij->j", q, q)  # in place: a view of self._proj_sq
        counts2 += np.bincount(yn, minlength=self.num_classes)
        pred = classes[np.argmin(p @ ncc_rhs + ncc_const, axis=1)]
        self._ncc_correct += int(np.count_nonzero(pred == yn))
        if bias is not None:
            net = np.argmax(prod[:, r:] + bias.numpy(), axis=1)
            self._net_correct += int(np.count_nonzero(net == yn))
            self._net_agree += int(np.count_nonzero(net == pred))
        return torch.from_numpy(pred)

    def update_within(self, features: ArrayLike, labels: ArrayLike) -> np.ndarray:
        """Pass-2 update; returns the NCC predictions (own means) of the chunk."""
        self.freeze()
        x = _features64(features, self.device)
        y = _labels(labels, x.shape[0], self.num_classes, self.device)
        return self._within64(x, y).cpu().numpy()

    def _check_pass2(self) -> None:
        if not self._frozen or self._counts2 is None:
            raise RuntimeError("pass 2 (update_within) has not been run")
        if not torch.equal(self._counts2, self._counts):
            raise RuntimeError("pass 2 saw different per-class counts than pass 1: not the same data")

    # ------------------------------------------------------------------ results
    def nc1(self) -> dict[str, float]:
        """``nc1`` = Tr(Sigma_W Sigma_B^+) and ``nc1_over_c`` = nc1 / C, C = number of classes present."""
        self._check_pass2()
        c = int(self._present.sum())
        if not bool(self._keep.any()):  # all class means coincide: Sigma_B = 0, NC1 undefined
            return {"nc1": float("nan"), "nc1_over_c": float("nan")}
        k = self._keep
        val = float((self._proj_sq[k] / self._sv[k] ** 2).sum()) * c / self.num_samples
        return {"nc1": val, "nc1_over_c": val / c}

    def centred_means(self) -> np.ndarray:
        """(C_present, D): the present classes' means minus the count-weighted global mean (freezes)."""
        self.freeze()
        global_mean = self._sums.sum(dim=0) / self.num_samples
        return (self._means_t[self._present] - global_mean).cpu().numpy()

    @property
    def ncc_accuracy(self) -> float:
        self._check_pass2()
        return self._ncc_correct / self.num_samples

    @classmethod
    def from_batches(cls, batches: Callable[[], Iterable[tuple[ArrayLike, ArrayLike]]],
                     num_classes: int, pinv_cutoff: str = AUTHORS_PINV_CUTOFF) -> ClassStats:
        """Both passes over ``batches()`` (called twice; it must yield the same samples each time)."""
        stats = cls(num_classes, pinv_cutoff)
        for x, y in batches():
            stats.update(x, y)
        stats.freeze()
        for x, y in batches():
            stats.update_within(x, y)
        return stats


# -------------------------------------------------------------------------------------------- neural collapse
def neural_collapse(features: ArrayLike, labels: ArrayLike, weight: ArrayLike | None = None,
                    bias: ArrayLike | None = None, num_classes: int | None = None,
                    pinv_cutoff: str = AUTHORS_PINV_CUTOFF) -> dict[str, float]:
    """NC1-NC4 of one feature set (paper.md 2.2-2.5), float64; ``pinv_cutoff`` as in the module docstring.

    Returns ``nc1``, ``nc1_over_c``, ``nc2_equinorm_means``, ``nc2_equiangular_means``, ``ncc_accuracy``
    and, when ``weight`` (C, D) is given, ``nc2_equinorm_weights``, ``nc2_equiangular_weights``, ``nc3``,
    ``nc4`` (NCC vs network mismatch rate) and ``accuracy`` (network argmax(W h + b) vs labels).
    ``num_classes`` defaults to ``weight.shape[0]`` or ``max(labels) + 1``. Classes absent from ``labels`` are
    left out (module docstring); fewer than two present raises ``ValueError``.
    """
    feats = _as_array(features)
    if feats.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D); got shape {tuple(feats.shape)}")
    n, d = feats.shape
    if n == 0:
        raise ValueError("no samples")
    if _numpy_inputs(features, labels, weight, bias):
        return _neural_collapse_np(feats, labels, weight, bias, num_classes, pinv_cutoff)
    dev = _device_of(feats)
    c = _num_classes(labels, weight, num_classes)
    w = b = None
    if weight is not None:
        w = _tensor(weight).detach().to(device=dev, dtype=torch.float64)
        if tuple(w.shape) != (c, d):
            raise ValueError(f"weight has shape {tuple(w.shape)}, expected ({c}, {d})")
        b = (torch.zeros(c, dtype=torch.float64, device=dev) if bias is None
             else _tensor(bias).detach().to(device=dev, dtype=torch.float64).reshape(-1))
        if b.shape[0] != c:
            raise ValueError(f"bias has {b.shape[0]} entries, expected {c}")
    lab = _labels(labels, n, c, dev)  # checked once, not per block
    stats = ClassStats(c, pinv_cutoff)
    # each block is cast to float64 where it stays in cache: no float64 copy of the whole input
    for xs, ys in _row_chunks(feats, lab, _block_rows(d)):
        stats._update64(_features64(xs), ys)
    stats.freeze()
    for xs, ys in _row_chunks(feats, lab, _block_rows(d)):
        stats._within64(_features64(xs), ys, w, b)

    wn = None if w is None else w.cpu().numpy()
    return _summary(stats.nc1(), stats.counts > 0, stats.centred_means(), wn, stats._net_agree,
                    stats._net_correct, stats.ncc_accuracy, n)


def _summary(nc1: dict[str, float], present: np.ndarray, centred: np.ndarray, w: np.ndarray | None,
             net_agree: int, net_correct: int, ncc_acc: float, n: int) -> dict[str, float]:
    """The result dict of ``neural_collapse`` from the two passes' totals (shared by both backends)."""
    out: dict[str, float] = dict(nc1)
    out["nc2_equinorm_means"] = _equinorm(centred)
    out["nc2_equiangular_means"] = _coherence(centred)
    if w is not None:
        out["nc2_equinorm_weights"] = _equinorm(w)
        out["nc2_equiangular_weights"] = _coherence(w)
        wp = w[present]
        with np.errstate(invalid="ignore", divide="ignore"):
            diff = wp / np.linalg.norm(wp) - centred / np.linalg.norm(centred)
        out["nc3"] = float((diff**2).sum())
        out["nc4"] = 1.0 - net_agree / n
        out["accuracy"] = net_correct / n
    out["ncc_accuracy"] = ncc_acc
    return out


# ---------------------------------------------------------------------------------- numpy path (no torch)
# The metrics stage reads numpy arrays from HDF5, and importing torch was most of its job's time (~2 s of
# ~3.5 s). With no torch tensor among the inputs the same two passes run in numpy alone: the same formulas in
# the same order (the torch path's CPU products already go through numpy's BLAS where it may), so both agree
# to rounding (tests: 1e-12 relative).
def _labels_np(y: ArrayLike, n: int, num_classes: int) -> np.ndarray:
    a = np.asarray(y).reshape(-1)
    if a.dtype.kind == "f" and not bool(np.all(a == np.round(a))):
        raise ValueError("labels must be integers")
    a = a.astype(np.int64)
    if a.size != n:
        raise ValueError(f"{a.size} labels for {n} feature rows")
    if n and (int(a.min()) < 0 or int(a.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got [{int(a.min())}, {int(a.max())}]")
    return a


def _class_totals_np(h: np.ndarray, y: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Class sums (C, D) float64 and counts (C,) of ``h`` (any float dtype), cast to float64 per block."""
    sums = np.zeros((c, h.shape[1]), dtype=np.float64)
    for xs, ys in _row_chunks(h, y, _block_rows(h.shape[1])):
        np.add.at(sums, ys, np.asarray(xs, dtype=np.float64))
    return sums, np.bincount(y, minlength=c).astype(np.int64)


def _means_np(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    cnt = counts.astype(np.float64)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, sums / np.maximum(cnt, 1), np.nan)


def _neural_collapse_np(h: np.ndarray, labels: ArrayLike, weight: ArrayLike | None, bias: ArrayLike | None,
                        num_classes: int | None, pinv_cutoff: str) -> dict[str, float]:
    """``neural_collapse`` for numpy inputs: ClassStats' two passes and formulas, in numpy."""
    n, d = h.shape
    c = int(num_classes) if num_classes is not None else (
        int(np.shape(weight)[0]) if weight is not None else int(np.max(np.asarray(labels))) + 1)
    pinv_keep(np.ones(1), 1, pinv_cutoff)
    w = b = None
    if weight is not None:
        w = np.asarray(weight, dtype=np.float64)
        if w.shape != (c, d):
            raise ValueError(f"weight has shape {w.shape}, expected ({c}, {d})")
        b = np.zeros(c) if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
        if b.shape[0] != c:
            raise ValueError(f"bias has {b.shape[0]} entries, expected {c}")
    y = _labels_np(labels, n, c)
    sums, counts = _class_totals_np(h, y, c)
    present = counts > 0
    if int(present.sum()) < 2:
        raise ValueError(f"neural collapse needs >= 2 classes with samples; {int(present.sum())} present")
    means = _means_np(sums, counts)
    global_mean = sums.sum(axis=0) / n
    centred = means[present] - global_mean
    _, sv, vh = np.linalg.svd(centred, full_matrices=False)
    basis = np.ascontiguousarray(vh.T)
    keep = pinv_keep(sv, d, pinv_cutoff)
    classes = np.flatnonzero(present)
    with np.errstate(invalid="ignore"):  # absent classes' NaN rows are never indexed (labels are present)
        means_basis = means @ basis
    centred_basis = centred @ basis
    ncc_rhs = np.ascontiguousarray(-2.0 * centred_basis.T)
    ncc_const = (centred_basis**2).sum(axis=1) + 2.0 * centred_basis @ (global_mean @ basis)
    rhs = np.ascontiguousarray(np.concatenate([basis, w.T], axis=1) if w is not None else basis)
    r = basis.shape[1]
    proj_sq = np.zeros(r)
    ncc_correct = net_correct = net_agree = 0
    for xs, ys in _row_chunks(h, y, _block_rows(d)):
        prod = np.asarray(xs, dtype=np.float64) @ rhs
        p = prod[:, :r]
        q = p - means_basis[ys]
        proj_sq += np.einsum("ij,ij->j", q, q)
        pred = classes[np.argmin(p @ ncc_rhs + ncc_const, axis=1)]
        ncc_correct += int(np.count_nonzero(pred == ys))
        if b is not None:
            net = np.argmax(prod[:, r:] + b, axis=1)
            net_correct += int(np.count_nonzero(net == ys))
            net_agree += int(np.count_nonzero(net == pred))
    k = int(present.sum())
    if not bool(keep.any()):
        nc1 = {"nc1": float("nan"), "nc1_over_c": float("nan")}
    else:
        val = float((proj_sq[keep] / sv[keep] ** 2).sum()) * k / n
        nc1 = {"nc1": val, "nc1_over_c": val / k}
    return _summary(nc1, present, centred, w, net_agree, net_correct, ncc_correct / n, n)


def _ncc_predict_np(h: np.ndarray, means: ArrayLike) -> np.ndarray:
    """The NCC rule of ``_NCCRule`` in numpy (chunked; NaN rows of ``means`` never win)."""
    m = np.asarray(means, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError("means must be 2-D (C, D)")
    valid = np.isfinite(m).all(axis=1)
    if not bool(valid.any()):
        raise ValueError("no finite class mean")
    if m.shape[1] != h.shape[1]:
        raise ValueError(f"means have dimension {m.shape[1]}, features {h.shape[1]}")
    classes, mv = np.flatnonzero(valid), m[valid]
    sq = (mv**2).sum(axis=1)
    step = _chunk_rows(h.shape[1])
    out = [classes[np.argmin(sq[None, :] - 2.0 * (np.asarray(h[i : i + step], dtype=np.float64) @ mv.T),
                             axis=1)] for i in range(0, h.shape[0], step)]
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


# ------------------------------------------------------------------------------------------ simplex alignment
def _angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise angle in radians, 2 atan2(|a^ - b^|, |a^ + b^|): exact 0 for identical rows, unlike arccos.

    NaN where either row has zero norm (the authors' ``+1e-10`` would give pi/2 there).
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        ua = a / np.linalg.norm(a, axis=-1, keepdims=True)
        ub = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return 2.0 * np.arctan2(np.linalg.norm(ua - ub, axis=-1), np.linalg.norm(ua + ub, axis=-1))


def simplex_alignment(means_a: ArrayLike, means_b: ArrayLike) -> dict[str, Any]:
    """Alignment of two class-mean simplices (paper.md 2.6c), angles in radians.

    Per class c (arrays ``*_per_class``, NaN where a row of either input is NaN) and their means over classes:
    ``angle_centred`` / ``dist_centred`` between ``mu_c^a - mean^a`` and ``mu_c^b - mean^b``, where
    ``mean^x`` is the unweighted mean of the class means of set x over the classes valid in *both* sets
    (so both simplices are centred on the same vertex set); ``angle_uncentred`` / ``dist_uncentred`` between
    the raw means;
    ``global_mean_angle`` / ``global_mean_dist`` between ``mean^a`` and ``mean^b``.
    """
    a = _to_numpy(means_a).astype(np.float64)
    b = _to_numpy(means_b).astype(np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"means must be two (C, D) arrays of the same shape; got {a.shape} and {b.shape}")
    valid = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    if not valid.any():
        raise ValueError("no class has a finite mean in both sets")
    ga, gb = a[valid].mean(axis=0), b[valid].mean(axis=0)
    nan = np.full(a.shape[0], np.nan)
    per: dict[str, np.ndarray] = {k: nan.copy() for k in ("angle_centred", "dist_centred", "angle_uncentred",
                                                          "dist_uncentred")}
    ca, cb = a[valid] - ga, b[valid] - gb
    per["angle_centred"][valid] = _angles(ca, cb)
    per["dist_centred"][valid] = np.linalg.norm(ca - cb, axis=1)
    per["angle_uncentred"][valid] = _angles(a[valid], b[valid])
    per["dist_uncentred"][valid] = np.linalg.norm(a[valid] - b[valid], axis=1)
    out: dict[str, Any] = {}
    for k, v in per.items():
        out[k] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
        out[f"{k}_per_class"] = v
    out["global_mean_angle"] = float(_angles(ga[None], gb[None])[0])
    out["global_mean_dist"] = float(np.linalg.norm(ga - gb))
    return out
