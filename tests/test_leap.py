"""The leap: nearest clean class mean of perturbed features, its matrix, shares, table and figures.

Synthetic data with known answers: clean features placed exactly on the vertices of a simplex (scaled standard
basis vectors of R^C), perturbed copies moved to chosen vertices, so every landing class, matrix entry and
share is known in advance.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from ncpipe import evaluate, families, figures, leap, tables
from ncpipe.io import create_dump, write_matrix

sys.path.insert(0, str(Path(__file__).parent))

C, PER, D = 4, 5, 6
VERTICES = 3.0 * np.eye(C, D)  # a regular simplex in R^D (pairwise distance 3 sqrt 2)
LABELS = np.repeat(np.arange(C), PER)
# where the perturbed copy of each point goes: class 0 -> all to 1; class 1 -> 3 to 2, 2 stay; class 2 -> all
# stay; class 3 -> 1 to 0 (its target), 4 to 1
PGD_DEST = np.array([1] * 5 + [2, 2, 2, 1, 1] + [2] * 5 + [0, 1, 1, 1, 1])
TARGETS = (LABELS + 1) % C
TARGETED_DEST = TARGETS.copy()
TARGETED_DEST[[0, 1]] = 0  # two points of class 0 stay home
TARGETED_DEST[17] = 2  # one point of class 3 lands at neither its own class (3) nor its target (0)

EXPECTED_PGD = np.array(
    [
        [0, 1, 0, 0],
        [0, 0.4, 0.6, 0],
        [0, 0, 1, 0],
        [0.2, 0.8, 0, 0],
    ]
)


def _noise(n: int, seed: int) -> np.ndarray:
    return 0.05 * np.random.default_rng(seed).standard_normal((n, D))  # far below half a vertex distance


def _clean() -> np.ndarray:
    return VERTICES[LABELS] + _noise(len(LABELS), 0)


def _moved(dest: np.ndarray, seed: int) -> np.ndarray:
    return VERTICES[dest] + _noise(len(dest), seed)


# ------------------------------------------------------------------------------------------- ncpipe.leap
def test_landing_classes_are_the_nearest_vertex():
    means = VERTICES
    np.testing.assert_array_equal(leap.landing_classes(_moved(PGD_DEST, 1), means), PGD_DEST)
    # blocks do not change the answer
    np.testing.assert_array_equal(leap.landing_classes(_moved(PGD_DEST, 1), means, block=3), PGD_DEST)


def test_absent_class_means_never_win():
    means = VERTICES.copy()
    means[1] = np.nan
    landed = leap.landing_classes(VERTICES[[1, 0]] + 0.01, means)
    assert landed[1] == 0 and landed[0] != 1


def test_leap_matrix_is_exactly_the_chosen_moves():
    landed = leap.landing_classes(_moved(PGD_DEST, 1), VERTICES)
    np.testing.assert_allclose(leap.leap_matrix(LABELS, landed, C), EXPECTED_PGD)
    counts = leap.leap_counts(LABELS, landed, C)
    assert counts.sum() == len(LABELS) and counts[3, 0] == 1 and counts[1, 2] == 3


def test_leap_matrix_rows_of_absent_classes_are_nan():
    m = leap.leap_matrix(np.array([0, 0, 2]), np.array([0, 1, 2]), 3)
    np.testing.assert_allclose(m[0], [0.5, 0.5, 0])
    assert np.isnan(m[1]).all()


def test_shares_untargeted_have_no_target_share():
    s = leap.leap_shares(LABELS, PGD_DEST)
    assert set(s) == {leap.SHARE_OWN, leap.SHARE_OTHER}
    assert s[leap.SHARE_OWN] == pytest.approx(7 / 20)  # 2 of class 1, all 5 of class 2
    assert s[leap.SHARE_OTHER] == pytest.approx(13 / 20)


def test_shares_targeted_sum_to_one_with_known_values():
    s = leap.leap_shares(LABELS, TARGETED_DEST, TARGETS)
    assert s[leap.SHARE_OWN] == pytest.approx(2 / 20)
    assert s[leap.SHARE_TARGET] == pytest.approx(17 / 20)
    assert s[leap.SHARE_OTHER] == pytest.approx(1 / 20)
    assert math.isclose(sum(s.values()), 1.0)


def test_bad_labels_are_refused():
    with pytest.raises(ValueError, match="0..3"):
        leap.leap_counts(np.array([0, 4]), np.array([0, 1]), 4)
    with pytest.raises(ValueError, match="dimension"):
        leap.landing_classes(np.zeros((2, 3)), np.zeros((2, 4)))


# ------------------------------------------------------------------------------------------- synthetic dump
def _dump(path: Path, method: str = "st", epoch: int = 7, seed: int = 1) -> Path:
    root = {
        "dataset": "cifar10",
        "arch": "vgg11bn",
        "width": 1.0,
        "method": method,
        "seed": seed,
        "epoch": epoch,
        "num_classes": C,
        "norm": "linf",
        "epsilon": 8 / 255,
        "epsilon_255": 8.0,
        "training_adversary": None
        if method == "st"
        else {"norm": "linf", "epsilon": 8, "step": 2, "steps": 10},
    }
    with create_dump(path, root) as f:
        cls = f.create_group("classifier")
        write_matrix(cls, "weight", VERTICES.astype(np.float32), compression=None)
        write_matrix(cls, "bias", np.zeros(C, dtype=np.float32), compression=None)
        for split in ("train", "test"):
            for kind, h in (
                ("clean", _clean()),
                ("pgd", _moved(PGD_DEST, 1)),
                ("targeted", _moved(TARGETED_DEST, 2)),
            ):
                g = f.create_group(f"{split}/{kind}")
                write_matrix(g, "features", h.astype(np.float32), compression=None)
                g.create_dataset("labels", data=LABELS)
                g.create_dataset("predictions", data=leap.landing_classes(h, VERTICES))
                if kind == "targeted":
                    g.create_dataset("targets", data=TARGETS)
    return path


def test_metrics_table_carries_the_leap_shares(tmp_path):
    df = evaluate.evaluate_dump(_dump(tmp_path / "d.h5"), regime="st")
    sh = df[df["metric"].str.startswith("leap_share") & (df["split"] == "train")]
    got = {(r.perturbation, r.metric): r.value for r in sh.itertuples()}
    assert got == pytest.approx(
        {
            ("pgd", "leap_share_own"): 7 / 20,
            ("pgd", "leap_share_other"): 13 / 20,
            ("targeted", "leap_share_own"): 2 / 20,
            ("targeted", "leap_share_target"): 17 / 20,
            ("targeted", "leap_share_other"): 1 / 20,
        }
    )
    assert set(sh["grouping"]) == {"true"}
    assert not (df["metric"].str.startswith("leap_share") & (df["perturbation"] == "clean")).any()


def test_leap_table_csv_html_tex_hold_the_known_matrix(tmp_path):
    dumps = [_dump(tmp_path / "st.h5"), _dump(tmp_path / "at.h5", method="at")]
    stem = "leap_matrix__cifar10__vgg11bn__linf8"
    out = tables.write_leap_tables(dumps, stem, tmp_path / "tables")
    assert sorted(Path(p).suffix for p in out) == [".csv", ".html", ".tex"]
    long = pd.read_csv(tmp_path / "tables" / f"{stem}.csv")
    assert set(long["regime"]) == {"st", "at_linf8"}
    pgd = long[(long["regime"] == "st") & (long["split"] == "train") & (long["perturbation"] == "pgd")]
    m = pgd.pivot(index="true_class", columns="landed_class", values="share").to_numpy()
    np.testing.assert_allclose(m, EXPECTED_PGD)
    assert pgd["count"].sum() == len(LABELS)
    clean = long[(long["regime"] == "st") & (long["split"] == "train") & (long["perturbation"] == "clean")]
    np.testing.assert_allclose(
        clean.pivot(index="true_class", columns="landed_class", values="share"), np.eye(C)
    )
    html = (tmp_path / "tables" / f"{stem}.html").read_text()
    assert "<table" in html and "to_3" in html and "at_linf8" in html
    tex = (tmp_path / "tables" / f"{stem}.tex").read_text()
    # class 3 under PGD (ST): 20 % to class 0, 80 % to class 1
    assert r"st & pgd & 3 & 20 & 80 & 0 & 0 \\" in tex
    assert families.parse_leap_stem(stem) == {
        "dataset": "cifar10",
        "arch": "vgg11bn",
        "norm": "linf",
        "eps": "8",
    }


# ------------------------------------------------------------------------------------------- figures
def test_leap_matrix_figure_shows_the_known_matrix_in_percent(tmp_path):
    dumps = [_dump(tmp_path / "st.h5"), _dump(tmp_path / "at.h5", method="at")]
    long = tables.leap_frame(dumps)
    fig = figures.DRAW["leap_matrix"](
        {"leap": long}, families.parse_stem("leap_matrix", "cifar10__vgg11bn__linf8")
    )
    maps = [ax for ax in fig.axes if ax.images]
    assert len(maps) == 4  # (PGD, targeted) x (ST, AT)
    st_pgd = [ax for ax in maps if ax.get_title().startswith("ST\nPGD (untargeted)")]
    np.testing.assert_allclose(st_pgd[0].images[0].get_array(), 100 * EXPECTED_PGD)
    assert any(ax.get_title().startswith("AT, PGD ℓ∞ 8/255") for ax in maps)
    plt.close(fig)


def test_simplex_projection_puts_perturbed_points_on_their_chosen_vertices(tmp_path):
    view = figures.read_dump_view(_dump(tmp_path / "st.h5"))
    fig = figures.draw_simplex(
        [view, view], families.parse_stem("simplex_projection", "cifar10__vgg11bn__st__linf8")
    )
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.collections]
    assert len(axes) == 4  # 2 checkpoints x (PGD, targeted)
    ax = [a for a in axes if "targeted to" in a.get_title()][0]
    assert "own 10 %, target 85 %, other 5 %" in ax.get_title()
    # the clean means (stars, the last scatter): perturbed points sit at their destination's star
    centre, plane = figures.simplex_plane(np.stack([_clean()[LABELS == c].mean(0) for c in range(C)]))
    stars = ax.collections[-1].get_offsets()
    expected = (np.stack([_clean()[LABELS == c].mean(0) for c in range(C)]) - centre) @ plane.T
    np.testing.assert_allclose(stars, expected, atol=1e-5)  # features stored as float32
    pert = np.asarray(ax.collections[1].get_offsets())  # clean sample, then perturbed sample
    dist = np.linalg.norm(pert[:, None, :] - stars[None, :, :], axis=2)
    assert dist.min(axis=1).max() < 0.2  # every perturbed point next to some vertex
    assert "ST" in fig._suptitle.get_text()
    plt.close(fig)


def test_simplex_plane_of_a_regular_simplex_keeps_its_centre():
    centre, plane = figures.simplex_plane(VERTICES)
    np.testing.assert_allclose(centre, VERTICES.mean(0))
    np.testing.assert_allclose(plane @ plane.T, np.eye(2), atol=1e-12)


def test_new_families_are_planned_and_captioned():
    from ncpipe.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "config" / "config.yaml")
    targets = families.figure_targets(cfg)
    for fam in ("simplex_projection", "leap_matrix"):
        assert any(f"/{fam}/" in t for t in targets), fam
        assert (Path(__file__).resolve().parents[1] / "workflow" / "report" / f"{fam}.rst").is_file()
    assert len([t for t in targets if "/simplex_projection/" in t and t.endswith(".png")]) == 3
    leap_tables = [t for t in families.table_targets(cfg) if "leap_matrix" in t]
    assert sorted(Path(t).suffix for t in leap_tables) == [".csv", ".html", ".tex"]
    dumps = families.simplex_dumps(
        cfg, {"dataset": "mnist5k", "arch": "vgg11bn", "regime": "st", "norm": "linf", "eps": "32"}
    )
    assert [Path(d).name for d in dumps] == ["epoch1_linf_eps32.h5", "epoch20_linf_eps32.h5"]


# ------------------------------------------------------------------------------------ targeted attack budget
def test_targeted_budget_scales_only_the_targeted_kind_and_paper_configs_keep_their_params():
    import json

    from ncpipe import grid
    from ncpipe.config import load_config
    from ncpipe.specs import FeaturesSpec

    root = Path(__file__).resolve().parents[1] / "config"
    wc = {"dataset": "cifar10", "regime": "st", "norm": "linf", "eps": "8"}
    paper = load_config(root / "paper.yaml")
    assert paper["attack"]["targeted"] == {"epsilon_factor": 1.0, "step_factor": 1.0, "steps_factor": 1}
    assert "targeted" not in json.loads(grid.features_spec(paper, wc))  # the authors' same-budget attack
    assert FeaturesSpec.from_json(grid.features_spec(paper, wc)).threat_of("targeted") == \
        FeaturesSpec.from_json(grid.features_spec(paper, wc)).threat
    default = load_config(root / "config.yaml")
    mnist = {"dataset": "mnist5k", "regime": "st", "norm": "linf", "eps": "32"}
    spec = FeaturesSpec.from_json(grid.features_spec(default, mnist))
    adv, tk, f = spec.threat, spec.threat_of("targeted"), spec.targeted
    assert not f.is_identity()
    assert tk.epsilon_px == pytest.approx(adv.epsilon_px * f.epsilon_factor)
    assert tk.step_px == pytest.approx(adv.step_px * f.step_factor)
    assert tk.steps == adv.steps * f.steps_factor
    assert spec.threat_of("pgd") == adv  # only the targeted kind is scaled
    assert "targeted" not in json.loads(grid.layerwise_spec(default, mnist))


def test_simplex_projection_of_c100_draws_the_first_ten_classes():
    c = 100
    y = np.repeat(np.arange(c), 3)
    vertices = 3.0 * np.eye(c)
    h = vertices[y] + _noise(len(y), 3)[:, :1]  # a per-point shift along the first axis
    t = (y + 1) % c
    view = figures.DumpView(
        3,
        c,
        {"clean": (h, y, None), "pgd": (vertices[(y + 7) % c], y, None), "targeted": (vertices[t], y, t)},
    )
    fig = figures.draw_simplex(
        [view], families.parse_stem("simplex_projection", "cifar100__vgg11bn__st__linf8")
    )
    assert "classes 0–9 of 100" in fig._suptitle.get_text()
    ax = [a for a in fig.axes if "targeted to" in a.get_title()][0]
    assert len(ax.collections[-1].get_offsets()) == 10  # ten vertices drawn
    assert "own 0 %, target 100 %, other 0 %" in ax.get_title()  # shares over all 100 classes
    plt.close(fig)
