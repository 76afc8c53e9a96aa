"""HDF5 feature dumps: writing (atomically) and reading.

The format is specified in docs/hdf5-format.md (``format_version`` 1.2); in short::

    /                            attrs: format_version, complete, dataset, arch, method, seed, epoch, norm,
                                        epsilon, ..., checkpoint, checkpoint_sha256, config (JSON)
    /classifier/weight           (C, D) float32     last linear layer
    /classifier/bias             (C,)   float32
    /{split}/{kind}/features     (N, D) float32 (or float16, config ``features.dtype``)
    /{split}/{kind}/labels       (N,)   int64  true labels
    /{split}/{kind}/predictions  (N,)   int64  network argmax
    /{split}/{kind}/targets      (N,)   int64  only for kind = targeted

Row ``i`` of every group of one split is the same image (sample ``i`` of that split as ``ncpipe.data``
loads it), so clean and perturbed features pair up by position.  The layerwise file
(``paths.LAYERWISE_H5``) uses ``/layers/{layer}/{kind}/features|labels|indices``: read one group with
:func:`load_layer`, list the probes with :func:`layers`; :func:`to_xarray` opens both layouts and
``ncpipe.inspect`` summarises both.

Integrity (1.2): every dataset is chunked with a Fletcher-32 checksum per chunk, so a changed byte of any
stored value fails its read; ``layout_sha256`` (a root attribute) covers every attribute and the name, shape,
dtype and filters of every object, checked by ``open_dump``.  A read that fails inside ``with open_dump(...)``
becomes a ``DumpError`` naming the file, the damaged dataset(s) and the command that regenerates the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from .config import schema_enum
from .utils import atomic_output, regenerate_hint

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import xarray as xr

FORMAT_VERSION = "1.2"
LAYOUT_DIGEST = "layout_sha256"
# Readers accept any minor version of this major: minor bumps only add datasets or attributes.
SUPPORTED_MAJOR = 1
# Rows per chunk: 256 KiB chunks (128 rows at D = 512 float32).  A partial read decodes every chunk it
# touches, so 100 random rows of 50,000 decode ~23 % of the matrix with 128-row chunks against ~64 % with
# 512-row ones, while size and whole-matrix reads barely change (benchmarks/hdf5_layout.py; numbers in
# docs/hdf5-format.md).
CHUNK_BYTES = 1 << 18
SPLITS = schema_enum("attack", "splits")
# Display / stacking order of perturbation kinds (the schema's); kinds unknown here sort after these.
KIND_ORDER = schema_enum("attack", "kinds")


class DumpError(RuntimeError):
    """A feature dump is missing, truncated or not an ncpipe dump."""


class NotSupportedError(DumpError):
    """The file is a readable ncpipe file, but the operation asked for does not apply to its layout."""


def _attr(v: Any) -> Any:
    if isinstance(v, dict | list | tuple) and not (isinstance(v, list | tuple) and all(
            isinstance(x, int | float) for x in v)):
        return json.dumps(v, sort_keys=True)
    if v is None:
        return "none"
    if isinstance(v, str | np.str_):
        # str subclasses (torch.__version__ is a TorchVersion) would become fixed-width numpy unicode, which
        # HDF5 cannot store; plain str is written as variable-length UTF-8
        return str.__str__(v)
    return v


def set_attrs(obj: h5py.HLObject, attrs: dict[str, Any]) -> None:
    for k, v in attrs.items():
        obj.attrs[k] = _attr(v)


def chunk_rows(dim: int, itemsize: int) -> int:
    return int(max(1, min(4096, CHUNK_BYTES // max(1, dim * itemsize))))


def write_matrix(group: h5py.Group, name: str, data: np.ndarray, *, dtype: str = "float32",
                 compression: str | None = "gzip") -> h5py.Dataset:
    src = np.asarray(data)
    with np.errstate(over="ignore"):  # overflow is detected and reported just below
        data = src.astype(dtype, copy=False)
    if data.dtype.kind == "f" and src.dtype.kind == "f" and data.dtype.itemsize < src.dtype.itemsize:
        # float16 tops out at 65504: a silent inf would poison every metric downstream
        bad = ~np.isfinite(data) & np.isfinite(src)
        if bad.any():
            raise DumpError(f"{group.name}/{name}: {int(bad.sum())} values overflow {dtype} (max |x| = "
                            f"{float(np.abs(src).max()):.4g}); store features as float32 "
                            "(config features.dtype)")
    kw: dict[str, Any] = {}
    if data.size and data.ndim:  # an empty dataset stores no bytes to check
        # a Fletcher-32 checksum per chunk: a flipped byte on disk fails the read instead of becoming a number
        # (deflate alone misses some corruptions, and an uncompressed matrix has no other check)
        rows = min(len(data), chunk_rows(data.shape[1] if data.ndim > 1 else 1, data.itemsize))
        kw = {"chunks": (rows, *data.shape[1:]), "fletcher32": True}
        if compression and compression != "none":
            kw.update(compression=compression, shuffle=True)
            if compression == "gzip":
                kw["compression_opts"] = 4
    return group.create_dataset(name, data=data, **kw)


def write_array(group: h5py.Group, name: str, data: np.ndarray, dtype: str = "int64") -> h5py.Dataset:
    """A label / prediction / target / index vector, chunked with its Fletcher-32 checksum like the
    matrices: one flipped bit would otherwise move a sample to a neighbouring class without any error."""
    return write_matrix(group, name, np.asarray(data), dtype=dtype, compression=None)


def _attr_bytes(v: Any) -> bytes:
    if isinstance(v, bytes):
        return b"b" + v
    if isinstance(v, np.ndarray):
        return f"a{v.dtype.str}{v.shape}".encode() + (v.tobytes() if v.dtype != object else repr(v.tolist())
                                                       .encode())
    if isinstance(v, np.generic):
        return f"g{v.dtype.str}".encode() + v.tobytes()
    return f"{type(v).__name__}:{v!r}".encode()


def layout_digest(f: h5py.File) -> str:
    """sha256 over every object's name, every attribute, and each dataset's shape, dtype, chunks and filters.

    Attributes live in object headers, which Fletcher-32 (a dataset filter) does not cover: an edited
    ``epoch`` or ``method`` attribute would otherwise relabel every row of the metrics.
    """
    import hashlib

    h = hashlib.sha256()
    names: list[str] = ["/"]
    f.visit(names.append)
    for name in sorted(names):
        obj = f[name]
        h.update(f"\0{name}|{type(obj).__name__}|".encode())
        if isinstance(obj, h5py.Dataset):
            h.update(f"{obj.shape}|{obj.dtype.str}|{obj.chunks}|{obj.fletcher32}|{obj.compression}|"
                     f"{obj.shuffle}|".encode())
        for k in sorted(obj.attrs):
            if name == "/" and k in (LAYOUT_DIGEST, "complete"):
                continue
            h.update(k.encode() + b"=" + _attr_bytes(obj.attrs[k]) + b";")
    return h.hexdigest()


def _datasets(f: h5py.File) -> list[h5py.Dataset]:
    out: list[h5py.Dataset] = []
    f.visititems(lambda _n, o: out.append(o) if isinstance(o, h5py.Dataset) else None)
    return out


def checksum_report(f: h5py.File) -> dict[str, list[str]]:
    """Read every stored byte once: ``{"damaged": [datasets failing their checksum or read], "unchecked":
    [non-empty datasets stored without a checksum (dumps older than format 1.2)]}``."""
    damaged, unchecked = [], []
    for d in _datasets(f):
        if d.size and not d.fletcher32:
            unchecked.append(d.name)
        try:
            if d.size:
                d[()]
        except OSError:
            damaged.append(d.name)
    return {"damaged": damaged, "unchecked": unchecked}


def damage_error(path: str | os.PathLike, damaged: list[str]) -> DumpError:
    return DumpError(f"{path}: dataset(s) {', '.join(damaged)} fail their Fletcher-32 checksum (stored bytes "
                     f"changed on disk); {regenerate_hint(path)}")


class _VerifiedFile(h5py.File):
    """An ``h5py.File`` whose failed reads inside ``with`` name the file and the damaged dataset(s).

    HDF5 reports a failed chunk checksum as "Can't synchronously read data (filter returned failure during
    read)", naming neither; only on that error path is every dataset read once to find which.
    """

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, OSError) and not isinstance(exc, DumpError) and self.id.valid:
            try:
                damaged = checksum_report(self)["damaged"]
            except Exception:  # noqa: BLE001 - the original error is the one to report then
                damaged = []
            name = self.filename
            super().__exit__(exc_type, exc, tb)
            if damaged:
                raise damage_error(name, damaged) from exc
            return
        super().__exit__(exc_type, exc, tb)


@contextmanager
def create_dump(path: str | os.PathLike, root_attrs: dict[str, Any],
                expected_bytes: int | None = None) -> Iterator[h5py.File]:
    """Open a new dump under a temporary name; it appears under ``path`` only once complete.

    ``expected_bytes`` (an upper bound of the file size) is checked against the free space before HDF5
    starts: HDF5 may crash the process on a full disk instead of raising.
    """
    with atomic_output(path, expected_bytes=expected_bytes) as tmp:
        with h5py.File(tmp, "w", track_order=True) as f:
            set_attrs(f, {"format_version": FORMAT_VERSION, **root_attrs})
            yield f
            f.attrs[LAYOUT_DIGEST] = layout_digest(f)
            f.attrs["complete"] = True


def open_dump(path: str | os.PathLike, *, require_complete: bool = True) -> h5py.File:
    """Open a dump read-only, refusing files that are truncated or were never completed."""
    p = Path(path)
    if not p.exists():
        raise DumpError(f"feature dump {p} does not exist")
    try:
        f = _VerifiedFile(p, "r")
    except OSError as err:
        raise DumpError(f"feature dump {p} is not a readable HDF5 file (truncated or corrupted?): {err}; "
                        f"{regenerate_hint(p)}") from err
    if require_complete and (not f.attrs.get("complete", False) or "format_version" not in f.attrs):
        f.close()
        raise DumpError(f"feature dump {p} is incomplete or not an ncpipe dump (no 'complete' flag); "
                        f"{regenerate_hint(p)}")
    recorded = f.attrs.get(LAYOUT_DIGEST)
    if recorded is not None:
        try:
            actual = layout_digest(f)
        except (OSError, KeyError, RuntimeError) as err:
            actual = f"unreadable ({err})"
        if (recorded.decode() if isinstance(recorded, bytes) else str(recorded)) != actual:
            f.close()
            raise DumpError(f"{p}: its attributes or layout changed since it was written (they no longer "
                            f"match its {LAYOUT_DIGEST}); {regenerate_hint(p)}")
    version = f.attrs.get("format_version")
    if version is not None:
        version = version.decode() if isinstance(version, bytes) else str(version)
        try:
            major = int(version.split(".")[0])
        except ValueError:
            major = -1
        if major != SUPPORTED_MAJOR:
            f.close()
            raise DumpError(f"feature dump {p} has format_version {version}; this ncpipe reads "
                            f"{SUPPORTED_MAJOR}.x (see docs/hdf5-format.md)")
    return f


def attrs_dict(obj: h5py.HLObject) -> dict[str, Any]:
    out = {}
    for k, v in obj.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, np.ndarray):
            v = v.tolist()
        out[k] = v
    return out


def load_features(path: str | os.PathLike, split: str, perturbation: str
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """``(features, labels, predictions, attrs)`` of one group; attrs merge the root's and the group's.

    Features keep their stored dtype (float32, or float16 when written so): cast before doing algebra in them;
    ``ncpipe.metrics`` computes in float64 whatever it receives.  A layerwise file is refused with a pointer
    to :func:`load_layer`.
    """
    with open_dump(path) as f:
        if is_layerwise(f):
            raise NotSupportedError(f"{path} is a layerwise file; read it with load_layer(path, layer, kind) "
                                    f"(layers: {layer_order(f)}) or to_xarray(path)")
        key = f"{split}/{perturbation}"
        if key not in f:
            raise DumpError(f"{path} has no group {key!r}; it holds {[f'{s}/{k}' for s, k in group_keys(f)]}")
        g = f[key]
        attrs = {**attrs_dict(f), **attrs_dict(g)}
        if "targets" in g:
            attrs["targets"] = g["targets"][:]
        return g["features"][:], g["labels"][:], g["predictions"][:], attrs


def is_layerwise(f: h5py.File) -> bool:
    """Whether an open file has the layerwise layout (``/layers/{layer}/{kind}``)."""
    return "layers" in f


def layer_order(f: h5py.File) -> list[str]:
    """The probe names of an open layerwise file, shallow to deep (unrecorded ``layer_index``: last)."""
    def index(name: str) -> tuple[int, str]:
        g = f[f"layers/{name}"]
        li = g.attrs.get("layer_index")
        if li is None:
            li = next((g[k].attrs.get("layer_index") for k in g if "layer_index" in g[k].attrs), None)
        return (int(li) if li is not None else 1 << 30, name)

    return sorted(f["layers"], key=index)


def layers(path: str | os.PathLike) -> list[str]:
    """The probe names of a layerwise file, shallow to deep (by the recorded ``layer_index``)."""
    with open_dump(path) as f:
        if not is_layerwise(f):
            raise NotSupportedError(f"{path} is a feature dump, not a layerwise file; use groups(path)")
        return layer_order(f)


def load_layer(path: str | os.PathLike, layer: str, perturbation: str
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """``(features, labels, indices, attrs)`` of one probe and perturbation of a layerwise file.

    ``features`` is ``(n, d)`` in the stored dtype (the probe's output flattened, after the optional pooling;
    ``attrs["original_shape"]`` / ``attrs["stored_shape"]`` give the per-sample shapes); ``indices`` are the
    rows of the split (``attrs["split"]``) the n subsampled images are; attrs merge the root's and the
    group's.
    """
    with open_dump(path) as f:
        if not is_layerwise(f):
            raise NotSupportedError(f"{path} is a feature dump, not a layerwise file; use load_features")
        key = f"layers/{layer}/{perturbation}"
        if key not in f:
            have = [f"{n}/{k}" for n in layer_order(f) for k in sorted(f[f"layers/{n}"], key=kind_sort_key)]
            raise DumpError(f"{path} has no layerwise group {layer}/{perturbation}; it holds {have}")
        g = f[key]
        return g["features"][:], g["labels"][:], g["indices"][:], {**attrs_dict(f), **attrs_dict(g)}


def load_classifier(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    with open_dump(path) as f:
        return f["classifier/weight"][:], f["classifier/bias"][:]


def kind_sort_key(kind: str) -> tuple[int, str]:
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), kind)


def group_keys(f: h5py.File) -> list[tuple[str, str]]:
    return [(s, k) for s in SPLITS if s in f for k in sorted(f[s], key=kind_sort_key)]


def groups(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(split, perturbation)`` of every group, splits train then test, kinds in ``KIND_ORDER``."""
    with open_dump(path) as f:
        return group_keys(f)


