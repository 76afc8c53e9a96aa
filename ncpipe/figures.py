"""Figures from the aggregated tidy tables, drawn with seaborn; ``DRAW`` maps each family to its drawing.

The families' names, file stems, input tables and report categories live in ``ncpipe.families``, which has no
plotting imports, so the workflow parses without loading matplotlib or seaborn; only the figure jobs import
this module.  A figure's rows are selected from its file stem alone.  Seeds are drawn as their mean with a
+-1 s.d. band (the sample s.d., as ``sns.lineplot(errorbar="sd")`` draws it; bars: ``sns.barplot(errorbar=
"sd")``); NC1 is on a log axis; angles are in degrees (the table stores radians).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _import_seaborn() -> Any:
    """seaborn, without the scipy modules it imports only for KDE and clustermap, which no figure draws.

    Importing scipy.stats is ~1.2 s, a third of a small figure job; seaborn falls back to its own code for
    what it needs them for (``seaborn._statistics``, ``seaborn.matrix``: ``_no_scipy``).  Modules already
    loaded are left alone, and later imports of scipy work as usual.
    """
    blocked = [m for m in ("scipy.stats", "scipy.cluster") if m not in sys.modules]
    for m in blocked:
        sys.modules[m] = None  # type: ignore[assignment]  # makes `from scipy.stats import x` an ImportError
    try:
        import seaborn
    finally:
        for m in blocked:
            if sys.modules.get(m, 0) is None:
                del sys.modules[m]
    return seaborn


sns = _import_seaborn()
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .families import FAMILIES, parse_stem  # noqa: E402
from .families import figure_targets as figure_targets  # noqa: E402  (re-exported)
from .grid import NORM_LABELS, method_of, regime_label  # noqa: E402
from .io import KIND_ORDER  # noqa: E402
from .specs import FigureSpec, TargetedBudget  # noqa: E402
from .utils import UsageError, atomic_output, read_csv_verified  # noqa: E402

log = logging.getLogger("ncpipe.figures")

PERTURBATION_LABELS = {
    "clean": "clean",
    "pgd": "PGD (untargeted)",
    "targeted": "PGD targeted to (y+1) mod C",
    "gaussian": "Gaussian noise",
    "sign": "random-sign noise",
    "train_adv": "adversarial examples trained on (AT/TRADES)",
    "autoattack": "AutoAttack",
}
PALETTE = {
    "clean": "#1f77b4",
    "pgd": "#d62728",
    "targeted": "#9467bd",
    "gaussian": "#2ca02c",
    "sign": "#ff7f0e",
    "train_adv": "#8c564b",
    "autoattack": "#000000",
}
METHOD_ORDER = ["st", "at", "trades", "ext"]
NCC_KINDS = ("clean", "pgd", "autoattack")  # ncc_vs_network: one panel per split x kind present

PCT = 100.0  # accuracies are stored as fractions and drawn in percent
DEG = 180.0 / np.pi  # angles are stored in radians and drawn in degrees


# ------------------------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class Series:
    """One line: the rows of a (perturbation, grouping) pair for one metric, named for the legend."""

    label: str
    metric: str
    perturbation: str | None = None  # None: the table has no perturbation column (training logs)
    grouping: str | None = "true"
    colour: str | None = None
    scale: float = 1.0
    style: str = "-"


@dataclass(frozen=True)
class Panel:
    ylabel: str
    series: tuple[Series, ...]
    log: bool = False
    note: str = ""  # a short axis title, e.g. why a line is absent


def _eps_equal(col: pd.Series, eps: str) -> pd.Series:
    return np.isclose(pd.to_numeric(col, errors="coerce").to_numpy(dtype=float), float(eps))


def select(df: pd.DataFrame, sel: dict[str, str]) -> pd.DataFrame:
    """Rows of ``df`` matching a stem's wildcards (dataset, arch, regime, norm, eps); epsilons as numbers."""
    m = np.ones(len(df), dtype=bool)
    for k, v in sel.items():
        if k == "eps":
            m &= _eps_equal(df["epsilon"], v)
        elif k in df.columns:
            m &= (df[k].astype(str) == str(v)).to_numpy()
    return df[m]


def _notna(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "f":
        return ~np.isnan(a)
    if a.dtype.kind == "O":
        return ~pd.isna(a)
    return np.ones(a.shape, dtype=bool)


@dataclass(frozen=True)
class Line:
    """The rows of one legend entry as arrays: x, seed (None: the table has no seeds), value as drawn."""

    x: np.ndarray
    seed: np.ndarray | None
    value: np.ndarray


class SeriesRows:
    """The rows of a selected table grouped once by (metric, perturbation, grouping), to draw its series.

    A figure draws up to ~50 series of one table; a boolean mask (and a copied frame) per series cost more
    than drawing them.  Columns the table lacks (training logs: perturbation, grouping) match every series.
    """

    def __init__(self, df: pd.DataFrame, x: str) -> None:
        self.columns = [c for c in ("metric", "perturbation", "grouping") if c in df.columns]
        self.x = df[x].to_numpy()
        self.seed = df["seed"].to_numpy() if "seed" in df.columns else None
        self.value = df["value"].to_numpy(dtype=float)
        groups: dict[tuple, list[int]] = {}
        for i, key in enumerate(zip(*(df[c].to_numpy() for c in self.columns), strict=True)):
            groups.setdefault(key, []).append(i)
        self.groups = {k: np.asarray(v, dtype=np.intp) for k, v in groups.items()}

    def rows(self, s: Series) -> np.ndarray:
        """Indices of the rows of ``s`` in table order (several groups where ``s`` leaves a key open)."""
        want = {"metric": s.metric, "perturbation": s.perturbation, "grouping": s.grouping}
        key = tuple(want[c] for c in self.columns)
        if None not in key:
            return self.groups.get(key, np.zeros(0, dtype=np.intp))
        parts = [v for k, v in self.groups.items()
                 if all(w is None or w == g for w, g in zip(key, k, strict=True))]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.intp)

    def line(self, s: Series) -> Line:
        """The finite rows of ``s``, values scaled for display."""
        idx = self.rows(s)
        value = self.value[idx] * s.scale
        keep = np.isfinite(value)
        idx = idx[keep]
        return Line(self.x[idx], None if self.seed is None else self.seed[idx], value[keep])


