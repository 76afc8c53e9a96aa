"""Training of the paper's three regimes (ST, PGD-AT, TRADES) with exact, resumable state.

The whole split sits on the device as uint8; each epoch draws a permutation from a dedicated generator, so a
run resumed from its last epoch state (model, optimiser, schedule position, every RNG) ends with the same
weights as an uninterrupted one.  Checkpoints are written under the run's ``.resume`` directory with atomic
renames and published (hard-linked) to their declared outputs only when the whole job succeeds: Snakemake
deletes a failed job's outputs, and the resume directory is what lets the rerun continue instead of
restarting.

What belongs here: the training loop alone (schedule, one step per regime, epoch loop, resume state).  The
checkpoint format lives in ``ncpipe.checkpoint``, device/AMP/model preparation in ``ncpipe.runtime``, the
typed training spec in ``ncpipe.specs``.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from . import attacks
from .checkpoint import (
    CorruptCheckpointError,
    adversarial_path,
    adversarial_record,
    checkpoint_payload,
    load_verified,
    save_adversarial_record,
    save_atomic,
)
from .data import ImageData, load_data, to_float
from .models import NCModel, build_model
from .progress import Meter, duration, log_header
from .runtime import autocast, prepare_model, runtime_setup
from .specs import TrainSpec
from .utils import (
    acquire_pid_lock,
    atomic_output,
    link_or_copy,
    release_pid_lock,
    seed_everything,
    spec_hash,
    write_digest_sidecar,
)

log = logging.getLogger("ncpipe.train")

LOG_COLUMNS = ["epoch", "lr", "loss", "train_acc", "robust_loss", "robust_acc", "test_acc", "seconds"]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the message names the run and the epoch."""


# ------------------------------------------------------------------------------------------- building blocks
def lr_at(t: float, epochs: int, lr: float, milestones: list[float], decay: float) -> float:
    """Piecewise-constant schedule on the fractional epoch ``t`` (the authors update it every iteration)."""
    return lr * decay ** sum(t / epochs >= m for m in milestones)


def model_from_data(spec: TrainSpec | dict[str, Any], data: ImageData) -> NCModel:
    """A fresh model of the spec's architecture for ``data`` (classes, channels, normalisation, stem)."""
    spec = TrainSpec.from_dict(spec)
    return build_model(spec.arch, num_classes=data.num_classes, in_channels=data.in_channels,
                       mean=data.mean, std=data.std, width=spec.width, stem=data.stem)


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024,
                      amp: torch.dtype | None = None) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = to_float(x[i:i + batch_size])
        with autocast(xb.device.type, amp):
            correct += (model(xb).argmax(1) == y[i:i + batch_size]).sum().item()
    model.train(was_training)
    return correct / max(1, len(x))


