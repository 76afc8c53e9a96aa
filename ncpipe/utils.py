"""Small shared helpers: atomic writes, hashing, seeding, logging (device choice: ncpipe.runtime)."""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import importlib.util
import json
import logging
import numbers
import os
import random
import re
import shlex
import shutil
import socket
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

# torch (and numpy, for seeding) are imported inside the functions that need them: the workflow's parse step
# and every bookkeeping stage import this module, and a torch import costs seconds (numpy ~0.1 s, most of an
# aggregate job) on every job.
if TYPE_CHECKING:
    import pandas as pd
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


class OutputError(RuntimeError):
    """An output cannot be written: its file system is full, read-only, or refuses us (one-line message)."""


class UsageError(ValueError):
    """A command-line argument contradicts the input it names (one-line message)."""


class ArtifactError(RuntimeError):
    """A stored artifact (a table, a sidecar) is missing, truncated or altered; the message says how to
    regenerate it."""


# errnos that mean "this location cannot take the output", not a bug: reported in one line naming the path
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def regenerate_hint(path: str | os.PathLike) -> str:
    """The command that regenerates ``path`` (and everything made from it) in the workflow.

    Plain ``snakemake`` after deleting an intermediate file says "Nothing to be done" when the files made from
    it still exist; ``--forcerun`` names the file, so its job and every job downstream of it rerun.
    """
    return (f"regenerate it with: snakemake --cores 1 --forcerun {shlex.quote(str(path))} "
            "(plus the --configfile/--profile options of the run that made it)")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stale_temps(final: str | os.PathLike) -> list[Path]:
    """Remove the temporary files (``tmp_path_for``) of ``final`` left by processes that no longer exist.

    A job killed mid-write leaves its ``.NAME.tmp-PID`` (gigabytes for a CIFAR dump); the next write of the
    same output cleans it.  Only one job writes an output at a time (Snakemake's own lock), so a dead PID's
    file is nobody's.
    """
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for tmp in final.parent.glob(f".{glob_escape(final.name)}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
                log.info("removed %s, the temporary file of a dead process (PID %s)", tmp, pid)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def write_error(path: str | os.PathLike, err: OSError) -> OutputError | None:
    """A one-line ``OutputError`` for an ``OSError`` that means the location cannot take the file, else None.

    HDF5 reports a full disk without an errno, so an errno-less error is blamed on space only when the file
    system is (nearly) full at that moment.
    """
    p = Path(path)
    code = err.errno
    if code is None:
        with contextlib.suppress(OSError):
            if shutil.disk_usage(_existing_parent(p)).free < (1 << 20):
                code = errno.ENOSPC
    if code not in WRITE_ERRNOS:
        return None
    what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "the file system is read-only"}.get(code, "permission denied")
    return OutputError(f"cannot write {p}: {what} ({os.strerror(code)}); free space or make "
                       f"{_existing_parent(p)} writable, then rerun the same command")


def _existing_parent(p: Path) -> Path:
    for q in [p.parent, *p.parents]:
        if q.exists():
            return q
    return Path(".")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path; on success fsync and rename it onto ``path``, on failure remove it.

    A job killed mid-write therefore leaves at most a dot-prefixed temporary file, never a truncated file
    under the final name that a later run could take for a finished one; such leftovers of dead processes are
    removed here.  ``expected_bytes`` is checked against the free space first: HDF5 can crash the process on a
    full disk instead of raising.  A full, read-only or forbidden location raises ``OutputError`` (one line
    naming the path), with the temporary file removed.
    """
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise (write_error(final, err) or err) from err
    remove_stale_temps(final)
    if expected_bytes:
        free = shutil.disk_usage(final.parent).free
        if free < expected_bytes:
            raise OutputError(f"cannot write {final}: it needs about {expected_bytes / 2**20:.1f} MiB but "
                              f"its file system has {free / 2**20:.1f} MiB free; free space, then rerun the "
                              "same command")
    tmp = tmp_path_for(final)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as err:
        mapped = write_error(final, err)
        if mapped is None:
            raise
        raise mapped from err
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()


# ----------------------------------------------------------------------------- tables with a digest sidecar
TABLE_DIGEST_FORMAT = "ncpipe-table-digest 1"


def digest_sidecar(path: str | os.PathLike) -> Path:
    """``.NAME.sha256`` beside ``path``: the digest that a verified reader checks before trusting the file."""
    p = Path(path)
    return p.with_name(f".{p.name}.sha256")


def write_digest_sidecar(path: str | os.PathLike, **promised: Any) -> Path:
    """Record ``path``'s sha256 and size (plus what the writer promises, e.g. rows and columns) beside it."""
    p = Path(path)
    rec = {"format": TABLE_DIGEST_FORMAT, "file": p.name, "sha256": sha256_file(p), "bytes": p.stat().st_size,
           **promised}
    side = digest_sidecar(p)
    with atomic_output(side) as tmp:
        tmp.write_text(json.dumps(rec, sort_keys=True) + "\n")
    return side


