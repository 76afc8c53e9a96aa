"""`ncpipe summary` against a synthetic results directory with known values, and the README's pasted block."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from synthetic_tables import layerwise_frame, metrics_frame, train_logs_frame

from ncpipe import summary

ROOT = Path(__file__).resolve().parents[1]
REGIMES = ("st", "at_linf8")
EPOCHS = (1, 5, 20)

# (regime, epoch, split, perturbation, grouping, metric) -> value; everything the assertions below read
KNOWN = {
    ("st", 1, "train", "clean", "true", "nc1"): 32.49,
    ("st", 5, "train", "clean", "true", "nc1"): 6.4649,
    ("st", 20, "train", "clean", "true", "nc1"): 0.4481,
    ("st", 20, "train", "pgd", "true", "nc1"): 62.6,
    ("st", 20, "train", "gaussian", "true", "nc1"): 0.5,
    ("st", 20, "train", "clean", "true", "accuracy"): 1.0,
    ("st", 20, "train", "pgd", "true", "accuracy"): 0.056,
    ("st", 20, "test", "clean", "true", "accuracy"): 0.955,
    ("st", 20, "test", "pgd", "true", "accuracy"): 0.04,
    ("st", 20, "train", "clean", "true", "ncc_train_means_accuracy"): 0.9994,
    ("st", 20, "train", "pgd", "true", "ncc_train_means_accuracy"): 0.0612,
    ("st", 20, "test", "clean", "true", "ncc_train_means_accuracy"): 0.945,
    ("st", 20, "test", "pgd", "true", "ncc_train_means_accuracy"): 0.0451,
    ("st", 20, "train", "targeted", "target", "accuracy"): 0.3649,
    ("at_linf8", 1, "train", "clean", "true", "nc1"): 35.5,
    ("at_linf8", 20, "train", "clean", "true", "nc1"): 0.673,
    ("at_linf8", 20, "train", "pgd", "true", "nc1"): 2.62,
    ("at_linf8", 20, "train", "train_adv", "true", "nc1"): 1.91,
    ("at_linf8", 20, "train", "targeted", "target", "accuracy"): 0.01,
}


def _metrics(leap: bool) -> pd.DataFrame:
    df = metrics_frame(regimes=REGIMES, seeds=(1,), epochs=EPOCHS)
    key = ["regime", "epoch", "split", "perturbation", "grouping", "metric"]
    idx = pd.MultiIndex.from_frame(df[key])
    for k, v in KNOWN.items():
        hit = idx == k
        assert hit.sum() == 1, k  # the synthetic table has exactly one row for every known value
        df.loc[hit, "value"] = v
    if leap:
        extra = []
        for regime, shares in (("st", (0.1, 0.8, 0.1)), ("at_linf8", (0.9512, 0.0, 0.0488))):
            base = df[(df.regime == regime) & (df.epoch == 20) & (df.split == "train")
                      & (df.perturbation == "targeted") & (df.grouping == "true")].iloc[0]
            for m, v in zip(summary.LEAP_METRICS, shares, strict=True):
                extra.append({**base.to_dict(), "metric": m, "value": v})
        df = pd.concat([df, pd.DataFrame(extra)], ignore_index=True)
    return df.sample(frac=1.0, random_state=3)  # row order must not matter


def _results(tmp_path: Path, leap: bool = False) -> Path:
    _metrics(leap).to_csv(tmp_path / "metrics.csv", index=False)
    train_logs_frame(regimes=REGIMES, seeds=(1,), epochs=20).to_csv(tmp_path / "train_logs.csv", index=False)
    layerwise_frame(regimes=REGIMES, seeds=(1,), epoch=20, layers=3).to_csv(tmp_path / "layerwise.csv",
                                                                         index=False)
    return tmp_path


def _row(text: str, *first: str) -> list[str]:
    """The cells of the first table row whose leading cells are ``first``."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[: len(first)] == list(first):
            return cells
    raise AssertionError(f"no row {first} in\n{text}")


def _section(text: str, title: str) -> str:
    return text.split(f"#### {title}", 1)[1].split("####", 1)[0]


def test_fmt_three_significant_digits():
    xs = (0.4481, 6.4649, 32.49, 139.7, 100.0, 1234.0, 9.996, 0.0, float("nan"))
    assert [summary.fmt(x) for x in xs] == ["0.448", "6.46", "32.5", "140", "100", "1230", "10.0", "0", "n/a"]