def _lines(rows: SeriesRows, series: tuple[Series, ...]) -> dict[str, Line]:
    """Each label of ``series`` with finite rows; series sharing a label are one line, in series order."""
    parts: dict[str, list[Line]] = {}
    for s in series:
        line = rows.line(s)
        if line.value.size:
            parts.setdefault(s.label, []).append(line)
    out = {}
    for label, ls in parts.items():
        if len(ls) == 1:
            out[label] = ls[0]
        else:
            seeds = None if ls[0].seed is None else np.concatenate([p.seed for p in ls])
            out[label] = Line(np.concatenate([p.x for p in ls]), seeds, np.concatenate([p.value for p in ls]))
    return out


def _wide_to_long(df: pd.DataFrame, id_cols: list[str], value_cols: list[str]) -> pd.DataFrame:
    cols = [c for c in value_cols if c in df.columns]
    return df.melt(id_vars=[c for c in id_cols if c in df.columns], value_vars=cols, var_name="metric")


# ------------------------------------------------------------------------------------------- drawing
def epoch_panels(df: pd.DataFrame, panels: list[Panel], title: str, x: str = "epoch") -> plt.Figure:
    """One axis per panel, x = epoch, one line per series: mean over seeds with a +-1 s.d. band."""
    rows = SeriesRows(df, x)
    shown = [(p, lines) for p in panels if (lines := _lines(rows, p.series))]
    if not shown:
        return empty_figure(title)
    cols = min(3, len(shown))
    nrows = (len(shown) + cols - 1) // cols
    fig = plt.figure(figsize=(4.4 * cols, 3.3 * nrows))
    axes = [fig.add_subplot(nrows, cols, i + 1) for i in range(len(shown))]  # an unused cell costs an Axes
    legend: dict[str, Any] = {}
    for ax, (panel, lines) in zip(axes, shown, strict=True):
        order = [s.label for s in panel.series if s.label in lines]
        colours = {s.label: s.colour for s in panel.series if s.colour}
        styles = {s.label: s.style for s in panel.series}
        xs = np.concatenate([ln.x for ln in lines.values()])
        marker = "o" if np.unique(xs[_notna(xs)]).size <= 80 else None  # 400 per-epoch markers hide the line
        for label in order:
            ln = lines[label]
            h = _plot_band(ax, *seed_mean_sd(ln.x, ln.seed, ln.value), colours.get(label), label,
                           style=styles.get(label, "-"), marker=marker)
            legend.setdefault(label, h)
        ax.set_xlabel("epoch")
        epoch_axis(ax, xs)
        if panel.note:
            ax.set_title(panel.note, fontsize=8)
        ax.set_ylabel(panel.ylabel)
        if panel.log and all((ln.value > 0).all() for ln in lines.values()):
            ax.set_yscale("log")
    return finish(fig, title, list(legend.values()), list(legend))


LOG_EPOCHS = 100  # runs this long get a log epoch axis, as NC papers draw 350-400-epoch runs


def epoch_axis(ax: plt.Axes, epochs: pd.Series | np.ndarray) -> None:
    """Ticks at the epochs with data (the checkpoints); a log axis for long runs (symlog if 0 is there)."""
    e = np.asarray(epochs)
    if e.dtype.kind not in "iufb":
        e = pd.to_numeric(pd.Series(e), errors="coerce").to_numpy(dtype=float)
    e = e.astype(float)
    e = np.unique(e[~np.isnan(e)])
    if e.size and e.max() >= LOG_EPOCHS:
        if e.min() <= 0:
            ax.set_xscale("symlog", linthresh=1.0)
        else:
            ax.set_xscale("log")
    if 0 < e.size <= 12:
        ax.set_xticks(e, [f"{v:g}" for v in e])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def mean_band(
    ax: plt.Axes,
    frame: pd.DataFrame,
    x: str,
    colour: str | None,
    label: str,
    style: str = "-",
    marker: str | None = "o",
) -> Any:
    """Mean of ``value`` over seeds per ``x`` with a +-1 s.d. band; returns the mean's line (a legend handle).

    The statistics are :func:`seed_mean_sd`'s.  Drawn with matplotlib directly: seaborn's lineplot cost ~30 ms
    a line, a third of a figure job.  Call before setting a log scale: the band is the arithmetic mean +- s.d.
    """
    seed = frame["seed"].to_numpy() if "seed" in frame.columns else None
    stats = seed_mean_sd(frame[x].to_numpy(), seed, frame["value"].to_numpy(dtype=float))
    return _plot_band(ax, *stats, colour, label, style=style, marker=marker)


def _plot_band(
    ax: plt.Axes,
    xs: np.ndarray,
    mean: np.ndarray,
    sd: np.ndarray,
    colour: str | None,
    label: str,
    style: str = "-",
    marker: str | None = "o",
) -> Any:
    (line,) = ax.plot(xs, mean, color=colour, label=label, linestyle=style, marker=marker, markersize=4,
                      markeredgewidth=0)  # seaborn's white marker edge would hide 4-point markers
    if np.isfinite(sd).any():
        ax.fill_between(xs, mean - sd, mean + sd, color=line.get_color(), alpha=0.2, linewidth=0)
    return line


