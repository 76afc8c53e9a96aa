"""The checkpoint file: its format, atomic save with digests, verified load, and the adversarial record.

What belongs here: everything that writes or reads a ``.pt`` checkpoint (``checkpoint_payload``,
``save_atomic``, ``verify_digest``, ``load_checkpoint``) and the record of training-time adversarial examples
stored in it (``adversarial_record``).  Any stage that needs a trained model imports this module, never the
trainer.  The resume state of an interrupted run is the trainer's own business (``ncpipe.train``).

A checkpoint is a ``torch.save`` dict: ``model`` (state dict), ``epoch``, ``spec`` (the training spec as a
dict), ``meta`` (what rebuilds the model: arch, width, classes, channels, normalisation, stem; plus dataset,
method, seed), for AT/TRADES checkpoint epochs ``train_adversarial``, and ``payload_sha256``: one sha256 over
*everything else* in the dict (``payload_digest``: every tensor's bytes, every number, string and nesting), so
an edited epoch, spec or record fails the load like a flipped weight does.  The file ``epoch{E}.pt`` must also
hold epoch E.  ``save_atomic`` / ``load_verified`` give the same guarantee to any other torch-saved dict (the
trainer's resume state; sidecar files beside a checkpoint).  Checkpoints of older ncpipe versions carry only
``model_sha256`` (the weights): they still load, with a warning.

The record of an AT/TRADES checkpoint epoch lives in a file of its own beside it, ``epoch{E}.adv.pt``
(:func:`adversarial_path`), so that a user can keep or delete it alone: it is no declared output of the train
rule (deleting it never triggers retraining) and the features rule reads it when present
(:func:`load_adversarial_record`).  It names the checkpoint it belongs to (epoch and spec hash), so a stale
record of an earlier training is never taken for the current one, and carries a ``payload_sha256`` like a
checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import math
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .models import NCModel, build_model
from .runtime import autocast
from .specs import Spec
from .utils import atomic_output, regenerate_hint, spec_hash, state_digest

if TYPE_CHECKING:  # pragma: no cover
    from .data import ImageData
    from .specs import TrainSpec


log = logging.getLogger("ncpipe.checkpoint")

ADVERSARIAL_SUFFIX = ".adv.pt"
DIGEST_KEY = "payload_sha256"
# digests written by older versions; never part of the payload digest
_DIGEST_KEYS = {DIGEST_KEY, "model_sha256", "train_adversarial_sha256"}
_EPOCH_FILE = re.compile(r"epoch(\d+)\.pt")


class CorruptCheckpointError(RuntimeError):
    """A checkpoint is truncated, unreadable, not an ncpipe checkpoint, or its bytes were damaged."""


def _feed(h: Any, obj: Any) -> None:
    """Feed ``obj`` to the hash ``h`` canonically: type-tagged, length-prefixed, dict keys sorted."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"A{a.dtype.str}{a.shape}|".encode())
        h.update(a.tobytes() if a.dtype != object else repr(a.tolist()).encode())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}|".encode())
        for k in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, list | tuple):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}|".encode())
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, str):
        b = obj.encode()
        h.update(f"S{len(b)}|".encode() + b)
    elif isinstance(obj, bytes | bytearray):
        h.update(f"B{len(obj)}|".encode() + bytes(obj))
    elif obj is None or isinstance(obj, bool | int | np.integer | np.bool_):
        h.update(f"I{type(obj).__name__}{obj!r}|".encode())
    elif isinstance(obj, float | np.floating):
        h.update(f"F{float(obj).hex() if not math.isnan(obj) else 'nan'}|".encode())
    elif isinstance(obj, torch.dtype | torch.device | torch.Size):
        h.update(f"O{obj!r}|".encode())
    else:  # anything else torch.save can store: its pickle (deterministic for plain objects)
        b = pickle.dumps(obj, protocol=4)
        h.update(f"P{len(b)}|".encode() + b)


