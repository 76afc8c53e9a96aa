"""Figures from the aggregated tidy table (seaborn).  Each family knows its own file names and how to draw them."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .utils import atomic_output  # noqa: E402

log = logging.getLogger("ncpipe.figures")

PERTURBATION_LABELS = {
    "clean": "clean",
    "pgd": "PGD (untargeted)",
    "targeted": "PGD (targeted)",
    "gaussian": "Gaussian noise",
    "sign": "random sign noise",
}
PALETTE = {"clean": "#1f77b4", "pgd": "#d62728", "targeted": "#9467bd", "gaussian": "#2ca02c", "sign": "#8c564b"}
METHOD_LABELS = {"st": "ST", "at": "AT (PGD)", "trades": "TRADES"}

NC_PANELS = [
    ("accuracy", "accuracy", False),
    ("nc1", "NC1  Tr(Σ_W Σ_B⁺)", True),
    ("nc2_equinorm_means", "NC2 equinorm (means)", False),
    ("nc2_equiangular_means", "NC2 equiangularity (means)", False),
    ("nc3", "NC3 self-duality", False),
    ("nc4", "NC4 NCC mismatch", False),
]


@dataclass(frozen=True)
class Panel:
    key: str  # table's metric name
    ylabel: str
    log: bool


def save(fig: plt.Figure, stem: str, formats: list[str], dpi: int) -> list[str]:
    out = []
    for ext in formats:
        path = f"{stem}.{ext}"
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=dpi, bbox_inches="tight")
        out.append(path)
    plt.close(fig)
    return out


def metric_vs_epoch(df: pd.DataFrame, panels: list[tuple[str, str, bool]], title: str,
                    hue: str = "perturbation") -> plt.Figure:
    """One panel per metric, x = epoch, one line per ``hue`` value, mean over seeds with a ±1 sd band."""
    n = len(panels)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (key, ylabel, logy) in zip(axes.flat, panels, strict=False):
        sub = df[df["metric"] == key]
        if sub.empty:
            ax.set_visible(False)
            continue
        order = [k for k in PERTURBATION_LABELS if k in set(sub[hue])] if hue == "perturbation" else None
        sns.lineplot(data=sub, x="epoch", y="value", hue=hue, hue_order=order, errorbar="sd", marker="o",
                     palette=PALETTE if hue == "perturbation" else None, ax=ax, legend=ax is axes.flat[0])
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if logy and (sub["value"] > 0).all():
            ax.set_yscale("log")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    leg = axes.flat[0].get_legend()
    if leg is not None:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        leg.remove()
        fig.legend(handles, [PERTURBATION_LABELS.get(lb, lb) for lb in labels], loc="upper center",
                   ncol=len(labels), bbox_to_anchor=(0.5, 1.02), frameon=False)
    fig.suptitle(title, y=1.08)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    names: Callable[[dict[str, Any]], list[str]]  # file stems (without extension) under results/figures
    draw: Callable[[pd.DataFrame, str], plt.Figure | None]
    caption: str


def _run_keys(config: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    from .grid import runs, threats

    keys = {(r.dataset, r.arch, r.regime, n, e) for r in runs(config) for n, e in threats(config)}
    return sorted(keys)


def _nc_names(config: dict[str, Any]) -> list[str]:
    return [f"{d}__{a}__{r}__{n}{e}" for d, a, r, n, e in _run_keys(config)]


def _parse(name: str) -> dict[str, str]:
    d, a, r, threat = name.split("__")
    norm = "linf" if threat.startswith("linf") else "l2"
    return {"dataset": d, "arch": a, "regime": r, "norm": norm, "epsilon": threat[len(norm):]}


def _select(df: pd.DataFrame, sel: dict[str, str]) -> pd.DataFrame:
    m = pd.Series(True, index=df.index)
    for k, v in sel.items():
        m &= df[k].astype(str) == str(v)
    return df[m]


def _draw_nc(df: pd.DataFrame, name: str) -> plt.Figure:
    sel = _parse(name)
    sub = _select(df, sel)
    sub = sub[(sub["split"] == "train") & (sub["grouping"] == "true")]
    method = sel["regime"].split("_")[0]
    title = (f"{METHOD_LABELS.get(method, method)} — {sel['dataset']} / {sel['arch']} — train data, "
             f"{sel['norm']} ε = {sel['epsilon']}/255")
    return metric_vs_epoch(sub, NC_PANELS, title)


FAMILIES: dict[str, Family] = {
    "nc_vs_epoch": Family(
        _nc_names, _draw_nc,
        "Neural-Collapse metrics against training epoch on the training set, for clean data and for each "
        "perturbation kind (features grouped by true label); mean over seeds with a ±1 s.d. band.",
    ),
}


def figure_stems(config: dict[str, Any], family: str) -> list[str]:
    return FAMILIES[family].names(config)


def draw_family(table: str | os.PathLike, family: str, stems: list[str], outdir: str, formats: list[str],
                dpi: int = 150, context: str = "paper") -> list[str]:
    sns.set_theme(context=context, style="whitegrid")
    df = pd.read_csv(table)
    out = []
    for stem in stems:
        fig = FAMILIES[family].draw(df, stem)
        if fig is None:
            fig = plt.figure()
            fig.text(0.5, 0.5, "no data for this figure in the table", ha="center")
        out += save(fig, str(Path(outdir) / stem), formats, dpi)
    return out
