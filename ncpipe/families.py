"""The names of the figure and table outputs, with no plotting imports.

The workflow imports this module when it parses the Snakefile (every ``snakemake`` call, dry runs included),
so it holds only what the rules need to name their outputs: each figure family's file stem, input table,
report category and caption, the accuracy tables' stem, and the target lists of a config.  The drawing code
(``ncpipe.figures``: matplotlib, seaborn) and the table code (``ncpipe.tables``: pandas) are imported only by
the jobs that run them.

A family's file stem is a pattern over the grid's wildcards (``{dataset}__{arch}__{regime}__{norm}{eps}``
...), so the main, l_2 and ImageNette grids write distinct files, Snakemake sees the wildcards (report
categories, captions), and the drawing code selects its rows from the stem alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import paths
from .grid import (
    EXTERNAL_EPOCH,
    Run,
    external_runs,
    has_probes,
    run_epochs,
    run_final_epoch,
    runs,
    threats,
    trained_runs,
)

RUN_THREAT = "{dataset}__{arch}__{regime}__{norm}{eps}"
ARCH_THREAT = "{dataset}__{arch}__{norm}{eps}"
RUN = "{dataset}__{arch}__{regime}"

TABLES = {"metrics": paths.ALL_METRICS, "layerwise": paths.ALL_LAYERWISE, "train_logs": paths.ALL_TRAIN_LOGS}


@dataclass(frozen=True)
class Family:
    stem: str  # pattern over grid wildcards
    table: str  # key of TABLES
    category: str  # report category
    caption: str  # one line, also in --help and docs
    needs: Callable[[dict[str, Any]], bool] = field(default=lambda config: True)
    targeted: bool = False  # draws the targeted kind: its title names that kind's budget where it differs


def _has_split(split: str) -> Callable[[dict[str, Any]], bool]:
    return lambda config: split in config["attack"]["splits"]


def _has_kinds(*kinds: str) -> Callable[[dict[str, Any]], bool]:
    return lambda config: all(k in config["attack"]["kinds"] for k in kinds)


# The drawing function of each family is ncpipe.figures.DRAW[<family>].
FAMILIES: dict[str, Family] = {
    "nc_vs_epoch": Family(
        RUN_THREAT,
        "metrics",
        "NC metrics vs epoch (train data)",
        "NC1-NC4 and accuracy vs epoch on training data, clean and per perturbation kind (true labels).",
        _has_split("train"),
        targeted=True,
    ),
    "nc_vs_epoch_test": Family(
        RUN_THREAT,
        "metrics",
        "NC metrics vs epoch (test data)",
        "NC1-NC4 and accuracy vs epoch on test data, clean and per perturbation kind (true labels).",
        _has_split("test"),
        targeted=True,
    ),
    "targeted_leap": Family(
        RUN_THREAT,
        "metrics",
        "Leap: targeted attack",
        "Targeted-PGD data grouped by target label vs clean data, and the angle between the clean mean of "
        "class c and the mean of points targeted to c, vs epoch.",
        lambda c: _has_split("train")(c) and _has_kinds("clean", "targeted")(c),
        targeted=True,
    ),
    "simplex_alignment": Family(
        RUN_THREAT,
        "metrics",
        "Simplex alignment",
        "Angle and distance between clean and perturbed class means (centred, raw, global mean) vs epoch.",
        lambda c: _has_split("train")(c) and "clean" in c["attack"]["kinds"],
        targeted=True,
    ),
    "ncc_vs_network": Family(
        ARCH_THREAT,
        "metrics",
        "NCC classifier vs network",
        "Final-epoch clean and PGD accuracy of the network and of the nearest clean-train-mean classifier, "
        "per training method.",
        _has_kinds("clean", "pgd"),
    ),
    "layerwise_nc1": Family(
        ARCH_THREAT,
        "layerwise",
        "Layerwise NC1",
        "NC1 per layer of the final model, clean vs PGD training data, per method.",
        lambda c: bool(c["layerwise"]["enabled"]),
    ),
    "layerwise_ncc_accuracy": Family(
        ARCH_THREAT,
        "layerwise",
        "Layerwise NCC accuracy",
        "NCC accuracy per layer of the final model (clean class means, and the data's own means), clean vs "
        "PGD training data, per method.",
        lambda c: bool(c["layerwise"]["enabled"]),
    ),
    "simplex_projection": Family(
        RUN_THREAT,
        "features",
        "Simplex projection (features)",
        "Clean class means and a per-class sample of clean, PGD and targeted train features on the "
        "plane of the first two principal axes of the centred clean class means, first and final checkpoint.",
        lambda c: _has_split("train")(c) and _has_kinds("clean", "pgd")(c),
        targeted=True,
    ),
    "leap_matrix": Family(
        ARCH_THREAT,
        "leap",
        "Leap matrix",
        "Final checkpoint: share of train points of true class c whose perturbed feature is nearest "
        "the clean train mean of class k (C x C, rows sum to 1), PGD and targeted PGD, per training regime.",
        lambda c: _has_split("train")(c) and _has_kinds("clean", "pgd")(c),
        targeted=True,
    ),
    "training_curves": Family(
        RUN,
        "train_logs",
        "Training curves",
        "Loss, clean/adversarial train accuracy, clean test accuracy and learning rate per epoch.",
    ),
}

def stem_keys(family: str) -> list[str]:
    """The wildcards in ``family``'s file stem, in the order they appear."""
    return re.findall(r"{(\w+)}", FAMILIES[family].stem)


