"""Speed of ``ncpipe.metrics.neural_collapse`` against the plain reference (tests/reference_metrics.py).

    python benchmarks/metrics_speed.py [--n 50000] [--d 512] [--classes 10 100] [--threads 2] [--repeats 3]

Times the full measure set (NC1-NC4, accuracies, with a classifier) on float32 features with class structure,
checks that the implementations agree, and prints a table: fast time (best of ``--repeats``), the time of the
reference (one run: it takes a while; Sigma_W summed one outer product per sample, as the definition and the
authors' code form it) and of the dense baseline (the same reference, Sigma_W built with one BLAS product per
class: the fastest explicit D x D route), the ratios and the largest relative difference over all keys.
Wall-clock and process CPU time are both shown: on a shared machine the wall clock measures the other tenants
too. Thread counts of every BLAS/OpenMP pool are fixed *before* numpy and torch are imported:
``--threads 2`` = two cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50_000, help="samples")
    p.add_argument("--d", type=int, default=512, help="feature dimension")
    p.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-reference", action="store_true", help="time the fast code only")
    return p.parse_args()


def main() -> None:
    args = parse()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from ncpipe.metrics import neural_collapse

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from reference_metrics import reference_neural_collapse

    rng = np.random.default_rng(0)
    print(f"n={args.n} d={args.d} threads={args.threads} cpu_count={os.cpu_count()} "
          f"load_avg={os.getloadavg()[0]:.1f} torch={torch.__version__} numpy={np.__version__}")
    header = (f"{'C':>5} {'fast wall [s]':>14} {'fast cpu [s]':>13} {'ref wall [s]':>13} {'ref cpu [s]':>12} "
              f"{'ratio wall':>11} {'ratio cpu':>10} {'dense wall [s]':>15} {'ratio wall':>11} "
              f"{'max rel diff':>13}")
    print(header)
    print("-" * len(header))
    for c in args.classes:
        y = rng.integers(0, c, args.n)
        h = (rng.normal(size=(c, args.d))[y] + rng.normal(size=(args.n, args.d))).astype(np.float32)
        w = rng.normal(size=(c, args.d)).astype(np.float32)
        b = rng.normal(size=c).astype(np.float32)
        walls, cpus = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            fast = neural_collapse(h, y, w, b)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        f_wall, f_cpu = min(walls), min(cpus)
        if args.no_reference:
            print(f"{c:>5} {f_wall:>14.3f} {f_cpu:>13.3f}")
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        ref = reference_neural_collapse(h, y, w, b)
        r_wall, r_cpu = time.perf_counter() - t0, time.process_time() - c0
        t0 = time.perf_counter()
        dense = reference_neural_collapse(h, y, w, b, scatter="classes")
        d_wall = time.perf_counter() - t0
        diff = max(abs(fast[k] - r[k]) / max(abs(r[k]), 1e-300) for r in (ref, dense) for k in r)
        print(f"{c:>5} {f_wall:>14.3f} {f_cpu:>13.3f} {r_wall:>13.2f} {r_cpu:>12.2f} "
              f"{r_wall / f_wall:>10.0f}x {r_cpu / f_cpu:>9.0f}x {d_wall:>15.2f} {d_wall / f_wall:>10.0f}x "
              f"{diff:>13.1e}")


if __name__ == "__main__":
    main()
