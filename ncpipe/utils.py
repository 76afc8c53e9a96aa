"""Small shared helpers: atomic writes, hashing, seeding, logging (device choice: ncpipe.runtime)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

# torch is imported inside the functions that need it: the workflow's parse step and the figure/table stages
# import this module, and a torch import costs seconds on every `snakemake` invocation.
if TYPE_CHECKING:
    import torch

log = logging.getLogger("ncpipe")


def setup_logging(logfile: str | os.PathLike | None = None, level: int = logging.INFO) -> None:
    """Log to stderr and, when given, to ``logfile`` (Snakemake's ``log:``)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if logfile:
        Path(logfile).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(logfile, mode="w"))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)


def tmp_path_for(path: str | os.PathLike) -> Path:
    """A sibling temporary name: same file system (atomic rename), never matched as a finished output."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success fsync and rename it onto ``path``, on failure remove it.

    A job killed mid-write therefore leaves at most a dot-prefixed temporary file, never a truncated file
    under the final name that a later run could take for a finished one.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(final)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable across a node crash; some network file systems refuse this, which is harmless."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of a state dict.

    Stored inside checkpoints at write time: torch.load happily returns tensors whose bytes were damaged on
    disk (it checks no CRC), so a flipped bit would otherwise reach the features silently.
    """
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def spec_hash(spec: dict[str, Any]) -> str:
    """Stable short hash of a JSON-able spec (used to refuse resuming from a state made by another config)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    import torch

    torch.manual_seed(seed)


def set_threads(n: int | None, *, load_torch: bool = True) -> None:
    """Respect Snakemake's ``threads:`` so concurrent jobs do not oversubscribe the cores.

    ``load_torch=False`` (stages that never compute with torch: metrics, figures, tables) sets only
    ``OMP_NUM_THREADS``, which torch reads if something loads it later: such a stage must not pay ~2 s of
    torch import for a thread setting.
    """
    if not n:
        return
    if load_torch or "torch._C" in sys.modules:  # "torch._C": really loaded, not a lazy_import placeholder
        import torch

        torch.set_num_threads(int(n))
    else:
        os.environ["OMP_NUM_THREADS"] = str(int(n))


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Publish ``src`` under ``dst`` without doubling disk use when the file system allows hard links."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(dst)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def lazy_import(name: str) -> ModuleType:
    """``name`` as a module that is imported on first attribute access (the standard library's LazyLoader).

    Bookkeeping stages import modules whose compute paths use torch; importing torch costs a second or more
    per job, most of such a job's time. An already imported module is returned as it is.
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"no module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # torch's own submodules must find this one object, not import a second torch
    loader.exec_module(module)
    return module
