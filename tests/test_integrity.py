"""Bad input at run time: diverging training names its cell; damaged checkpoints and dumps are refused."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from ncpipe import grid
from ncpipe.checkpoint import CorruptCheckpointError, checkpoint_payload, load_checkpoint, save_atomic
from ncpipe.config import validate_config
from ncpipe.data import ImageData
from ncpipe.io import DumpError, create_dump, open_dump, write_matrix
from ncpipe.models import build_model
from ncpipe.train import TrainingDivergedError, check_finite_weights, run_training


@pytest.fixture(autouse=True)
def _one_thread_and_restore(torch_global_state):
    """Every test here runs under conftest's torch_global_state."""


# ------------------------------------------------------------------------------------------- NaN / inf loss
def tiny_spec(method: str, lr: float) -> dict[str, Any]:
    cfg = validate_config({
        "datasets": ["mnist5k"], "archs": ["vgg11bn"], "methods": [method], "seeds": [7],
        "data": {"train_per_class": 10, "test_per_class": 2}, "model": {"width": 0.1},
        "train": {"epochs": 3, "checkpoints": [0, 1, 3], "batch_size": 25, "lr": lr,
                  "adversary": {"norm": "linf", "epsilon": 64, "step": 64, "steps": 1}},
        "runtime": {"device": "cpu"},
    })
    regime = grid.regime_id(method, cfg["train"]["adversary"])
    return json.loads(grid.train_spec(cfg, {"dataset": "mnist5k", "arch": "vgg11bn", "regime": regime,
                                            "seed": 7}))


@pytest.mark.parametrize("method", ["st", "at"])
def test_absurd_learning_rate_stops_naming_the_cell_and_publishes_nothing(tmp_path, method):
    spec = tiny_spec(method, lr=1e6)
    outs = {e: str(tmp_path / "ckpt" / f"epoch{e}.pt") for e in spec["checkpoints"]}
    with pytest.raises(TrainingDivergedError) as info:
        run_training(spec, outs, str(tmp_path / "log.csv"), str(tmp_path / ".resume"))
    msg = str(info.value)
    for part in ("mnist5k", "vgg11bn", f"/{method}/", "seed7", "diverged"):
        assert part in msg, f"{part!r} missing from: {msg}"
    assert re.search(r"\bepoch 1\b", msg), msg  # lr 1e6 explodes within the first epoch
    assert not (tmp_path / "ckpt").exists(), "a diverged run must publish no checkpoint, not even epoch 0"
    assert not (tmp_path / "log.csv").exists()


def test_reasonable_learning_rate_trains(tmp_path):
    """The same tiny run with a sane rate completes: the divergence above is the lr's doing."""
    spec = tiny_spec("st", lr=0.05)
    outs = {e: str(tmp_path / f"epoch{e}.pt") for e in spec["checkpoints"]}
    run_training(spec, outs, str(tmp_path / "log.csv"), str(tmp_path / ".resume"))
    assert all(Path(p).exists() for p in outs.values())


def small_model() -> torch.nn.Module:
    return build_model("vgg11bn", num_classes=10, in_channels=1, mean=(0.13,), std=(0.31,), width=0.1,
                       stem="cifar")


def test_non_finite_weights_are_refused_with_cell_and_epoch():
    model = small_model()
    check_finite_weights(model, "mnist5k/vgg11bn/st/seed1", 4)  # a fresh model passes
    with torch.no_grad():
        model.linear.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDivergedError, match=r"mnist5k/vgg11bn/st/seed1.*linear\.weight.*epoch 4"):
        check_finite_weights(model, "mnist5k/vgg11bn/st/seed1", 4)


# ------------------------------------------------------------------------------------------- checkpoints
def fake_data() -> ImageData:
    z = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    y = torch.zeros(1, dtype=torch.int64)
    return ImageData("mnist5k", z, y, z, y, num_classes=10, mean=(0.13,), std=(0.31,))


