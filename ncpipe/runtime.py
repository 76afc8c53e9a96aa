"""How a stage runs on this machine: device choice, determinism, mixed precision, model preparation.

What belongs here: everything that turns a :class:`ncpipe.specs.RuntimeSpec` into torch settings (device,
deterministic algorithms, bf16 autocast, channels_last, torch.compile), shared by training, extraction and
the layerwise stage.  Science (attacks, metrics) and file formats (checkpoint, HDF5) live elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch

from .specs import RuntimeSpec

log = logging.getLogger("ncpipe.runtime")


# Exit status of a stage that was asked for a GPU and sees none (README, `ncpipe -h`): sysexits' EX_TEMPFAIL,
# "try again later" (on a node that has one), distinct from the generic 1 and inspect's 2 / 3.
EXIT_NO_GPU = 75


class DeviceUnavailableError(RuntimeError):
    """A GPU was asked for (``runtime.device: cuda``, or GPU resources of a scheduled job); none is seen."""


def _no_cuda_message(why: str) -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"{why}, but torch sees no CUDA device (torch.cuda.is_available() is False; "
            f"CUDA_VISIBLE_DEVICES={visible!r}); refusing to run on the CPU instead. Check the node's GPU "
            "allocation (e.g. the SLURM partition / --gpus) or set runtime.device: cpu or auto")


def require_gpu(gpus: int) -> None:
    """Fail at the start of a job that was scheduled with ``gpus`` > 0 GPUs and sees none.

    Enforced inside a scheduler's allocation (``SLURM_JOB_ID`` set) or with ``NCPIPE_REQUIRE_GPU=1``: in a
    local run the rules' ``gpu`` resource is only a concurrency token (profiles/default), and the default
    ``device: auto`` then runs on the CPU of a machine without one, saying so with a WARNING.
    ``NCPIPE_REQUIRE_GPU=0`` turns the check off, also inside an allocation: for clusters whose GPUs are only
    counted (CI's single-node test cluster has count-only fake GPUs).
    """
    flag = os.environ.get("NCPIPE_REQUIRE_GPU")
    if gpus <= 0 or flag == "0" or not (os.environ.get("SLURM_JOB_ID") or flag == "1"):
        return
    import torch

    if not torch.cuda.is_available():
        raise DeviceUnavailableError(_no_cuda_message(f"this job was scheduled with {gpus} GPU(s)"))


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # loud on purpose: a cluster job that landed on a node without CUDA would otherwise train on the CPU
        # for days without a word
        log.warning("runtime.device: auto chose %s%s", dev,
                    f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda"
                    else f" ({torch.get_num_threads()} threads): no CUDA device is visible")
        return dev
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(_no_cuda_message("the config asks for runtime.device: cuda"))
    return dev


def runtime_setup(runtime: RuntimeSpec | dict[str, Any]) -> tuple[torch.device, torch.dtype | None]:
    """The device and the autocast dtype (None: full precision) of ``runtime``; sets the global switches."""
    rt = RuntimeSpec.from_dict(runtime, "runtime")
    device = pick_device(rt.device)
    if rt.deterministic:
        _deterministic(compiled=rt.compile)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # bf16 autocast only pays on GPUs; on CPU it would slow down and change numerics, so it is ignored there
    amp = torch.bfloat16 if rt.amp and device.type == "cuda" else None
    return device, amp


def _deterministic(compiled: bool) -> None:
    """``torch.use_deterministic_algorithms(True, warn_only=True)``, without its import of torch._inductor
    when nothing is compiled: that import (for inductor's own ``deterministic`` flag, read only by compiled
    code) pulls in torch._dynamo, ~2.5 s of every train/features/layerwise job on a CPU."""
    set_flag = getattr(torch._C, "_set_deterministic_algorithms", None)
    if compiled or set_flag is None:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        set_flag(True, warn_only=True)


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
