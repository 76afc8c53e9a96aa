"""AutoAttack on a fixed subset (attack.autoattack.per_class > 0) is compared with PGD on the same images.

A synthetic dump with known contents, written through ncpipe.io's writers as extract.py writes one: PGD leaves
the subset's images mostly correct and the others mostly wrong, so that PGD's accuracy on AutoAttack's images
and on the whole split differ, and a table that put AutoAttack beside the whole-split number would mislead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ncpipe import evaluate, io, metrics, summary, tables
from ncpipe.io import DumpError

C, D, TRAIN_PER, TEST_PER, PER_CLASS = 3, 4, 6, 8, 2
W = np.hstack([np.eye(C), np.zeros((C, D - C))]).astype(np.float32)
B = np.array([0.1, 0.0, -0.1], np.float32)
SUBSET_METRICS = ("accuracy_autoattack_images", "ncc_train_means_accuracy_autoattack_images")


def _first_per_class(y: np.ndarray, n: int) -> np.ndarray:
    return np.sort(np.concatenate([np.flatnonzero(y == c)[:n] for c in range(C)]))


def _toward(classes: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    return (3.0 * np.eye(C, D)[classes] + noise * rng.normal(size=(len(classes), D))).astype(np.float32)


def _group(f, name: str, h: np.ndarray, y: np.ndarray, indices: np.ndarray | None = None) -> None:
    g = f.create_group(name)
    io.write_matrix(g, "features", h)
    io.write_array(g, "labels", y)
    io.write_array(g, "predictions", np.argmax(h @ W.T + B, axis=1))
    if indices is not None:
        io.write_array(g, "indices", indices)


def _dump(path: Path, per_class: int, bad_labels: bool = False) -> dict[str, np.ndarray]:
    """The dump at ``path``; returns the arrays a plain reference needs. per_class 0: AutoAttack on the whole
    test split (no ``indices``), as the shipped configs run it."""
    rng = np.random.default_rng(11)
    y_train = np.repeat(np.arange(C), TRAIN_PER)
    y_test = np.repeat(np.arange(C), TEST_PER)  # sorted by class: the subset is no block of rows
    idx = _first_per_class(y_test, per_class) if per_class else np.arange(len(y_test))
    on_subset = np.isin(np.arange(len(y_test)), idx)
    pgd = np.where(on_subset[:, None], _toward(y_test, rng, 1.2), _toward((y_test + 1) % C, rng, 1.2))
    truth = {"train": _toward(y_train, rng, 0.5), "y_train": y_train, "test_clean": _toward(y_test, rng, 1.5),
             "test_pgd": pgd, "y_test": y_test, "idx": idx}
    aa_labels = y_test[idx] if not bad_labels else (y_test[idx] + 1) % C
    root = {"dataset": "mnist5k", "arch": "vgg11bn", "width": 0.125, "method": "st", "seed": 1, "epoch": 20,
            "num_classes": C, "norm": "linf", "epsilon": 8 / 255, "epsilon_255": 8.0,
            "training_adversary": None,
            "config": {"autoattack": {"per_class": per_class, "splits": ["test"]}}}
    with io.create_dump(path, root) as f:
        cls = f.create_group("classifier")
        io.write_matrix(cls, "weight", W, compression=None)
        io.write_matrix(cls, "bias", B, compression=None)
        _group(f, "train/clean", truth["train"], y_train)
        _group(f, "test/clean", truth["test_clean"], y_test)
        _group(f, "test/pgd", pgd, y_test)
        _group(f, "test/autoattack", _toward((y_test[idx] + 2) % C, rng, 1.0), aa_labels,
               idx if per_class else None)
    return truth


def _network_acc(h: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(h.astype(np.float64) @ W.T.astype(np.float64) + B, axis=1) == y))


def _ncc_acc(h: np.ndarray, y: np.ndarray, means: np.ndarray) -> float:
    d = ((h.astype(np.float64)[:, None, :] - means[None]) ** 2).sum(axis=2)
    return float(np.mean(np.argmin(d, axis=1) == y))


def _values(df: pd.DataFrame, kind: str) -> dict[str, float]:
    sel = df[(df["split"] == "test") & (df["perturbation"] == kind) & (df["grouping"] == "true")]
    return dict(zip(sel["metric"], sel["value"], strict=True))


@pytest.fixture(scope="module")
def dumps(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("aa_subset")
    return {"subset": (d / "subset.h5", _dump(d / "subset.h5", PER_CLASS)),
            "whole": (d / "whole.h5", _dump(d / "whole.h5", 0))}


def test_pgd_on_autoattacks_images_equals_a_plain_reference(dumps):
    path, t = dumps["subset"]
    df = evaluate.evaluate_dump(path, regime="st")
    idx, y = t["idx"], t["y_test"]
    assert len(idx) == PER_CLASS * C and not np.array_equal(idx, np.arange(len(idx)))
    means = np.stack([t["train"][t["y_train"] == c].astype(np.float64).mean(axis=0) for c in range(C)])
    pgd, clean = _values(df, "pgd"), _values(df, "clean")
    want_pgd = {"accuracy_autoattack_images": _network_acc(t["test_pgd"][idx], y[idx]),
                "ncc_train_means_accuracy_autoattack_images": _ncc_acc(t["test_pgd"][idx], y[idx], means)}
    assert {m: pgd[m] for m in SUBSET_METRICS} == pytest.approx(want_pgd, abs=1e-12)
    assert {m: clean[m] for m in SUBSET_METRICS} == pytest.approx(
        {"accuracy_autoattack_images": _network_acc(t["test_clean"][idx], y[idx]),
         "ncc_train_means_accuracy_autoattack_images": _ncc_acc(t["test_clean"][idx], y[idx], means)},
        abs=1e-12)
    # the whole-split numbers are the same computation on every row, and differ here by the images alone
    assert pgd["accuracy"] == pytest.approx(_network_acc(t["test_pgd"], y), abs=1e-12)
    assert pgd["ncc_train_means_accuracy"] == pytest.approx(_ncc_acc(t["test_pgd"], y, means), abs=1e-12)
    assert pgd["accuracy_autoattack_images"] - pgd["accuracy"] > 0.4
    assert pgd["ncc_train_means_accuracy_autoattack_images"] - pgd["ncc_train_means_accuracy"] > 0.4
    assert metrics.on_autoattack_images("accuracy") == SUBSET_METRICS[0]
    new = df[df["metric"].str.endswith(metrics.AUTOATTACK_IMAGES_SUFFIX)]
    assert len(new) == 4 and set(new["grouping"]) == {"true"} and set(new["split"]) == {"test"}
    assert set(new["perturbation"]) == {"clean", "pgd"}  # AutoAttack's own rows keep their plain names
    assert list(df.columns) == evaluate.COLUMNS


def test_autoattack_on_the_whole_split_adds_no_rows(dumps):
    path, _ = dumps["whole"]
    df = evaluate.evaluate_dump(path, regime="st")
    assert "autoattack" in set(df["perturbation"])
    assert not df["metric"].str.endswith(metrics.AUTOATTACK_IMAGES_SUFFIX).any()


def test_a_subset_that_is_not_rows_of_the_split_is_refused(tmp_path):
    _dump(tmp_path / "bad.h5", PER_CLASS, bad_labels=True)
    with pytest.raises(DumpError, match="test/autoattack/labels differ"):
        evaluate.evaluate_dump(tmp_path / "bad.h5")


def _results(root: Path, dump: Path) -> Path:
    evaluate.evaluate_dump(dump, regime="st").to_csv(root / "metrics.csv", index=False)
    target = root / "mnist5k" / "vgg11bn" / "st" / "seed1" / "features" / "epoch20_linf_eps8.h5"
    target.parent.mkdir(parents=True)
    target.write_bytes(dump.read_bytes())  # where summary looks for the final dump's settings
    return root


def _header_and_row(text: str) -> tuple[list[str], list[str], str]:
    """The accuracy table's header, its first row and the whole section."""
    acc = text.split(f"#### {summary.TITLES['accuracy']}", 1)[1].split("####", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in acc.splitlines()
            if line.startswith("| ") and not line.startswith("| ---")]
    return rows[0], rows[1], acc