def seed_mean_sd(
    x: np.ndarray, seed: np.ndarray | None, value: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct ``x`` (ascending, as floats): the mean of ``value`` over seeds and its s.d. over seeds.

    Repeated rows of one seed at one ``x`` are averaged first so that every seed counts once (``seed`` None:
    every row counts once); the s.d. is the sample s.d. (ddof 1), as seaborn's ``lineplot(errorbar="sd")``
    draws it, NaN for a single seed (no band).  NaN values are skipped and rows with a NaN key dropped, as
    ``DataFrame.groupby`` does; an ``x`` with only NaN values keeps a NaN mean (a gap in the line).  These
    are the statistics of pandas' two groupbys, which the figures drew from before, to rounding (tested),
    without their ~5 ms a line; a seed's single value at an ``x`` is passed through exactly.
    """
    x, value = np.asarray(x), np.asarray(value, dtype=float)
    ok = _notna(x) if seed is None else _notna(x) & _notna(np.asarray(seed))
    x, value = x[ok], value[ok]
    xs, xi = np.unique(x, return_inverse=True)
    xi = xi.ravel()
    if seed is None:
        sample_x, sample = xi, value
    else:
        _, si = np.unique(np.asarray(seed)[ok], return_inverse=True)
        width = int(si.max()) + 1 if si.size else 1
        pairs, pi = np.unique(xi * width + si.ravel(), return_inverse=True)  # one code per (x, seed)
        sample_x, sample = pairs // width, _nanmean_by(pi.ravel(), value, pairs.size)
    mean = _nanmean_by(sample_x, sample, xs.size)
    present = ~np.isnan(sample)
    n = np.bincount(sample_x, weights=present, minlength=xs.size)
    with np.errstate(invalid="ignore"):  # an infinite value: inf - inf, a NaN s.d., as pandas gives
        dev = np.where(present, sample - mean[sample_x], 0.0) ** 2
        sd = np.sqrt(np.bincount(sample_x, weights=dev, minlength=xs.size) / np.maximum(n - 1, 1))
    sd[n < 2] = np.nan
    return xs.astype(float), mean, sd


def _nanmean_by(groups: np.ndarray, value: np.ndarray, n: int) -> np.ndarray:
    present = ~np.isnan(value)
    total = np.bincount(groups, weights=np.where(present, value, 0.0), minlength=n)
    count = np.bincount(groups, weights=present, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def finish(
    fig: plt.Figure, title: str, handles: list | None = None, labels: list[str] | None = None, ncol: int = 3
) -> plt.Figure:
    """Lay out the axes, then put the shared legend just above them and the title above the legend."""
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    to_fig = fig.transFigure.inverted()
    # the axes' full extent (their titles included), so the legend never covers a panel title
    top = max(ax.get_tightbbox(renderer).transformed(to_fig).y1 for ax in fig.axes if ax.get_visible())
    y = top + 0.02
    if handles:
        leg = fig.legend(
            handles,
            labels,
            loc="lower center",
            bbox_to_anchor=(0.5, y),
            ncol=min(ncol, len(handles)),
            frameon=False,
        )
        box = leg.get_window_extent(renderer).transformed(to_fig)
        y = box.y1 + 0.005
    fig.suptitle(title, y=y, va="bottom")
    return fig


def empty_figure(title: str) -> plt.Figure:
    fig = plt.figure(figsize=(6, 2))
    fig.text(0.5, 0.6, title, ha="center", fontsize=9)
    fig.text(0.5, 0.3, "no data for this figure in the table", ha="center")
    return fig


def fit_to_content(fig: plt.Figure, pad: float | None = None) -> None:
    """Resize ``fig`` to its content's tight box plus ``pad`` inches, keeping every artist's size in inches.

    The same crop as ``savefig(bbox_inches="tight")``, done once: "tight" lays the figure out again for every
    saved format, a third of a figure's cost.  Axes, figure legends and figure texts (the suptitle) are placed
    in figure fractions, so each is moved to where it was relative to the box.
    """
    pad = matplotlib.rcParams["savefig.pad_inches"] if pad is None else pad
    box = fig.get_tightbbox(fig.canvas.get_renderer()).padded(pad)  # inches
    width, height = fig.get_size_inches()

    def moved(x: float, y: float) -> tuple[float, float]:
        return (x * width - box.x0) / box.width, (y * height - box.y0) / box.height

    for ax in fig.axes:
        p = ax.get_position(original=True)
        ax.set_position([*moved(p.x0, p.y0), p.width * width / box.width, p.height * height / box.height])
    to_fig = fig.transFigure.inverted()
    for leg in fig.legends:
        anchor = leg.get_bbox_to_anchor().transformed(to_fig)
        leg.set_bbox_to_anchor((*moved(anchor.x0, anchor.y0), anchor.width * width / box.width,
                                anchor.height * height / box.height), transform=fig.transFigure)
    for text in fig.texts:
        if text.get_transform() in (fig.transFigure, fig.transSubfigure):
            text.set_position(moved(*text.get_position()))
    fig.set_size_inches(box.width, box.height)
    # tight_layout() leaves a placeholder layout engine, and with any engine savefig lays the figure out
    # again (a draw without rendering) for every format: the layout is final here
    fig.set_layout_engine(None)


def save(fig: plt.Figure, stem: str, spec: FigureSpec) -> list[str]:
    """``fig`` as ``<stem>.<format>`` for each of the spec's formats, at its dpi; closes the figure."""
    # text is measured at the dpi it is drawn at (hinting makes widths differ between dpis), and the PNG
    # reuses the renderer the measuring laid out
    fig.set_dpi(spec.dpi)
    fit_to_content(fig)
    out = []
    for ext in spec.formats:
        path = f"{stem}.{ext}"
        with atomic_output(path) as tmp:  # it creates the directory
            fig.savefig(tmp, format=ext, dpi=spec.dpi, bbox_inches=None)
        out.append(path)
    plt.close(fig)
    return out


def _threat(sel: dict[str, str]) -> str:
    return f"{NORM_LABELS.get(sel['norm'], sel['norm'])} ε = {sel['eps']}/255"


def _title(sel: dict[str, str], what: str, note: str = "", detail: str = "") -> str:
    """``what``, then the figure's cell (from its stem) and ``detail``, then ``note`` (a targeted_note)."""
    head = " / ".join(sel[k] for k in ("dataset", "arch") if k in sel)
    parts = [head]
    if "regime" in sel:
        parts.append(regime_label(sel["regime"]))
    if "norm" in sel:
        parts.append(f"evaluation threat {_threat(sel)}")
    return "\n".join([what, " — ".join(parts) + detail, *([note] if note else [])])


# ------------------------------------------------------------------------------------------- families
NC_METRICS = [
    ("accuracy", "network accuracy (%)", False, PCT),
    ("nc1", "NC1 = Tr(Σ_W Σ_B⁺)", True, 1.0),
    ("nc2_equinorm_means", "NC2 equinorm (CV of mean norms)", False, 1.0),
    ("nc2_equiangular_means", "NC2 equiangularity", False, 1.0),
    ("nc3", "NC3 self-duality ‖W/‖W‖ − M/‖M‖‖²", False, 1.0),
    ("nc4", "NC4 NCC ≠ network (fraction)", False, 1.0),
]


def _by_perturbation(metric: str, scale: float, kinds: tuple[str, ...] = tuple(PERTURBATION_LABELS)) -> tuple:
    return tuple(Series(PERTURBATION_LABELS[k], metric, k, "true", PALETTE[k], scale) for k in kinds)


# NC2 of the classifier rows W (one matrix per checkpoint, the same for every data kind: read from clean rows)
CLASSIFIER_NC2 = {
    "nc2_equinorm_means": "nc2_equinorm_weights",
    "nc2_equiangular_means": "nc2_equiangular_weights",
}
CLASSIFIER_LABEL = "classifier rows W (NC2 of the weights)"
CLASSIFIER_COLOUR = "#000000"


def _nc_panels() -> list[Panel]:
    panels = []
    for m, lbl, lg, s in NC_METRICS:
        series = _by_perturbation(m, s)
        if m in CLASSIFIER_NC2:
            series = (*series, Series(CLASSIFIER_LABEL, CLASSIFIER_NC2[m], "clean", "true", CLASSIFIER_COLOUR,
                                      style="--"))
        panels.append(Panel(lbl, series, lg))
    return panels


def _draw_nc(split: str) -> Draw:
    def draw(tables: dict[str, pd.DataFrame], sel: dict[str, str], note: str = "") -> plt.Figure:
        df = select(tables["metrics"], sel)
        df = df[df["split"] == split]
        panels = _nc_panels()
        return epoch_panels(
            df, panels, _title(sel, f"Neural Collapse on {split} data, grouped by true label", note)
        )

    return draw


# Target and true groupings of the (y+1) mod C attack are one partition of the points relabelled, so NC1 and
# NC2 (which never pair a group with a classifier row) are identical by construction: drawn once, said so.
LEAP_LINES = {
    "clean": ("clean, by true label", "clean", "true", "#1f77b4"),
    "target": ("targeted PGD, by target label", "targeted", "target", "#9467bd"),
    "true": ("targeted PGD, by true label", "targeted", "true", "#ff7f0e"),
    "predicted": ("untargeted PGD, by predicted label", "pgd", "predicted", "#d62728"),
}
LEAP_SAME_PARTITION = "targeted PGD by true label = by target label (same partition): drawn once"
LEAP_SHARES = [
    ("targeted PGD lands at the target's mean", "leap_share_target", "#2ca02c"),
    ("targeted PGD lands at its own class's mean", "leap_share_own", "#aec7e8"),
    ("targeted PGD lands at another class's mean", "leap_share_other", "#7f7f7f"),
]


def _leap_series(metric: str, keys: tuple[str, ...], scale: float = 1.0) -> tuple:
    return tuple(Series(LEAP_LINES[k][0], metric, *LEAP_LINES[k][1:], scale) for k in keys)


def _draw_leap(tables: dict[str, pd.DataFrame], sel: dict[str, str], note: str = "") -> plt.Figure:
    df = select(tables["metrics"], sel)
    df = df[df["split"] == "train"]
    every = ("clean", "target", "true", "predicted")
    once = ("clean", "target", "predicted")
    panels = [
        Panel("agreement of network with grouping label (%)", _leap_series("accuracy", every, PCT)),
        Panel("share of targeted PGD train points (%)",
              tuple(Series(lb, m, "targeted", "true", c, PCT) for lb, m, c in LEAP_SHARES)),
        Panel("NC1 = Tr(Σ_W Σ_B⁺)", _leap_series("nc1", once), log=True, note=LEAP_SAME_PARTITION),
        Panel("NC2 equiangularity", _leap_series("nc2_equiangular_means", once), note=LEAP_SAME_PARTITION),
        Panel("NC3 self-duality", _leap_series("nc3", every)),
        Panel(
            "∠(clean mean of c, mean of points targeted to c) (degrees)",
            (
                Series("angle, centred means", "align_angle_centred", "targeted", "target", "#e377c2", DEG),
                Series("angle, raw means", "align_angle_uncentred", "targeted", "target", "#17becf", DEG),
            ),
        ),
        Panel(
            "‖clean mean of c − mean targeted to c‖ (feature units)",
            (
                Series("distance, centred means", "align_dist_centred", "targeted", "target", "#8c564b"),
                Series("distance, raw means", "align_dist_uncentred", "targeted", "target", "#bcbd22"),
            ),
        ),
    ]
    return epoch_panels(df, panels, _title(sel, "Leap: targeted PGD (y → (y+1) mod C) on train data", note))


ALIGN_PANELS = [
    ("align_angle_centred", "∠ centred clean vs perturbed means (degrees)", DEG),
    ("align_angle_uncentred", "∠ raw clean vs perturbed means (degrees)", DEG),
    ("align_global_mean_angle", "∠ clean vs perturbed global means (degrees)", DEG),
    ("align_dist_centred", "‖centred mean difference‖ (feature units)", 1.0),
    ("align_dist_uncentred", "‖raw mean difference‖ (feature units)", 1.0),
    ("align_global_mean_dist", "‖global mean difference‖ (feature units)", 1.0),
]


def _draw_alignment(tables: dict[str, pd.DataFrame], sel: dict[str, str], note: str = "") -> plt.Figure:
    df = select(tables["metrics"], sel)
    df = df[df["split"] == "train"]
    kinds = tuple(k for k in KIND_ORDER if k != "clean")  # each is compared with the clean means
    panels = [Panel(lbl, _by_perturbation(m, s, kinds)) for m, lbl, s in ALIGN_PANELS]
    return epoch_panels(
        df,
        panels,
        _title(
            sel,
            "Clean vs perturbed simplex alignment on train data "
            "(class means by true label, averaged over classes)",
            note,
        ),
    )


def _final(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["epoch"] == df["epoch"].max()] if not df.empty else df


def _regime_order(regimes: list[str]) -> list[str]:
    return sorted(
        set(regimes),
        key=lambda r: (METHOD_ORDER.index(method_of(r)) if method_of(r) in METHOD_ORDER else 9, r),
    )


def _draw_ncc_bars(tables: dict[str, pd.DataFrame], sel: dict[str, str], note: str = "") -> plt.Figure:
    what = "Network vs nearest-clean-class-mean (NCC) classifier, final epoch"
    title = _title(sel, what, note)
    df = _final(select(tables["metrics"], sel))
    df = df[
        (df["grouping"] == "true")
        & df["perturbation"].isin(NCC_KINDS)
        & df["metric"].isin(["accuracy", "ncc_train_means_accuracy"])
    ]
    if df.empty:
        return empty_figure(title)
    df = df.assign(
        value=df["value"] * PCT,
        classifier=df["metric"].map(
            {"accuracy": "network", "ncc_train_means_accuracy": "NCC on clean train means"}
        ),
        method=df["regime"].map(regime_label),
    )
    cells = [
        (s, k)
        for s in ("test", "train")
        for k in NCC_KINDS
        if not df[(df["split"] == s) & (df["perturbation"] == k)].empty
    ]
    order = [regime_label(r) for r in _regime_order(list(df["regime"]))]
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.6), squeeze=False, sharey=True)
    classifiers = {"network": "#4c72b0", "NCC on clean train means": "#dd8452"}
    for ax, (split, kind) in zip(axes.flat, cells, strict=True):
        sub = df[(df["split"] == split) & (df["perturbation"] == kind)]
        # one value per seed (repeated rows averaged): bar = mean over seeds, error bar = their s.d.
        per_seed = sub.groupby(["method", "classifier", "seed"], as_index=False)["value"].mean()
        sns.barplot(
            data=per_seed,
            x="method",
            y="value",
            hue="classifier",
            order=order,
            hue_order=list(classifiers),
            palette=classifiers,
            saturation=1.0,
            errorbar="sd",
            capsize=0.15,
            err_kws={"color": "black", "linewidth": 1.0},
            legend=False,
            ax=ax,
        )
        ax.set_title(f"{split} data, {PERTURBATION_LABELS[kind]}")
        ax.set_xlabel("training method")
        # the regime labels name the training threat too: side by side they overlap, slanted they do not
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right", rotation_mode="anchor")
        ax.set_ylabel("accuracy (%)", visible=True)  # seaborn hides it next to shared (hidden) y ticks
        ax.set_ylim(0, 100)
    # seaborn's own legend would add its proxy patches to the first axes; the figure gets one shared legend
    shown = [c for c in classifiers if c in set(df["classifier"])]
    handles = [Patch(facecolor=classifiers[c], label=c) for c in shown]
    seeds = df["seed"].nunique()
    detail = f" (epoch {int(df['epoch'].max())}, {seeds} seed(s), bars ±1 s.d.)"
    return finish(fig, _title(sel, what, note, detail), handles, shown)


