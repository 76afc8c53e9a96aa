"""HDF5 dump I/O: round trips, float16 storage, truncated/incomplete files, xarray and pandas views."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from ncpipe import io, metrics

sys.path.insert(0, str(Path(__file__).parent))
from tiny_dump import (  # noqa: E402
    FEATURE_DIM,
    KINDS,
    NUM_CLASSES,
    TEST_PER_CLASS,
    TRAIN_PER_CLASS,
    make_dump,
)

N = {"train": TRAIN_PER_CLASS * NUM_CLASSES, "test": TEST_PER_CLASS * NUM_CLASSES}


@pytest.fixture(scope="module")
def real(tiny_dump: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared float32 dump (conftest.py) and a float16 one extracted from the same checkpoint."""
    f16 = make_dump(tmp_path_factory.mktemp("io_f16"), tiny_dump["checkpoint"], dtype="float16")
    return {"ckpt": tiny_dump["checkpoint"], "f32": tiny_dump["dump"], "f16": f16}


def _synthetic(path: Path, kinds: dict[str, list[str]], rng: np.random.Generator) -> dict:
    """A dump written through the same helpers as extract.py, with known contents."""
    truth: dict = {}
    root = {"dataset": "toy", "arch": "none", "method": "st", "seed": 3, "epoch": 7, "num_classes": 4,
            "config": {"a": [1, "x"], "b": {"c": 2}}, "training_adversary": None, "epsilon": 0.5}
    with io.create_dump(path, root) as f:
        w, b = rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=4).astype(np.float32)
        io.write_matrix(f.create_group("classifier"), "weight", w, compression=None)
        io.write_matrix(f["classifier"], "bias", b, compression=None)
        truth["classifier"] = (w, b)
        for split, n in (("train", 1200), ("test", 5)):
            lab = rng.integers(0, 4, n)
            tgt = (lab + 1) % 4
            for kind in kinds[split]:
                g = f.create_group(f"{split}/{kind}")
                feats = rng.normal(size=(n, 6)).astype(np.float32)
                pred = rng.integers(0, 4, n)
                io.write_matrix(g, "features", feats)
                g.create_dataset("labels", data=lab)
                g.create_dataset("predictions", data=pred)
                if kind == "targeted":
                    g.create_dataset("targets", data=tgt)
                io.set_attrs(g, {"kind": kind, "split": split, "accuracy": float((pred == lab).mean())})
                truth[(split, kind)] = (feats, lab, pred, tgt if kind == "targeted" else None)
    return truth