def test_summary_of_a_synthetic_run(tmp_path):
    text = summary.summarize(_results(tmp_path), commit="abc123")
    assert text.startswith("Commit: `abc123`\n")
    assert "seeds 1;" in text and "20 training epochs" in text and "checkpoints 1, 5, 20" in text
    assert "### cifar10, vgg11bn, l_inf 8/255" in text

    nc1 = _section(text, summary.TITLES["nc1"])
    assert _row(nc1, "regime") == ["regime", "data", "epoch 1", "epoch 5", "epoch 20"]
    assert _row(nc1, "`st`", "clean")[2:] == ["32.5", "6.46", "0.448"]
    assert _row(nc1, "`st`", "PGD")[-1] == "62.6"
    assert _row(nc1, "`at_linf8`", "adversarial examples trained on (`train_adv`)")[-1] == "1.91"
    # ST has no train_adv row; the regimes come in method order
    assert "`st` | adversarial" not in nc1
    assert nc1.index("`st`") < nc1.index("`at_linf8`")

    acc = _section(text, summary.TITLES["accuracy"])
    assert _row(acc, "`st`") == ["`st`", "20", "100", "5.60", "95.5", "4.00", "99.9", "6.12", "94.5", "4.51"]
    header = _row(acc, "regime")
    assert header[2:6] == ["network, train, clean", "network, train, PGD (robust)", "network, test, clean",
                           "network, test, PGD (robust)"]
    assert all(h.startswith("NCC, ") for h in header[6:])

    leap = _section(text, summary.TITLES["leap"])
    assert _row(leap, "`st`", "targeted PGD")[2] == "36.5"
    assert _row(leap, "`at_linf8`", "targeted PGD")[2] == "1.00"
    assert "no `leap_share_*` metrics" in leap

    ratios = _section(text, summary.TITLES["ratios"])
    # 62.6 / 0.4481, 0.5 / 0.4481, no train_adv for ST, 32.49 / 0.4481
    assert _row(ratios, "`st`")[1:] == ["140x", "1.12x", "n/a", "72.5x"]
    assert _row(ratios, "`at_linf8`")[1:4:2] == ["3.89x", "2.84x"]  # 2.62/0.673, 1.91/0.673

    lw = _section(text, summary.TITLES["layerwise"])
    assert _row(lw, "regime")[3:] == ["`block0`", "`block1`", "`block2`"]
    assert _row(lw, "`st`", "20", "clean")[3:] == ["40.0", "70.0", "100"]  # 0.4 + 0.6 * depth


def test_summary_with_leap_shares(tmp_path):
    text = summary.summarize(_results(tmp_path, leap=True), commit="x")
    # the shares are optional columns: the README's block has the same structure with or without them
    assert summary.structure(text) == summary.structure(summary.summarize(_results(tmp_path), commit="x"))
    leap = _section(text, summary.TITLES["leap"])
    assert _row(leap, "regime")[3:] == ["nearest clean mean: own class", "nearest clean mean: target class",
                                        "nearest clean mean: other class"]
    assert _row(leap, "`st`", "targeted PGD")[2:] == ["36.5", "10.0", "80.0", "10.0"]
    assert _row(leap, "`at_linf8`", "targeted PGD")[3:] == ["95.1", "0", "4.88"]
    assert _row(leap, "`st`", "PGD")[2:] == ["-", "n/a", "n/a", "n/a"]  # no shares for PGD in this table


def test_summary_is_deterministic_and_cli_prints_it(tmp_path):
    res = _results(tmp_path)
    first = summary.summarize(res, commit="c")
    pd.read_csv(res / "metrics.csv").iloc[::-1].to_csv(res / "metrics.csv", index=False)
    assert summary.summarize(res, commit="c") == first
    out = subprocess.run([sys.executable, "-m", "ncpipe", "summary", str(res)], capture_output=True,
                         text=True, check=True).stdout
    assert out.split("\n", 1)[1] == first.split("\n", 1)[1]  # all but the commit line
    assert out.startswith("Commit: `")


def test_summary_bad_directory(tmp_path):
    with pytest.raises(summary.SummaryError, match="metrics.csv not found"):
        summary.summarize(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "ncpipe", "summary", str(tmp_path)], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "metrics.csv not found" in proc.stderr