def _match_stem(pattern: str, stem: str) -> dict[str, str] | None:
    """The wildcards of ``stem`` as an instance of ``pattern`` (``None`` if it is not one)."""
    m = re.fullmatch(paths.pattern_regex(pattern), stem)
    return None if m is None else m.groupdict()


def parse_stem(family: str, stem: str) -> dict[str, str]:
    """The wildcards of a family's file stem (inverse of ``stem_wildcards``)."""
    w = _match_stem(FAMILIES[family].stem, stem)
    if w is None:
        raise ValueError(f"{stem!r} is not a {family} figure name ({FAMILIES[family].stem})")
    return w


def stem_wildcards(config: dict[str, Any], family: str) -> list[dict[str, str]]:
    """One wildcard dict per figure of ``family`` in this config's grid."""
    if not FAMILIES[family].needs(config):
        return []
    keys = set(stem_keys(family))
    out = set()
    for r in _family_runs(config, family):
        for norm, eps in threats(config):
            w = {"dataset": r.dataset, "arch": r.arch, "regime": r.regime, "norm": norm, "eps": eps}
            out.add(tuple(sorted((k, v) for k, v in w.items() if k in keys)))
    return [dict(t) for t in sorted(out)]


def _family_runs(config: dict[str, Any], family: str) -> list[Run]:
    """The runs a family draws: training logs exist for trained runs only, layerwise tables where probed."""
    table = FAMILIES[family].table
    if table == "train_logs":
        return trained_runs(config)
    if table == "layerwise":
        return [r for r in runs(config) if has_probes(config, r)]
    return runs(config)


def figure_stems(config: dict[str, Any], family: str) -> list[str]:
    return [FAMILIES[family].stem.format(**w) for w in stem_wildcards(config, family)]


def table_rule(table: str) -> str:
    """The rule that draws every figure of the families reading the aggregated table ``table`` (one job)."""
    return f"figures_{table}"


def figure_rule(family: str) -> str:
    """The rule that draws ``family``: its table's one job, or ``figure_<family>`` with a job per figure."""
    table = FAMILIES[family].table
    return table_rule(table) if table in TABLES else f"figure_{family}"


def table_families(config: dict[str, Any], table: str) -> list[str]:
    """The families of this config drawn from the aggregated table ``table`` (those with a figure)."""
    return [f for f, fam in FAMILIES.items() if fam.table == table and figure_stems(config, f)]


def figure_path(family: str, stem: str, ext: str) -> str:
    """The file of one figure (``stem`` may be the family's wildcard pattern)."""
    return paths.format_path(paths.FIGURE, name=f"{family}/{stem}", ext=ext)


def figure_targets(config: dict[str, Any], tables: set[str] | None = None) -> list[str]:
    """Every figure file of the config; with ``tables``, only families whose input table is produced."""
    return [
        figure_path(fam, stem, ext)
        for fam, f in FAMILIES.items()
        if tables is None or f.table not in TABLES or TABLES[f.table] in tables
        for stem in figure_stems(config, fam)
        for ext in config["figures"]["formats"]
    ]


# ------------------------------------------------------------------------------------------- tables
ACCURACY_STEM = "accuracy_final__{dataset}__{norm}{eps}"
TABLE_FORMATS = ("csv", "html", "tex")