def test_round_trip_every_group(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "toy.h5"
    kinds = {"train": ["sign", "clean", "targeted", "pgd"], "test": ["clean", "pgd"]}
    truth = _synthetic(path, kinds, rng)
    # groups come back train before test, kinds in the canonical order whatever the write order
    assert io.groups(path) == [("train", "clean"), ("train", "pgd"), ("train", "targeted"), ("train", "sign"),
                               ("test", "clean"), ("test", "pgd")]
    for (split, kind) in io.groups(path):
        feats, lab, pred, attrs = io.load_features(path, split, kind)
        t_feats, t_lab, t_pred, t_tgt = truth[(split, kind)]
        np.testing.assert_array_equal(feats, t_feats)
        np.testing.assert_array_equal(lab, t_lab)
        np.testing.assert_array_equal(pred, t_pred)
        assert feats.dtype == np.float32 and lab.dtype == np.int64
        assert attrs["split"] == split and attrs["kind"] == kind and attrs["seed"] == 3
        assert attrs["format_version"] == io.FORMAT_VERSION and attrs["complete"] is True
        assert attrs["config"] == '{"a": [1, "x"], "b": {"c": 2}}'  # dicts are stored as sorted JSON
        assert attrs["training_adversary"] == "none"
        if t_tgt is not None:
            np.testing.assert_array_equal(attrs["targets"], t_tgt)
        else:
            assert "targets" not in attrs
    w, b = io.load_classifier(path)
    np.testing.assert_array_equal(w, truth["classifier"][0])
    np.testing.assert_array_equal(b, truth["classifier"][1])
    with pytest.raises(io.DumpError, match="no group 'test/sign'.*train/clean"):
        io.load_features(path, "test", "sign")


def test_chunking_and_compression_of_the_writer(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "c.h5", "w") as f:
        big = io.write_matrix(f, "big", np.zeros((3000, 512), np.float32))
        small = io.write_matrix(f, "small", np.zeros((10, 512), np.float32))
        half = io.write_matrix(f, "half", np.zeros((3000, 512), np.float32), dtype="float16")
        plain = io.write_matrix(f, "plain", np.zeros((10, 512), np.float32), compression="none")
        # 256 KiB chunks of whole rows: 128 rows of 512 float32, 256 rows of float16
        assert big.chunks == (128, 512) and half.chunks == (256, 512) and small.chunks == (10, 512)
        assert big.compression == "gzip" and big.compression_opts == 4 and big.shuffle
        assert plain.chunks == (10, 512) and plain.compression is None and not plain.shuffle
        assert all(d.fletcher32 for d in (big, small, half, plain))


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_a_flipped_byte_on_disk_fails_the_read(tmp_path: Path, compression: str) -> None:
    path = tmp_path / "flip.h5"
    data = np.random.default_rng(0).normal(size=(300, 512)).astype(np.float32)  # 128-row chunks
    with h5py.File(path, "w") as f:
        offset = io.write_matrix(f, "x", data, compression=compression).id.get_chunk_info(1).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset + 100] ^= 0x10  # inside the second chunk's stored bytes
    path.write_bytes(bytes(raw))
    with h5py.File(path, "r") as f:
        assert np.array_equal(f["x"][:128], data[:128])  # the untouched first chunk still reads
        with pytest.raises(OSError):
            f["x"][128:256]


def test_float16_overflow_is_refused(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "o.h5", "w") as f, pytest.raises(io.DumpError, match="overflow float16"):
        io.write_matrix(f, "features", np.array([[1.0, 7e4]], np.float32), dtype="float16")