# ------------------------------------------------------------------------------------------ tabular / xarray
def samples_frame(path: str | os.PathLike) -> pd.DataFrame:
    """Per-sample metadata, one row per sample per group (no features).

    Columns: ``split``, ``perturbation`` (categoricals), ``index`` (row within the split: the same image in
    every group of that split), ``label``, ``prediction``, ``target`` (nullable Int64: ``<NA>`` outside
    targeted groups) and ``correct`` (prediction == label).
    """
    import pandas as pd

    parts = []
    with open_dump(path) as f:
        if is_layerwise(f):
            # no per-sample predictions there, and each layer holds the same subsample: one row per sample
            # and group would only repeat the labels; the loaders give what the file has
            raise NotSupportedError(f"{path} is a layerwise file, which holds no per-sample predictions; use "
                                    "to_xarray(path) (labels and split indices per sample) or "
                                    "load_layer(path, layer, kind)")
        keys = group_keys(f)
        for split, kind in keys:
            g = f[f"{split}/{kind}"]
            lab, pred = g["labels"][:], g["predictions"][:]
            tgt = pd.array(g["targets"][:], dtype="Int64") if "targets" in g else pd.array([pd.NA] * len(lab),
                                                                                             dtype="Int64")
            parts.append(pd.DataFrame({"split": split, "perturbation": kind, "index": np.arange(len(lab)),
                                       "label": lab, "prediction": pred, "target": tgt,
                                       "correct": pred == lab}))
    cols = ["split", "perturbation", "index", "label", "prediction", "target", "correct"]
    if not parts:
        return pd.DataFrame({c: [] for c in cols})
    df = pd.concat(parts, ignore_index=True)
    df["split"] = pd.Categorical(df["split"], categories=[s for s in SPLITS if s in set(df["split"])])
    kinds = sorted({k for _, k in keys}, key=kind_sort_key)
    df["perturbation"] = pd.Categorical(df["perturbation"], categories=kinds)
    return df[cols]