def _rng_state(gens: dict[str, torch.Generator]) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "gens": {k: g.get_state() for k, g in gens.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], gens: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    for k, g in gens.items():
        g.set_state(state["gens"][k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


LOCK_NAME = "trainer.lock"


def resume_key(spec: TrainSpec, code_digest: str) -> dict[str, str]:
    """What a resume state must match to be continued: the spec and the training stage's code.

    ``code_digest`` is ``ncpipe.stages.code_digest("train")`` (the modules whose change makes Snakemake rerun
    training): epochs run by other code must not be continued by this one.
    """
    return {"spec": spec_hash(spec.to_dict()), "code": code_digest}


def lock_resume_dir(resume: Path, cell: str) -> Path:
    """One trainer per cell: take ``resume/trainer.lock`` (PID + host); a second trainer of the same cell
    raises ``utils.BusyError`` while the first lives; the lock of a dead trainer is replaced."""
    return acquire_pid_lock(resume / LOCK_NAME, f"training of {cell}")


def clear_resume_dir(resume: Path) -> None:
    """Remove everything of a refused state but the lock this trainer holds."""
    if not resume.is_dir():
        return
    for child in resume.iterdir():
        if child.name == LOCK_NAME:
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def read_resume_state(resume: Path, key: dict[str, str] | str, checkpoint_epochs: list[int]
                      ) -> dict[str, Any] | None:
    """The epoch state in ``resume`` if it can be continued, else None (the caller then starts afresh).

    A state is refused when it was made by another spec (a config change must retrain from scratch) or by
    other training code, when it cannot be read or fails its digest, or when a checkpoint it claims to have
    written is missing; none of these is an error, the run restarts from epoch 0 with a log line saying why.
    Temporary files of writes interrupted by a kill are removed here.
    """
    if not resume.is_dir():
        return None
    for tmp in resume.rglob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)
    state_file = resume / "state.pt"
    if not state_file.exists():
        return None
    try:
        state = load_verified(state_file)
    except CorruptCheckpointError as err:  # any damage means: start again
        log.warning("resume state %s is unusable (%s); training from scratch", state_file, err)
        return None
    key = key if isinstance(key, dict) else {"spec": key}
    got = state.get("resume_key") or {"spec": state.get("spec_hash")}
    if got.get("spec") != key["spec"]:
        log.warning("ignoring resume state of another configuration in %s; training from scratch", resume)
        return None
    if got.get("code") != key.get("code"):
        log.warning("discarding the resume state in %s: it was made by other training code (code digest %s, "
                    "now %s); training from epoch 0", resume, str(got.get("code"))[:12],
                    str(key.get("code"))[:12])
        return None
    missing = [e for e in checkpoint_epochs if e <= state["epoch"]
               and not (resume / "checkpoints" / f"epoch{e}.pt").exists()]
    if missing:
        log.warning("resume state in %s lacks checkpoints of epochs %s; training from scratch", resume,
                    missing)
        return None
    return state


def check_finite_weights(model: torch.nn.Module, cell: str, epoch: int) -> None:
    """Refuse to checkpoint a model whose weights or BatchNorm statistics hold NaN/inf (a finite last loss
    does not rule that out: the final optimiser step comes after it)."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TrainingDivergedError(
            f"training of {cell} diverged: non-finite values in {bad[:5]} after epoch {epoch}; "
            "lower train.lr or check the data"
        )


# ------------------------------------------------------------------------------------------------ training
def train_step(model: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor, spec: TrainSpec,
               gen: torch.Generator, amp: torch.dtype | None) -> dict[str, torch.Tensor]:
    """One optimisation step's loss (not yet backpropagated) and the logits used for logging."""
    method = spec.method
    if method == "st":
        with autocast(xb.device.type, amp):
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
        return {"loss": loss, "logits": logits}
    assert spec.adversary is not None
    adv = spec.adversary.threat()
    if method == "at":
        train_mode = spec.at_attack_mode == "train"
        x_adv = attacks.pgd(model, xb, yb, norm=adv.norm, epsilon=adv.epsilon_px, step=adv.step_px,
                            steps=adv.steps, eval_mode=not train_mode, generator=gen, amp_dtype=amp)
        if spec.at_final_pass and train_mode:
            # the authors' attack evaluates its objective once more after the last step (a restart
            # selection that one restart does not need); in train mode that pass updates the BN running stats
            with torch.no_grad(), autocast(xb.device.type, amp):
                model(x_adv)
        with autocast(xb.device.type, amp):
            robust_logits = model(x_adv)
            loss = F.cross_entropy(robust_logits, yb)
            with torch.no_grad():  # clean pass for logging only, in train mode as in the authors' loop
                logits = model(xb)
        return {"loss": loss, "logits": logits, "robust_logits": robust_logits, "x_adv": x_adv}
    if method == "trades":
        tr = spec.trades
        assert tr is not None
        kl = tr.threat(spec.adversary)  # TRADES's own step (the authors' l_2 rule 2 * eps / steps)
        out = attacks.trades_loss(model, xb, yb, beta=tr.beta, norm=kl.norm, epsilon=kl.epsilon_px,
                                  step=kl.step_px, steps=kl.steps, bn_quirk=tr.bn_quirk,
                                  project_start=tr.project_start, l2_projection=tr.l2_projection,
                                  l2_zero_gradient=tr.l2_zero_gradient, generator=gen, amp_dtype=amp)
        # robust accuracy is logged from the loss's own adversarial logits: a third forward pass would update
        # the BN running stats once more in train mode
        return {"loss": out.loss, "logits": out.logits_clean, "robust_logits": out.logits_adv.detach(),
                "x_adv": out.x_adv}
    raise ValueError(f"unknown training method {method!r}; known: st, at, trades")


def run_training(spec: TrainSpec | dict[str, Any], checkpoint_outputs: dict[int, str], log_csv: str,
                 resume_dir: str, *, stop_after_epoch: int | None = None, code_digest: str = "") -> None:
    """Train one run described by ``spec`` (see ``grid.train_spec``) and publish its checkpoints and log.

    ``code_digest`` identifies the training code (``ncpipe.stages.code_digest("train")``, which ``ncpipe
    train`` passes): a resume state made by other code is discarded.  Only one trainer per resume directory
    runs at a time (``lock_resume_dir``).  ``stop_after_epoch`` exists for tests that simulate an
    interruption at an epoch boundary.
    """
    spec = TrainSpec.from_dict(spec, "training spec")
    resume = Path(resume_dir)
    cell = f"{spec.data.name}/{spec.arch}/{spec.method}/seed{spec.seed}"
    # the device first: a job that asked for a GPU and has none fails before it touches the resume directory
    device, amp = runtime_setup(spec.runtime)
    lock = lock_resume_dir(resume, cell)
    try:
        _train(spec, checkpoint_outputs, log_csv, resume, stop_after_epoch, resume_key(spec, code_digest),
               device, amp)
    finally:
        release_pid_lock(lock)


def _train(spec: TrainSpec, checkpoint_outputs: dict[int, str], log_csv: str, resume: Path,
           stop_after_epoch: int | None, key: dict[str, str], device: torch.device,
           amp: torch.dtype | None) -> None:
    seed_everything(spec.seed)
    data = load_data(spec)
    model = model_from_data(spec, data)
    net = prepare_model(model, spec.runtime, device)
    opt = spec.optim
    optimizer = torch.optim.SGD(model.parameters(), lr=opt.lr, momentum=opt.momentum,
                                weight_decay=opt.weight_decay)
    gens = {"shuffle": torch.Generator().manual_seed(spec.seed),
            "attack": torch.Generator(device=device).manual_seed(spec.seed + 1)}
    x_tr, y_tr = data.x_train.to(device), data.y_train.to(device)
    x_te, y_te = data.x_test.to(device), data.y_test.to(device)
    cell = f"{data.name}/{spec.arch}/{spec.method}/seed{spec.seed}"
    label = _progress_label(spec, data)

    ckpt_dir = resume / "checkpoints"
    state_file = resume / "state.pt"
    start_epoch, rows = 0, []
    state = read_resume_state(resume, key, sorted(checkpoint_outputs))
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"], gens)
        start_epoch, rows = state["epoch"], state["rows"]
        log.info("resuming %s from the end of epoch %d", cell, start_epoch)
    else:
        clear_resume_dir(resume)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if start_epoch == 0 and 0 in checkpoint_outputs:
        save_atomic(checkpoint_payload(model, spec, data, 0), ckpt_dir / "epoch0.pt")

    epochs, n = opt.epochs, len(x_tr)
    _log_train_header(label, spec, data, device, amp, start_epoch)
    bar = Meter(label, epochs, initial=start_epoch, unit="epoch")
    for epoch in range(start_epoch, epochs):  # ``epoch`` counts completed epochs before this one
        t0 = time.time()
        net.train()
        order = torch.randperm(n, generator=gens["shuffle"]).to(device)
        batches = order.split(opt.batch_size)
        # at checkpoint epochs of AT/TRADES, keep the adversarial batches trained on (dataset order, exact
        # float32); in host memory, which has room for ImageNette's 5.7 GB where a GPU might not
        record = spec.method != "st" and bool(spec.record_adversarial)
        x_adv_epoch = torch.empty(x_tr.shape) if record and epoch + 1 in checkpoint_outputs else None
        sums = {"loss": 0.0, "correct": 0, "robust_loss": 0.0, "robust_correct": 0}
        beat = Meter(f"{label} epoch {epoch + 1}/{epochs}", len(batches), unit="batch")
        for i, idx in enumerate(batches):
            lr = lr_at(epoch + (i + 1) / len(batches), epochs, opt.lr, list(opt.lr_milestones), opt.lr_decay)
            for g in optimizer.param_groups:
                g["lr"] = lr
            xb, yb = to_float(x_tr[idx]), y_tr[idx]
            out = train_step(net, xb, yb, spec, gens["attack"], amp)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"training of {cell} diverged: loss = {loss.item()} at epoch {epoch + 1}, batch {i + 1} "
                    f"(lr = {lr:g}); lower train.lr or check the data"
                )
            if x_adv_epoch is not None:
                x_adv_epoch[idx.cpu()] = out["x_adv"].detach().float().cpu()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums["loss"] += loss.item() * len(idx)
            sums["correct"] += (out["logits"].argmax(1) == yb).sum().item()
            if "robust_logits" in out:
                rl = out["robust_logits"].float()
                sums["robust_loss"] += F.cross_entropy(rl, yb, reduction="sum").item()
                sums["robust_correct"] += (rl.argmax(1) == yb).sum().item()
            beat.update(1, len(idx), loss=sums["loss"] / beat.images if beat.images else math.nan)
        beat.close()
        robust = "robust_logits" in out
        row = {"epoch": epoch + 1, "lr": lr, "loss": sums["loss"] / n, "train_acc": sums["correct"] / n,
               "robust_loss": sums["robust_loss"] / n if robust else math.nan,
               "robust_acc": sums["robust_correct"] / n if robust else math.nan,
               "test_acc": evaluate_accuracy(net, x_te, y_te, amp=amp), "seconds": time.time() - t0}
        rows.append(row)
        _epoch_progress(bar, row, n)
        check_finite_weights(model, cell, epoch + 1)
        # Order matters for a kill between the two writes: the checkpoint of epoch e is durable before the
        # state claims epoch e done, so a resumed run never lacks a checkpoint it believes written (at worst
        # it redoes epoch e and rewrites an identical checkpoint).
        if epoch + 1 in checkpoint_outputs:
            payload = checkpoint_payload(model, spec, data, epoch + 1)
            if x_adv_epoch is not None:  # before the checkpoint: a checkpoint on disk has its record
                save_adversarial_record(adversarial_record(model, x_adv_epoch, spec, amp),
                                        adversarial_path(ckpt_dir / f"epoch{epoch + 1}.pt"), payload)
            save_atomic(payload, ckpt_dir / f"epoch{epoch + 1}.pt")
            _checkpoint_progress(bar, epoch + 1, ckpt_dir / f"epoch{epoch + 1}.pt")
        save_atomic({"resume_key": key, "epoch": epoch + 1, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "rng": _rng_state(gens), "rows": rows}, state_file)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            bar.close()
            return
    bar.close()

    with atomic_output(log_csv) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=LOG_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    write_digest_sidecar(log_csv, rows=len(rows), columns=LOG_COLUMNS)
    for e, out_path in checkpoint_outputs.items():
        link_or_copy(ckpt_dir / f"epoch{e}.pt", out_path)
        # the record is no declared output (deleting it must not retrain): publish it beside its checkpoint,
        # and drop a stale one of an earlier training
        rec = adversarial_path(ckpt_dir / f"epoch{e}.pt")
        if rec.exists():
            link_or_copy(rec, adversarial_path(out_path))
        else:
            adversarial_path(out_path).unlink(missing_ok=True)
    shutil.rmtree(resume)