LAYERWISE_NC1 = [("nc1", "NC1 = Tr(Σ_W Σ_B⁺)", True, "-")]
LAYERWISE_NCC = [
    ("ncc_accuracy_clean_means", "NCC with clean class means", False, "-"),
    ("ncc_accuracy_own_means", "NCC with the data's own class means", False, "--"),
]


def _draw_layerwise(metrics: list[tuple[str, str, bool, str]], ylabel: str, what: str, scale: float = 1.0):
    def draw(tables: dict[str, pd.DataFrame], sel: dict[str, str], note: str = "") -> plt.Figure:
        title = _title(sel, what, note)
        df = select(tables["layerwise"], sel)
        if "split" in df.columns and (df["split"] == "train").any():
            df = df[df["split"] == "train"]
        df = _final(df[df["metric"].isin([m for m, *_ in metrics])])
        if df.empty:
            return empty_figure(title)
        regimes = _regime_order(list(df["regime"]))
        fig, axes = plt.subplots(
            1, len(regimes), figsize=(4.4 * len(regimes), 3.6), squeeze=False, sharey=True
        )
        names = df.drop_duplicates("layer_index").sort_values("layer_index")
        for ax, regime in zip(axes.flat, regimes, strict=True):
            sub = df[df["regime"] == regime]
            for metric, mlabel, logy, dash in metrics:
                part = sub[sub["metric"] == metric].assign(value=lambda d: d["value"] * scale)
                kinds = [k for k in PERTURBATION_LABELS if k in set(part["perturbation"])]
                for k in kinds:
                    lbl = PERTURBATION_LABELS[k] + ("" if len(metrics) == 1 else f", {mlabel}")
                    mean_band(ax, part[part["perturbation"] == k], "layer_index", PALETTE[k], lbl, dash)
                if logy and (part["value"] > 0).all():
                    ax.set_yscale("log")
            ax.set_xticks(names["layer_index"], names["layer"], rotation=60, ha="right", fontsize=7)
            ax.set_xlabel("layer (input → output)")
            ax.set_ylabel(ylabel, visible=True)  # seaborn hides it next to shared (hidden) y ticks
            ax.set_title(regime_label(regime))
        handles, labels = axes.flat[0].get_legend_handles_labels()
        return finish(
            fig,
            _title(sel, what, note, f" (epoch {int(df['epoch'].max())}, {df['seed'].nunique()} seed(s))"),
            handles,
            labels,
            ncol=2,
        )

    return draw


