"""``ncpipe inspect``: golden structure of a real dump's summary, --json, --verify, layerwise files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ncpipe import grid, io, paths
from ncpipe.checkpoint import save_atomic
from ncpipe.cli import main
from ncpipe.config import load_config
from ncpipe.inspect import EXIT_NOT_SUPPORTED

sys.path.insert(0, str(Path(__file__).parent))
from tiny_dump import KINDS, NUM_CLASSES, TEST_PER_CLASS, TRAIN_PER_CLASS, make_checkpoint  # noqa: E402

GROUPS = [f"/{s}/{k}" for s in ("train", "test") for k in KINDS]
N = {"train": TRAIN_PER_CLASS * NUM_CLASSES, "test": TEST_PER_CLASS * NUM_CLASSES}


@pytest.fixture(scope="module")
def dump(tiny_dump: dict[str, Path]) -> Path:
    return tiny_dump["dump"]


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        main(["inspect", *args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _sections(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith(" ")]


def _table_first_column(text: str, header: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2:]:  # skip the section title and the column header
        if not line.startswith("  "):
            break
        rows.append(line.split()[0])
    return rows


def test_summary_golden_structure(dump: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, str(dump))
    assert code == 0
    assert _sections(out) == [
        f"{dump}  ({dump.stat().st_size / 1024:.1f} KiB, ncpipe features file, "
        f"format_version {io.FORMAT_VERSION}, complete)",
        "provenance:", "integrity: every dataset passed its Fletcher-32 checksum", "classifier:", "groups:",
        "class counts (true labels | network predictions):"]
    provenance = [line.split()[0] for line in out.split("provenance:\n")[1].split("\n\n")[0].splitlines()]
    assert provenance[:4] == ["format_version", "complete", "dataset", "arch"]
    for key in ("method", "seed", "epoch", "norm", "epsilon_255", "checkpoint", "checkpoint_sha256"):
        assert key in provenance
    assert provenance[-1] == "config"
    assert _table_first_column(out, "classifier:") == ["/classifier/weight", "/classifier/bias"]
    assert _table_first_column(out, "groups:") == GROUPS
    header = out.splitlines()[out.splitlines().index("groups:") + 1].split()
    assert header == ["group", "N", "D", "dtype", "chunks", "filters", "stored", "accuracy", "also"]
    row = out.splitlines()[out.splitlines().index("groups:") + 4].split()  # /train/targeted
    n = N["train"]
    assert row[:6] == ["/train/targeted", str(n), "32", "float32", f"{n}x32", "shuffle+gzip(4)+fletcher32"]
    assert row[-3:] == ["labels", "predictions", "targets"]
    counts = out.split("class counts (true labels | network predictions):\n")[1].splitlines()
    assert counts[0].split() == ["group", *map(str, range(NUM_CLASSES)), "|", *map(str, range(NUM_CLASSES))]
    assert counts[1].split()[:NUM_CLASSES + 2] == ["/train/clean", *[str(TRAIN_PER_CLASS)] * NUM_CLASSES, "|"]


def test_json_matches_the_file(dump: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, str(dump), "--json")
    assert code == 0
    s = json.loads(out)
    assert s["kind"] == "features" and s["file_bytes"] == dump.stat().st_size
    assert s["attrs"]["format_version"] == io.FORMAT_VERSION and s["attrs"]["complete"] is True
    assert isinstance(s["attrs"]["config"], dict) and s["attrs"]["config"]["threat"]["norm"] == "linf"
    assert s["classifier"]["weight"]["shape"] == [NUM_CLASSES, 32]
    assert [g["path"] for g in s["groups"]] == GROUPS
    for g in s["groups"]:
        feats, lab, pred, attrs = io.load_features(dump, g["split"], g["perturbation"])
        assert g["num_samples"] == len(lab) == N[g["split"]]
        assert g["datasets"]["features"]["shape"] == list(feats.shape)
        assert g["datasets"]["features"]["compression"] == "gzip"
        assert g["accuracy"] == pytest.approx(float((pred == lab).mean()))
        assert g["accuracy"] == pytest.approx(attrs["accuracy"])
        assert g["class_counts"] == np.bincount(lab, minlength=NUM_CLASSES).tolist()
        assert g["prediction_counts"] == np.bincount(pred, minlength=NUM_CLASSES).tolist()
        assert ("targets" in g["datasets"]) == (g["perturbation"] == "targeted")


@pytest.mark.skipif(shutil.which("h5ls") is None, reason="hdf5-tools (h5ls) not installed")
def test_h5ls_shows_the_same_structure(dump: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listing = subprocess.run(["h5ls", "-r", str(dump)], capture_output=True, text=True, check=True).stdout
    h5ls = {line.split()[0]: line.split(None, 1)[1] for line in listing.splitlines()}
    s = json.loads(_cli(capsys, str(dump), "--json")[1])
    for g in s["groups"]:
        assert h5ls[g["path"]] == "Group"
        for name, d in g["datasets"].items():
            assert h5ls[f"{g['path']}/{name}"] == "Dataset {" + ", ".join(map(str, d["shape"])) + "}"


def test_verify_passes_on_a_good_dump(dump: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, str(dump), "--verify", "--rows", "4")
    assert code == 0, out
    assert "ok   checkpoint sha256" in out and "ok   train/clean features" in out and "VERIFIED" in out
    code, out, _ = _cli(capsys, str(dump), "--verify", "--rows", "2", "--json")
    v = json.loads(out)["verify"]
    assert code == 0 and v["ok"] and v["problems"] == []
    checks = [c["check"] for c in v["checks"]]
    assert checks == ["checkpoint_sha256", "train/clean features", "test/clean features"]


def test_verify_fails_when_the_checkpoint_changed(dump: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # A private copy of dump and checkpoint, the dump pointing at the copy: the shared fixture stays intact.
    ckpt = tmp_path / "epoch0.pt"
    with h5py.File(dump) as f:
        shutil.copyfile(f.attrs["checkpoint"], ckpt)
    copy = tmp_path / "dump.h5"
    shutil.copyfile(dump, copy)
    with h5py.File(copy, "r+") as f:
        f.attrs["checkpoint"] = str(ckpt)
        f.attrs["layout_sha256"] = io.layout_digest(f)  # re-sealed as the writer would: an edit, not damage
    assert _cli(capsys, str(copy), "--verify", "--rows", "2")[0] == 0
    original = tmp_path / "original.pt"
    shutil.copyfile(ckpt, original)

    # 1. only the bytes change (a bias nudged): the sha256 alone must fail it
    payload = torch.load(ckpt, weights_only=False)
    payload["model"]["linear.bias"] += 1.0
    save_atomic(payload, ckpt)
    code, out, _ = _cli(capsys, str(copy), "--verify", "--rows", "2")
    assert code == 1
    assert "FAIL checkpoint sha256" in out and "the checkpoint changed since extraction" in out
    assert "ok   train/clean features" in out and "VERIFICATION FAILED" in out

    # 2. a different model (retrained from another seed): features differ too
    make_checkpoint(tmp_path / "other", seed=2)
    other = next((tmp_path / "other").rglob("epoch0.pt"))
    shutil.copyfile(other, ckpt)
    code, out, _ = _cli(capsys, str(copy), "--verify", "--rows", "2")
    assert code == 1
    assert "FAIL train/clean features" in out and "differ from the stored ones" in out

    # --checkpoint points at the right file: passes again; at a missing one: a clear failure
    assert _cli(capsys, str(copy), "--verify", "--rows", "2", "--checkpoint", str(original))[0] == 0
    code, out, _ = _cli(capsys, str(copy), "--verify", "--checkpoint", str(tmp_path / "gone.pt"))
    assert code == 1 and "gone.pt (recorded in the dump's 'checkpoint' attribute) not found" in out


def test_truncated_or_foreign_file_exits_2(dump: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    cut = tmp_path / "cut.h5"
    shutil.copyfile(dump, cut)
    with open(cut, "r+b") as fh:
        fh.truncate(cut.stat().st_size // 2)
    code, out, err = _cli(capsys, str(cut))
    assert code == 2 and out == ""
    assert err.startswith(f"ncpipe inspect: feature dump {cut} is not a readable HDF5 file (truncated")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    code, _, err = _cli(capsys, str(tmp_path / "other.h5"))
    assert code == 2 and "neither an ncpipe feature dump nor a layerwise file" in err


def _layerwise(path: Path) -> None:
    """A layerwise file laid out as docs/hdf5-format.md specifies (written by the layerwise stage)."""
    rng = np.random.default_rng(0)
    layers = [("conv2_in", 0, [16, 14, 14]), ("linear_in_prepool", 1, [32, 1, 1])]
    with io.create_dump(path, {"dataset": "mnist5k", "arch": "vgg11bn", "num_classes": 3}) as f:
        for name, index, shape in reversed(layers):  # written out of order on purpose
            for kind in ("pgd", "clean"):
                g = f.create_group(f"layers/{name}/{kind}")
                io.write_matrix(g, "features", rng.normal(size=(6, 20)).astype(np.float32))
                g.create_dataset("labels", data=np.array([0, 0, 1, 1, 2, 2]))
                io.set_attrs(g, {"layer": name, "layer_index": index, "original_shape": shape})


def test_layerwise_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "layerwise.h5"
    _layerwise(path)
    code, out, _ = _cli(capsys, str(path))
    assert code == 0
    assert "ncpipe layerwise file" in _sections(out)[0] and "layers (shallow to deep):" in _sections(out)
    assert _table_first_column(out, "layers (shallow to deep):") == [
        "/layers/conv2_in/clean", "/layers/conv2_in/pgd", "/layers/linear_in_prepool/clean",
        "/layers/linear_in_prepool/pgd"]
    assert "16x14x14" in out
    s = json.loads(_cli(capsys, str(path), "--json")[1])
    assert [(g["layer"], g["layer_index"], g["perturbation"]) for g in s["groups"]] == [
        ("conv2_in", 0, "clean"), ("conv2_in", 0, "pgd"), ("linear_in_prepool", 1, "clean"),
        ("linear_in_prepool", 1, "pgd")]
    assert s["groups"][0]["original_shape"] == [16, 14, 14] and s["groups"][0]["class_counts"] == [2, 2, 2]
    code, _, err = _cli(capsys, str(path), "--verify")  # no row indices: it cannot be recomputed
    assert code == EXIT_NOT_SUPPORTED == 3 and "has no 'indices'" in err


def test_verify_layerwise_file(tiny_layerwise: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    # every probe's stored clean rows are recomputed from the checkpoint through the same hooks and pooling
    code, out, _ = _cli(capsys, str(tiny_layerwise), "--verify", "--rows", "3")
    assert code == 0 and "VERIFIED" in out
    v = json.loads(_cli(capsys, str(tiny_layerwise), "--verify", "--json")[1])["verify"]
    layers = io.layers(tiny_layerwise)
    assert len(layers) == 8
    assert [c["check"] for c in v["checks"]][1:] == [f"{n}/clean features" for n in layers]
    assert all(c["max_rel_error"] < 1e-5 for c in v["checks"][1:])
    bad = tmp_path / "bad.h5"
    shutil.copy(tiny_layerwise, bad)
    with h5py.File(bad, "r+") as f:
        g = f[f"layers/{layers[3]}/clean"]
        feats = g["features"][:]
        del g["features"]
        io.write_matrix(g, "features", feats * 1.1)
    code, out, _ = _cli(capsys, str(bad), "--verify")
    assert code == 1 and f"{layers[3]}/clean: features recomputed" in out and "VERIFICATION FAILED" in out


def test_readme_recipes_run_as_written(dump: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every code block of the README's "Inspecting feature dumps" section, run against a dump at the path
    of the default run's final ST dump (derived from config/config.yaml, so the recipes cannot go stale)."""
    pytest.importorskip("xarray")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Inspecting feature dumps", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(bash|python)\n(.*?)```", section, flags=re.S)
    assert [lang for lang, _ in blocks] == ["bash", "python", "python"]
    default = load_config(Path(__file__).parents[1] / "config" / "config.yaml")
    st_final = [c for c in grid.cells(default, final_only=True) if c.run.method == "st"][0]
    rel = paths.format_path(paths.FEATURES, **st_final.wildcards())
    assert all(rel in code for _, code in blocks), f"the recipes must use the default run's dump {rel}"
    target = tmp_path / rel
    target.parent.mkdir(parents=True)
    shutil.copyfile(dump, target)
    monkeypatch.chdir(tmp_path)
    for lang, code in blocks:
        if lang == "python":
            exec(compile(code, "README.md", "exec"), {})
        elif shutil.which("h5ls") and shutil.which("h5dump"):
            env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
            r = subprocess.run(["bash", "-eu", "-c", code], capture_output=True, text=True, env=env)
            assert r.returncode == 0, r.stderr
            assert "/train/clean/features" in r.stdout and "checkpoint_sha256" in r.stdout