# ------------------------------------------------------------------------------------------- progress lines
def _progress_label(spec: TrainSpec, data: ImageData) -> str:
    """``train mnist5k/vgg11bn/at_linf32/seed1``: the regime, as the workflow names the run."""
    from .grid import regime_id

    adv = spec.to_dict().get("adversary")
    return f"train {data.name}/{spec.arch}/{regime_id(spec.method, adv)}/seed{spec.seed}"


def _log_train_header(label: str, spec: TrainSpec, data: ImageData, device: torch.device,
                      amp: torch.dtype | None, start_epoch: int) -> None:
    opt = spec.optim
    summary = {"epochs": opt.epochs, "batch_size": opt.batch_size, "lr": opt.lr,
               "train_images": len(data.y_train), "test_images": len(data.y_test), "width": spec.width,
               "checkpoints": list(spec.checkpoints), "start_epoch": start_epoch}
    if spec.adversary is not None:
        a = spec.adversary.threat()
        summary["adversary"] = f"{a.norm} eps {a.epsilon}/255 step {a.step}/255 x{a.steps}"
    log_header(label, summary, device, spec.runtime, amp, logger=log)


def _epoch_progress(bar: Meter, row: dict[str, float], images: int) -> None:
    bar.update(1, images, heartbeat=False, loss=row["loss"], acc=row["train_acc"], test=row["test_acc"])
    fields = {k: row[k] for k in ("loss", "train_acc", "robust_loss", "robust_acc", "test_acc", "lr")
              if not (isinstance(row[k], float) and math.isnan(row[k]))}
    bar.line(f"epoch {int(row['epoch'])}/{bar.total}", **fields, epoch_s=round(row["seconds"], 2))


def _checkpoint_progress(bar: Meter, epoch: int, path: Path) -> None:
    bar.message("%s: checkpoint of epoch %d written (%s, %.1f MB, elapsed %s)", bar.label, epoch, path,
                path.stat().st_size / 1e6, duration(bar.elapsed))