def test_real_dump_round_trip(real: dict[str, Path]) -> None:
    path = real["f32"]
    assert io.groups(path) == [(s, k) for s in ("train", "test") for k in KINDS]
    clean_labels = {}
    for split, kind in io.groups(path):
        feats, lab, pred, attrs = io.load_features(path, split, kind)
        assert feats.shape == (N[split], FEATURE_DIM) and feats.dtype == np.float32
        assert lab.shape == pred.shape == (N[split],)
        assert np.bincount(lab, minlength=NUM_CLASSES).tolist() == [N[split] // NUM_CLASSES] * NUM_CLASSES
        assert attrs["accuracy"] == pytest.approx(float((pred == lab).mean()))
        assert attrs["checkpoint_sha256"] and attrs["config"].startswith("{")
        # every group of a split holds the same images in the same order
        np.testing.assert_array_equal(clean_labels.setdefault(split, lab), lab)
        if kind == "targeted":
            np.testing.assert_array_equal(attrs["targets"], (lab + 1) % NUM_CLASSES)  # target_rule "next"


def test_float16_storage_metrics_in_float64(real: dict[str, Path]) -> None:
    with h5py.File(real["f16"]) as f:
        assert f["train/clean/features"].dtype == np.float16
        assert f["train/clean/features"].chunks[0] == N["train"]  # smaller than a chunk: one chunk
    f32, lab, _, _ = io.load_features(real["f32"], "train", "clean")
    f16, lab16, _, _ = io.load_features(real["f16"], "train", "clean")
    np.testing.assert_array_equal(lab, lab16)
    # the same deterministic CPU forward pass, rounded to float16 (relative precision 2^-11)
    np.testing.assert_allclose(f16.astype(np.float32), f32, rtol=2 ** -10, atol=1e-6)
    means16, _ = metrics.class_means(f16, lab, NUM_CLASSES)
    means32, _ = metrics.class_means(f32, lab, NUM_CLASSES)
    assert means16.dtype == np.float64
    np.testing.assert_allclose(means16, means32, rtol=2e-3, atol=1e-6)


def test_truncated_dump_gives_clear_error(real: dict[str, Path], tmp_path: Path) -> None:
    cut = tmp_path / "cut.h5"
    shutil.copyfile(real["f32"], cut)
    size = cut.stat().st_size
    with open(cut, "r+b") as fh:
        fh.truncate(size // 2)
    clear = r"cut\.h5 is not a readable HDF5 file \(truncated or corrupted\?\)"
    with pytest.raises(io.DumpError, match=clear):
        io.load_features(cut, "train", "clean")
    with pytest.raises(io.DumpError, match="truncated"):
        io.samples_frame(cut)


def test_incomplete_or_foreign_files(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "half_written.h5", "w") as f:
        f.attrs["format_version"] = io.FORMAT_VERSION  # but never marked complete
    with pytest.raises(io.DumpError, match="incomplete or not an ncpipe dump"):
        io.open_dump(tmp_path / "half_written.h5")
    with h5py.File(tmp_path / "future.h5", "w") as f:
        f.attrs["format_version"] = "2.0"
        f.attrs["complete"] = True
    with pytest.raises(io.DumpError, match="format_version 2.0; this ncpipe reads 1.x"):
        io.open_dump(tmp_path / "future.h5")
    with pytest.raises(io.DumpError, match="does not exist"):
        io.open_dump(tmp_path / "nope.h5")


def test_to_xarray_dims_and_coords(real: dict[str, Path]) -> None:
    pytest.importorskip("xarray")
    path = real["f32"]
    ds = io.to_xarray(path)
    total = N["train"] + N["test"]
    assert dict(ds.sizes) == {"perturbation": len(KINDS), "sample": total, "feature": FEATURE_DIM,
                              "class": NUM_CLASSES}
    assert ds.features.dims == ("perturbation", "sample", "feature")
    assert ds.predictions.dims == ("perturbation", "sample") and ds.labels.dims == ("sample",)
    assert ds.classifier_weight.dims == ("class", "feature") and ds.classifier_bias.dims == ("class",)
    assert list(ds.perturbation.values) == KINDS
    assert ds.split.values.tolist() == ["train"] * N["train"] + ["test"] * N["test"]
    assert ds.index.values.tolist() == list(range(N["train"])) + list(range(N["test"]))
    assert ds["class"].values.tolist() == list(range(NUM_CLASSES))
    assert ds.attrs["dataset"] == "mnist5k" and ds.attrs["format_version"] == io.FORMAT_VERSION
    for split, kind in io.groups(path):
        feats, lab, pred, _ = io.load_features(path, split, kind)
        sel = ds.sel(split=split, perturbation=kind)
        np.testing.assert_array_equal(sel.features.values, feats)
        np.testing.assert_array_equal(sel.predictions.values, pred)
        np.testing.assert_array_equal(sel.labels.values, lab)
    w, b = io.load_classifier(path)
    np.testing.assert_array_equal(ds.classifier_weight.values, w)
    # one split: a plain integer sample dimension
    test = io.to_xarray(path, split="test")
    assert dict(test.sizes) == {"perturbation": len(KINDS), "sample": N["test"], "feature": FEATURE_DIM,
                                "class": NUM_CLASSES}
    assert test.sample.values.tolist() == list(range(N["test"])) and test.attrs["split"] == "test"
    np.testing.assert_array_equal(test.targets.values, (test.labels.values + 1) % NUM_CLASSES)
    with pytest.raises(io.DumpError, match="no split 'val'"):
        io.to_xarray(path, split="val")


def test_to_xarray_fills_missing_groups(tmp_path: Path) -> None:
    pytest.importorskip("xarray")
    path = tmp_path / "toy.h5"
    truth = _synthetic(path, {"train": ["clean", "pgd"], "test": ["clean"]}, np.random.default_rng(1))
    ds = io.to_xarray(path)
    assert list(ds.perturbation.values) == ["clean", "pgd"] and "targets" not in ds
    missing = ds.sel(split="test", perturbation="pgd")
    assert np.isnan(missing.features.values).all() and (missing.predictions.values == -1).all()
    np.testing.assert_array_equal(ds.sel(split="train", perturbation="pgd").features.values,
                                  truth[("train", "pgd")][0])


def test_to_xarray_without_xarray_says_how_to_install(real: dict[str, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "xarray", None)  # makes `import xarray` raise ImportError
    with pytest.raises(ImportError, match=r"optional dependency xarray: pip install 'ncpipe\[test\]'"):
        io.to_xarray(real["f32"])


def test_samples_frame(real: dict[str, Path]) -> None:
    df = io.samples_frame(real["f32"])
    assert list(df.columns) == ["split", "perturbation", "index", "label", "prediction", "target", "correct"]
    assert len(df) == len(KINDS) * (N["train"] + N["test"])
    assert list(df.split.cat.categories) == ["train", "test"]
    assert list(df.perturbation.cat.categories) == KINDS
    sizes = df.groupby(["split", "perturbation"], observed=True).size()
    assert all(sizes.loc[(s, k)] == N[s] for s in N for k in KINDS)
    assert (df.correct == (df.prediction == df.label)).all()
    targeted = df.perturbation == "targeted"
    assert df.loc[~targeted, "target"].isna().all()
    assert (df.loc[targeted, "target"] == (df.loc[targeted, "label"] + 1) % NUM_CLASSES).all()
    for (split, kind), g in df.groupby(["split", "perturbation"], observed=True):
        _, lab, pred, attrs = io.load_features(real["f32"], split, kind)
        assert g["index"].tolist() == list(range(N[split]))
        np.testing.assert_array_equal(g.label.to_numpy(), lab)
        np.testing.assert_array_equal(g.prediction.to_numpy(), pred)
        assert g.correct.mean() == pytest.approx(attrs["accuracy"])


# ------------------------------------------------------------------------------------------ layerwise files
def test_layerwise_file_opens_like_a_feature_dump(tiny_layerwise: Path) -> None:
    import h5py

    names = io.layers(tiny_layerwise)
    with h5py.File(tiny_layerwise) as f:
        assert sorted(names) == sorted(f["layers"]) and len(names) == 8
        assert [f[f"layers/{n}/clean"].attrs["layer_index"] for n in names] == list(range(8))
    feats, labels, idx, attrs = io.load_layer(tiny_layerwise, names[2], "pgd")
    assert feats.shape == (20, int(np.prod(attrs["stored_shape"]))) and attrs["perturbation"] == "pgd"
    assert np.array_equal(np.bincount(labels), [2] * 10) and attrs["split"] == "train" and attrs["complete"]
    with pytest.raises(io.DumpError, match=r"no layerwise group .*nope/pgd.*it holds"):
        io.load_layer(tiny_layerwise, "nope", "pgd")
    with pytest.raises(io.NotSupportedError, match="load_layer"):
        io.load_features(tiny_layerwise, "train", "clean")
    # never an empty frame for a file that has samples: a layerwise file is refused, naming the readers
    with pytest.raises(io.NotSupportedError, match=r"no per-sample predictions.*to_xarray"):
        io.samples_frame(tiny_layerwise)


def test_layerwise_to_xarray(tiny_layerwise: Path) -> None:
    pytest.importorskip("xarray")
    ds = io.to_xarray(tiny_layerwise)
    names = io.layers(tiny_layerwise)
    assert ds.attrs["layers"] == names and list(ds.perturbation.values) == ["clean", "pgd"]
    for n in names:
        for kind in ("clean", "pgd"):
            feats, labels, idx, _ = io.load_layer(tiny_layerwise, n, kind)
            np.testing.assert_array_equal(ds[n].sel(perturbation=kind).values, feats)
            np.testing.assert_array_equal(ds["labels"].values, labels)
            np.testing.assert_array_equal(ds["index"].values, idx)
    assert ds[names[0]].dims == ("perturbation", "sample", f"{names[0]}_feature")
    with pytest.raises(io.DumpError, match="'train' split, not 'test'"):
        io.to_xarray(tiny_layerwise, split="test")