def payload_digest(payload: dict[str, Any]) -> str:
    """sha256 over every entry of a torch-saved dict except its digests (exact bytes of every tensor)."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k not in _DIGEST_KEYS})
    return h.hexdigest()


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


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save under a temporary name, then rename; a dict gets its ``payload_sha256``, which
    ``load_verified`` (``load_checkpoint``, the resume logic) checks."""
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k not in _DIGEST_KEYS}
        obj[DIGEST_KEY] = payload_digest(obj)
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def verify_digest(payload: dict[str, Any], path: str | Path) -> None:
    """Raise ``CorruptCheckpointError`` when the payload no longer matches the digest written with it."""
    recorded = payload.get(DIGEST_KEY)
    if recorded is not None:
        bad = payload_digest(payload) != recorded
        what = "its contents (weights, epoch, spec, metadata, records)"
    else:  # an older ncpipe: the tensors alone were digested
        bad = "model_sha256" in payload and state_digest(payload["model"]) != payload["model_sha256"]
        recorded = payload.get("train_adversarial_sha256")
        rec = payload.get("train_adversarial") or {}
        tensors = {k: v for k, v in rec.items() if isinstance(v, torch.Tensor)}
        bad |= recorded is not None and state_digest(tensors) != recorded
        what = "its tensors"
        if not bad:
            log.warning("%s was written by an older ncpipe: only its weights are covered by a digest", path)
    if bad:
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupted: {what} do not match the sha256 recorded when it was "
            f"written; {regenerate_hint(path)}"
        )


def load_verified(path: str | Path) -> dict[str, Any]:
    """``torch.load`` of a dict written by ``save_atomic``, refused (``CorruptCheckpointError`` naming the
    file and the command that regenerates it) when unreadable, truncated or not matching its digest."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(payload, dict):
            raise TypeError(f"holds a {type(payload).__name__}, not a dict")
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a damaged zip
        raise CorruptCheckpointError(
            f"checkpoint {path} is unreadable or truncated ({type(err).__name__}: {err}); "
            f"{regenerate_hint(path)}"
        ) from err
    verify_digest(payload, path)
    return payload


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
    """Write ``record`` atomically with its payload digest, naming the checkpoint payload ``ckpt`` (its
    owner)."""
    save_atomic({"train_adversarial": record, "checkpoint": _owner(ckpt)}, path)


def load_adversarial_record(checkpoint: str | Path, ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The record beside ``checkpoint`` (payload ``ckpt``), or None (with a log line) when there is none.

    A missing file is no error (ST has none; a user may have deleted it: the ``train_adv`` kind is then
    skipped, nothing is retrained).  A record of another training (a stale file) is refused with a log
    line; a damaged one raises ``CorruptCheckpointError``.
    """
    path = adversarial_path(checkpoint)
    if not path.exists():
        return None
    fix = "delete the file (train_adv is then skipped) or rerun training"
    try:
        payload = load_verified(path)
        record, owner = payload["train_adversarial"], payload["checkpoint"]
    except CorruptCheckpointError as err:
        raise CorruptCheckpointError(
            f"recorded adversarial features {path} are damaged ({err}); {fix}"
        ) from err
    except KeyError as err:
        raise CorruptCheckpointError(f"recorded adversarial features {path} lack {err}; {fix}") from err
    if owner != _owner(ckpt):
        log.warning("%s belongs to another training of this run (%s, the checkpoint is %s); ignored", path,
                    owner, _owner(ckpt))
        return None
    return record


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[NCModel, dict[str, Any]]:
    """Rebuild a model from a checkpoint (eval mode, on ``device``) and return it with the payload.

    A truncated or foreign file, one that fails its digest, or an ``epoch{E}.pt`` that holds another epoch
    gives a ``CorruptCheckpointError`` that names it and the command that regenerates it.
    """
    ckpt = load_verified(path)
    meta = ckpt.get("meta")
    if not isinstance(meta, dict) or "model" not in ckpt:
        raise CorruptCheckpointError(f"{path} is not an ncpipe checkpoint (no 'meta'/'model'); "
                                     f"{regenerate_hint(path)}")
    m = _EPOCH_FILE.fullmatch(Path(path).name)
    if m and ckpt.get("epoch") != int(m.group(1)):
        raise CorruptCheckpointError(f"checkpoint {path} holds epoch {ckpt.get('epoch')!r}, not the epoch "
                                     f"{m.group(1)} its name says; {regenerate_hint(path)}")
    model = build_model(meta["arch"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
                        mean=meta["mean"], std=meta["std"], width=meta["width"], stem=meta["stem"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt
