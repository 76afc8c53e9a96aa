"""The pandas-free tables (utils.Table) and aggregate jobs (ncpipe.tidy): the bytes pandas wrote.

The reference for each is the pandas code these jobs ran before (read_csv, concat, stable sort_values,
to_csv), applied to the same inputs.
"""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ncpipe import evaluate, layerwise, paths, tidy
from ncpipe.utils import (
    ArtifactError,
    Table,
    digest_sidecar,
    read_csv_verified,
    read_table_verified,
    write_csv_verified,
    write_digest_sidecar,
)

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_tables import layerwise_frame, metrics_frame, train_logs_frame  # noqa: E402

EDGE_FLOATS = [0.1 + 0.2, 1e-5, 1e-4, 1e16, 1e15 + 0.5, 1e-300, 5e-324, -0.0, 2.0, 1 / 3, math.pi * 1e20,
               float("inf"), float("-inf"), float("nan"), 123456789.123456789, 0.25]


def _pandas_bytes(df: pd.DataFrame, tmp_path: Path) -> bytes:
    p = tmp_path / "pandas.csv"
    df.to_csv(p, index=False)
    return p.read_bytes()


def test_a_table_is_written_byte_for_byte_as_pandas_writes_it(tmp_path):
    n = len(EDGE_FLOATS)
    cols = {
        "f": EDGE_FLOATS,
        "np64": [np.float64(v) for v in EDGE_FLOATS],
        "i": list(range(-3, n - 3)),
        "s": ['plain', 'a,b', 'say "hi"', "two\nlines", "", " pad ", "é", *["x"] * (n - 7)],
        "b": [bool(i % 2) for i in range(n)],
    }
    rows = [[cols[c][i] for c in cols] for i in range(n)]
    write_csv_verified(Table(list(cols), rows), tmp_path / "t.csv")
    ref = pd.DataFrame({c: v if c != "s" else pd.Series(v, dtype=object) for c, v in cols.items()})
    assert (tmp_path / "t.csv").read_bytes() == _pandas_bytes(ref, tmp_path)
    assert read_csv_verified(tmp_path / "t.csv").shape == (n, len(cols))  # and its sidecar is right


def test_a_table_read_back_keeps_each_cells_text_and_blanks_missing_values(tmp_path):
    p = tmp_path / "t.csv"
    write_csv_verified(Table(["a", "b", "c"], [[1, 0.5, "x,y"], [2, float("nan"), None]]), p)
    t = read_table_verified(p)
    assert t == Table(["a", "b", "c"], [["1", "0.5", "x,y"], ["2", None, None]])
    # pandas' NA spellings (the trainer's log writes "nan") read as missing, as read_csv reads them
    q = tmp_path / "made_elsewhere.csv"  # no digest sidecar
    q.write_text("a,b\n1,nan\n2,NA\n3,4\n")
    assert read_table_verified(q, required=False).rows == [["1", None], ["2", None], ["3", "4"]]


def test_table_readers_check_the_digest_rows_and_columns(tmp_path):
    p = tmp_path / "t.csv"
    write_csv_verified(Table(["a"], [[1], [2]]), p)
    p.write_text("a\n1\n3\n")
    with pytest.raises(ArtifactError, match="does not match the digest"):
        read_table_verified(p)
    write_csv_verified(Table(["a"], [[1], [2]]), p)
    digest_sidecar(p).write_text(digest_sidecar(p).read_text().replace('"rows": 2', '"rows": 3'))
    with pytest.raises(ArtifactError, match="not the 3 rows"):
        read_table_verified(p)
    with pytest.raises(TypeError, match="no to_csv options"):
        write_csv_verified(Table(["a"], [[1]]), p, float_format="%.3g")


