"""Progress of the long stages: bars on a terminal, plain timed lines in a log file.

Snakemake sends every job's output to ``logs/...`` (``> {log} 2>&1``), and a cluster user watches a 400-epoch
run through that file: there, carriage-return bars are noise (one physical line per many epochs) and say
nothing after the job died.  So a stage writes, when stderr is not a terminal, plain lines through
``logging``: a header per job (what runs, on which device, with which torch settings), one line per epoch
or per (split, kind) with images/s, elapsed time and an ETA, a heartbeat at most every
``LINE_INTERVAL_S`` seconds inside long units, and one line per checkpoint written.  On a terminal the
same meters draw tqdm bars.  ``NCPIPE_PROGRESS=bars|lines`` overrides the choice.

What belongs here: formatting and pacing of progress output only, used by ``ncpipe.train``,
``ncpipe.extract`` and ``ncpipe.layerwise``.  No science, no file formats.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("ncpipe.progress")

# A heartbeat line inside a long epoch or attack at most this often (a log file, not a terminal).
LINE_INTERVAL_S = 60.0


def on_terminal() -> bool:
    """Whether progress is drawn as bars (stderr is a terminal) or written as lines (a log file)."""
    mode = os.environ.get("NCPIPE_PROGRESS", "").strip().lower()
    if mode in ("bars", "lines"):
        return mode == "bars"
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def duration(seconds: float) -> str:
    """``12.3s``, ``4m05s``, ``2h03m``: short and unambiguous in a log line."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def fields_text(fields: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())


def device_description(device: Any) -> str:
    """``cuda:0 (NVIDIA H100 80GB HBM3)`` or ``cpu (2 threads)``."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


def log_header(title: str, spec_summary: Mapping[str, Any], device: Any, runtime: Any,
               amp: Any = None, logger: logging.Logger = log) -> None:
    """The job's header lines: what runs, on which device, with which torch settings."""
    import torch

    logger.info("%s | %s", title, fields_text(spec_summary))
    logger.info("%s | device %s | torch %s | amp %s | channels_last %s | compile %s | deterministic %s",
                title, device_description(device), torch.__version__,
                "off" if amp is None else str(amp).removeprefix("torch."),
                runtime.channels_last and device.type == "cuda", runtime.compile, runtime.deterministic)


class Meter:
    """Progress of ``total`` units (epochs, batches) of one labelled task, counting images.

    On a terminal: a tqdm bar.  In a log file: :meth:`line` writes a line when asked (end of an epoch, of a
    split/kind) and :meth:`update` a heartbeat at most every ``interval`` seconds.
    """

    def __init__(self, label: str, total: int, *, initial: int = 0, unit: str = "it",
                 interval: float = LINE_INTERVAL_S, logger: logging.Logger = log,
                 bars: bool | None = None) -> None:
        self.label, self.total, self.done, self.unit = label, total, initial, unit
        self.initial = initial
        self.images = 0
        self.start = self._last = time.monotonic()
        self.interval, self.logger = interval, logger
        self._bar = None
        if on_terminal() if bars is None else bars:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=label, unit=unit, dynamic_ncols=True,
                             leave=False)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def rate(self) -> float:
        """Images per second since the start of this meter."""
        e = self.elapsed
        return self.images / e if e > 0 else math.nan

    def eta(self) -> float:
        """Seconds left at the mean pace of the units done in this job (resumed ones excluded)."""
        run = self.done - self.initial
        return (self.total - self.done) * self.elapsed / run if run > 0 else math.nan

    def update(self, units: int = 1, images: int = 0, *, heartbeat: bool = True, **postfix: Any) -> None:
        """Count ``units`` and ``images``; ``heartbeat=False``: the caller writes its own line now."""
        self.done += units
        self.images += images
        if self._bar is not None:
            self._bar.update(units)
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
        elif heartbeat and time.monotonic() - self._last >= self.interval:
            self.line(**postfix)

    def line(self, prefix: str = "", **fields: Any) -> None:
        """One plain line: position, fields, images/s, elapsed and ETA (nothing on a terminal)."""
        self._last = time.monotonic()
        if self._bar is not None:
            return
        head = f"{self.label} {prefix or f'{self.done}/{self.total} {self.unit}'}"
        body = fields_text(fields)
        self.logger.info("%s | %s%simages/s %.1f | elapsed %s | ETA %s", head, body, " | " if body else "",
                         self.rate(), duration(self.elapsed), duration(self.eta()))

    def message(self, text: str, *args: Any) -> None:
        """A line that is written in both modes (e.g. a checkpoint written), above the bar on a terminal."""
        if self._bar is not None:
            self._bar.write(text % args if args else text, file=sys.stderr)
        else:
            self.logger.info(text, *args)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