def test_summary_shows_autoattack_beside_pgd(tmp_path):
    """autoattack rows (test split, final epoch: config/autoattack.yaml) add their columns, nothing else."""
    res = _results(tmp_path)
    plain = summary.summarize(res, commit="x")
    df = pd.read_csv(res / "metrics.csv")
    aa = df[(df.epoch == 20) & (df.split == "test") & (df.perturbation == "pgd")].copy()
    aa["perturbation"] = "autoattack"
    aa["value"] = aa["value"] / 2  # AutoAttack finds more adversarial examples than PGD
    known = {("st", "accuracy"): 0.0123, ("at_linf8", "ncc_train_means_accuracy"): 0.4567}
    for (regime, metric), v in known.items():
        aa.loc[(aa.regime == regime) & (aa.metric == metric) & (aa.grouping == "true"), "value"] = v
    pd.concat([df, aa], ignore_index=True).to_csv(res / "metrics.csv", index=False)
    text = summary.summarize(res, commit="x")
    acc = _section(text, summary.TITLES["accuracy"])
    header = _row(acc, "regime")
    assert header[2:] == ["network, train, clean", "network, train, PGD (robust)", "network, test, clean",
                          "network, test, PGD (robust)", "network, test, AutoAttack (robust)",
                          "NCC, train, clean", "NCC, train, PGD", "NCC, test, clean", "NCC, test, PGD",
                          "NCC, test, AutoAttack"]
    assert _row(acc, "`st`") == ["`st`", "20", "100", "5.60", "95.5", "4.00", "1.23", "99.9", "6.12", "94.5",
                                 "4.51", "2.25"]  # NCC test AutoAttack: 0.0451 / 2
    assert _row(acc, "`at_linf8`")[-1] == "45.7"
    assert "*AutoAttack*" in acc and "*AutoAttack*" not in plain
    # every other section is byte-identical, and the README's block keeps the structure of such a run
    assert text.replace(acc, "") == plain.replace(_section(plain, summary.TITLES["accuracy"]), "")
    assert summary.structure(text) == summary.structure(plain)


def test_readme_block_has_the_summary_structure(tmp_path):
    block = summary.readme_block((ROOT / "README.md").read_text())
    assert block.startswith("Commit: `")
    fresh = summary.summarize(_results(tmp_path), commit="c")
    assert summary.structure(block) == summary.structure(fresh)
    for line in block.splitlines():  # every table row of the block is a complete Markdown row
        assert not line.startswith("|") or line.rstrip().endswith("|")


def test_readme_block_is_the_summary_of_the_run_here():
    """Where this checkout holds a finished run of the commit the README names, the block is its summary."""
    block = summary.readme_block((ROOT / "README.md").read_text())
    results = ROOT / "results"
    if not (results / "metrics.csv").is_file():
        pytest.skip("no finished run under results/")
    fresh = summary.summarize(results)
    if fresh.splitlines()[0] != block.splitlines()[0]:
        pytest.skip("results/ is a run of another commit than the README's block")
    assert block == fresh


def test_readme_option_replaces_only_the_block(tmp_path):
    res = _results(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{summary.BEGIN}\nold numbers\n{summary.END}\nafter\n")
    subprocess.run([sys.executable, "-m", "ncpipe", "summary", str(res), "--readme", str(readme)], check=True,
                   capture_output=True)
    text = readme.read_text()
    assert text.startswith(f"# title\n\nbefore\n{summary.BEGIN}\nCommit: `") and text.endswith(
        f"{summary.END}\nafter\n")
    assert summary.readme_block(text) == summary.summarize(res)
    readme.write_text("no markers\n")
    proc = subprocess.run([sys.executable, "-m", "ncpipe", "summary", str(res), "--readme", str(readme)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "summary:begin" in proc.stderr


def test_settings_line_comes_from_the_final_dump(tmp_path, tiny_dump):
    res = _results(tmp_path)
    assert "Settings recorded" not in summary.summarize(res, commit="c")  # no dumps: no line
    target = res / "cifar10" / "vgg11bn" / "st" / "seed1" / "features" / "epoch20_linf_eps8.h5"
    target.parent.mkdir(parents=True)
    shutil.copyfile(tiny_dump["dump"], target)  # the tiny dump's own settings (tests/tiny_dump.py)
    line = summary.summarize(res, commit="c").splitlines()[4]
    assert line.startswith("Settings recorded in the final-checkpoint dumps: model width 0.0625; "
                           "3 train / 2 test images per class; evaluation PGD-1, step 16/255"), line
    assert "trained against" not in line  # ST has no training adversary
