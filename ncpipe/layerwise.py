"""Layerwise Neural Collapse of one (final) checkpoint: NC1 and NCC accuracy at every probe layer.

The authors did not release this code (paper.md 1.7, 2.8, 5.8); the choices made here:

* probes: ``model.probe_layers()`` (paper.md 2.8), features = the module's output, flattened (D up to 65,536);
* data: the training split (``spec.splits``), clean and untargeted PGD against the *full network* with the
  features rule's threat (``spec.threat``), in eval mode;
* per probe and perturbation: ``nc1`` / ``nc1_over_c`` (true labels, that data's own means, exact low-rank
  formula of ``ncpipe.metrics``), ``ncc_accuracy_own_means`` and ``ncc_accuracy_clean_means`` (the NCC rule
  with the *clean* class means of that layer; for clean data both are the same number).

Everything streams batch by batch through ``metrics.ClassStats`` (two passes: the NC1 projections need the
class means first). The PGD inputs of pass 1 are kept on the CPU and replayed in pass 2, so both passes see
exactly the same perturbed points (CIFAR-10 train: 600 MB); no feature matrix of all samples is ever held.
A per-class subsample of every probe's features (config ``layerwise.per_class``, optionally average-pooled to
``layerwise.pool`` x ``layerwise.pool``) goes to an HDF5 file::

    /layers/{layer}/{clean,pgd}/features   (n, D') float32     D' = flattened (pooled) size
    /layers/{layer}/{clean,pgd}/labels     (n,) int64
    /layers/{layer}/{clean,pgd}/indices    (n,) int64          row of the split each sample is
        attrs: layer, layer_index, original_shape, stored_shape, pool, perturbation, split, and the metrics
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .data import to_float
from .grid import regime_id
from .io import create_dump, set_attrs, write_array, write_matrix
from .metrics import AUTHORS_PINV_CUTOFF, ClassStats, NCCAccuracy
from .progress import Meter, log_header
from .runtime import autocast
from .session import open_evaluation
from .specs import LayerwiseSpec
from .utils import UsageError, write_csv_verified

log = logging.getLogger("ncpipe.layerwise")

COLUMNS = ["dataset", "arch", "method", "regime", "norm", "epsilon", "seed", "epoch", "split", "perturbation",
           "layer", "layer_index", "metric", "value"]
KINDS = ("clean", "pgd")


class ProbeHooks:
    """Forward hooks on the probe modules; while ``sink`` is set, each output goes to ``sink(name, output)``.

    The sink consumes the output inside the hook, so no layer's activations outlive the forward pass (and an
    in-place op later in the network cannot change what was read). ``sink = None`` (e.g. during the attack)
    makes the hooks no-ops.
    """

    def __init__(self, probes: list[tuple[str, nn.Module]]) -> None:
        self.sink: Callable[[str, torch.Tensor], None] | None = None
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in probes]

    def _hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            if self.sink is not None:
                self.sink(name, output.detach())

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> ProbeHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Boolean mask of the first ``per_class`` samples of every class, in data order."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    rank = np.arange(len(labels)) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    mask = np.zeros(len(labels), dtype=bool)
    mask[order[rank < per_class]] = True
    return mask


def pooled(t: torch.Tensor, pool: int) -> torch.Tensor:
    """Adaptive average pool of a (B, C, H, W) map to pool x pool (0: unchanged; other shapes: unchanged)."""
    if pool > 0 and t.ndim == 4 and (t.shape[2] > pool or t.shape[3] > pool):
        return F.adaptive_avg_pool2d(t.float(), pool)
    return t


def analyse_layers(
    net: nn.Module,
    probes: list[tuple[str, nn.Module]],
    xs: torch.Tensor,
    ys: torch.Tensor,
    *,
    num_classes: int,
    batch_size: int,
    attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    per_class: int = 0,
    pool: int = 0,
    device: torch.device | str = "cpu",
    amp: torch.dtype | None = None,
    pinv_cutoff: str = AUTHORS_PINV_CUTOFF,
    label: str = "layerwise",
) -> dict[str, Any]:
    """Stream ``xs`` (uint8 or float in [0, 1]) and ``attack(x, y)`` of it through ``net``; stats per probe.

    Returns ``{"metrics": {(kind, layer): {metric: value}}, "subsample": {(kind, layer): (features, labels,
    indices)}, "shapes" / "stored_shapes": {layer: per-sample output shape, as probed / as stored},
    "accuracy": {kind: network accuracy}, "names": probe names}``.
    ``attack = None`` analyses clean data only.
    """
    device = torch.device(device)
    names = [n for n, _ in probes]
    kinds = KINDS if attack is not None else KINDS[:1]
    stats = {(k, n): ClassStats(num_classes, pinv_cutoff) for k in kinds for n in names}
    keep = torch.from_numpy(first_per_class(ys.cpu().numpy(), per_class)) if per_class > 0 else None
    sub: dict[tuple[str, str], list[torch.Tensor]] = {key: [] for key in stats}
    shapes: dict[str, tuple[int, ...]] = {}
    stored: dict[str, tuple[int, ...]] = {}
    correct = dict.fromkeys(kinds, 0)
    replay: list[torch.Tensor] = []

    def as_float(x: torch.Tensor) -> torch.Tensor:
        return to_float(x) if x.dtype == torch.uint8 else x.float()

    @torch.no_grad()
    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast(device.type, amp):
            return net(x)

    def batches(what: str) -> Any:
        meter = Meter(f"{label} {what}", -(-len(xs) // batch_size), unit="batch")
        for i in range(0, len(xs), batch_size):
            yield i, as_float(xs[i : i + batch_size]).to(device), ys[i : i + batch_size].to(device)
            meter.update(1, len(ys[i : i + batch_size]))
        meter.close()
        meter.line(f"{what} done", kinds="+".join(kinds), images=len(xs))

    with ProbeHooks(probes) as hooks:
        # pass 1: class sums per probe, the subsample, and the perturbed inputs for pass 2
        for i, xb, yb in batches("pass 1 (attack, class means)"):
            sel = keep[i : i + len(yb)] if keep is not None else None
            inputs = {"clean": xb}
            if attack is not None:
                inputs["pgd"] = attack(xb, yb).detach()
                replay.append(inputs["pgd"].cpu())
            for kind, xin in inputs.items():

                def sink1(name: str, out: torch.Tensor, kind: str = kind, sel: Any = sel,
                          yb: torch.Tensor = yb) -> None:
                    shapes[name] = tuple(out.shape[1:])
                    stats[(kind, name)].update(out.reshape(len(out), -1), yb)
                    if sel is not None and bool(sel.any()):
                        rows = pooled(out[sel.to(out.device)], pool)
                        stored[name] = tuple(rows.shape[1:])
                        sub[(kind, name)].append(rows.reshape(len(rows), -1).float().cpu())

                hooks.sink = sink1
                correct[kind] += int((forward(xin).argmax(1) == yb).sum())
                hooks.sink = None
        for s in stats.values():
            s.freeze()
        ncc_clean = {n: NCCAccuracy(stats[("clean", n)].means) for n in names} if attack is not None else {}
        # pass 2: within-class projections and NCC accuracies, on exactly the same inputs
        for j, (_, xb, yb) in enumerate(batches("pass 2 (projections, NCC)")):
            inputs = {"clean": xb}
            if attack is not None:
                inputs["pgd"] = replay[j].to(device)
            for kind, xin in inputs.items():

                def sink2(name: str, out: torch.Tensor, kind: str = kind, yb: torch.Tensor = yb) -> None:
                    flat = out.reshape(len(out), -1)
                    stats[(kind, name)].update_within(flat, yb)
                    if kind == "pgd":
                        ncc_clean[name].update(flat, yb)

                hooks.sink = sink2
                forward(xin)
                hooks.sink = None

    results: dict[tuple[str, str], dict[str, float]] = {}
    for (kind, name), s in stats.items():
        own = s.ncc_accuracy
        clean_means = own if kind == "clean" else ncc_clean[name].accuracy
        results[(kind, name)] = {**s.nc1(), "ncc_accuracy_own_means": own,
                                 "ncc_accuracy_clean_means": clean_means}
    subsample = {}
    if keep is not None:
        idx = torch.nonzero(keep).reshape(-1)
        for key, parts in sub.items():
            feats = torch.cat(parts).numpy() if parts else np.zeros((0, 0), np.float32)
            subsample[key] = (feats, ys[idx].cpu().numpy().astype(np.int64), idx.numpy().astype(np.int64))
    n = len(ys)
    return {"metrics": results, "subsample": subsample, "shapes": shapes, "stored_shapes": stored,
            "accuracy": {k: correct[k] / n for k in kinds}, "names": names}


def run_layerwise(spec: LayerwiseSpec | dict[str, Any], checkpoint: str, out_csv: str, out_h5: str,
                  regime: str | None = None) -> pd.DataFrame:
    """The layerwise stage for one checkpoint x threat: tidy CSV (``COLUMNS``) + HDF5 subsample file."""
    spec = LayerwiseSpec.from_dict(spec, "layerwise spec")
    ev = open_evaluation(spec, checkpoint)  # eager modules: the probes are forward hooks
    ckpt, meta, threat, lw = ev.ckpt, ev.meta, spec.threat, spec.layerwise

    def attack(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ev.perturb("pgd", x, y)

    trained = meta.get("regime") or regime_id(meta["method"], ckpt["spec"].get("adversary"))
    if regime is not None and regime != trained:
        raise UsageError(f"--regime {regime} contradicts {checkpoint}, which was trained as {trained}")
    regime = trained
    ident = {"dataset": meta["dataset"], "arch": meta["arch"], "method": meta["method"], "regime": regime,
             "norm": threat.norm, "epsilon": threat.epsilon, "seed": meta["seed"], "epoch": ckpt["epoch"]}
    probes = ev.model.probe_layers()
    (split,) = spec.splits  # the file layout holds one split (the grid's: train)
    root = {**{k: v for k, v in ident.items() if k != "epsilon"}, "split": split,
            "num_classes": ev.num_classes, **ev.provenance(), "per_class": lw.per_class, "pool": lw.pool,
            "probes": [n for n, _ in probes]}
    xs, ys = ev.data.split(split)
    run = f"{meta['dataset']}/{meta['arch']}/{regime}/seed{meta['seed']}"
    label = f"layerwise {run}/epoch{ckpt['epoch']} {threat.norm}{threat.epsilon:g} {split}"
    log_header(label, {"probes": len(probes), "images": len(ys), **threat.attrs(),
                       "batch_size": spec.batch_size, "checkpoint": checkpoint}, ev.device, spec.runtime,
               ev.amp, logger=log)
    res = analyse_layers(ev.net, probes, xs, ys, num_classes=ev.num_classes, batch_size=spec.batch_size,
                         attack=attack, per_class=lw.per_class, pool=lw.pool, device=ev.device, amp=ev.amp,
                         pinv_cutoff=spec.metrics.pinv_cutoff, label=label)
    log.info("%s: network accuracy clean %.4f, pgd %.4f", split, res["accuracy"]["clean"],
             res["accuracy"]["pgd"])
    rows: list[dict[str, Any]] = []
    with create_dump(out_h5, root) as f:
        for (kind, name), vals in res["metrics"].items():
            li = res["names"].index(name)
            rows += [{**ident, "split": split, "perturbation": kind, "layer": name, "layer_index": li,
                      "metric": m, "value": float(v)} for m, v in vals.items()]
            log.info("%s %-20s nc1 %.4g  ncc(own means) %.4f  ncc(clean means) %.4f", kind, name, vals["nc1"],
                     vals["ncc_accuracy_own_means"], vals["ncc_accuracy_clean_means"])
            if (kind, name) not in res["subsample"]:
                continue
            feats, labels, idx = res["subsample"][(kind, name)]
            g = f.create_group(f"layers/{name}/{kind}")
            write_matrix(g, "features", feats, dtype=spec.storage.dtype, compression=spec.storage.compression)
            write_array(g, "labels", labels)
            write_array(g, "indices", idx)
            set_attrs(g, {"layer": name, "layer_index": li, "original_shape": list(res["shapes"][name]),
                          "stored_shape": list(res["stored_shapes"].get(name, ())), "pool": lw.pool,
                          "perturbation": kind, "split": split, "num_samples": len(labels), **vals})
    df = pd.DataFrame(rows, columns=COLUMNS)
    write_csv_verified(df, out_csv)
    return df
