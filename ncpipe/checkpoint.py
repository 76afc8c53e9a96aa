"""The checkpoint file: its format, atomic save with digests, verified load, and the adversarial record.

What belongs here: everything that writes or reads a ``.pt`` checkpoint (``checkpoint_payload``,
``save_atomic``, ``verify_digest``, ``load_checkpoint``) and the record of training-time adversarial examples
stored in it (``adversarial_record``).  Any stage that needs a trained model imports this module, never the
trainer.  The resume state of an interrupted run is the trainer's own business (``ncpipe.train``).

A checkpoint is a ``torch.save`` dict: ``model`` (state dict), ``epoch``, ``spec`` (the training spec as a
dict), ``meta`` (what rebuilds the model: arch, width, classes, channels, normalisation, stem; plus dataset,
method, seed) and ``model_sha256``.

The record of an AT/TRADES checkpoint epoch lives in a file of its own beside it, ``epoch{E}.adv.pt``
(:func:`adversarial_path`), so that a user can keep or delete it alone: it is no declared output of the train
rule (deleting it never triggers retraining) and the features rule reads it when present
(:func:`load_adversarial_record`).  It names the checkpoint it belongs to (epoch and spec hash), so a stale
record of an earlier training is never taken for the current one, and carries the sha256 of its tensors.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .models import NCModel, build_model
from .runtime import autocast
from .specs import Spec
from .utils import atomic_output, spec_hash, state_digest

log = logging.getLogger("ncpipe.checkpoint")
ADVERSARIAL_SUFFIX = ".adv.pt"

if TYPE_CHECKING:  # pragma: no cover
    from .data import ImageData
    from .specs import TrainSpec


class CorruptCheckpointError(RuntimeError):
    """A checkpoint is truncated, unreadable, not an ncpipe checkpoint, or its bytes were damaged."""


def checkpoint_payload(model: NCModel, spec: TrainSpec | dict[str, Any], data: ImageData,
                       epoch: int) -> dict[str, Any]:
    s = spec.to_dict() if isinstance(spec, Spec) else spec
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "epoch": epoch,
        "spec": s,
        "meta": {"arch": s["arch"], "width": s["width"], "num_classes": data.num_classes,
                 "in_channels": data.in_channels, "mean": list(data.mean), "std": list(data.std),
                 "stem": data.stem, "dataset": data.name, "method": s["method"], "seed": s["seed"]},
    }


def _record_tensors(record: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in record.items() if isinstance(v, torch.Tensor)}


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save under a temporary name, then rename; a payload with a ``model`` state dict gets its digest
    (``model_sha256``), which ``load_checkpoint`` and the resume logic check."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = {**obj, "model_sha256": state_digest(obj["model"])}
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def verify_digest(payload: dict[str, Any], path: str | Path) -> None:
    """Raise ``CorruptCheckpointError`` when the tensors no longer match the digest written with them."""
    recorded = payload.get("model_sha256")
    bad = recorded is not None and state_digest(payload["model"]) != recorded
    if bad:
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupted: its tensors do not match the sha256 recorded when it was "
            "written; delete it and rerun training"
        )


@torch.no_grad()
def adversarial_record(model: NCModel, x_adv: torch.Tensor, spec: TrainSpec, amp: torch.dtype | None,
                       batch_size: int = 1024) -> dict[str, Any]:
    """Penultimate features and predictions of one epoch's training-time adversarial examples.

    The authors measure AT/TRADES "perturbed data" on the adversarial batches the model trained on during the
    epoch (made mid-epoch, by the model of that moment), passed through the end-of-epoch model in eval mode
    (paper.md section 5, item 4); ``x_adv`` holds them in dataset order. The features rule writes them as the
    perturbation kind ``train_adv``.  Features are stored in ``spec.record_dtype``; ``adversary`` is the
    attack as it ran (TRADES: with its own step).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats, preds = [], []
    for i in range(0, len(x_adv), batch_size):
        with autocast(device.type, amp):
            h, logits = model.forward_features(x_adv[i:i + batch_size].to(device))
        feats.append(h.float().cpu())
        preds.append(logits.argmax(1).cpu())
    model.train(was_training)
    assert spec.adversary is not None
    adversary = spec.adversary.to_dict()
    if spec.method == "trades" and spec.trades is not None:
        adversary = {k: v for k, v in spec.trades.threat(spec.adversary).to_dict().items() if k in adversary}
    dtype = getattr(torch, spec.record_dtype or "float32")
    return {"features": torch.cat(feats).to(dtype), "predictions": torch.cat(preds), "method": spec.method,
            "adversary": adversary,
            "at_attack_mode": spec.at_attack_mode if spec.method == "at" else None,
            "trades_bn_quirk": spec.trades.bn_quirk if spec.method == "trades" and spec.trades else None}


def adversarial_path(checkpoint: str | Path) -> Path:
    """The record file beside a checkpoint: ``epoch{E}.pt`` -> ``epoch{E}.adv.pt``."""
    p = Path(checkpoint)
    return p.with_name(p.name.removesuffix(".pt") + ADVERSARIAL_SUFFIX)


def _owner(ckpt: dict[str, Any]) -> dict[str, Any]:
    return {"epoch": ckpt["epoch"], "spec_hash": spec_hash(ckpt["spec"])}


def save_adversarial_record(record: dict[str, Any], path: str | Path, ckpt: dict[str, Any]) -> None:
    """Write ``record`` atomically, naming the checkpoint payload ``ckpt`` it belongs to."""
    payload = {"train_adversarial": record, "checkpoint": _owner(ckpt),
               "sha256": state_digest(_record_tensors(record))}
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def load_adversarial_record(checkpoint: str | Path, ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The record beside ``checkpoint`` (payload ``ckpt``), or None (with a log line) when there is none.

    A missing file is no error (ST has none; a user may have deleted it: the ``train_adv`` kind is then
    skipped, nothing is retrained).  A record of another training (a stale file) is refused with a log
    line; a damaged one raises ``CorruptCheckpointError``.
    """
    path = adversarial_path(checkpoint)
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
        record, owner = payload["train_adversarial"], payload["checkpoint"]
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a damaged zip
        raise CorruptCheckpointError(
            f"recorded adversarial features {path} are unreadable or truncated "
            f"({type(err).__name__}: {err}); delete the file (train_adv is then skipped) or rerun training"
        ) from err
    if state_digest(_record_tensors(record)) != payload.get("sha256"):
        raise CorruptCheckpointError(
            f"recorded adversarial features {path} are corrupted: their tensors do not match the sha256 "
            "recorded when they were written; delete the file (train_adv is then skipped) or rerun training"
        )
    if owner != _owner(ckpt):
        log.warning("%s belongs to another training of this run (%s, the checkpoint is %s); ignored", path,
                    owner, _owner(ckpt))
        return None
    return record


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[NCModel, dict[str, Any]]:
    """Rebuild a model from a checkpoint (eval mode, on ``device``) and return it with the payload.

    A truncated or foreign file, or one whose tensors fail their digest, gives a ``CorruptCheckpointError``
    that names it.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        meta = ckpt["meta"]
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a damaged zip
        raise CorruptCheckpointError(
            f"checkpoint {path} is unreadable or truncated ({type(err).__name__}: {err}); "
            "delete it and rerun training"
        ) from err
    verify_digest(ckpt, path)
    model = build_model(meta["arch"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
                        mean=meta["mean"], std=meta["std"], width=meta["width"], stem=meta["stem"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt
