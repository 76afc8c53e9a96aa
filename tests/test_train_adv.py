"""Training-time adversarial examples (perturbation kind ``train_adv``, paper.md section 5 item 4).

AT and TRADES record, at each checkpoint epoch, the adversarial batches they trained on; the checkpoint stores
their penultimate features under the end-of-epoch model in eval mode, and the features rule writes them as
the group ``train/train_adv`` of the cells whose evaluation threat is the training threat.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

import ncpipe.train
from ncpipe import evaluate, grid, io
from ncpipe.checkpoint import (
    CorruptCheckpointError,
    adversarial_path,
    load_adversarial_record,
    load_checkpoint,
)
from ncpipe.config import validate_config
from ncpipe.data import load_data, to_float
from ncpipe.extract import extract_features
from ncpipe.train import run_training

CONFIG = validate_config({
    "datasets": ["mnist5k"], "archs": ["vgg11bn"], "methods": ["st", "at", "trades"], "seeds": [3],
    "data": {"train_per_class": 8, "test_per_class": 2}, "model": {"width": 0.1},
    "train": {"epochs": 3, "checkpoints": [1, 3], "batch_size": 20, "lr": 0.05,
              "adversary": {"norm": "linf", "epsilon": 32, "step": 12, "steps": 2}},
    "attack": {"threats": {"linf": {"epsilons": [32, 16], "step": 8, "steps": 2}}, "batch_size": 64},
    "runtime": {"device": "cpu", "deterministic": True},
})
REGIMES = {"st": "st", "at": "at_linf32", "trades": "trades_linf32"}


@pytest.fixture(autouse=True)
def _one_thread_and_restore(torch_global_state):
    """Every test here runs under conftest's torch_global_state."""


def wildcards(method: str, **cell: Any) -> dict[str, Any]:
    return {"dataset": "mnist5k", "arch": "vgg11bn", "regime": REGIMES[method], "seed": 3, **cell}


def spec_of(method: str) -> dict[str, Any]:
    return json.loads(grid.train_spec(CONFIG, wildcards(method)))


def record(path: str | Path) -> dict[str, Any] | None:
    """The record beside a checkpoint (``epoch{E}.adv.pt``), as the features rule reads it."""
    return load_adversarial_record(path, load_checkpoint(path)[1])


def train(root: Path, spec: dict[str, Any], **kw: Any) -> dict[int, str]:
    outs = {e: str(root / f"epoch{e}.pt") for e in spec["checkpoints"]}
    run_training(spec, outs, str(root / "log.csv"), str(root / ".resume"), **kw)
    return outs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[int, str]]:
    # conftest's torch_global_state, at module scope: one thread (a resumed run must match bit for bit)
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    try:
        return {m: train(tmp_path_factory.mktemp(m), spec_of(m)) for m in REGIMES}
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=warn)


def test_robust_checkpoints_carry_the_record_and_st_ones_do_not(runs) -> None:
    n = len(load_data(spec_of("at")).y_train)
    for method in ("at", "trades"):
        for path in runs[method].values():
            model, _ = load_checkpoint(path)
            rec = record(path)
            assert rec is not None and "train_adversarial" not in load_checkpoint(path)[1]
            assert rec["features"].shape == (n, model.linear.in_features)
            assert rec["features"].dtype == torch.float32
            assert rec["adversary"] == CONFIG["train"]["adversary"] and rec["method"] == method
            # the predictions are the end-of-epoch model's own on those features
            logits = model.linear(rec["features"])
            assert torch.equal(logits.argmax(1), rec["predictions"])
        a, b = (record(p)["features"] for p in runs[method].values())
        assert not torch.equal(a, b)  # epochs 1 and 3 recorded different examples with different models
    assert not any(adversarial_path(p).exists() for p in runs["st"].values())


def test_the_record_is_what_training_fed_the_model(tmp_path, monkeypatch) -> None:
    # Replace the training attack by a known map: the record must then hold, in dataset order, the features of
    # exactly those images under the end-of-epoch model in eval mode (not of fresh attacks, not shuffled).
    def known_attack(model, x, y, **kw):
        return (1.0 - x).flip(-1)

    monkeypatch.setattr(ncpipe.train.attacks, "pgd", known_attack)
    spec = spec_of("at")
    outs = train(tmp_path, spec)
    x = to_float(load_data(spec).x_train)
    model, ckpt = load_checkpoint(outs[3])
    with torch.no_grad():
        expected, _ = model.eval().forward_features(known_attack(model, x, None))
    torch.testing.assert_close(record(outs[3])["features"], expected, rtol=1e-5, atol=1e-6)


