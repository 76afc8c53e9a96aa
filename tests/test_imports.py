"""CPU bookkeeping stages load only what they use: no torch (its import is most of such a job's time)."""

from __future__ import annotations

import json
import subprocess
import sys

from synthetic_tables import layerwise_frame, metrics_frame, train_logs_frame

from ncpipe.utils import write_csv_verified

# Runs one `ncpipe` command in this interpreter, then reports whether torch's extension was really loaded
# (ncpipe.metrics registers torch lazily, so "torch" in sys.modules alone means nothing).
_PROBE = """
import json, sys
from ncpipe import cli
cli.main(sys.argv[1:])
print(json.dumps({m: m in sys.modules for m in ("torch._C", "scipy", "matplotlib")}))
"""


def _loaded(*argv: str) -> dict[str, bool]:
    res = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_aggregates_and_summary_never_load_torch(tmp_path):
    m1, m2 = tmp_path / "a.csv", tmp_path / "b.csv"
    df = metrics_frame(regimes=("st",), seeds=(1,), epochs=(1, 2))
    write_csv_verified(df[df.epoch == 1], m1)  # as the metrics stage writes them (with their digests)
    write_csv_verified(df[df.epoch == 2], m2)
    lw = tmp_path / "lw.csv"
    write_csv_verified(layerwise_frame(regimes=("st",), seeds=(1,), layers=2), lw)
    run = tmp_path / "run"
    run.mkdir()
    for argv in (["aggregate", "--out", str(run / "metrics.csv"), str(m1), str(m2)],
                 ["aggregate-layerwise", "--out", str(run / "layerwise.csv"), str(lw)],
                 ["summary", str(run)]):
        assert _loaded(*argv) == {"torch._C": False, "scipy": False, "matplotlib": False}, argv


def test_metrics_of_numpy_inputs_never_load_torch():
    code = ("import sys, numpy as np; from ncpipe import metrics; h = np.eye(3); y = np.arange(3); "
            "v = metrics.neural_collapse(h, y, weight=np.eye(3), bias=np.zeros(3)); "
            "metrics.class_means(h, y, 3); metrics.ncc_accuracy(h, y, h); metrics.ncc_predict(h, h); "
            "metrics.simplex_alignment(h, h); print('torch._C' in sys.modules, round(v['nc1'], 12))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "0.0"]


def test_the_metrics_stage_never_loads_torch(tmp_path, tiny_dump):
    # --threads as the rule passes it: setting the thread count must not import torch either
    argv = ["--threads", "1", "metrics", "--dump", str(tiny_dump["dump"]), "--regime", "st",
            "--out", str(tmp_path / "m.csv")]
    assert _loaded(*argv) == {"torch._C": False, "scipy": False, "matplotlib": False}
    assert (tmp_path / "m.csv").stat().st_size > 0


# The bookkeeping jobs that only move text load neither pandas nor numpy (their imports were most of each
# job's time); the metrics stage needs numpy and h5py, not pandas.
_PROBE_LIGHT = """
import json, sys
from ncpipe import cli
numpy_before = "numpy" in sys.modules
cli.main(sys.argv[1:])
print(json.dumps({"numpy_before_run": numpy_before, "numpy": "numpy" in sys.modules,
                  "pandas": "pandas" in sys.modules, "jsonschema": "jsonschema" in sys.modules}))
"""


def _light(*argv: str) -> dict[str, bool]:
    res = subprocess.run([sys.executable, "-c", _PROBE_LIGHT, *argv], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_aggregate_jobs_load_no_pandas_nor_numpy(tmp_path):
    from ncpipe import paths

    m = tmp_path / "m.csv"
    write_csv_verified(metrics_frame(regimes=("st",), seeds=(1,), epochs=(1,)), m)
    lw = tmp_path / "lw.csv"
    write_csv_verified(layerwise_frame(regimes=("st",), seeds=(1,), layers=2), lw)
    log = tmp_path / paths.format_path(paths.TRAIN_LOG, dataset="cifar10", arch="vgg11bn", regime="st",
                                       seed=1)
    log.parent.mkdir(parents=True)
    write_csv_verified(train_logs_frame(regimes=("st",), seeds=(1,), epochs=2).drop(
        columns=["dataset", "arch", "regime", "method", "seed"]), log)
    none = {"numpy_before_run": False, "numpy": False, "pandas": False, "jsonschema": False}
    for argv in (["aggregate", "--out", str(tmp_path / "a.csv"), str(m)],
                 ["aggregate-layerwise", "--out", str(tmp_path / "b.csv"), str(lw)],
                 ["train-logs", "--out", str(tmp_path / "c.csv"), str(log)]):
        assert _light(*argv) == none, argv


def test_the_metrics_stage_loads_no_pandas_and_numpy_only_after_the_thread_setting(tmp_path, tiny_dump):
    # numpy's OpenBLAS reads OMP_NUM_THREADS once, when numpy loads: `--threads` must come first, or the
    # BLAS sums (and the last digits of NC1) would depend on the machine's core count
    argv = ["--threads", "1", "metrics", "--dump", str(tiny_dump["dump"]), "--regime", "st",
            "--out", str(tmp_path / "m.csv")]
    assert _light(*argv) == {"numpy_before_run": False, "numpy": True, "pandas": False, "jsonschema": False}