def _xarray() -> Any:
    try:
        import xarray as xr
    except ImportError as err:
        raise ImportError("ncpipe.io.to_xarray needs the optional dependency xarray: "
                          "pip install 'ncpipe[test]' (or pip install xarray)") from err
    return xr


def to_xarray(path: str | os.PathLike, split: str | None = None) -> xr.Dataset:
    """The dump (or one ``split`` of it) as an in-memory ``xarray.Dataset`` with named dimensions.

    Dimensions: ``perturbation`` (clean, pgd, ...), ``sample``, ``feature`` and ``class``.  With ``split``
    given, ``sample`` is the row index within that split.  Without, both splits are stacked along ``sample``,
    indexed by a pandas MultiIndex of ``split`` and ``index`` (``ds.sel(split="test")`` selects one split;
    xarray then names the remaining dimension ``index``).
    Variables: ``features(perturbation, sample, feature)`` in the stored dtype, ``predictions(perturbation,
    sample)``, ``labels(sample)``, ``targets(sample)`` (only when a targeted group exists; -1 where a split
    has none), ``classifier_weight(class, feature)`` and ``classifier_bias(class)``.  A split that lacks a
    perturbation has NaN features and -1 predictions there.
    Root attributes become ``ds.attrs``; each group's attributes are in ``ds.attrs["groups"]`` (JSON).
    Call ``ds.reset_index("sample")`` before ``to_netcdf``: netCDF cannot store a MultiIndex.

    A layerwise file gives one variable per probe, ``{layer}(perturbation, sample, {layer}_feature)`` (the
    probes' widths differ), with ``labels(sample)`` and ``index(sample)`` (the row of the split each
    subsampled image is); ``ds.attrs["layers"]`` lists the probes shallow to deep.
    """
    xr = _xarray()
    import pandas as pd

    with open_dump(path) as f:
        if is_layerwise(f):
            return _layerwise_xarray(xr, f, path, split)
        keys = group_keys(f)
        if not keys:
            raise DumpError(f"{path} holds no /{{split}}/{{kind}} groups")
        splits = [s for s in SPLITS if any(s == k[0] for k in keys)]
        if split is not None:
            if split not in splits:
                raise DumpError(f"{path} has no split {split!r}; it holds {splits}")
            splits, keys = [split], [k for k in keys if k[0] == split]
        kinds = sorted({k for _, k in keys}, key=kind_sort_key)
        first = {s: f[f"{s}/{next(k for s2, k in keys if s2 == s)}"] for s in splits}
        sizes = [len(first[s]["labels"]) for s in splits]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        dim = first[splits[0]]["features"].shape[1]
        dtype = first[splits[0]]["features"].dtype
        feats = np.full((len(kinds), offsets[-1], dim), np.nan, dtype=dtype)
        preds = np.full((len(kinds), offsets[-1]), -1, dtype=np.int64)
        labels = np.empty(offsets[-1], dtype=np.int64)
        targets = np.full(offsets[-1], -1, dtype=np.int64)
        group_attrs = {}
        for si, s in enumerate(splits):
            a, b = int(offsets[si]), int(offsets[si + 1])
            labels[a:b] = first[s]["labels"][:]
            for ki, k in enumerate(kinds):
                if f"{s}/{k}" not in f:
                    continue
                g = f[f"{s}/{k}"]
                if "indices" in g:  # a subset group (autoattack, per_class > 0): its rows, NaN elsewhere
                    rows = a + g["indices"][:]
                    if g["features"].shape[1] != dim or not np.array_equal(g["labels"][:], labels[rows]):
                        raise DumpError(f"{path}: group {s}/{k} does not match its indices' labels")
                    feats[ki, rows] = g["features"][:]
                    preds[ki, rows] = g["predictions"][:]
                    group_attrs[f"{s}/{k}"] = attrs_dict(g)
                    continue
                if g["features"].shape != (b - a, dim) or not np.array_equal(g["labels"][:], labels[a:b]):
                    raise DumpError(f"{path}: group {s}/{k} is not row-aligned with {first[s].name} "
                                    "(different shape or labels); read it with load_features instead")
                g["features"].read_direct(feats, dest_sel=np.s_[ki, a:b])
                preds[ki, a:b] = g["predictions"][:]
                if "targets" in g:
                    targets[a:b] = g["targets"][:]
                group_attrs[f"{s}/{k}"] = attrs_dict(g)
        weight, bias = f["classifier/weight"][:], f["classifier/bias"][:]
        root = attrs_dict(f)
    if split is None:
        split_of = np.repeat(np.array(splits, dtype=object), sizes)
        index = np.concatenate([np.arange(n) for n in sizes])
        sample = xr.Coordinates.from_pandas_multiindex(
            pd.MultiIndex.from_arrays([split_of, index], names=["split", "index"]), "sample")
    else:
        sample = xr.Coordinates({"sample": np.arange(sizes[0])})
    data_vars: dict[str, Any] = {
        "features": (("perturbation", "sample", "feature"), feats),
        "predictions": (("perturbation", "sample"), preds),
        "labels": ("sample", labels),
        "classifier_weight": (("class", "feature"), weight),
        "classifier_bias": ("class", bias),
    }
    if any(k == "targeted" for _, k in keys):
        data_vars["targets"] = ("sample", targets)
    ds = xr.Dataset(data_vars, coords=sample).assign_coords(
        {"perturbation": kinds, "feature": np.arange(dim), "class": np.arange(len(bias))})
    ds.attrs = {**root, "groups": json.dumps(group_attrs, sort_keys=True)}
    if split is not None:
        ds.attrs["split"] = split
    return ds