@pytest.fixture
def checkpoint(tmp_path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = small_model()
    spec = {"arch": "vgg11bn", "width": 0.1, "method": "st", "seed": 1}
    path = tmp_path / "epoch1.pt"
    save_atomic(checkpoint_payload(model, spec, fake_data(), 1), path)
    return path, model


def test_intact_checkpoint_round_trips(checkpoint):
    path, model = checkpoint
    loaded, payload = load_checkpoint(path)
    assert payload["epoch"] == 1 and len(payload["payload_sha256"]) == 64
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


@pytest.mark.parametrize("keep", [0.5, 0.01, 0.0])
def test_truncated_checkpoint_gives_a_clear_error(checkpoint, keep):
    path, _ = checkpoint
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptCheckpointError, match=r"epoch1\.pt is unreadable or truncated.*--forcerun"):
        load_checkpoint(path)


def test_flipped_bytes_inside_a_tensor_are_detected(checkpoint):
    """torch.load itself accepts this file and returns wrong weights; the stored digest catches it."""
    path, model = checkpoint
    data = bytearray(path.read_bytes())
    w = model.state_dict()["linear.weight"].numpy().tobytes()
    at = bytes(data).find(w)
    assert at > 0, "tensor bytes are stored uncompressed in the zip"
    data[at + 16: at + 24] = b"\x7f" * 8
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=False)["model"]["linear.weight"],
                           model.state_dict()["linear.weight"])  # silent damage without the digest
    with pytest.raises(CorruptCheckpointError, match=r"epoch1\.pt is corrupted.*sha256"):
        load_checkpoint(path)


def test_foreign_torch_file_is_refused(tmp_path):
    path = tmp_path / "not_a_checkpoint.pt"
    torch.save({"weights": torch.ones(3)}, path)
    with pytest.raises(CorruptCheckpointError, match="not_a_checkpoint.pt"):
        load_checkpoint(path)


def test_failed_save_leaves_no_file_under_the_final_name(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    target = tmp_path / "epoch3.pt"
    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"x": Unpicklable()}, target)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- HDF5 dumps
@pytest.fixture
def dump(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "epoch1_linf_eps8.h5"
    with create_dump(path, {"dataset": "mnist5k", "arch": "vgg11bn", "method": "st", "seed": 1}) as f:
        g = f.create_group("train/clean")
        write_matrix(g, "features", rng.normal(size=(200, 32)))
        g.create_dataset("labels", data=np.arange(200) % 10)
        g.create_dataset("predictions", data=np.arange(200) % 10)
    return path


def test_intact_dump_opens(dump):
    with open_dump(dump) as f:
        assert f["train/clean/features"].shape == (200, 32)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.001])
def test_truncated_dump_gives_a_clear_error(dump, keep):
    data = dump.read_bytes()
    dump.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DumpError, match=r"epoch1_linf_eps8\.h5 is not a readable HDF5 file \(truncated"):
        open_dump(dump)


def test_dump_without_complete_flag_is_refused(tmp_path):
    path = tmp_path / "half.h5"
    with h5py.File(path, "w") as f:  # what a writer bypassing create_dump would leave
        f.attrs["format_version"] = "1.0"
        f.create_dataset("train/clean/features", data=np.zeros((2, 3)))
    with pytest.raises(DumpError, match=r"half\.h5 is incomplete"):
        open_dump(path)


def test_interrupted_dump_never_appears_under_its_name(tmp_path):
    path = tmp_path / "epoch2_linf_eps8.h5"
    with pytest.raises(KeyboardInterrupt), create_dump(path, {"dataset": "mnist5k"}) as f:
        write_matrix(f.create_group("train/clean"), "features", np.zeros((10, 4)))
        raise KeyboardInterrupt  # stands for a kill in the middle of extraction
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DumpError, match="does not exist"):
        open_dump(path)