TRAIN_LOG_PANELS = [
    Panel(
        "loss",
        (
            Series("training loss (method's objective)", "loss", None, None, "#1f77b4"),
            Series("loss on the training-time adversarial batch", "robust_loss", None, None, "#d62728"),
        ),
    ),
    Panel(
        "accuracy (%)",
        (
            Series("train, clean (during epoch)", "train_acc", None, None, "#1f77b4", PCT),
            Series("train, adversarial (during epoch)", "robust_acc", None, None, "#d62728", PCT),
            Series("test, clean (end of epoch)", "test_acc", None, None, "#2ca02c", PCT),
        ),
    ),
    Panel("learning rate", (Series("learning rate (end of epoch)", "lr", None, None, "#7f7f7f"),), log=True),
]


def _draw_training(tables: dict[str, pd.DataFrame], sel: dict[str, str], note: str = "") -> plt.Figure:
    df = select(tables["train_logs"], sel)
    long = _wide_to_long(
        df,
        ["dataset", "arch", "regime", "seed", "epoch"],
        ["loss", "robust_loss", "train_acc", "robust_acc", "test_acc", "lr"],
    )
    return epoch_panels(long, TRAIN_LOG_PANELS, _title(sel, "Training curves", note))


# ------------------------------------------------------------------------------------------- leap matrix
LEAP_FIGURE_KINDS = ("pgd", "targeted")