def read_verified_bytes(path: str | os.PathLike, what: str = "table", required: bool = True
                        ) -> tuple[bytes, dict[str, Any] | None]:
    """The bytes of ``path`` after checking them against its digest sidecar, and the sidecar's record.

    With ``required=False`` a file without a sidecar (made outside ncpipe) is returned unchecked, with None.
    """
    p = Path(path)
    hint = regenerate_hint(p)
    if not p.is_file():
        raise ArtifactError(f"{what} {p} does not exist; {hint}")
    side = digest_sidecar(p)
    data = p.read_bytes()
    if not side.is_file():
        if not required:
            return data, None
        raise ArtifactError(f"{what} {p} has no digest file {side.name} beside it (its job was interrupted, "
                            f"it was copied without it, or an older ncpipe wrote it); {hint}")
    try:
        rec = json.loads(side.read_text())
        ok = rec.get("format") == TABLE_DIGEST_FORMAT
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise ArtifactError(f"{what} {p}: its digest file {side} is unreadable; {hint}")
    if len(data) != rec.get("bytes") or hashlib.sha256(data).hexdigest() != rec.get("sha256"):
        raise ArtifactError(f"{what} {p} does not match the digest written with it ({len(data)} bytes, "
                            f"{rec.get('bytes')} written): it was truncated or altered; {hint}")
    return data, rec


@dataclass
class Table:
    """A CSV table as plain lists, for the bookkeeping jobs that need no pandas (its import alone was about
    half of a metrics or aggregate job): ``columns``, and ``rows`` of cells in that order.

    Cells are written as pandas' ``to_csv`` writes them, so either writer gives the same bytes: a float in
    its shortest round-trip form (``repr``), NaN and None as an empty field, anything else by ``str``.  A
    table read from a file (:func:`read_table_verified`) holds each cell's text, written back unchanged
    (a missing value, ``NA_TEXT``, as None).  Unlike pandas it does not retype a column: an integer column
    with a missing value keeps ``1``, where read_csv + to_csv would write ``1.0``.
    """

    columns: list[str]
    rows: list[list[Any]]

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def concat(cls, tables: Iterable[Table]) -> Table:
        """The rows of ``tables`` in turn; columns: their union in order of first appearance (as
        ``pandas.concat``), a column a table lacks is empty in its rows."""
        tables = list(tables)
        columns: list[str] = []
        for t in tables:
            columns += [c for c in t.columns if c not in columns]
        rows: list[list[Any]] = []
        for t in tables:
            if t.columns == columns:
                rows += t.rows
            else:
                where = [t.columns.index(c) if c in t.columns else None for c in columns]
                rows += [[None if i is None else r[i] for i in where] for r in t.rows]
        return cls(columns, rows)

    def sorted_by(self, keys: list[str]) -> Table:
        """The rows in a stable order by ``keys``, the order of pandas' ``sort_values(keys, kind="stable")``
        on the table as ``read_csv`` types it: a column whose filled cells all read as integers (or all as
        numbers) compares as numbers, any other as text; empty cells sort last."""
        by: list[list[Any]] = []
        for k in keys:
            i = self.columns.index(k)
            cells = [r[i] for r in self.rows]
            missing = [_missing(v) for v in cells]
            parse = _column_parser([v for v, m in zip(cells, missing, strict=True) if not m])
            if any(missing):  # (0, value) before (1, 0): missing last, never compared with a value
                by.append([(1, 0) if m else (0, parse(v)) for v, m in zip(cells, missing, strict=True)])
            else:
                by.append([parse(v) for v in cells])
        keyed = list(zip(*by, strict=True)) if by else [()] * len(self)
        order = sorted(range(len(self.rows)), key=keyed.__getitem__)
        return Table(list(self.columns), [self.rows[i] for i in order])


# The texts pandas' read_csv takes for a missing value (its default na_values): a Table reads them as None,
# written back as an empty field, as read_csv followed by to_csv writes them (the trainer's log says "nan").
NA_TEXT = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                     "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


def _missing(v: Any) -> bool:
    return v is None or v == "" or (not isinstance(v, str) and v != v)  # v != v: NaN


def _column_parser(filled: list[Any]) -> type:
    """``int``, ``float`` or ``str``: the type ``read_csv`` gives a column of these (non-missing) cells."""
    for parse in (int, float):
        if all(_reads_as(v, parse) for v in filled):
            return parse
    return str


_INT_TEXT = re.compile(r"[+-]?\d+")


def _reads_as(v: Any, parse: type) -> bool:
    if not isinstance(v, str):  # a cell made in code: its own type decides (numpy's scalars included)
        return isinstance(v, numbers.Integral) or parse is float and isinstance(v, numbers.Real)
    if parse is int:
        return _INT_TEXT.fullmatch(v) is not None
    try:
        float(v)
    except ValueError:
        return False
    return True


