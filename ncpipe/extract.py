"""Attack and extract: penultimate features of clean and perturbed data, one checkpoint x one threat model."""

from __future__ import annotations

import datetime as dt
import logging
import math
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import __version__, attacks
from .data import to_float
from .io import create_dump, set_attrs, write_matrix
from .train import load_checkpoint, load_data, prepare_model, runtime_setup
from .utils import sha256_file

log = logging.getLogger("ncpipe.extract")

TRAIN_ADV = attacks.TRAIN_ADV  # made by training itself, not by this stage (see _write_train_adv)


def targeted_kwargs(adv: dict[str, Any], budget: dict[str, Any] | None) -> dict[str, Any]:
    """The targeted kind's attack_kwargs: the threat's scaled by the config's ``attack.targeted`` factors."""
    b = budget or {}
    return {**adv, "epsilon": adv["epsilon"] * float(b.get("epsilon_factor", 1.0)),
            "step": adv["step"] * float(b.get("step_factor", 1.0)),
            "steps": adv["steps"] * int(b.get("steps_factor", 1))}


def attack_kwargs(threat: dict[str, Any]) -> dict[str, Any]:
    """The features rule's threat slice (1/255 units) as pixel-unit keyword arguments of attacks.perturb."""
    return {"norm": threat["norm"], "epsilon": threat["epsilon"] / 255.0, "step": threat["step"] / 255.0,
            "steps": threat["steps"], "restarts": threat["restarts"]}