def test_summary_puts_pgd_on_the_same_images_beside_autoattack(dumps, tmp_path):
    path, _ = dumps["subset"]
    (tmp_path / "subset").mkdir()
    res = _results(tmp_path / "subset", path)
    text = summary.summarize(res, commit="x")
    header, row, acc = _header_and_row(text)
    test_cols = [h for h in header if h.startswith(("network, test", "NCC, test"))]
    assert test_cols == ["network, test, clean", "network, test, PGD (robust)",
                         "network, test, PGD on AutoAttack's images",
                         "network, test, AutoAttack (robust) on its images",
                         "NCC, test, clean", "NCC, test, PGD", "NCC, test, PGD on AutoAttack's images",
                         "NCC, test, AutoAttack on its images"]
    df = pd.read_csv(res / "metrics.csv")
    pgd, aa = _values(df, "pgd"), _values(df, "autoattack")
    cells = dict(zip(header, row, strict=True))
    assert cells["network, test, PGD (robust)"] == summary.pct(pgd["accuracy"])
    assert cells["network, test, PGD on AutoAttack's images"] == summary.pct(
        pgd["accuracy_autoattack_images"])
    assert cells["network, test, AutoAttack (robust) on its images"] == summary.pct(aa["accuracy"])
    assert cells["NCC, test, PGD on AutoAttack's images"] == summary.pct(
        pgd["ncc_train_means_accuracy_autoattack_images"])
    assert f"the first {PER_CLASS} images of each class" in acc
    assert "`accuracy_autoattack_images`" in acc
    # the README's block keeps its structure with these columns too
    whole = tmp_path / "whole"
    whole.mkdir()
    plain = summary.summarize(_results(whole, dumps["whole"][0]), commit="x")
    assert summary.structure(text) == summary.structure(plain)


