"""HDF5 feature dumps: writing (atomically) and reading.

Layout (documented in docs/hdf5-format.md)::

    /                       attrs: format_version, dataset, arch, method, regime, seed, epoch, norm, epsilon, ...
    /classifier/weight      (C, D) float32     last linear layer
    /classifier/bias        (C,)   float32
    /{split}/{kind}/features     (N, D) float32 (or float16)
    /{split}/{kind}/labels       (N,)   int64  true labels
    /{split}/{kind}/predictions  (N,)   int64  network argmax
    /{split}/{kind}/targets      (N,)   int64  only for kind = targeted
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .utils import atomic_output

FORMAT_VERSION = "1.0"
# Rows per chunk: ~1 MiB chunks at D = 512 float32, so a partial read of a few rows touches one chunk.
CHUNK_BYTES = 1 << 20


class DumpError(RuntimeError):
    """A feature dump is missing, truncated or not an ncpipe dump."""


def _attr(v: Any) -> Any:
    if isinstance(v, dict | list | tuple) and not (isinstance(v, list | tuple) and all(
            isinstance(x, int | float) for x in v)):
        return json.dumps(v, sort_keys=True)
    if v is None:
        return "none"
    return v


def set_attrs(obj: h5py.HLObject, attrs: dict[str, Any]) -> None:
    for k, v in attrs.items():
        obj.attrs[k] = _attr(v)


def chunk_rows(dim: int, itemsize: int) -> int:
    return int(max(1, min(4096, CHUNK_BYTES // max(1, dim * itemsize))))


def write_matrix(group: h5py.Group, name: str, data: np.ndarray, *, dtype: str = "float32",
                 compression: str | None = "gzip") -> h5py.Dataset:
    data = np.asarray(data, dtype=dtype)
    kw: dict[str, Any] = {}
    if compression and compression != "none" and data.size:
        rows = min(len(data), chunk_rows(data.shape[1] if data.ndim > 1 else 1, data.itemsize))
        kw = {"chunks": (rows, *data.shape[1:]), "compression": compression, "shuffle": True}
        if compression == "gzip":
            kw["compression_opts"] = 4
    return group.create_dataset(name, data=data, **kw)


@contextmanager
def create_dump(path: str | os.PathLike, root_attrs: dict[str, Any]) -> Iterator[h5py.File]:
    """Open a new dump under a temporary name; it appears under ``path`` only once complete."""
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w", track_order=True) as f:
            set_attrs(f, {"format_version": FORMAT_VERSION, **root_attrs})
            yield f
            f.attrs["complete"] = True


def open_dump(path: str | os.PathLike) -> h5py.File:
    """Open a dump read-only, refusing files that are truncated or were never completed."""
    p = Path(path)
    if not p.exists():
        raise DumpError(f"feature dump {p} does not exist")
    try:
        f = h5py.File(p, "r")
    except OSError as err:
        raise DumpError(f"feature dump {p} is not a readable HDF5 file (truncated or corrupted?): {err}") from err
    if not f.attrs.get("complete", False) or "format_version" not in f.attrs:
        f.close()
        raise DumpError(f"feature dump {p} is incomplete or not an ncpipe dump (no 'complete' flag); rerun its job")
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
    """``(features, labels, predictions, attrs)`` of one group; attrs merge the root's and the group's."""
    with open_dump(path) as f:
        key = f"{split}/{perturbation}"
        if key not in f:
            groups = [f"{s}/{k}" for s in f if s != "classifier" for k in f[s]]
            raise DumpError(f"{path} has no group {key!r}; it holds {groups}")
        g = f[key]
        attrs = {**attrs_dict(f), **attrs_dict(g)}
        if "targets" in g:
            attrs["targets"] = g["targets"][:]
        return g["features"][:], g["labels"][:], g["predictions"][:], attrs


def load_classifier(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    with open_dump(path) as f:
        return f["classifier/weight"][:], f["classifier/bias"][:]


def groups(path: str | os.PathLike) -> list[tuple[str, str]]:
    with open_dump(path) as f:
        return [(s, k) for s in f if s in ("train", "test") for k in f[s]]