def test_resumed_run_records_the_same_examples(tmp_path, runs) -> None:
    spec = spec_of("trades")
    train(tmp_path, spec, stop_after_epoch=2)  # killed after epoch 2: the epoch-3 record comes after resuming
    outs = train(tmp_path, spec)
    for e, path in outs.items():
        mine, ref = record(path), record(runs["trades"][e])
        assert torch.equal(mine["features"], ref["features"]) and torch.equal(mine["predictions"],
                                                                              ref["predictions"])


def test_recording_can_be_switched_off(tmp_path) -> None:
    spec = {**spec_of("at"), "record_adversarial": False, "checkpoints": [1]}
    spec["optim"] = {**spec["optim"], "epochs": 1}
    outs = train(tmp_path, spec)
    assert not adversarial_path(outs[1]).exists()


def test_a_damaged_or_stale_record_is_refused(tmp_path, runs) -> None:
    ckpt = tmp_path / "epoch1.pt"
    ckpt.write_bytes(Path(runs["at"][1]).read_bytes())
    payload = torch.load(adversarial_path(runs["at"][1]), map_location="cpu", weights_only=False)
    bad = copy.deepcopy(payload)
    bad["train_adversarial"]["features"][0, 0] += 1.0
    torch.save(bad, adversarial_path(ckpt))  # bytes changed after the digest was written
    with pytest.raises(CorruptCheckpointError, match="corrupted"):
        record(ckpt)
    # the record of another training of this run (here: of epoch 3) is ignored, never used for this one
    adversarial_path(ckpt).write_bytes(adversarial_path(runs["at"][3]).read_bytes())
    assert record(ckpt) is None


def extract(runs, tmp_path: Path, method: str, eps: str, **over: Any) -> Path:
    spec = json.loads(grid.features_spec(CONFIG, wildcards(method, epoch=3, norm="linf", eps=eps)))
    spec.update(over)
    out = tmp_path / f"{method}_{eps}_{len(spec['kinds'])}.h5"
    extract_features(spec, runs[method][3], str(out))
    return out


def test_features_rule_writes_train_adv_only_at_the_training_threat(tmp_path, runs) -> None:
    at = extract(runs, tmp_path, "at", "32")
    assert ("train", "train_adv") in io.groups(at) and ("test", "train_adv") not in io.groups(at)
    rec = record(runs["at"][3])
    with h5py.File(at) as f:
        g = f["train/train_adv"]
        np.testing.assert_array_equal(g["features"][:], rec["features"].numpy())
        np.testing.assert_array_equal(g["labels"][:], f["train/clean/labels"][:])
        assert g.attrs["kind"] == "train_adv" and g.attrs["epsilon_255"] == 32 and g.attrs["method"] == "at"
    df = evaluate.evaluate_dump(at, "at_linf32")
    got = df[(df.perturbation == "train_adv") & (df.grouping == "true")].set_index("metric")["value"]
    assert {"nc1", "accuracy", "align_angle_centred", "ncc_train_means_accuracy"} <= set(got.index)
    with h5py.File(at) as f:
        labels = f["train/clean/labels"][:]
    assert got["accuracy"] == pytest.approx(float((rec["predictions"].numpy() == labels).mean()))
    # another evaluation threat, a standard-trained model, or a config without the kind: no group
    assert ("train", "train_adv") not in io.groups(extract(runs, tmp_path, "at", "16"))
    assert ("train", "train_adv") not in io.groups(extract(runs, tmp_path, "st", "32"))
    kinds = [k for k in CONFIG["attack"]["kinds"] if k != "train_adv"]
    assert ("train", "train_adv") not in io.groups(extract(runs, tmp_path, "trades", "32", kinds=kinds))


def test_a_changed_train_split_is_an_error(tmp_path, runs) -> None:
    spec = json.loads(grid.features_spec(CONFIG, wildcards("at", epoch=3, norm="linf", eps="32")))
    spec["data"] = {**spec["data"], "train_per_class": 7}
    with pytest.raises(ValueError, match="data config changed since training"):
        extract_features(spec, runs["at"][3], str(tmp_path / "x.h5"))
    assert not (tmp_path / "x.h5").exists()


def test_a_deleted_record_skips_train_adv_and_says_so(tmp_path, runs) -> None:
    """A user may delete epoch{E}.adv.pt: the dump then lacks train_adv and says why; nothing retrains."""
    ckpt = tmp_path / "epoch3.pt"
    ckpt.write_bytes(Path(runs["at"][3]).read_bytes())  # a copy without its record beside it
    spec = json.loads(grid.features_spec(CONFIG, wildcards("at", epoch=3, norm="linf", eps="32")))
    extract_features(spec, str(ckpt), str(tmp_path / "x.h5"))
    assert ("train", "train_adv") not in io.groups(tmp_path / "x.h5")
    with h5py.File(tmp_path / "x.h5") as f:
        assert f.attrs["train_adv_record"] == "missing"