def table_path(stem: str, ext: str) -> str:
    """The file of one accuracy table (``stem`` may be ``ACCURACY_STEM`` itself)."""
    return f"{paths.TABLE_DIR}/{stem}.{ext}"


def parse_table_stem(stem: str) -> dict[str, str]:
    """``dataset``, ``norm`` and ``eps`` of an accuracy table's stem (inverse of ``table_stems``)."""
    w = _match_stem(ACCURACY_STEM, stem)
    if w is None:
        raise ValueError(f"{stem!r} is not an accuracy table name ({ACCURACY_STEM})")
    return w


def table_stems(config: dict[str, Any]) -> list[str]:
    return [
        ACCURACY_STEM.format(dataset=d, norm=n, eps=e) for d in config["datasets"] for n, e in threats(config)
    ]


def table_targets(config: dict[str, Any]) -> list[str]:
    return [
        *(table_path(s, ext) for s in table_stems(config) for ext in TABLE_FORMATS),
        *(table_path(s, ext) for s in leap_table_stems(config) for ext in TABLE_FORMATS),
    ]


# ------------------------------------------------------------------- inputs read from the feature dumps
# The leap table (one per dataset x arch x threat) is the input of the leap_matrix figures: same stem keys.
LEAP_STEM = "leap_matrix__{dataset}__{arch}__{norm}{eps}"
LEAP_KINDS = ("clean", "pgd", "targeted")  # clean: the NCC confusion matrix, the reference of the leap


def family_table(family: str) -> str:
    """The input table (pattern) of a table-reading figure family."""
    fam = FAMILIES[family]
    if fam.table == "leap":
        return table_path(LEAP_STEM, "csv")
    return TABLES[fam.table]


def leap_table_stems(config: dict[str, Any]) -> list[str]:
    return [LEAP_STEM.format(**w) for w in stem_wildcards(config, "leap_matrix")]


def parse_leap_stem(stem: str) -> dict[str, str]:
    w = _match_stem(LEAP_STEM, stem)
    if w is None:
        raise ValueError(f"{stem!r} is not a leap table name ({LEAP_STEM})")
    return w


def leap_dumps(config: dict[str, Any], wildcards: Any) -> list[str]:
    """The final-checkpoint feature dumps of every regime and seed of one (dataset, arch, threat)."""
    w = {k: wildcards[k] for k in ("dataset", "arch", "norm", "eps")}
    return [
        paths.format_path(paths.FEATURES, **r.wildcards(), epoch=run_final_epoch(config, r.regime),
                          norm=w["norm"], eps=w["eps"])
        for r in runs(config)
        if r.dataset == w["dataset"] and r.arch == w["arch"]
    ]


def kept_dump_epochs(config: dict[str, Any]) -> list[int]:
    """The checkpoint epochs whose feature dumps stay on disk; the others are temporary (Snakemake temp()).

    ``features.keep`` (all, final, or epochs), plus the first and final epochs whenever the simplex figure
    is drawn: it reads their dumps, and a figure option changed later must redraw it without re-attacking.
    """
    keep, epochs = config["features"]["keep"], sorted(config["train"]["checkpoints"])
    ext = {EXTERNAL_EPOCH} if external_runs(config) else set()  # an external model's one dump always stays
    if keep == "all":
        return sorted(set(epochs) | ext)
    kept = {epochs[-1]} if keep == "final" else set(keep) & set(epochs)
    if stem_wildcards(config, "simplex_projection"):
        kept |= {epochs[0], epochs[-1]}
    return sorted(kept | ext)


def simplex_dumps(config: dict[str, Any], wildcards: Any) -> list[str]:
    """The first- and final-checkpoint feature dumps of one run and threat (the config's first seed)."""
    epochs = run_epochs(config, wildcards["regime"])
    seeds = [r.seed for r in runs(config) if r.regime == wildcards["regime"]]
    seed = min(seeds) if seeds else sorted(int(s) for s in config["seeds"])[0]
    return [
        paths.format_path(paths.FEATURES, dataset=wildcards["dataset"], arch=wildcards["arch"],
                          regime=wildcards["regime"], seed=seed, epoch=e, norm=wildcards["norm"],
                          eps=wildcards["eps"])
        for e in (epochs[0], epochs[-1])
    ]
