"""Write tiny datasets in the exact on-disk formats of the real ones (CIFAR pickles, ImageFolder trees).

The images are known functions of (index, label), so a test can check that a loader decoded every pixel from
the right place.  Used by tests/test_datasets.py and by the fake-CIFAR run in tests/test_paper_config.py.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np


def cifar_images(n: int, num_classes: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (N, 3, 32, 32) uint8 with labels cycling through the classes.

    Red encodes the pixel position (h * 32 + w mod 256) so a wrong reshape is caught; green encodes the global
    image index, blue the label: every image is distinct and its label is readable from its pixels (a network
    can learn it, which the fake-CIFAR workflow run relies on for non-degenerate metrics).
    """
    idx = np.arange(offset, offset + n)
    labels = (idx % num_classes).astype(np.int64)
    x = np.empty((n, 3, 32, 32), dtype=np.uint8)
    x[:, 0] = (np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)
    x[:, 1] = (idx % 256).astype(np.uint8)[:, None, None]
    x[:, 2] = (labels * (255 // max(num_classes - 1, 1))).astype(np.uint8)[:, None, None]
    return x, labels


class _Python2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` opcodes (BINSTRING), as the official files (Python 2 cPickle) do.

    Such strings load as ``bytes`` under ``encoding="bytes"`` (the CIFAR page's recipe: keys b'data',
    b'labels') and as ``str`` under ``encoding="latin1"`` (torchvision's reader); the numpy payload inside the
    array's pickle is a Python 2 string as well.  Python 3's own pickler would write bytes that load as bytes
    under either encoding, so the fixture would not be the real format.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as fh:
        _Python2Pickler(fh, protocol=2).dump(obj)


def write_cifar10(root: Path, per_batch: int = 20, test: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``; returns the train arrays."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for b in range(5):
        x, y = cifar_images(per_batch, 10, offset=b * per_batch)
        _dump(
            folder / f"data_batch_{b + 1}",
            {
                b"batch_label": f"training batch {b + 1} of 5".encode(),
                b"labels": y.tolist(),
                b"data": x.reshape(len(x), -1),
                b"filenames": [b"img.png"] * len(x),
            },
        )
        xs.append(x)
        ys.append(y)
    x, y = cifar_images(test, 10, offset=5 * per_batch)
    _dump(
        folder / "test_batch",
        {b"batch_label": b"testing batch 1 of 1", b"labels": y.tolist(), b"data": x.reshape(len(x), -1)},
    )
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    _dump(
        folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    )
    return np.concatenate(xs), np.concatenate(ys)


def write_cifar100(root: Path, train: int = 200, test: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """``root/cifar-100-python/{train, test, meta}`` with ``fine_labels`` and ``coarse_labels``."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    x, y = cifar_images(train, 100)
    _dump(
        folder / "train",
        {b"fine_labels": y.tolist(), b"coarse_labels": (y // 5).tolist(), b"data": x.reshape(len(x), -1)},
    )
    xt, yt = cifar_images(test, 100, offset=train)
    _dump(
        folder / "test",
        {b"fine_labels": yt.tolist(), b"coarse_labels": (yt // 5).tolist(), b"data": xt.reshape(len(xt), -1)},
    )
    _dump(
        folder / "meta",
        {
            b"fine_label_names": [f"c{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"s{i}".encode() for i in range(20)],
        },
    )
    return x, y


IMAGENETTE_CLASSES = ["n01440764", "n02102040", "n02979186"]  # real ImageNette folder names (WordNet ids)


def imagefolder_colour(label: int, index: int) -> tuple[int, int, int]:
    return (40 + 80 * label, 10 * index, 200 - 50 * label)


def write_imagefolder(root: Path, per_class: dict[str, int], size: tuple[int, int] = (213, 160)) -> None:
    """``root/imagenette2-160/{train,val}/<wnid>/*.JPEG``: solid-colour images of ``size`` (width, height)."""
    from PIL import Image

    for split, n in per_class.items():
        for label, wnid in enumerate(IMAGENETTE_CLASSES):
            d = Path(root) / "imagenette2-160" / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", size, imagefolder_colour(label, i)).save(d / f"{wnid}_{i}.JPEG", quality=95)
