"""How a stage runs on this machine: device choice, determinism, mixed precision, model preparation.

What belongs here: everything that turns a :class:`ncpipe.specs.RuntimeSpec` into torch settings (device,
deterministic algorithms, bf16 autocast, channels_last, torch.compile), shared by training, extraction and
the layerwise stage.  Science (attacks, metrics) and file formats (checkpoint, HDF5) live elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from .specs import RuntimeSpec

log = logging.getLogger("ncpipe.runtime")


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "config asks for device 'cuda' but no CUDA device is visible; use device: auto or cpu"
        )
    return dev


def runtime_setup(runtime: RuntimeSpec | dict[str, Any]) -> tuple[torch.device, torch.dtype | None]:
    """The device and the autocast dtype (None: full precision) of ``runtime``; sets the global switches."""
    rt = RuntimeSpec.from_dict(runtime, "runtime")
    device = pick_device(rt.device)
    if rt.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # bf16 autocast only pays on GPUs; on CPU it would slow down and change numerics, so it is ignored there
    amp = torch.bfloat16 if rt.amp and device.type == "cuda" else None
    return device, amp


def autocast(device_type: str, amp: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``amp`` when given, else a disabled one (full precision)."""
    return torch.autocast(device_type, dtype=amp or torch.bfloat16, enabled=amp is not None)


def prepare_model(model: torch.nn.Module, runtime: RuntimeSpec | dict[str, Any], device: torch.device,
                  *, compile: bool | None = None) -> torch.nn.Module:
    """Move to the device; channels_last and torch.compile where asked and available. Returns the callable.

    ``compile=False`` overrides the spec (forward hooks and exact replay need the eager modules).
    """
    rt = RuntimeSpec.from_dict(runtime, "runtime")
    model.to(device)
    if rt.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if rt.compile if compile is None else compile:
        try:
            import torch._dynamo as dynamo

            # compilation is lazy: a backend that fails at the first call (no compiler, unsupported op) must
            # fall back to eager execution instead of killing a long run
            dynamo.config.suppress_errors = True
            return torch.compile(model)  # type: ignore[return-value]
        except Exception as err:  # noqa: BLE001 - any backend failure falls back to eager
            log.warning("torch.compile unavailable (%s); running eagerly", err)
    return model
