"""Every output path of the workflow, in one place.

Patterns use Snakemake wildcard syntax; ``format_path`` fills them from Python, so the rules, the CLI, the
tests and the aggregation code all derive paths from these strings and never rebuild them by hand.
"""

from __future__ import annotations

import re
from typing import Any

RESULTS = "results"
LOGS = "logs"
BENCH = f"{RESULTS}/benchmarks"

# One training run: dataset x architecture x regime (method + training threat) x seed.
RUN = RESULTS + "/{dataset}/{arch}/{regime}/seed{seed}"
CHECKPOINT = RUN + "/checkpoints/epoch{epoch}.pt"
TRAIN_LOG = RUN + "/train_log.csv"
RESUME_DIR = RUN + "/.resume"  # not an output: survives a killed job so the rerun can continue

# One evaluation cell: a checkpoint x an evaluation threat model (norm, epsilon in 1/255 units).
CELL = "epoch{epoch}_{norm}_eps{eps}"
FEATURES = RUN + "/features/" + CELL + ".h5"
METRICS = RUN + "/metrics/" + CELL + ".csv"
LAYERWISE = RUN + "/layerwise/" + CELL + ".csv"
LAYERWISE_H5 = RUN + "/layerwise/" + CELL + ".h5"

ALL_METRICS = RESULTS + "/metrics.csv"
ALL_LAYERWISE = RESULTS + "/layerwise.csv"
ALL_TRAIN_LOGS = RESULTS + "/train_logs.csv"
FIGURE_DIR = RESULTS + "/figures"
FIGURE = FIGURE_DIR + "/{name}.{ext}"
TABLE_DIR = RESULTS + "/tables"
FIGURES_INDEX = RESULTS + "/figures.txt"  # rule `figures`: every figure and table file, one a line


# What each wildcard may match, defined once: Snakemake's wildcard_constraints (workflow/rules/common.smk),
# the figure-stem parser (families.py) and the training-log path parser (tidy.py) all use these.
WILDCARD_PATTERNS = {
    "dataset": r"[a-z0-9]+",
    "arch": r"[a-z0-9]+",
    "regime": r"(?:st|at_[a-z0-9.]+|trades_[a-z0-9.]+|ext_[a-z0-9]+)",  # ext_<name>: config `external`
    "seed": r"\d+",
    "epoch": r"\d+",
    "norm": r"linf|l2",
    "eps": r"[0-9.]+",
    "family": r"[a-z0-9_]+",
    "stem": r"[A-Za-z0-9_.\-]+",
}


def pattern_regex(pattern: str) -> str:
    """A regex of ``pattern``'s instances: each ``{wildcard}`` a named group matching what it may match."""
    rx = re.escape(pattern)
    for k, sub in WILDCARD_PATTERNS.items():
        rx = rx.replace(re.escape(f"{{{k}}}"), f"(?P<{k}>{sub})")
    return rx


def log(rule: str, pattern: str) -> str:
    """The log file of ``rule`` for the job whose main output is ``pattern`` (a path under results/)."""
    return f"{LOGS}/{rule}/{_stem(pattern)}.log"


def benchmark(rule: str, pattern: str) -> str:
    return f"{BENCH}/{rule}/{_stem(pattern)}.tsv"


def _stem(pattern: str) -> str:
    s = pattern.removeprefix(RESULTS + "/")
    return s.rsplit(".", 1)[0] if "." in s.rsplit("/", 1)[-1] else s


def format_path(pattern: str, **wildcards: Any) -> str:
    return pattern.format(**wildcards)