def _layerwise_xarray(xr: Any, f: h5py.File, path: str | os.PathLike, split: str | None) -> xr.Dataset:
    root = attrs_dict(f)
    stored_split = root.get("split")
    if split is not None and stored_split is not None and split != stored_split:
        raise DumpError(f"{path} is a layerwise file of the {stored_split!r} split, not {split!r}")
    names = layer_order(f)
    if not names:
        raise DumpError(f"{path} holds no /layers/{{layer}}/{{kind}} groups")
    kinds = sorted({k for n in names for k in f[f"layers/{n}"]}, key=kind_sort_key)
    ref = next(f[f"layers/{n}/{k}"] for n in names for k in kinds if f"layers/{n}/{k}" in f)
    labels, index = ref["labels"][:], ref["indices"][:]
    data_vars: dict[str, Any] = {"labels": ("sample", labels)}
    group_attrs = {}
    for n in names:
        present = [k for k in kinds if f"layers/{n}/{k}" in f]
        dim = f[f"layers/{n}/{present[0]}/features"].shape[1]
        dtype = f[f"layers/{n}/{present[0]}/features"].dtype
        feats = np.full((len(kinds), len(labels), dim), np.nan, dtype=dtype)
        for ki, k in enumerate(kinds):
            if k not in present:
                continue
            g = f[f"layers/{n}/{k}"]
            if (g["features"].shape != (len(labels), dim) or not np.array_equal(g["labels"][:], labels)
                    or not np.array_equal(g["indices"][:], index)):
                raise DumpError(f"{path}: group {g.name} is not row-aligned with {ref.name} (different "
                                "shape, labels or indices); read it with load_layer instead")
            g["features"].read_direct(feats, dest_sel=np.s_[ki])
            group_attrs[f"{n}/{k}"] = attrs_dict(g)
        data_vars[n] = (("perturbation", "sample", f"{n}_feature"), feats)
    ds = xr.Dataset(data_vars, coords={"sample": np.arange(len(labels)), "index": ("sample", index),
                                       "perturbation": kinds})
    ds.attrs = {**root, "layers": names, "groups": json.dumps(group_attrs, sort_keys=True)}
    return ds
