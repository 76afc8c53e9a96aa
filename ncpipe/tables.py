"""Tables: the final-epoch accuracy table and the leap table (CSV + LaTeX + HTML).

The aggregated metrics, layerwise tables and training logs are ``ncpipe.tidy``'s (no pandas there).

The accuracy table (paper.md T1 and the numbers behind F7) has one row per (architecture, training method)
of a dataset and evaluation threat: clean and PGD accuracy of the network on train and test data and of the
nearest-clean-class-mean classifier (NCC on clean *train* means) on test data, each as mean and s.d. over
seeds, in percent, read at the final epoch from ``results/metrics.csv``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import leap, metrics
from .families import LEAP_KINDS, parse_leap_stem, parse_table_stem
from .families import table_targets as table_targets  # re-exported: the table names belong to families
from .grid import METHOD_LABELS, method_of, regime_id
from .io import attrs_dict, open_dump
from .metrics import AUTOATTACK_IMAGES_SUFFIX, on_autoattack_images
from .utils import atomic_output, read_csv_verified

# (column, split, perturbation, metric, header)
ACCURACY_COLUMNS = [
    ("train_clean", "train", "clean", "accuracy", "train clean"),
    ("train_pgd", "train", "pgd", "accuracy", "train PGD"),
    ("test_clean", "test", "clean", "accuracy", "test clean"),
    ("test_pgd", "test", "pgd", "accuracy", "test PGD"),
    ("ncc_test_clean", "test", "clean", "ncc_train_means_accuracy", "NCC test clean"),
    ("ncc_test_pgd", "test", "pgd", "ncc_train_means_accuracy", "NCC test PGD"),
]
# Beside PGD where the run has the autoattack kind (columns left out of tables without it). Where
# AutoAttack attacked a fixed subset (attack.autoattack.per_class > 0), PGD on that subset (the metrics
# ``metrics.on_autoattack_images``) comes first, so that the AutoAttack gap is read off the same
# images.
OPTIONAL_ACCURACY_COLUMNS = [
    ("train_pgd_autoattack_images", "train", "pgd", on_autoattack_images("accuracy"),
     "train PGD on AutoAttack's images"),
    ("train_autoattack", "train", "autoattack", "accuracy", "train AutoAttack"),
    ("test_pgd_autoattack_images", "test", "pgd", on_autoattack_images("accuracy"),
     "test PGD on AutoAttack's images"),
    ("test_autoattack", "test", "autoattack", "accuracy", "test AutoAttack"),
    ("ncc_test_pgd_autoattack_images", "test", "pgd", on_autoattack_images("ncc_train_means_accuracy"),
     "NCC test PGD on AutoAttack's images"),
    ("ncc_test_autoattack", "test", "autoattack", "ncc_train_means_accuracy", "NCC test AutoAttack"),
]


def _columns(metrics: pd.DataFrame) -> list[tuple[str, str, str, str, str]]:
    if not len(metrics):
        return list(ACCURACY_COLUMNS)
    rows = set(zip(metrics["split"], metrics["perturbation"], metrics["metric"], strict=True))
    kinds = {(s, k) for s, k, _ in rows}

    def shown(c: tuple[str, str, str, str, str]) -> bool:
        # a subset column needs its own metric (the pgd kind is always there); an AutoAttack column its kind
        if c[3].endswith(AUTOATTACK_IMAGES_SUFFIX):
            return (c[1], c[2], c[3]) in rows
        return (c[1], c[2]) in kinds

    return [*ACCURACY_COLUMNS, *(c for c in OPTIONAL_ACCURACY_COLUMNS if shown(c))]


NORM_TEX = {"linf": r"$\ell_\infty$", "l2": r"$\ell_2$"}


def accuracy_table(metrics: pd.DataFrame, dataset: str, norm: str, eps: str) -> pd.DataFrame:
    """Rows (arch, regime); columns ``<col>_mean``, ``<col>_sd`` (percent), ``seeds``, ``epoch``."""
    df = metrics[
        (metrics["dataset"].astype(str) == dataset)
        & (metrics["norm"].astype(str) == norm)
        & np.isclose(pd.to_numeric(metrics["epsilon"]).to_numpy(float), float(eps))
        & (metrics["grouping"] == "true")
    ]
    rows = []
    for (arch, regime), g in df.groupby(["arch", "regime"], sort=False):
        final = int(g["epoch"].max())
        g = g[g["epoch"] == final]
        row: dict[str, Any] = {
            "dataset": dataset,
            "arch": arch,
            "method": str(g["method"].iloc[0]),
            "regime": regime,
            "threat": f"{norm}{eps}",
            "epoch": final,
            "seeds": int(g["seed"].nunique()),
        }
        for col, split, kind, metric, _ in _columns(df):
            v = g[(g["split"] == split) & (g["perturbation"] == kind) & (g["metric"] == metric)]
            per_seed = v.groupby("seed")["value"].mean() * 100.0
            row[f"{col}_mean"] = float(per_seed.mean()) if len(per_seed) else np.nan
            row[f"{col}_sd"] = float(per_seed.std(ddof=1)) if len(per_seed) > 1 else np.nan
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    order = {m: i for i, m in enumerate(METHOD_LABELS)}
    out["_o"] = out["method"].map(order).fillna(9)
    return out.sort_values(["arch", "_o", "regime"]).drop(columns="_o").reset_index(drop=True)


def _cell(mean: float, sd: float) -> str:
    if not np.isfinite(mean):
        return "--"
    return f"{mean:.1f}" if not np.isfinite(sd) else f"{mean:.1f} $\\pm$ {sd:.1f}"


def to_latex(table: pd.DataFrame, dataset: str, norm: str, eps: str) -> str:
    """A booktabs table: mean +- s.d. over seeds, in percent."""
    cols = [c for c in (*ACCURACY_COLUMNS, *OPTIONAL_ACCURACY_COLUMNS) if f"{c[0]}_mean" in table.columns]
    cols = cols or ACCURACY_COLUMNS
    head = " & ".join(["Architecture", "Method", *[h for *_, h in cols]]) + r" \\"
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        r"\begin{tabular}{ll" + "r" * len(cols) + "}",
        r"\toprule",
        head,
        r"\midrule",
    ]
    for _, r in table.iterrows():
        cells = [_cell(r[f"{c}_mean"], r[f"{c}_sd"]) for c, *_ in cols]
        lines.append(
            " & ".join(
                [str(r["arch"]).replace("_", r"\_"), METHOD_LABELS.get(r["method"], r["method"]), *cells]
            )
            + r" \\"
        )
    epochs = sorted(set(table["epoch"])) if not table.empty else []
    seeds = sorted(set(table["seeds"])) if not table.empty else []
    lines += [
        r"\bottomrule",
        r"\end{tabular}",
        rf"\caption{{{dataset}: accuracy (\%) at epoch {', '.join(map(str, epochs))}, mean $\pm$ s.d. over "
        rf"{', '.join(map(str, seeds))} seed(s); PGD and the NCC robust accuracy under "
        rf"{NORM_TEX.get(norm, norm)} $\epsilon = {eps}/255$. NCC: nearest clean training class mean in "
        r"the penultimate-layer feature space." + _subset_note(cols) + "}",
        rf"\label{{tab:accuracy-{dataset}-{norm}{eps}}}",
        r"\end{table}",
        "",
    ]
    return "\n".join(lines)


def _subset_note(cols: list[tuple[str, str, str, str, str]]) -> str:
    if not any(c[3].endswith(AUTOATTACK_IMAGES_SUFFIX) for c in cols):
        return ""
    return (r" AutoAttack attacked a fixed subset of the images (the first attack.autoattack.per\_class of "
            r"each class); PGD on AutoAttack's images: PGD on that same subset.")


def write_accuracy_tables(
    metrics_csv: str | os.PathLike, stems: list[str], outdir: str | os.PathLike
) -> list[str]:
    metrics = read_csv_verified(metrics_csv, "metrics table", required=False)
    out = []
    for stem in stems:
        sel = parse_table_stem(stem)
        t = accuracy_table(metrics, **sel)
        out += _write_formats(Path(outdir) / stem, t, "%.4g", to_latex(t, **sel),
                              to_html(t, f"{sel['dataset']}: final-epoch accuracy (%), {sel['norm']} "
                                         f"ε = {sel['eps']}/255, mean and s.d. over seeds"))
    return out


def _write_formats(base: Path, frame: pd.DataFrame, float_format: str, latex: str, html: str) -> list[str]:
    """``<base>.csv`` of ``frame`` and the given LaTeX and HTML texts, each written atomically."""
    with atomic_output(f"{base}.csv") as tmp:
        frame.to_csv(tmp, index=False, float_format=float_format)
    for ext, text in (("tex", latex), ("html", html)):
        with atomic_output(f"{base}.{ext}") as tmp:
            Path(tmp).write_text(text)
    return [f"{base}.csv", f"{base}.tex", f"{base}.html"]


def to_html(table: pd.DataFrame, title: str) -> str:
    """A stand-alone HTML page of ``table`` (the report shows HTML inline; CSV is only a download there)."""
    body = table.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="–", border=0)
    style = ("body{font-family:sans-serif;font-size:13px} table{border-collapse:collapse} "
             "th,td{padding:2px 8px;text-align:right;border-bottom:1px solid #ddd} th{background:#f4f4f4}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style>"
            f"</head><body><h3>{title}</h3>\n{body}\n</body></html>\n")


# ------------------------------------------------------------------------------------------- leap table
LEAP_COLUMNS = ["dataset", "arch", "regime", "method", "seed", "epoch", "norm", "epsilon", "split",
                "perturbation", "true_class", "landed_class", "count", "share"]


def _regime_of(root: dict[str, Any]) -> str:
    if root.get("regime"):  # external checkpoints name their regime (ext_<name>) in the dump
        return str(root["regime"])
    adv = root.get("training_adversary")
    if isinstance(adv, str):
        adv = json.loads(adv) if adv not in ("", "null", "none", "None") else None
    return regime_id(str(root["method"]), adv)


def leap_frame(dumps: list[str | os.PathLike], kinds: tuple[str, ...] = LEAP_KINDS) -> pd.DataFrame:
    """Tidy leap table of ``dumps``: per split and kind, the counts and row shares true -> landing class.

    The landing class is the nearest clean *train* class mean of the dump (``ncpipe.leap``); for the clean
    kind this is the NCC confusion matrix, the reference against which the perturbed rows show the leap.
    """
    rows: list[pd.DataFrame] = []
    for path in dumps:
        with open_dump(path) as f:
            root = attrs_dict(f)
            c = int(root["num_classes"])
            means = metrics.class_means(f["train/clean/features"][:], f["train/clean/labels"][:], c)[0]
            for split in [s for s in ("train", "test") if s in f]:
                for kind in [k for k in kinds if k in f[split]]:
                    g = f[f"{split}/{kind}"]
                    y = g["labels"][:]
                    landed = leap.landing_classes(g["features"][:], means)
                    counts = leap.leap_counts(y, landed, c)
                    share = leap.leap_matrix(y, landed, c)
                    t, k = np.meshgrid(np.arange(c), np.arange(c), indexing="ij")
                    rows.append(pd.DataFrame({
                        "dataset": root["dataset"], "arch": root["arch"], "regime": _regime_of(root),
                        "method": root["method"], "seed": int(root["seed"]), "epoch": int(root["epoch"]),
                        "norm": root["norm"], "epsilon": root["epsilon_255"], "split": split,
                        "perturbation": kind, "true_class": t.ravel(), "landed_class": k.ravel(),
                        "count": counts.ravel(), "share": share.ravel()}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=LEAP_COLUMNS)


def leap_wide(long: pd.DataFrame, split: str = "train") -> pd.DataFrame:
    """One row per (regime, perturbation, true class), one column per landing class; mean over seeds."""
    df = long[long["split"] == split]
    if df.empty:
        return pd.DataFrame()
    keys = ["regime", "perturbation", "true_class", "landed_class"]
    mean = df.groupby(keys, as_index=False)["share"].mean()
    wide = mean.pivot_table(index=["regime", "perturbation", "true_class"], columns="landed_class",
                            values="share", dropna=False).reset_index()
    wide.columns = [f"to_{c}" if isinstance(c, (int, np.integer)) else c for c in wide.columns]
    order = {m: i for i, m in enumerate(METHOD_LABELS)}
    kind_order = {k: i for i, k in enumerate(LEAP_KINDS)}
    wide["_o"] = wide["regime"].map(lambda r: order.get(method_of(r), 9))
    wide["_k"] = wide["perturbation"].map(lambda k: kind_order.get(k, 9))
    return wide.sort_values(["_o", "regime", "_k", "true_class"]).drop(columns=["_o", "_k"]).reset_index(
        drop=True)


def leap_latex(wide: pd.DataFrame, sel: dict[str, str]) -> str:
    """Booktabs table of the train-split leap matrices (percent)."""
    to = [c for c in wide.columns if str(c).startswith("to_")]
    lines = [r"\begin{table}[t]", r"\centering", r"\scriptsize",
             r"\begin{tabular}{llr" + "r" * len(to) + "}", r"\toprule",
             " & ".join(["Regime", "Data", "class", *[c.removeprefix("to_") for c in to]]) + r" \\",
             r"\midrule"]
    for _, r in wide.iterrows():
        cells = ["--" if not np.isfinite(r[c]) else f"{100 * r[c]:.0f}" for c in to]
        lines.append(" & ".join([str(r["regime"]).replace("_", r"\_"), str(r["perturbation"]),
                                 str(int(r["true_class"])), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}",
              rf"\caption{{{sel['dataset']} / {sel['arch']}, final epoch, train data: share (\%) of the "
              rf"points of "
              rf"each true class whose feature is nearest the clean training mean of each class (columns), "
              rf"under {NORM_TEX.get(sel['norm'], sel['norm'])} $\epsilon = {sel['eps']}/255$.}}",
              rf"\label{{tab:leap-{sel['dataset']}-{sel['arch']}-{sel['norm']}{sel['eps']}}}",
              r"\end{table}", ""]
    return "\n".join(lines)


def write_leap_tables(dumps: list[str | os.PathLike], stem: str, outdir: str | os.PathLike) -> list[str]:
    """``<stem>.csv`` (tidy, every split and seed), ``.html`` and ``.tex`` (train, mean over seeds)."""
    sel = parse_leap_stem(stem)
    long = leap_frame(dumps)
    wide = leap_wide(long)
    return _write_formats(Path(outdir) / stem, long, "%.6g", leap_latex(wide, sel),
                          to_html(wide, f"{sel['dataset']} / {sel['arch']}: leap matrix (share of each true "
                                        f"class landing nearest each clean train class mean), final epoch, "
                                        f"train data, {sel['norm']} ε = {sel['eps']}/255"))
