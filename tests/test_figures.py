"""Figure families and tables against synthetic tidy tables with the real columns (synthetic_tables.py)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from ncpipe import families, figures, grid, tables
from ncpipe.config import load_config
from ncpipe.specs import FigureSpec, TargetedBudget
from ncpipe.utils import UsageError

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_tables import (  # noqa: E402
    METRICS_COLUMNS,
    layerwise_frame,
    metrics_frame,
    train_logs_frame,
)

ROOT = Path(__file__).resolve().parents[1]
PNG = FigureSpec(("png",), 40, "paper")  # small PNGs, and the authors' targeted budget (no note)
REPORT_DIR = ROOT / "workflow" / "report"


def _row(**kw) -> dict:
    base = {
        "dataset": "cifar10",
        "arch": "vgg11bn",
        "method": "st",
        "norm": "linf",
        "epsilon": 8.0,
        "seed": 1,
        "epoch": 1,
        "split": "train",
        "perturbation": "clean",
        "grouping": "true",
        "metric": "nc1",
        "value": 1.0,
        "regime": "st",
    }
    return {**base, **kw}


def _axis(fig: plt.Figure, ylabel_start: str) -> plt.Axes:
    (ax,) = [a for a in fig.axes if a.get_ylabel().startswith(ylabel_start)]
    return ax


def _line(ax: plt.Axes, label: str):
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return line


def test_stems_round_trip_and_do_not_collide_across_paper_configs():
    stems = {}
    for name in ("paper", "paper_l2", "imagenette"):
        cfg = load_config(ROOT / "config" / f"{name}.yaml")
        for fam in families.FAMILIES:
            for stem in families.figure_stems(cfg, fam):
                w = families.parse_stem(fam, stem)
                assert families.FAMILIES[fam].stem.format(**w) == stem
                stems.setdefault((fam, stem), set()).add(name)
    # every evaluated figure names its threat, so the l_inf and l_2 grids never write the same file; only the
    # training curves of the shared ST runs coincide (same runs, same content)
    shared = {k for k, v in stems.items() if len(v) > 1}
    assert shared == {
        ("training_curves", f"{d}__{a}__st")
        for d in ("cifar10", "cifar100")
        for a in ("vgg11bn", "preactresnet18")
    }
    main = load_config(ROOT / "config" / "paper.yaml")
    assert len(families.figure_stems(main, "nc_vs_epoch")) == 2 * 2 * 3  # dataset x arch x method, one threat
    assert len(families.figure_stems(main, "ncc_vs_network")) == 4
    assert families.parse_stem("nc_vs_epoch", "cifar100__preactresnet18__trades_l2128__l2128") == {
        "dataset": "cifar100",
        "arch": "preactresnet18",
        "regime": "trades_l2128",
        "norm": "l2",
        "eps": "128",
    }
    with pytest.raises(ValueError, match="not a nc_vs_epoch figure name"):
        families.parse_stem("nc_vs_epoch", "cifar10__vgg11bn__linf8")


def test_select_matches_epsilon_as_a_number():
    df = pd.DataFrame([_row(epsilon=8.0), _row(epsilon=16.0), _row(epsilon=8, arch="preactresnet18")])
    assert len(figures.select(df, {"eps": "8", "norm": "linf"})) == 2
    assert len(figures.select(df, {"eps": "8", "arch": "vgg11bn"})) == 1


def test_nc_curves_are_seed_means_with_sd_band_on_log_axis():
    # two seeds: NC1 = 1 and 3 at epoch 1, 0.1 and 0.3 at epoch 2 -> means 2 and 0.2, s.d. sqrt(2), sqrt(2)/10
    rows = [
        _row(seed=s, epoch=e, value=v) for s, e, v in [(1, 1, 1.0), (2, 1, 3.0), (1, 2, 0.1), (2, 2, 0.3)]
    ]
    rows += [
        _row(seed=1, epoch=1, perturbation="pgd", value=5.0),
        _row(seed=1, epoch=2, perturbation="pgd", value=6.0),
    ]
    rows += [_row(seed=1, epoch=1, metric="accuracy", value=0.25)]
    rows += [_row(seed=1, epoch=1, split="test", value=99.0)]  # another split: must not leak in
    fig = figures.DRAW["nc_vs_epoch"](
        {"metrics": pd.DataFrame(rows)}, families.parse_stem("nc_vs_epoch", "cifar10__vgg11bn__st__linf8")
    )
    ax = _axis(fig, "NC1")
    assert ax.get_yscale() == "log"
    clean = _line(ax, "clean")
    np.testing.assert_allclose(clean.get_xdata(), [1, 2])
    np.testing.assert_allclose(clean.get_ydata(), [2.0, 0.2])
    band = [
        c
        for c in ax.collections
        if np.allclose(
            c.get_facecolor()[0][:3],
            clean.get_color()[:3]
            if not isinstance(clean.get_color(), str)
            else plt.matplotlib.colors.to_rgb(clean.get_color()),
        )
    ]
    verts = band[0].get_paths()[0].vertices
    assert np.isclose(verts[:, 1].max(), 2 + math.sqrt(2)) and np.isclose(
        verts[:, 1].min(), 0.2 - 0.1 * math.sqrt(2)
    )
    np.testing.assert_allclose(_line(ax, "PGD (untargeted)").get_ydata(), [5.0, 6.0])
    np.testing.assert_allclose(_line(_axis(fig, "network accuracy (%)"), "clean").get_ydata(), [25.0])
    assert "ST" in fig._suptitle.get_text() and "ε = 8/255" in fig._suptitle.get_text()
    assert "cifar10 / vgg11bn" in fig._suptitle.get_text()
    legend_texts = {t.get_text() for leg in fig.legends for t in leg.get_texts()}
    assert legend_texts == {"clean", "PGD (untargeted)"}
    plt.close(fig)


def test_leap_angles_are_drawn_in_degrees_from_target_grouping():
    rows = [
        _row(perturbation="targeted", grouping="target", metric="align_angle_centred", value=math.pi / 2),
        _row(perturbation="targeted", grouping="true", metric="align_angle_centred", value=0.1),
        _row(perturbation="targeted", grouping="target", metric="nc1", value=0.5),
        _row(perturbation="pgd", grouping="predicted", metric="nc1", value=0.7),
    ]
    rows += [_row(perturbation="targeted", grouping=g, metric="accuracy", value=0.5)
             for g in ("true", "target")]
    rows += [_row(perturbation="targeted", grouping="true", metric=m, value=0.3)
             for m in ("leap_share_own", "leap_share_target", "leap_share_other")]
    fig = figures.DRAW["targeted_leap"](
        {"metrics": pd.DataFrame(rows)}, families.parse_stem("targeted_leap", "cifar10__vgg11bn__st__linf8")
    )
    ax = _axis(fig, "∠(clean mean of c")
    assert "degrees" in ax.get_ylabel()
    np.testing.assert_allclose(_line(ax, "angle, centred means").get_ydata(), [90.0])
    nc1 = _axis(fig, "NC1")
    # target and true groupings are one partition: NC1 drawn once, and the legend says so
    np.testing.assert_allclose(_line(nc1, "targeted PGD, by target label").get_ydata(), [0.5])
    assert not [ln for ln in nc1.get_lines() if ln.get_label() == "targeted PGD, by true label"]
    assert nc1.get_title() == figures.LEAP_SAME_PARTITION
    np.testing.assert_allclose(_line(nc1, "untargeted PGD, by predicted label").get_ydata(), [0.7])
    colours = [ln.get_color() for a in fig.axes for ln in a.get_lines() if not ln.get_label().startswith("_")]
    labels = [ln.get_label() for a in fig.axes for ln in a.get_lines() if not ln.get_label().startswith("_")]
    by_label = dict(zip(labels, colours, strict=True))
    assert len(set(by_label.values())) == len(by_label)  # every line its own colour
    plt.close(fig)


def test_regime_labels_are_readable():
    assert grid.regime_label("st") == "ST"
    assert grid.regime_label("at_linf32") == "AT, PGD ℓ∞ 32/255"
    assert grid.regime_label("trades_l2128") == "TRADES, KL-PGD ℓ2 128/255"


def test_epoch_ticks_sit_at_the_checkpoints_and_long_runs_get_a_log_axis():
    rows = [_row(epoch=e, value=1.0 / (e + 1)) for e in (1, 2, 5, 10, 20)]
    fig = figures.DRAW["nc_vs_epoch"]({"metrics": pd.DataFrame(rows)},
                                      families.parse_stem("nc_vs_epoch", "cifar10__vgg11bn__st__linf8"))
    ax = _axis(fig, "NC1")
    np.testing.assert_allclose(ax.get_xticks(), [1, 2, 5, 10, 20])
    assert ax.get_xscale() == "linear"
    plt.close(fig)
    rows = [_row(epoch=e, value=1.0 / (e + 1)) for e in (0, 10, 100, 400)]
    fig = figures.DRAW["nc_vs_epoch"]({"metrics": pd.DataFrame(rows)},
                                      families.parse_stem("nc_vs_epoch", "cifar10__vgg11bn__st__linf8"))
    ax = _axis(fig, "NC1")
    assert ax.get_xscale() == "symlog"
    np.testing.assert_allclose(ax.get_xticks(), [0, 10, 100, 400])
    plt.close(fig)


def test_nc2_of_the_classifier_is_drawn_beside_nc2_of_the_means():
    rows = [_row(epoch=e, metric=m, value=v) for e in (1, 2)
            for m, v in (("nc2_equinorm_means", 0.3), ("nc2_equinorm_weights", 0.1))]
    rows += [_row(epoch=1, perturbation="pgd", metric="nc2_equinorm_weights", value=0.1)]
    fig = figures.DRAW["nc_vs_epoch"]({"metrics": pd.DataFrame(rows)},
                                      families.parse_stem("nc_vs_epoch", "cifar10__vgg11bn__st__linf8"))
    ax = _axis(fig, "NC2 equinorm")
    w = _line(ax, figures.CLASSIFIER_LABEL)
    np.testing.assert_allclose(w.get_ydata(), [0.1, 0.1])
    assert w.get_linestyle() == "--"
    np.testing.assert_allclose(_line(ax, "clean").get_ydata(), [0.3, 0.3])
    plt.close(fig)


def test_ncc_bars_show_final_epoch_test_accuracy_per_method_in_percent():
    rows = []
    for regime, net, ncc in [("st", 0.0, 0.02), ("at_linf8", 0.40, 0.38)]:
        for seed, jitter in [(1, -0.02), (2, 0.02)]:
            for metric, v in [("accuracy", net), ("ncc_train_means_accuracy", ncc)]:
                rows.append(
                    _row(
                        regime=regime,
                        method=regime[:2].strip("_"),
                        seed=seed,
                        epoch=4,
                        split="test",
                        perturbation="pgd",
                        metric=metric,
                        value=v + jitter,
                    )
                )
                rows.append(
                    _row(
                        regime=regime,
                        seed=seed,
                        epoch=2,
                        split="test",
                        perturbation="pgd",
                        metric=metric,
                        value=0.99,
                    )
                )  # an earlier epoch: ignored
    fig = figures.DRAW["ncc_vs_network"](
        {"metrics": pd.DataFrame(rows)}, families.parse_stem("ncc_vs_network", "cifar10__vgg11bn__linf8")
    )
    (ax,) = fig.axes
    assert ax.get_title() == "test data, PGD (untargeted)"
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    np.testing.assert_allclose(heights, [0.0, 2.0, 38.0, 40.0], atol=1e-9)
    # error bars (one line each, caps included): mean +- the s.d. of the two seeds, 100 * 0.04 / sqrt(2)
    bars = [(np.nanmin(ln.get_ydata()), np.nanmax(ln.get_ydata())) for ln in ax.get_lines()]
    np.testing.assert_allclose(sorted((lo + hi) / 2 for lo, hi in bars), [0.0, 2.0, 38.0, 40.0], atol=1e-9)
    np.testing.assert_allclose([(hi - lo) / 2 for lo, hi in bars], [2 * math.sqrt(2)] * 4)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["ST", "AT, PGD ℓ∞ 8/255"]
    assert "epoch 4" in fig._suptitle.get_text()
    plt.close(fig)


def test_every_family_has_a_drawing():
    assert set(figures.DRAW) == set(families.FAMILIES)


def test_every_family_draws_a_png_from_synthetic_tables(tmp_path):
    src = {
        "metrics": metrics_frame(epochs=(1, 4), seeds=(1, 2)),
        "layerwise": layerwise_frame(seeds=(1, 2)),
        "train_logs": train_logs_frame(epochs=6),
    }
    files = {}
    for key, df in src.items():
        files[key] = tmp_path / f"{key}.csv"
        df.to_csv(files[key], index=False)
    stems = {
        families.RUN_THREAT: "cifar10__vgg11bn__at_linf8__linf8",
        families.ARCH_THREAT: "cifar10__vgg11bn__linf8",
        families.RUN: "cifar10__vgg11bn__at_linf8",
    }
    leap_rows = [{"dataset": "cifar10", "arch": "vgg11bn", "regime": r, "method": r.split("_")[0], "seed": 1,
                  "epoch": 4, "norm": "linf", "epsilon": 8.0, "split": "train", "perturbation": k,
                  "true_class": t, "landed_class": c, "count": int(t == c), "share": float(t == c)}
                 for r in ("st", "at_linf8") for k in ("pgd", "targeted") for t in range(3) for c in range(3)]
    files["leap"] = tmp_path / "leap.csv"
    pd.DataFrame(leap_rows).to_csv(files["leap"], index=False)
    for fam, f in families.FAMILIES.items():
        if f.table == "features":  # drawn from feature dumps: tests/test_leap.py
            continue
        name = f"{fam}/{stems[f.stem]}"
        (out,) = figures.draw_figures(files[f.table], [name], str(tmp_path), PNG)
        head = Path(out).read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n", fam
        assert (REPORT_DIR / f"{fam}.rst").is_file(), f"no report caption for {fam}"


def test_one_job_draws_every_family_of_a_table_and_refuses_mixed_tables(tmp_path):
    path = tmp_path / "metrics.csv"
    metrics_frame(epochs=(1, 4), seeds=(1,)).to_csv(path, index=False)
    names = ["nc_vs_epoch/cifar10__vgg11bn__st__linf8", "ncc_vs_network/cifar10__vgg11bn__linf8"]
    out = figures.draw_figures(path, names, str(tmp_path), FigureSpec(("png", "pdf"), 40, "paper"))
    assert out == [str(tmp_path / f"{n}.{ext}") for n in names for ext in ("png", "pdf")]
    assert all(Path(o).stat().st_size > 0 for o in out)
    with pytest.raises(UsageError, match="read different tables"):
        figures.draw_figures(path, [names[0], "training_curves/cifar10__vgg11bn__st"], str(tmp_path), PNG)
    with pytest.raises(UsageError, match="not <family>/<stem>"):
        figures.draw_figures(path, ["cifar10__vgg11bn__st__linf8"], str(tmp_path), PNG)


def _legend_above_panels() -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(4, 2))
    for ax in axes:
        ax.plot([1, 2], [3, 4], label="a label long enough to stick out of a narrow figure on both sides")
        ax.set_ylabel("y label")
    handles, labels = axes[0].get_legend_handles_labels()
    return figures.finish(fig, "a title\non two lines", handles * 3, [f"{lb} {i}" for i, lb in
                                                                        enumerate(labels * 3)])


def test_fit_to_content_is_the_tight_crop_done_once(tmp_path):
    from PIL import Image

    tight = _legend_above_panels()
    tight.savefig(tmp_path / "tight.png", dpi=80, bbox_inches="tight")
    plt.close(tight)
    fig = _legend_above_panels()
    fig.set_dpi(80)  # as figures.save does: measured at the dpi it is drawn at
    assert fig.get_tightbbox().y1 > fig.get_size_inches()[1]  # legend and title stick out above the figure
    figures.fit_to_content(fig)
    box, size = fig.get_tightbbox(), fig.get_size_inches()
    pad = plt.rcParams["savefig.pad_inches"]
    # everything inside, with the pad on every side (a text's extent moves by a rounding hair)
    assert np.allclose([box.x0, box.y0, size[0] - box.x1, size[1] - box.y1], pad, atol=0.02)
    fig.savefig(tmp_path / "fit.png", dpi=80)
    plt.close(fig)
    w, h = Image.open(tmp_path / "fit.png").size
    wt, ht = Image.open(tmp_path / "tight.png").size
    assert abs(w - wt) <= 3 and abs(h - ht) <= 3, ((w, h), (wt, ht))


def test_one_seed_draws_no_band_and_repeated_rows_count_once():
    fig, ax = plt.subplots()
    frame = pd.DataFrame({"epoch": [1, 1, 1, 2], "seed": [1, 1, 1, 1], "value": [1.0, 2.0, 3.0, 5.0]})
    line = figures.mean_band(ax, frame, "epoch", "#123456", "one seed")
    np.testing.assert_allclose(line.get_ydata(), [2.0, 5.0])
    assert not ax.collections  # no s.d. of one seed
    # seed 1 has two rows at epoch 1 (mean 2), seed 2 one (4): the mean is over seeds, 3, s.d. sqrt(2)
    frame = pd.DataFrame({"epoch": [1, 1, 1], "seed": [1, 1, 2], "value": [1.0, 3.0, 4.0]})
    line = figures.mean_band(ax, frame, "epoch", None, "two seeds")
    np.testing.assert_allclose(line.get_ydata(), [3.0])
    (band,) = ax.collections
    ys = band.get_paths()[0].vertices[:, 1]
    assert np.isclose(ys.max(), 3 + math.sqrt(2)) and np.isclose(ys.min(), 3 - math.sqrt(2))
    plt.close(fig)


def _pandas_mean_sd(frame: pd.DataFrame) -> tuple[np.ndarray, ...]:
    """The two groupbys the figures drew from before: the reference for seed_mean_sd."""
    per_seed = frame.groupby(["epoch", "seed"], as_index=False)["value"].mean()
    stats = per_seed.groupby("epoch")["value"].agg(["mean", "std"]).sort_index()
    return stats.index.to_numpy(dtype=float), stats["mean"].to_numpy(), stats["std"].to_numpy()


@pytest.mark.parametrize("order", ["table", "shuffled"])
def test_seed_mean_sd_is_the_pandas_groupby(order):
    # repeated rows of one seed at one epoch, groups of 1 to ~40 rows, NaN values and an all-NaN epoch, wide
    # magnitudes: the statistics of the two groupbys the figures drew from before, to rounding
    rng = np.random.default_rng(7)
    for trial in range(40):
        n = int(rng.integers(1, 120))
        frame = pd.DataFrame({"epoch": rng.integers(0, 6, n) * 5, "seed": rng.integers(1, 4, n),
                              "value": rng.normal(size=n) * 10.0 ** rng.integers(-4, 5, n) + 1e3 * trial})
        if order == "table":
            frame = frame.sort_values(["epoch", "seed"], kind="stable")
        if trial % 3 == 0:
            frame.loc[frame.sample(frac=0.2, random_state=trial).index, "value"] = np.nan
            frame.loc[frame["epoch"] == frame["epoch"].iloc[0], "value"] = np.nan
        got = figures.seed_mean_sd(*(frame[c].to_numpy() for c in ("epoch", "seed", "value")))
        for g, want in zip(got, _pandas_mean_sd(frame), strict=True):
            # NaN where pandas has NaN; an s.d. of ~0.1 among values ~1e3 loses ~4 digits to cancellation
            # in either summation order
            np.testing.assert_allclose(g, want, rtol=1e-9, atol=0)


def test_seed_mean_sd_passes_one_seed_through_exactly():
    # the default run's case: every curve is one seed, one row per epoch, drawn as its values bit for bit
    value = np.array([0.1, 1 / 3, 2.5e-7, np.nan, 7.0])
    xs, mean, sd = figures.seed_mean_sd(np.array([20, 1, 5, 10, 2]), np.ones(5, dtype=int), value)
    np.testing.assert_array_equal(xs, [1, 2, 5, 10, 20])
    np.testing.assert_array_equal(mean, value[[1, 4, 2, 3, 0]])
    assert np.isnan(sd).all()


def test_series_rows_leave_open_keys_the_series_do_not_name():
    rows = [_row(epoch=1, grouping="true", value=1.0), _row(epoch=2, grouping="target", value=2.0),
            _row(epoch=3, grouping="true", perturbation="pgd", value=3.0),
            _row(epoch=4, grouping="true", value=np.inf)]
    by = figures.SeriesRows(pd.DataFrame(rows), "epoch")
    line = by.line(figures.Series("any grouping", "nc1", "clean", None, scale=10.0))
    np.testing.assert_array_equal(line.x, [1, 2])  # table order, the infinite value dropped
    np.testing.assert_array_equal(line.value, [10.0, 20.0])
    np.testing.assert_array_equal(by.line(figures.Series("true", "nc1", "clean", "true")).x, [1])


def test_figures_of_the_targeted_kind_name_its_own_budget(tmp_path):
    cfg = load_config(ROOT / "config" / "config.yaml")  # the demo: targeted at 2x epsilon, 3x the steps
    spec = grid.figures_spec_of(cfg)
    assert spec.targeted == TargetedBudget(2, 1.0, 3) and FigureSpec.from_json(spec.to_json()) == spec
    paper = grid.figures_spec_of(load_config(ROOT / "config" / "paper.yaml"))
    assert paper.targeted is None and FigureSpec.from_json(paper.to_json()) == paper  # the authors' budget
    note = "targeted PGD's own budget (config attack.targeted): ε × 2 = 16/255, steps × 3"
    assert figures.targeted_note({"eps": "8"}, spec.targeted) == note
    path = tmp_path / "metrics.csv"
    metrics_frame(epochs=(1, 4), seeds=(1,)).to_csv(path, index=False)
    titles = {}
    for budget in (spec.targeted, None):
        for name in ("targeted_leap/cifar10__vgg11bn__st__linf8", "ncc_vs_network/cifar10__vgg11bn__linf8"):
            family, stem = name.split("/")
            fig = figures._draw(family, {"metrics": figures.read_table(path)}, stem,
                                FigureSpec(("png",), 40, "paper", budget))
            titles[name, budget is None] = fig.get_suptitle()
            plt.close(fig)
    assert titles["targeted_leap/cifar10__vgg11bn__st__linf8", False].endswith("\n" + note)
    assert note not in titles["targeted_leap/cifar10__vgg11bn__st__linf8", True]
    # a figure without the targeted kind says nothing of its budget
    assert titles["ncc_vs_network/cifar10__vgg11bn__linf8", False] == titles[
        "ncc_vs_network/cifar10__vgg11bn__linf8", True]


def test_missing_rows_give_a_placeholder_not_a_crash(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame(columns=METRICS_COLUMNS).to_csv(path, index=False)
    for fam in ("nc_vs_epoch", "ncc_vs_network"):
        stem = families.figure_stems(load_config(ROOT / "config" / "config.yaml"), fam)[0]
        (out,) = figures.draw_figures(path, [f"{fam}/{stem}"], str(tmp_path), PNG)
        assert Path(out).stat().st_size > 0


# Runs the Snakemake CLI in this interpreter, then reports which heavy libraries parsing the workflow loaded.
_PARSE_PROBE = """
import json, sys
from snakemake.cli import main
code = 0
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("matplotlib", "seaborn", "scipy", "torch") if m in sys.modules)
print(json.dumps({"rc": code, "heavy": heavy}))
"""


def test_dry_run_plans_the_figures_step_without_loading_plotting_libraries(tmp_path):
    res = subprocess.run(
        [sys.executable, "-c", _PARSE_PROBE, "-n", "-q", "rules", "--cores", "1"]
        + ["-s", str(ROOT / "workflow" / "Snakefile"), "--directory", str(tmp_path)]
        + ["--configfile", str(ROOT / "config" / "config.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    probe = json.loads(res.stdout.strip().splitlines()[-1])
    assert probe["rc"] == 0, res.stderr[-3000:]
    assert probe["heavy"] == [], "parsing the workflow imported a plotting/ML library"
    block = (res.stdout + res.stderr).split("Job stats:", 1)[1].split("total", 1)[0]
    counts = {m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)\s*$", block, flags=re.M)}
    # train -> features -> metrics -> figures -> all, with every figure rule's jobs under `figures`
    assert counts["train"] == 3 and counts["figures"] == 1 and counts["all"] == 1
    cfg = load_config(ROOT / "config" / "config.yaml")
    # the families drawn from one aggregated table are one job for all their figures; the others a job each
    for fam, f in families.FAMILIES.items():
        if f.table not in families.TABLES:
            assert counts.get(families.figure_rule(fam), 0) == len(families.figure_stems(cfg, fam)), fam
    for table in families.TABLES:
        drawn = int(bool(families.table_families(cfg, table)))
        assert counts.get(families.table_rule(table), 0) == drawn, table


def test_snakemake_lint_is_clean():
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]


def test_accuracy_table_mean_and_sd_over_seeds():
    rows = []
    for seed, v in [(1, 0.5), (2, 0.7)]:
        rows.append(_row(seed=seed, epoch=10, split="test", perturbation="clean", metric="accuracy", value=v))
        rows.append(
            _row(
                seed=seed,
                epoch=10,
                split="test",
                perturbation="pgd",
                metric="ncc_train_means_accuracy",
                value=0.1,
            )
        )
        rows.append(
            _row(seed=seed, epoch=5, split="test", perturbation="clean", metric="accuracy", value=0.0)
        )
    rows.append(
        _row(
            seed=1,
            epoch=10,
            split="test",
            perturbation="clean",
            metric="accuracy",
            value=0.9,
            dataset="cifar100",
        )
    )
    t = tables.accuracy_table(pd.DataFrame(rows), "cifar10", "linf", "8")
    assert len(t) == 1 and t.loc[0, "epoch"] == 10 and t.loc[0, "seeds"] == 2
    assert np.isclose(t.loc[0, "test_clean_mean"], 60.0)
    assert np.isclose(t.loc[0, "test_clean_sd"], math.sqrt(200))  # sample s.d. of 50 and 70
    assert np.isclose(t.loc[0, "ncc_test_pgd_mean"], 10.0) and np.isclose(t.loc[0, "ncc_test_pgd_sd"], 0.0)
    assert np.isnan(t.loc[0, "train_pgd_mean"])
    tex = tables.to_latex(t, "cifar10", "linf", "8")
    assert r"60.0 $\pm$ 14.1" in tex and r"\toprule" in tex and "--" in tex
    assert r"$\ell_\infty$ $\epsilon = 8/255$" in tex


def test_accuracy_table_stems_round_trip():
    stems = families.table_stems(load_config(ROOT / "config" / "config.yaml"))
    assert stems
    for stem in stems:
        assert families.ACCURACY_STEM.format(**families.parse_table_stem(stem)) == stem
    assert families.parse_table_stem("accuracy_final__cifar10__l2128.5") == {
        "dataset": "cifar10",
        "norm": "l2",
        "eps": "128.5",
    }
    with pytest.raises(ValueError, match="not an accuracy table name"):
        families.parse_table_stem("accuracy_final__cifar10__l38")
