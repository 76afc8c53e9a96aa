"""The aggregate jobs: per-job tidy tables concatenated into ``results/metrics.csv``, ``layerwise.csv`` and
``train_logs.csv``.

No pandas or numpy here (``utils.Table``): these jobs only read, concatenate, sort and write text, and
importing pandas was most of each job's time.  Rows are ordered as ``pandas.sort_values(kind="stable")``
ordered them, and cells keep their text, so the outputs are the bytes the pandas version wrote.  Nor does
this module import the stages whose tables it reads (``evaluate`` loads h5py and numpy, ``layerwise``
torch): their tables' sort keys are spelled out here, and tests/test_tidy.py checks them against the
writers' column lists.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from . import paths
from .utils import Table, read_table_verified

# Row order of ``paths.ALL_METRICS``: ``evaluate.ID_COLUMNS``, then grouping and metric.
METRICS_KEYS = ["dataset", "arch", "method", "norm", "epsilon", "seed", "epoch", "split", "perturbation",
                "grouping", "metric"]

# Row order of ``paths.ALL_LAYERWISE``: by cell, then from the input to the output layer.
LAYERWISE_KEYS = ["dataset", "arch", "regime", "norm", "epsilon", "seed", "epoch", "split", "perturbation",
                  "layer_index", "metric"]

# The run identity that ``paths.ALL_TRAIN_LOGS`` puts before each training log's own columns.
RUN_COLUMNS = ["dataset", "arch", "regime", "method", "seed"]


def aggregate_metrics(tables: list[str | os.PathLike]) -> Table:
    """Concatenate per-cell metrics tables, each checked against its digest (``read_table_verified``)."""
    if not tables:
        raise ValueError("no metrics tables to aggregate")
    return Table.concat(read_table_verified(t, "metrics table") for t in tables).sorted_by(METRICS_KEYS)


def aggregate_layerwise(tables: list[str | os.PathLike]) -> Table:
    """Concatenate per-checkpoint layerwise tables (``layerwise.COLUMNS``) into ``paths.ALL_LAYERWISE``."""
    if not tables:
        raise ValueError("no layerwise tables to aggregate")
    return Table.concat(read_table_verified(t, "layerwise table") for t in tables).sorted_by(LAYERWISE_KEYS)


def _run_regex() -> re.Pattern[str]:
    # the inverse of paths.TRAIN_LOG, so a log's run identity comes from where the workflow wrote it
    return re.compile(rf"(?:.*/)?{paths.pattern_regex(paths.TRAIN_LOG)}")


def aggregate_train_logs(logs: list[str | os.PathLike]) -> Table:
    """Concatenate per-run ``train_log.csv`` files with their run identity (RUN_COLUMNS first)."""
    from .grid import method_of  # here: grid loads specs (~0.04 s), which the other aggregate jobs never use

    rx = _run_regex()
    parts = []
    for p in logs:
        m = rx.fullmatch(Path(p).as_posix())
        if m is None:
            raise ValueError(f"{p} is not a training log path ({paths.TRAIN_LOG})")
        ident = m.groupdict()
        run = [ident["dataset"], ident["arch"], ident["regime"], method_of(ident["regime"]),
               str(int(ident["seed"]))]
        log = read_table_verified(p, "training log")
        # the log's own columns (ncpipe.train.LOG_COLUMNS) follow, as written and in their order
        own = [i for i, c in enumerate(log.columns) if c not in RUN_COLUMNS]
        parts.append(Table([*RUN_COLUMNS, *(log.columns[i] for i in own)],
                           [[*run, *(r[i] for i in own)] for r in log.rows]))
    if not parts:
        return Table(list(RUN_COLUMNS), [])
    return Table.concat(parts).sorted_by([*RUN_COLUMNS, "epoch"])
