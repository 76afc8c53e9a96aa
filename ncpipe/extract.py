"""Attack and extract: penultimate features of clean and perturbed data, one checkpoint x one threat model."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from . import attacks
from .checkpoint import adversarial_path, load_adversarial_record
from .data import to_float
from .io import create_dump, set_attrs, write_array, write_matrix
from .progress import Meter, duration, log_header
from .session import open_evaluation
from .specs import Adversary, FeaturesSpec, Storage, Threat

log = logging.getLogger("ncpipe.extract")

TRAIN_ADV = attacks.TRAIN_ADV  # made by training itself, not by this stage (see _write_train_adv)


def extract_features(spec: FeaturesSpec | dict[str, Any], checkpoint: str, out_h5: str) -> None:
    """Write one HDF5 dump: every split x perturbation kind of ``spec`` for the model in ``checkpoint``."""
    spec = FeaturesSpec.from_dict(spec, "features spec")
    ev = open_evaluation(spec, checkpoint)
    ckpt, meta, threat, device = ev.ckpt, ev.meta, spec.threat, ev.device
    root = {
        "dataset": meta["dataset"], "arch": meta["arch"], "width": meta["width"], "method": meta["method"],
        "seed": meta["seed"], "epoch": ckpt["epoch"], "num_classes": meta["num_classes"],
        **threat.attrs(), "training_adversary": ckpt["spec"].get("adversary"),
        **{k: v for k, v in ev.provenance().items() if k not in threat.attrs()},
        "feature_layer": "penultimate",
        **({"regime": meta["regime"], "external": meta["external"]} if "external" in meta else {}),
    }
    bs = spec.batch_size
    label = _progress_label(ev)
    kinds = [k for k in spec.kinds if k != TRAIN_ADV]
    log_header(label, {"splits": list(spec.splits), "kinds": list(spec.kinds), **threat.attrs(),
                       "batch_size": bs, "checkpoint": checkpoint}, device, spec.runtime, ev.amp, logger=log)
    total = Meter(label, sum(len(ev.data.split(s)[1]) for s in spec.splits) * len(kinds), unit="image",
                  bars=False)
    with create_dump(out_h5, root, expected_bytes=_dump_bytes(spec, ev)) as f:
        cls = f.create_group("classifier")
        write_matrix(cls, "weight", ev.model.linear.weight.detach().cpu().numpy(), compression=None)
        write_matrix(cls, "bias", ev.model.linear.bias.detach().cpu().numpy(), compression=None)
        for split in spec.splits:
            xs, ys = ev.data.split(split)
            xs, ys = xs.to(device), ys.to(device)
            lab = ys.cpu().numpy().astype(np.int64)
            targets_all = attacks.target_labels(ys, ev.num_classes, rule=spec.target_rule,
                                                generator=ev.generator)
            for kind in kinds:
                rows = _kind_rows(spec, kind, split, ys)
                if rows is not None and len(rows) == 0:
                    continue  # this kind does not attack this split (attack.autoattack.splits)
                kx, ky = (xs, ys) if rows is None else (xs[rows], ys[rows])
                kt = targets_all if rows is None else targets_all[rows]
                feats, preds = [], []
                meter = Meter(f"{label} {split}/{kind}", math.ceil(len(kx) / bs), unit="batch")
                for i in range(0, len(kx), bs):
                    xb, yb = to_float(kx[i:i + bs]), ky[i:i + bs]
                    xp = ev.perturb(kind, xb, yb, targets=kt[i:i + bs])
                    h, logits = ev.features(xp)
                    feats.append(h.cpu())
                    preds.append(logits.argmax(1).cpu())
                    meter.update(1, len(yb))
                meter.close()
                total.update(len(kx), len(kx), heartbeat=False)
                meter.line("done", images=len(kx), total_elapsed=duration(total.elapsed),
                           total_eta=duration(total.eta()))
                params = attacks.kind_params(kind, **spec.threat_of(kind).attack_kwargs(),
                                             target_rule=spec.target_rule,
                                             input_numel=int(xs[0].numel()), options=spec.kind_options(kind))
                klab = lab if rows is None else lab[rows.cpu().numpy()]
                g = _write_group(f, split, kind, torch.cat(feats).numpy(), klab, torch.cat(preds).numpy(),
                                 params, spec.storage)
                if rows is not None:
                    write_array(g, "indices", rows.cpu().numpy())
                if kind == "targeted":
                    write_array(g, "targets", targets_all.cpu().numpy())
            if TRAIN_ADV in spec.kinds and split == "train":
                _write_train_adv(f, checkpoint, ckpt, threat, lab, spec.storage)


def _dump_bytes(spec: FeaturesSpec, ev: Any) -> int:
    """An upper bound of the dump's size (uncompressed, plus 1 MiB of HDF5 overhead), checked against the
    free space before writing: HDF5 can crash the process on a full disk instead of raising."""
    dim = int(ev.model.linear.in_features)
    item = np.dtype(spec.storage.dtype).itemsize
    rows = sum(len(ev.data.split(s)[1]) for s in spec.splits) * len(spec.kinds)
    return rows * (dim * item + 3 * 8) + 4 * dim * (ev.num_classes + 1) + (1 << 20)


def _kind_rows(spec: FeaturesSpec, kind: str, split: str, ys: torch.Tensor) -> torch.Tensor | None:
    """The rows of ``split`` that ``kind`` perturbs (None: all; empty: the kind skips the split).

    Only autoattack is restricted: to its splits and, with ``per_class`` > 0, to the first ``per_class``
    samples of every class in data order (a fixed subset, as RobustBench evaluates a fixed test subset).
    """
    if kind != "autoattack":
        return None
    aa = spec.autoattack
    if aa is None:
        return None
    if split not in aa.splits:
        return torch.zeros(0, dtype=torch.long, device=ys.device)
    if aa.per_class <= 0:
        return None
    y = ys.cpu()
    keep = torch.zeros(len(y), dtype=torch.bool)
    for c in torch.unique(y):
        keep[torch.nonzero(y == c).reshape(-1)[:aa.per_class]] = True
    return torch.nonzero(keep).reshape(-1).to(ys.device)


def _write_group(f: Any, split: str, kind: str, features: np.ndarray, labels: np.ndarray,
                 predictions: np.ndarray, attrs: dict[str, Any], storage: Storage) -> Any:
    """One ``/{split}/{kind}`` group: features, labels, predictions; ``attrs`` plus split, size, accuracy."""
    g = f.create_group(f"{split}/{kind}")
    write_matrix(g, "features", features, dtype=storage.dtype, compression=storage.compression)
    preds = predictions.astype(np.int64)
    write_array(g, "labels", labels)
    write_array(g, "predictions", preds)
    acc = float((preds == labels).mean()) if len(labels) else math.nan
    set_attrs(g, {**attrs, "split": split, "num_samples": len(labels), "accuracy": acc})
    log.info("%s/%s: accuracy %.4f", split, kind, acc)
    return g


def _write_train_adv(f: Any, checkpoint: str, ckpt: dict[str, Any], threat: Threat, labels: np.ndarray,
                     storage: Storage) -> None:
    """The group ``train/train_adv``: the training-time adversarial examples recorded beside the checkpoint.

    Written only where they answer the same question as the other kinds: an AT/TRADES checkpoint whose
    training threat (norm, epsilon) is this cell's evaluation threat. ST has none; another threat's cells
    skip it (their fresh PGD is the perturbed data there).  A record the user deleted
    (``checkpoints/epoch{E}.adv.pt``) is skipped with a log line and the root attribute
    ``train_adv_record = "missing"``: it can only be made again by retraining, which nothing here triggers.
    """
    rec = load_adversarial_record(checkpoint, ckpt)
    if rec is None:
        if ckpt["meta"]["method"] != "st":
            log.warning("%s: no recorded adversarial features beside %s (%s): kind %s skipped; only "
                        "retraining makes them again", TRAIN_ADV, checkpoint, adversarial_path(checkpoint),
                        TRAIN_ADV)
            f.attrs["train_adv_record"] = "missing"
        else:
            log.info("%s: standard training records no adversarial examples", TRAIN_ADV)
        return
    adv = Adversary.from_dict(rec["adversary"], "train_adversarial.adversary").threat()
    if adv.norm != threat.norm or float(adv.epsilon) != float(threat.epsilon):
        log.info("%s: trained at %s eps %s/255, this cell evaluates %s eps %s/255; not written", TRAIN_ADV,
                 adv.norm, adv.epsilon, threat.norm, threat.epsilon)
        return
    feats = rec["features"].float().numpy()
    if len(feats) != len(labels):
        raise ValueError(f"the checkpoint recorded {len(feats)} training-time adversarial examples, but the "
                         f"train split has {len(labels)} samples: the data config changed since training")
    attrs = {"kind": TRAIN_ADV, "norm": adv.norm, "epsilon": adv.epsilon_px, "epsilon_255": adv.epsilon,
             "step": adv.step_px, "step_255": adv.step, "steps": adv.steps, "method": rec["method"],
             "source": "recorded during training",
             "model_mode": "made by the mid-epoch model during training; features from the end-of-epoch "
                           "model in eval mode",
             "at_attack_mode": rec["at_attack_mode"], "trades_bn_quirk": rec["trades_bn_quirk"]}
    _write_group(f, "train", TRAIN_ADV, feats, labels, rec["predictions"].numpy(), attrs, storage)


def _progress_label(ev: Any) -> str:
    """``features mnist5k/vgg11bn/at_linf32/seed1/epoch20 linf32``: run, checkpoint and threat."""
    from .grid import regime_id

    m = ev.meta
    regime = m.get("regime") or regime_id(m["method"], ev.ckpt["spec"].get("adversary"))  # external: its own
    t = ev.spec.threat
    run = f"{m['dataset']}/{m['arch']}/{regime}/seed{m['seed']}"
    return f"features {run}/epoch{ev.ckpt['epoch']} {t.norm}{t.epsilon:g}"