def _cell_text(v: Any) -> str:
    if isinstance(v, str):
        return v
    if v is None or v != v:  # NaN
        return ""
    if isinstance(v, float):  # np.float64 too: its repr would be "np.float64(...)"
        return float.__repr__(v)
    return str(v)


def write_csv_verified(table: Table | pd.DataFrame, path: str | os.PathLike, **to_csv: Any) -> None:
    """Write a table atomically, with a digest sidecar promising its rows and columns.

    ``table``: a :class:`Table` (written with the csv module: no pandas import), or a pandas DataFrame
    (written by its ``to_csv(index=False, **to_csv)``).
    """
    if isinstance(table, Table):
        if to_csv:
            raise TypeError(f"write_csv_verified of a Table takes no to_csv options, got {sorted(to_csv)}")
        with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            # what pandas' to_csv does: the csv module, minimal quoting, "\n" line ends
            w = csv.writer(fh, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
            w.writerow(table.columns)
            w.writerows([_cell_text(v) for v in r] for r in table.rows)
    else:
        with atomic_output(path) as tmp:
            table.to_csv(tmp, index=False, **to_csv)
    write_digest_sidecar(path, rows=int(len(table)), columns=[str(c) for c in table.columns])


def _check_promise(path: str | os.PathLike, what: str, rec: dict[str, Any] | None, rows: int,
                   columns: list[str]) -> None:
    if rec is not None and (rec.get("rows") is not None and rows != rec["rows"]
                            or rec.get("columns") is not None and columns != rec["columns"]):
        raise ArtifactError(f"{what} {path} parses to {rows} rows x {columns}, not the "
                            f"{rec.get('rows')} rows x {rec.get('columns')} its writer recorded; "
                            f"{regenerate_hint(path)}")


def read_csv_verified(path: str | os.PathLike, what: str = "table", required: bool = True) -> Any:
    """``pandas.read_csv`` of a table whose bytes, rows and columns match what its writer recorded."""
    import io as _io

    import pandas as pd

    data, rec = read_verified_bytes(path, what, required)
    df = pd.read_csv(_io.BytesIO(data))
    _check_promise(path, what, rec, len(df), [str(c) for c in df.columns])
    return df


def read_table_verified(path: str | os.PathLike, what: str = "table", required: bool = True) -> Table:
    """:func:`read_csv_verified` without pandas: a :class:`Table` of the cells' text."""
    import io as _io

    data, rec = read_verified_bytes(path, what, required)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ArtifactError(f"{what} {path} is not UTF-8 text ({err}); {regenerate_hint(path)}") from None
    lines = [r for r in csv.reader(_io.StringIO(text, newline="")) if r]  # read_csv skips blank lines too
    table = Table(lines[0] if lines else [], [[None if v in NA_TEXT else v for v in r] for r in lines[1:]])
    _check_promise(path, what, rec, len(table), table.columns)
    return table


# ------------------------------------------------------------------------------------ one process per dir
class BusyError(RuntimeError):
    """Another live process holds the lock of this directory."""


def acquire_pid_lock(lock: str | os.PathLike, what: str) -> Path:
    """Create ``lock`` holding this process's PID and host; refuse while another live process holds it.

    A lock of a dead PID on this host is stale (a killed job) and is replaced.  A lock from another host
    cannot be checked from here: it is refused, and the message says how to clear it.
    """
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(lock.read_text())
                pid, host = int(held["pid"]), str(held["host"])
            except (OSError, ValueError, KeyError, TypeError):
                pid, host = -1, me["host"]  # half-written by a process killed while taking it
            if pid == me["pid"] and host == me["host"]:
                return lock
            if host == me["host"] and not pid_alive(pid):
                log.info("removing the stale lock %s of dead process %d", lock, pid)
                lock.unlink(missing_ok=True)
                continue
            raise BusyError(f"{what} is already running (PID {pid} on {host}, lock {lock}); wait for it or "
                            f"stop it (kill {pid}); if no such process exists, delete {lock}") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(me))
        return lock
    raise BusyError(f"could not take the lock {lock} for {what}")


def release_pid_lock(lock: str | os.PathLike) -> None:
    """Remove ``lock`` if this process holds it."""
    lock = Path(lock)
    try:
        held = json.loads(lock.read_text())
    except (OSError, ValueError):
        return
    if held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


def module_digest(names: list[str] | tuple[str, ...], package_dir: str | os.PathLike | None = None) -> str:
    """sha256 over the names and contents of the package modules ``names`` (``ncpipe/{name}.py``)."""
    root = Path(package_dir) if package_dir else Path(__file__).parent
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(f"{name}\0".encode())
        h.update((root / f"{name}.py").read_bytes())
        h.update(b"\0")
    return h.hexdigest()


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
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
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
