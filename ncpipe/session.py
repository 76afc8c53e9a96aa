"""Open one checkpoint for evaluation under one threat: the set-up every evaluating stage shares.

What belongs here: :func:`open_evaluation` (runtime set-up, load and verify the checkpoint, prepare the model
eagerly in eval mode, load the spec's data, seed the stage's generator) and the :class:`Evaluation` it
returns, which also builds the provenance attributes of the stage's output file and runs a perturbation kind
with the spec's threat.  ``ncpipe.extract`` and ``ncpipe.layerwise`` both start here; a new stage that
evaluates a checkpoint should too.  An external model (``spec.external``) is rebuilt by ``ncpipe.external``
from its own file instead.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import __version__, attacks
from .checkpoint import load_checkpoint
from .data import ImageData, load_data
from .models import NCModel
from .runtime import autocast, prepare_model, runtime_setup
from .specs import FeaturesSpec, Threat
from .utils import sha256_file


@dataclass
class Evaluation:
    """A checkpoint opened for evaluation: the model (``net``: the prepared callable), its data and threat."""

    spec: FeaturesSpec
    checkpoint: str
    model: NCModel
    net: nn.Module
    ckpt: dict[str, Any]
    data: ImageData
    device: torch.device
    amp: torch.dtype | None
    generator: torch.Generator

    @property
    def meta(self) -> dict[str, Any]:
        return self.ckpt["meta"]

    @property
    def threat(self) -> Threat:
        return self.spec.threat

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def provenance(self) -> dict[str, Any]:
        """Root attributes every evaluation file carries: threat, checkpoint, its digest, config, versions."""
        return {**self.threat.attrs(), "checkpoint": str(self.checkpoint),
                "checkpoint_sha256": sha256_file(self.checkpoint), "config": self.spec.to_dict(),
                "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "ncpipe_version": __version__, "torch_version": torch.__version__}

    def perturb(self, kind: str, x: torch.Tensor, y: torch.Tensor, **kw: Any) -> torch.Tensor:
        """``attacks.perturb`` of ``kind`` against the prepared model with the kind's threat and generator."""
        return attacks.perturb(kind, self.net, x, y, **self.spec.threat_of(kind).attack_kwargs(),
                               generator=self.generator,
                               amp_dtype=self.amp, options=self.spec.kind_options(kind), **kw)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate features and logits of a batch, in float32."""
        with autocast(x.device.type, self.amp):
            h, logits = self.net.forward_features(x)
        return h.float(), logits.float()


def open_evaluation(spec: FeaturesSpec, checkpoint: str) -> Evaluation:
    """Load ``checkpoint`` for evaluation under ``spec``'s threat on ``spec``'s data.

    The model runs eagerly (no torch.compile: forward hooks and exact replays need the eager modules) in
    eval mode.  The generator is fixed per (seed, epoch), so reruns of a job give the same noise and random
    starts.
    """
    device, amp = runtime_setup(spec.runtime)
    data = load_data(spec)
    if spec.external is not None:  # a model ncpipe did not train (config `external`); the file is its own
        from .external import InputShape, load_external

        shape = InputShape(data.num_classes, data.in_channels, int(data.x_train.shape[-1]), data.stem)
        model, ckpt = load_external(spec.external, shape, device)
    else:
        model, ckpt = load_checkpoint(checkpoint, device)
    net = prepare_model(model, spec.runtime, device, compile=False)
    net.eval()
    meta = ckpt["meta"]
    gen = torch.Generator(device=device).manual_seed(int(meta["seed"]) * 100_003 + int(ckpt["epoch"]))
    return Evaluation(spec, str(checkpoint), model, net, ckpt, data, device, amp, gen)