def test_sorted_by_orders_rows_as_pandas_stable_sort_values(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    df = pd.DataFrame({
        "s": rng.choice(["b", "a", "B", "ab", ""], n),  # "" is read back as missing: sorted last
        "i": rng.choice([10, 9, -1, 100], n),
        "f": rng.choice([2.5, 10.0, -0.5, np.nan, 1e-5], n),
        "tie": rng.choice([1, 2], n),
        "row": np.arange(n),  # to see that ties keep their order
    })
    p = tmp_path / "t.csv"
    write_csv_verified(df, p)
    keys = ["s", "f", "i", "tie"]
    ref = read_csv_verified(p).sort_values(keys, kind="stable")
    got = read_table_verified(p).sorted_by(keys)
    assert [int(r[-1]) for r in got.rows] == ref["row"].tolist()


def test_sorted_by_compares_cells_made_in_code_by_their_type():
    t = Table(["n", "x"], [[np.int64(10), 0.5], [9, float("nan")], [np.int64(-1), np.float64(2.0)]])
    assert [r[0] for r in t.sorted_by(["n"]).rows] == [-1, 9, 10]
    assert [r[0] for r in t.sorted_by(["x"]).rows] == [10, -1, 9]  # NaN last


def test_concat_takes_the_union_of_columns_like_pandas():
    a, b = Table(["x", "y"], [["1", "2"]]), Table(["y", "z"], [["3", "4"]])
    assert Table.concat([a, b]) == Table(["x", "y", "z"], [["1", "2", None], [None, "3", "4"]])


def _write_parts(frame: pd.DataFrame, by: str, root: Path) -> list[Path]:
    out = []
    for i, (_, part) in enumerate(frame.groupby(by, sort=False)):
        p = root / f"part{i}.csv"
        write_csv_verified(part.sample(frac=1.0, random_state=i), p)  # unsorted: the aggregate sorts
        out.append(p)
    return out


def test_aggregate_metrics_writes_the_bytes_of_the_pandas_aggregate(tmp_path):
    frame = metrics_frame(regimes=("st", "at_linf8"), seeds=(1, 2), epochs=(1, 10, 2))
    parts = _write_parts(frame, "epoch", tmp_path)
    write_csv_verified(tidy.aggregate_metrics(parts), tmp_path / "ours.csv")
    ref = pd.concat([read_csv_verified(p) for p in parts], ignore_index=True)
    ref = ref.sort_values(tidy.METRICS_KEYS, kind="stable")
    assert (tmp_path / "ours.csv").read_bytes() == _pandas_bytes(ref, tmp_path)
    with pytest.raises(ValueError, match="no metrics tables"):
        tidy.aggregate_metrics([])


def test_aggregate_layerwise_writes_the_bytes_of_the_pandas_aggregate(tmp_path):
    frame = layerwise_frame(regimes=("st", "trades_linf8"), seeds=(1, 2), layers=12)
    parts = _write_parts(frame, "seed", tmp_path)
    write_csv_verified(tidy.aggregate_layerwise(parts), tmp_path / "ours.csv")
    ref = pd.concat([read_csv_verified(p) for p in parts], ignore_index=True)
    ref = ref.sort_values(tidy.LAYERWISE_KEYS, kind="stable")
    assert (tmp_path / "ours.csv").read_bytes() == _pandas_bytes(ref, tmp_path)


def test_the_sort_keys_are_the_writers_columns():
    assert tidy.METRICS_KEYS == [*evaluate.ID_COLUMNS, "grouping", "metric"]
    assert set(tidy.LAYERWISE_KEYS) <= set(layerwise.COLUMNS)


def test_train_logs_get_their_run_identity_from_the_path(tmp_path):
    frame = train_logs_frame(regimes=("st", "at_linf8"), seeds=(2, 1), epochs=3)
    own = [c for c in frame.columns if c not in tidy.RUN_COLUMNS]
    logs, runs = [], []
    for (regime, seed), g in frame.groupby(["regime", "seed"], sort=False):
        p = tmp_path / paths.format_path(paths.TRAIN_LOG, dataset="cifar10", arch="vgg11bn", regime=regime,
                                         seed=seed)
        p.parent.mkdir(parents=True)
        # as the trainer writes it (csv module: "nan" for a missing value, "\r\n" line ends), with its digest
        p.write_text(g[own].to_csv(index=False, na_rep="nan", lineterminator="\r\n"), newline="")
        write_digest_sidecar(p, rows=len(g), columns=own)
        logs.append(p)
        runs.append((regime, int(seed)))
    table = tidy.aggregate_train_logs(logs)
    df = pd.read_csv(io.StringIO(_text(table, tmp_path)))
    assert list(df.columns) == [*tidy.RUN_COLUMNS, *own]
    assert df.groupby(["regime", "method", "seed"]).size().to_dict() == {
        ("at_linf8", "at", 1): 3, ("at_linf8", "at", 2): 3, ("st", "st", 1): 3, ("st", "st", 2): 3}
    # the pandas version's bytes: identity assigned, concatenated, sorted by run and epoch
    ref = pd.concat([read_csv_verified(p).assign(dataset="cifar10", arch="vgg11bn", regime=r,
                                                 method=r.split("_")[0], seed=s)
                     for p, (r, s) in zip(logs, runs, strict=True)], ignore_index=True)
    ref = ref[[*tidy.RUN_COLUMNS, *own]].sort_values([*tidy.RUN_COLUMNS, "epoch"], kind="stable")
    assert _text(table, tmp_path).encode() == _pandas_bytes(ref, tmp_path)
    assert tidy.aggregate_train_logs([]) == Table(tidy.RUN_COLUMNS, [])
    with pytest.raises(ValueError, match="not a training log path"):
        tidy.aggregate_train_logs([tmp_path / "elsewhere.csv"])


def _text(table: Table, tmp_path: Path) -> str:
    write_csv_verified(table, tmp_path / "out.csv")
    return (tmp_path / "out.csv").read_text()


def test_the_metrics_stage_writes_the_bytes_of_its_pandas_table(tiny_dump, tmp_path):
    write_csv_verified(evaluate.evaluate_table(tiny_dump["dump"], regime="st"), tmp_path / "ours.csv")
    ref = evaluate.evaluate_dump(tiny_dump["dump"], regime="st")
    assert list(ref.columns) == evaluate.COLUMNS and ref["value"].dtype == float
    assert (tmp_path / "ours.csv").read_bytes() == _pandas_bytes(ref, tmp_path)