def _draw_leap_matrix(tables: dict[str, pd.DataFrame], sel: dict[str, str], note: str = "") -> plt.Figure:
    """Heat maps true class (rows) -> class of the nearest clean train mean (columns), train, final epoch.

    One column per regime (ST beside AT and TRADES), one row per attack; each row of a map sums to 100 %.
    """
    what = "Leap matrix: where perturbed train points land (nearest clean train class mean), final epoch"
    title = _title(sel, what, note)
    df = select(tables["leap"], sel)
    df = _final(df[(df["split"] == "train") & df["perturbation"].isin(LEAP_FIGURE_KINDS)])
    if df.empty:
        return empty_figure(title)
    regimes = _regime_order(list(df["regime"]))
    kinds = [k for k in LEAP_FIGURE_KINDS if k in set(df["perturbation"])]
    c = int(df["true_class"].max()) + 1
    size = 3.2 if c <= 20 else 4.5
    fig, axes = plt.subplots(len(kinds), len(regimes), figsize=(size * len(regimes) + 1.0, size * len(kinds)),
                             squeeze=False)
    image = None
    for i, kind in enumerate(kinds):
        for j, regime in enumerate(regimes):
            ax = axes[i, j]
            sub = df[(df["perturbation"] == kind) & (df["regime"] == regime)]
            m = (sub.groupby(["true_class", "landed_class"])["share"].mean().unstack()
                 .reindex(index=range(c), columns=range(c)).to_numpy(dtype=float) * PCT)
            image = ax.imshow(m, vmin=0, vmax=100, cmap="viridis", interpolation="nearest")
            if c <= 10:
                for (r, k), v in np.ndenumerate(m):
                    if np.isfinite(v) and v >= 0.5:
                        ax.text(k, r, f"{v:.0f}", ha="center", va="center", fontsize=6,
                                color="white" if v < 60 else "black")
            ticks = np.arange(c) if c <= 20 else np.arange(0, c, 10)
            ax.set_xticks(ticks)
            ax.set_yticks(ticks)
            ax.tick_params(labelsize=7)
            ax.grid(False)
            ax.set_xlabel("class of the nearest clean mean")
            ax.set_ylabel("true class")
            own = float(np.nanmean(np.diag(m))) if np.isfinite(m).any() else float("nan")
            ax.set_title(f"{regime_label(regime)}\n{PERTURBATION_LABELS[kind]}\n(diagonal mean {own:.0f} %)",
                         fontsize=8)
    fig.tight_layout()
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="share of the true class (%)")
    seeds = df["seed"].nunique()
    fig.suptitle(_title(sel, what, note, f" ({seeds} seed(s), mean)"), y=1.02, va="bottom", fontsize=10)
    return fig