@torch.no_grad()
def _features(model: torch.nn.Module, x: torch.Tensor,
              amp: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        h, logits = model.forward_features(x)
    return h.float(), logits.float()


def extract_features(spec: dict[str, Any], checkpoint: str, out_h5: str) -> None:
    """Write one HDF5 dump: every split x perturbation kind of ``spec`` for the model in ``checkpoint``."""
    device, amp = runtime_setup(spec["runtime"])
    model, ckpt = load_checkpoint(checkpoint, device)
    net = prepare_model(model, {**spec["runtime"], "compile": False}, device)
    net.eval()
    data = load_data(spec)
    threat, meta = spec["threat"], ckpt["meta"]
    adv = attack_kwargs(threat)
    # A fixed generator per (seed, epoch): reruns of a job give the same noise and random starts.
    gen = torch.Generator(device=device).manual_seed(int(meta["seed"]) * 100_003 + int(ckpt["epoch"]))
    root = {
        "dataset": meta["dataset"], "arch": meta["arch"], "width": meta["width"], "method": meta["method"],
        "seed": meta["seed"], "epoch": ckpt["epoch"], "num_classes": meta["num_classes"],
        "norm": threat["norm"], "epsilon": threat["epsilon"] / 255.0, "epsilon_255": threat["epsilon"],
        "step": threat["step"] / 255.0, "steps": threat["steps"], "restarts": threat["restarts"],
        "training_adversary": ckpt["spec"].get("adversary"),
        "checkpoint": str(checkpoint), "checkpoint_sha256": sha256_file(checkpoint),
        "config": spec, "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "ncpipe_version": __version__, "torch_version": torch.__version__, "feature_layer": "penultimate",
    }
    storage = spec.get("storage", {})
    bs = spec["batch_size"]
    with create_dump(out_h5, root) as f:
        cls = f.create_group("classifier")
        write_matrix(cls, "weight", model.linear.weight.detach().cpu().numpy(), compression=None)
        write_matrix(cls, "bias", model.linear.bias.detach().cpu().numpy(), compression=None)
        for split in spec["splits"]:
            xs, ys = data.split(split)
            xs, ys = xs.to(device), ys.to(device)
            lab = ys.cpu().numpy().astype(np.int64)
            targets_all = attacks.target_labels(ys, meta["num_classes"], rule=spec["target_rule"],
                                                generator=gen)
            for kind in [k for k in spec["kinds"] if k != TRAIN_ADV]:
                kw = targeted_kwargs(adv, spec.get("targeted")) if kind == "targeted" else adv
                feats, preds = [], []
                for i in tqdm(range(0, len(xs), bs), desc=f"{split}/{kind}", mininterval=5, leave=False):
                    xb, yb = to_float(xs[i:i + bs]), ys[i:i + bs]
                    xp = attacks.perturb(kind, net, xb, yb, **kw, targets=targets_all[i:i + bs],
                                         generator=gen, amp_dtype=amp)
                    h, logits = _features(net, xp, amp)
                    feats.append(h.cpu())
                    preds.append(logits.argmax(1).cpu())
                params = attacks.kind_params(kind, **kw, target_rule=spec["target_rule"],
                                             input_numel=int(xs[0].numel()))
                g = _write_group(f, split, kind, torch.cat(feats).numpy(), lab, torch.cat(preds).numpy(),
                                 params, storage)
                if kind == "targeted":
                    g.create_dataset("targets", data=targets_all.cpu().numpy().astype(np.int64))
            if TRAIN_ADV in spec["kinds"] and split == "train":
                _write_train_adv(f, ckpt, threat, lab, storage)


def _write_group(f: Any, split: str, kind: str, features: np.ndarray, labels: np.ndarray,
                 predictions: np.ndarray, attrs: dict[str, Any], storage: dict[str, Any]) -> Any:
    """One ``/{split}/{kind}`` group: features, labels, predictions; ``attrs`` plus split, size, accuracy."""
    g = f.create_group(f"{split}/{kind}")
    write_matrix(g, "features", features, dtype=storage.get("dtype", "float32"),
                 compression=storage.get("compression", "gzip"))
    preds = predictions.astype(np.int64)
    g.create_dataset("labels", data=labels)
    g.create_dataset("predictions", data=preds)
    acc = float((preds == labels).mean()) if len(labels) else math.nan
    set_attrs(g, {**attrs, "split": split, "num_samples": len(labels), "accuracy": acc})
    log.info("%s/%s: accuracy %.4f", split, kind, acc)
    return g


def _write_train_adv(f: Any, ckpt: dict[str, Any], threat: dict[str, Any], labels: np.ndarray,
                     storage: dict[str, Any]) -> None:
    """The group ``train/train_adv``: the training-time adversarial examples recorded with the checkpoint.

    Written only where they answer the same question as the other kinds: an AT/TRADES checkpoint whose
    training threat (norm, epsilon) is this cell's evaluation threat. ST has none; another threat's cells
    skip it (their fresh PGD is the perturbed data there).
    """
    rec = ckpt.get("train_adversarial")
    if rec is None:
        log.info("%s: no training-time adversarial examples in the checkpoint (method %s)", TRAIN_ADV,
                 ckpt["meta"]["method"])
        return
    adv = rec["adversary"]
    if adv["norm"] != threat["norm"] or float(adv["epsilon"]) != float(threat["epsilon"]):
        log.info("%s: trained at %s eps %s/255, this cell evaluates %s eps %s/255; not written", TRAIN_ADV,
                 adv["norm"], adv["epsilon"], threat["norm"], threat["epsilon"])
        return
    feats = rec["features"].numpy()
    if len(feats) != len(labels):
        raise ValueError(f"the checkpoint recorded {len(feats)} training-time adversarial examples, but the "
                         f"train split has {len(labels)} samples: the data config changed since training")
    attrs = {"kind": TRAIN_ADV, "norm": adv["norm"], "epsilon": adv["epsilon"] / 255.0,
             "epsilon_255": adv["epsilon"], "step": adv["step"] / 255.0, "step_255": adv["step"],
             "steps": adv["steps"], "method": rec["method"], "source": "recorded during training",
             "model_mode": "made by the mid-epoch model during training; features from the end-of-epoch "
                           "model in eval mode",
             "at_attack_mode": rec["at_attack_mode"], "trades_bn_quirk": rec["trades_bn_quirk"]}
    _write_group(f, "train", TRAIN_ADV, feats, labels, rec["predictions"].numpy(), attrs, storage)