def test_summary_without_subset_rows_is_unchanged(dumps, tmp_path):
    whole = tmp_path / "whole"
    whole.mkdir()
    text = summary.summarize(_results(whole, dumps["whole"][0]), commit="x")
    header, _, acc = _header_and_row(text)
    assert "network, test, AutoAttack (robust)" in header and "NCC, test, AutoAttack" in header
    assert not any("AutoAttack's images" in h or "on its images" in h for h in header)
    assert "on the samples it attacks" in acc and "_autoattack_images" not in text


def test_accuracy_table_has_pgd_on_autoattacks_images(dumps):
    df = evaluate.evaluate_dump(dumps["subset"][0], regime="st")
    t = tables.accuracy_table(df, "mnist5k", "linf", "8")
    pgd = _values(df, "pgd")
    assert t["test_pgd_autoattack_images_mean"].iloc[0] == pytest.approx(
        100 * pgd["accuracy_autoattack_images"])
    assert t["ncc_test_pgd_autoattack_images_mean"].iloc[0] == pytest.approx(
        100 * pgd["ncc_train_means_accuracy_autoattack_images"])
    assert t["test_pgd_mean"].iloc[0] == pytest.approx(100 * pgd["accuracy"])
    cols = [c for c in t.columns if c.endswith("_mean")]
    assert cols.index("test_pgd_autoattack_images_mean") + 1 == cols.index("test_autoattack_mean")
    assert "train_pgd_autoattack_images_mean" not in t.columns  # AutoAttack did not attack the train split
    tex = tables.to_latex(t, "mnist5k", "linf", "8")
    assert "test PGD on AutoAttack's images & test AutoAttack" in tex and "same subset" in tex

    plain_df = evaluate.evaluate_dump(dumps["whole"][0], regime="st")
    plain = tables.accuracy_table(plain_df, "mnist5k", "linf", "8")
    assert "test_autoattack_mean" in plain.columns
    assert not any(c.endswith("autoattack_images_mean") for c in plain.columns)
    assert "same subset" not in tables.to_latex(plain, "mnist5k", "linf", "8")
    # the subset rows dropped, the table is the one of a run without them
    dropped = df[~df["metric"].str.endswith(metrics.AUTOATTACK_IMAGES_SUFFIX)]
    assert list(tables.accuracy_table(dropped, "mnist5k", "linf", "8").columns) == list(plain.columns)