# ------------------------------------------------------------------------------------ simplex projection
SIMPLEX_KINDS = ("pgd", "targeted")
SIMPLEX_MARKERS = {"clean": "o", "pgd": "X", "targeted": "^"}
SIMPLEX_MAX_CLASSES = 10  # C = 100: the first ten classes (their own PCA plane)
SIMPLEX_PER_CLASS = 12  # sampled points per class and kind
SIMPLEX_SEGMENTS = 2  # clean points per class joined to their perturbed images


@dataclass(frozen=True)
class DumpView:
    """The train-split groups of one dump that the projection draws (features as float64)."""

    epoch: int
    num_classes: int
    groups: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]  # kind -> (features, labels, targets)


def read_dump_view(path: str | os.PathLike, kinds: tuple[str, ...] = ("clean", *SIMPLEX_KINDS)) -> DumpView:
    from .io import attrs_dict, open_dump

    with open_dump(path) as f:
        root = attrs_dict(f)
        groups = {}
        for k in kinds:
            if f"train/{k}" in f:
                g = f[f"train/{k}"]
                groups[k] = (g["features"][:].astype(np.float64), g["labels"][:],
                             g["targets"][:] if "targets" in g else None)
        return DumpView(int(root["epoch"]), int(root["num_classes"]), groups)


