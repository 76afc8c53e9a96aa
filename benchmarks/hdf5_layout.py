"""Measure HDF5 chunk / compression / dtype choices for a feature matrix (numbers in docs/hdf5-format.md).

For each layout: file size, write time, and the time to read 100 random rows, one class (10 % of the rows,
scattered, as in a dump whose rows follow the data order), and the whole matrix.  The matrix is synthetic but
shaped like penultimate ReLU features of a 10-class network: non-negative, ~40 % exact zeros, class structure.

    python benchmarks/hdf5_layout.py                    # 50,000 x 512, the issue's size
    python benchmarks/hdf5_layout.py --rows 5000 --repeats 1 --out /tmp/b   # a quick smoke run

Each read is timed on a freshly opened file (so HDF5's chunk cache starts empty), repeated, and the minimum is
reported; the operating system's page cache is warm, so these are decode costs, not disk costs.  Times are the
process's CPU time (user + system, ``time.process_time``), not wall time: on a shared machine wall time mostly
measures the other jobs, while reading and decoding chunks from the page cache is this process's CPU work.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ncpipe.io import chunk_rows, write_matrix

# (name, dtype, chunk rows or None for contiguous, compression, compression_opts, shuffle, fletcher32)
LAYOUTS: list[tuple[str, str, int | None, str | None, int | None, bool, bool]] = [
    ("contiguous, uncompressed", "float32", None, None, None, False, False),
    ("chunks 512 rows, uncompressed", "float32", 512, None, None, False, False),
    ("chunks 128 rows, uncompressed+fletcher32", "float32", 128, None, None, False, True),
    ("chunks 64 rows, shuffle+gzip4", "float32", 64, "gzip", 4, True, False),
    ("chunks 128 rows, shuffle+gzip4", "float32", 128, "gzip", 4, True, False),
    ("chunks 128 rows, shuffle+gzip4+fletcher32", "float32", 128, "gzip", 4, True, True),
    ("chunks 256 rows, shuffle+gzip4", "float32", 256, "gzip", 4, True, False),
    ("chunks 512 rows, shuffle+gzip4", "float32", 512, "gzip", 4, True, False),
    ("chunks 2048 rows, shuffle+gzip4", "float32", 2048, "gzip", 4, True, False),
    ("chunks 512 rows, gzip4, no shuffle", "float32", 512, "gzip", 4, False, False),
    ("chunks 512 rows, shuffle+gzip1", "float32", 512, "gzip", 1, True, False),
    ("chunks 512 rows, shuffle+gzip9", "float32", 512, "gzip", 9, True, False),
    ("chunks 512 rows, shuffle+lzf", "float32", 512, "lzf", None, True, False),
    ("float16, chunks 256 rows, shuffle+gzip4+fletcher32", "float16", 256, "gzip", 4, True, True),
    ("float16, chunks 256 rows, uncompressed", "float16", 256, None, None, False, False),
]


def _is_default(layout: tuple, d: int) -> bool:
    """The layout ``ncpipe.io.write_matrix`` writes by default: shuffle, gzip 4, fletcher32, 256 KiB chunks"""
    _, dtype, rows, comp, opts, shuffle, fletcher32 = layout
    return rows == chunk_rows(d, np.dtype(dtype).itemsize) and (comp, opts, shuffle, fletcher32) == (
        "gzip", 4, True, True)


def synthetic_features(n: int, d: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    means = np.abs(rng.normal(0.0, 1.0, (classes, d)))
    x = means[labels] + rng.normal(0.0, 0.8, (n, d))
    return np.maximum(x, 0.0).astype(np.float32), labels


def _write(path: Path, x: np.ndarray, layout: tuple) -> float:
    _, dtype, rows, comp, opts, shuffle, fletcher32 = layout
    t = time.process_time()
    with h5py.File(path, "w") as f:
        if _is_default(layout, x.shape[1]):
            ds = write_matrix(f, "features", x, dtype=dtype, compression="gzip")  # the writer extract.py uses
            assert ds.chunks == (rows, x.shape[1]) and ds.fletcher32, (ds.chunks, ds.fletcher32)
        else:
            kw: dict[str, Any] = {}
            if rows is not None:
                kw = {"chunks": (min(rows, len(x)), x.shape[1]), "compression": comp,
                      "compression_opts": opts, "shuffle": shuffle, "fletcher32": fletcher32}
            f.create_dataset("features", data=x.astype(dtype), **kw)
    return time.process_time() - t


def _time(path: Path, fn: Any, repeats: int) -> float:
    best = np.inf
    for _ in range(repeats):
        with h5py.File(path, "r") as f:
            t = time.process_time()
            fn(f["features"])
            best = min(best, time.process_time() - t)
    return best


def run(n: int, d: int, classes: int, repeats: int, out: Path) -> list[dict[str, Any]]:
    x, labels = synthetic_features(n, d, classes)
    rng = np.random.default_rng(1)
    rows100 = np.sort(rng.choice(n, size=min(100, n), replace=False))
    one_class = np.flatnonzero(labels == 0)  # increasing, as h5py's fancy indexing requires
    mask = labels == 0
    results = []
    for layout in LAYOUTS:
        path = out / "layout.h5"
        wt = _write(path, x, layout)
        default = _is_default(layout, d)
        res = {
            "layout": layout[0] + (" (ncpipe default)" if default else ""),
            "size_mb": path.stat().st_size / 1e6,
            "write_s": wt,
            "rows100_ms": 1e3 * _time(path, lambda ds: ds[rows100], repeats),
            "class_fancy_ms": 1e3 * _time(path, lambda ds: ds[one_class], repeats),
            "class_via_full_ms": 1e3 * _time(path, lambda ds: ds[:][mask], repeats),
            "full_ms": 1e3 * _time(path, lambda ds: ds[:], repeats),
        }
        with h5py.File(path) as f:  # lossless check (float16: within its rounding)
            np.testing.assert_allclose(f["features"][:].astype(np.float32), x, rtol=2 ** -10, atol=1e-7)
        results.append(res)
        path.unlink()
        print(f"{res['layout']:<58} {res['size_mb']:7.1f} MB  write {res['write_s']:5.2f} s  "
              f"100 rows {res['rows100_ms']:7.1f} ms  class {res['class_fancy_ms']:7.1f} ms "
              f"(via full {res['class_via_full_ms']:6.1f})  full {res['full_ms']:6.1f} ms", flush=True)
    return results


def markdown(results: list[dict[str, Any]], n: int, d: int) -> str:
    lines = [f"| layout ({n:,} x {d}); CPU times | size MB | write s | 100 random rows ms "
             "| one class (fancy) ms | one class (read all, mask) ms | whole matrix ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['layout']} | {r['size_mb']:.1f} | {r['write_s']:.2f} | {r['rows100_ms']:.1f} | "
              f"{r['class_fancy_ms']:.0f} | {r['class_via_full_ms']:.0f} | {r['full_ms']:.0f} |"
              for r in results]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="scratch directory (default: a temporary one)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = a.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        results = run(a.rows, a.dim, a.classes, a.repeats, out)
    print()
    print(markdown(results, a.rows, a.dim))


if __name__ == "__main__":
    main()