def simplex_plane(means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre (D,) and the two principal axes (2, D) of the centred class means (rows of ``means``)."""
    centre = means.mean(axis=0)
    _, _, vt = np.linalg.svd(means - centre, full_matrices=False)
    axes = vt[:2]
    if axes.shape[0] < 2:  # one or two classes: pad with a zero axis
        axes = np.vstack([axes, np.zeros((2 - axes.shape[0], means.shape[1]))])
    return centre, axes


def _sample(labels: np.ndarray, classes: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    idx = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)


def _draw_simplex_panel(ax: plt.Axes, view: DumpView, kind: str, classes: np.ndarray, colours: list) -> None:
    from . import leap

    h, y, _ = view.groups["clean"]
    means_all = np.stack([h[y == c].mean(axis=0) if (y == c).any() else np.full(h.shape[1], np.nan)
                          for c in range(view.num_classes)])
    centre, axes2 = simplex_plane(means_all[classes])

    def proj(x: np.ndarray) -> np.ndarray:
        return (x - centre) @ axes2.T

    rng = np.random.default_rng(0)
    pick = _sample(y, classes, SIMPLEX_PER_CLASS, rng)
    hp, yp, tp = view.groups[kind]
    colour_of = {int(c): colours[i] for i, c in enumerate(classes)}
    pc, pp = proj(h[pick]), proj(hp[pick])
    col = [colour_of[int(v)] for v in y[pick]]
    # segments first (under the points): clean point -> its perturbed image (same image, same row)
    for c in classes:
        rows = np.flatnonzero(y[pick] == c)[:SIMPLEX_SEGMENTS]
        for r in rows:
            ax.plot([pc[r, 0], pp[r, 0]], [pc[r, 1], pp[r, 1]], color=colour_of[int(c)], lw=0.7, alpha=0.8,
                    zorder=1)
    ax.scatter(pc[:, 0], pc[:, 1], c=col, marker=SIMPLEX_MARKERS["clean"], s=10, alpha=0.35, linewidths=0,
               zorder=2)
    ax.scatter(pp[:, 0], pp[:, 1], c=col, marker=SIMPLEX_MARKERS[kind], s=22, alpha=0.9, linewidths=0.3,
               edgecolors="black", zorder=3)
    # the perturbed data's own class means (by true label): aligned with the clean ones = a second simplex
    pm = np.stack([hp[yp == c].mean(axis=0) for c in classes])
    mp, pmp = proj(means_all[classes]), proj(pm)
    for i in range(len(classes)):
        ax.plot([mp[i, 0], pmp[i, 0]], [mp[i, 1], pmp[i, 1]], color="black", lw=0.6, ls=":", zorder=4)
    ax.scatter(pmp[:, 0], pmp[:, 1], facecolors="white", edgecolors=colours[: len(classes)], marker="D", s=45,
               linewidths=1.5, zorder=5)
    ax.scatter(mp[:, 0], mp[:, 1], c=colours[: len(classes)], marker="*", s=230, edgecolors="black",
               linewidths=0.8, zorder=6)
    for i, c in enumerate(classes):
        ax.annotate(str(int(c)), mp[i], xytext=(5, 5), textcoords="offset points", fontsize=8, weight="bold",
                    zorder=7)
    shares = leap.leap_shares(yp, leap.landing_classes(hp, means_all), tp if kind == "targeted" else None)
    text = ", ".join(f"{k.removeprefix('leap_share_')} {PCT * v:.0f} %" for k, v in shares.items())
    ax.set_title(f"epoch {view.epoch}: clean and {PERTURBATION_LABELS[kind]}\nnearest clean mean: {text}",
                 fontsize=8)
    ax.set_xlabel("PC 1 of the centred clean class means")
    ax.set_ylabel("PC 2")
    ax.set_aspect("equal", adjustable="datalim")


def draw_simplex(views: list[DumpView], sel: dict[str, str], note: str = "") -> plt.Figure:
    """Rows: the checkpoints (first, final); columns: PGD and targeted PGD, each over the clean data."""
    what = "Simplex projection of train features (class means and a sample per class)"
    title = _title(sel, what, note)
    views = [v for v in views if "clean" in v.groups]
    kinds = [k for k in SIMPLEX_KINDS if all(k in v.groups for v in views)]
    if not views or not kinds:
        return empty_figure(title)
    c = views[0].num_classes
    classes = np.arange(min(c, SIMPLEX_MAX_CLASSES))
    colours = sns.color_palette("tab10" if len(classes) <= 10 else "tab20", len(classes))
    fig, axes = plt.subplots(len(views), len(kinds), figsize=(5.2 * len(kinds), 4.8 * len(views)),
                             squeeze=False)
    for i, view in enumerate(views):
        for j, kind in enumerate(kinds):
            _draw_simplex_panel(axes[i, j], view, kind, classes, colours)
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], ls="", marker="*", ms=12, color="grey", mec="black",
               label="clean class mean (vertex)"),
        Line2D([], [], ls="", marker="D", ms=6, mfc="white", mec="grey", mew=1.5,
               label="perturbed class mean (true label)"),
        Line2D([], [], ls="", marker="o", ms=4, color="grey", alpha=0.5, label="clean sample"),
        *[Line2D([], [], ls="", marker=SIMPLEX_MARKERS[k], ms=6, color="grey", mec="black",
                 label=PERTURBATION_LABELS[k]) for k in kinds],
        Line2D([], [], color="grey", lw=0.7, label="clean point → its perturbed image"),
    ]
    subset = "" if len(classes) == c else f"; classes 0–{len(classes) - 1} of {c}"
    return finish(fig, _title(sel, what, note, f"\ncolour = true class{subset}"), handles,
                  [h.get_label() for h in handles])


def _draw_simplex_family(tables: dict[str, Any], sel: dict[str, str], note: str = "") -> plt.Figure:
    return draw_simplex([read_dump_view(p) for p in tables["features"]], sel, note)


def draw_simplex_files(dumps: list[str], stem: str, outdir: str, spec: FigureSpec) -> list[str]:
    """The simplex_projection figure ``stem`` from its feature dumps (first and final checkpoint)."""
    sns.set_theme(context=spec.context, style="whitegrid")
    fig = _draw("simplex_projection", {"features": dumps}, stem, spec)
    return save(fig, str(Path(outdir) / stem), spec)


# ------------------------------------------------------------------------------------------- registry
# (tables, sel, note=""): the input tables by name, the stem's wildcards, an extra title line
Draw = Callable[..., plt.Figure]

# One drawing per family of ncpipe.families.FAMILIES (same keys; tests/test_figures.py checks).
DRAW: dict[str, Draw] = {
    "nc_vs_epoch": _draw_nc("train"),
    "nc_vs_epoch_test": _draw_nc("test"),
    "targeted_leap": _draw_leap,
    "simplex_alignment": _draw_alignment,
    "ncc_vs_network": _draw_ncc_bars,
    "layerwise_nc1": _draw_layerwise(
        LAYERWISE_NC1, "NC1 = Tr(Σ_W Σ_B⁺)", "Layerwise NC1 on train data, final epoch"
    ),
    "layerwise_ncc_accuracy": _draw_layerwise(
        LAYERWISE_NCC, "NCC accuracy (%)", "Layerwise NCC accuracy on train data, final epoch", PCT
    ),
    "training_curves": _draw_training,
    "simplex_projection": _draw_simplex_family,
    "leap_matrix": _draw_leap_matrix,
}


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """The input table, checked against its digest sidecar when it has one (every table ncpipe writes)."""
    return read_csv_verified(path, "table", required=False)


def targeted_note(sel: dict[str, str], budget: TargetedBudget) -> str:
    """The line that says how the targeted kind's budget differs from the evaluation threat of ``sel``."""
    parts = [f"ε × {budget.epsilon_factor:g} = {budget.epsilon_of(float(sel['eps'])):g}/255"]
    if budget.step_factor != 1:
        parts.append(f"step × {budget.step_factor:g}")
    if budget.steps_factor != 1:
        parts.append(f"steps × {budget.steps_factor}")
    return "targeted PGD's own budget (config attack.targeted): " + ", ".join(parts)


def _draw(family: str, tables: dict[str, Any], stem: str, spec: FigureSpec) -> plt.Figure:
    sel = parse_stem(family, stem)
    # the file name and title name the evaluation threat; the targeted kind drawn here may have used another
    budget = spec.targeted
    drawn = FAMILIES[family].targeted and budget is not None and not budget.is_identity()
    return DRAW[family](tables, sel, targeted_note(sel, budget) if drawn else "")


def draw_figures(table: str | os.PathLike, names: list[str], root: str, spec: FigureSpec) -> list[str]:
    """Draw each figure ``<family>/<stem>`` of ``names`` from the one ``table`` they all read, under ``root``.

    One process for all families of a table: each figure reads the whole table, so splitting them into jobs
    caches nothing more, and each job would pay the ~1 s of importing matplotlib, seaborn and pandas again.
    """
    by_family: dict[str, list[str]] = {}
    for name in names:
        family, _, stem = name.partition("/")
        if family not in FAMILIES or not stem:
            raise UsageError(f"{name!r} is not <family>/<stem> (families: {', '.join(FAMILIES)})")
        by_family.setdefault(family, []).append(stem)
    read = {FAMILIES[f].table for f in by_family}
    if len(read) != 1:
        raise UsageError(f"the figures {names} read different tables ({', '.join(sorted(read))})")
    sns.set_theme(context=spec.context, style="whitegrid")
    tables = {read.pop(): read_table(table)}
    out = []
    for family, stems in by_family.items():
        for stem in stems:
            log.info("drawing %s/%s", family, stem)
            fig = _draw(family, tables, stem, spec)
            out += save(fig, str(Path(root) / family / stem), spec)
    return out
