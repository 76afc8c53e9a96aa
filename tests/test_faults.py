"""Fault injection (issue 14): every way an artifact can be wrong is either harmless or refused, loudly.

For each fault, either the result is bit-identical to an undisturbed run, or the command fails with one
ERROR line naming the file and the command that regenerates it; nothing exits 0 with a changed number.
Faults: a flipped bit in every stored dataset of a feature dump and of a layerwise file, edited attributes,
truncated / altered per-cell tables of each kind, edited checkpoint fields, a code change between kill and
resume, a second trainer of one cell, stale temporary files, a full disk and a read-only directory (real
tmpfs mounts when running as root, simulated otherwise too), and bad input to every subcommand.
Everything is tiny (session fixtures of conftest.py, trainings of 40 images); the real workflow reruns that
the error messages advise are exercised in tests/test_reruns.py (slow).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from ncpipe import grid, io, paths
from ncpipe.checkpoint import CorruptCheckpointError, load_checkpoint, payload_digest, save_atomic
from ncpipe.cli import EXIT_BAD_INPUT, EXIT_BUSY, EXIT_CANNOT_WRITE, EXIT_NOT_SUPPORTED, EXIT_USAGE, main
from ncpipe.config import validate_config
from ncpipe.evaluate import evaluate_dump
from ncpipe.figures import read_table
from ncpipe.stages import STAGE_MODULES, code_digest
from ncpipe.tidy import aggregate_metrics
from ncpipe.train import run_training
from ncpipe.utils import (
    ArtifactError,
    BusyError,
    OutputError,
    Table,
    atomic_output,
    digest_sidecar,
    read_csv_verified,
    state_digest,
    write_csv_verified,
)

REPO = Path(__file__).resolve().parents[1]
FIX = "--forcerun"  # every "regenerate it" message gives the snakemake command that does


# ------------------------------------------------------------------------------------------------ helpers
def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, *needles: str) -> None:
    """The failure is explained in exactly one ERROR line (``inspect``: one ``ncpipe inspect:`` line), with no
    traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if " ERROR " in ln or ln.startswith("ncpipe inspect: ")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def datasets_of(path: Path) -> list[str]:
    names: list[str] = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and o.size else None)
    return names


def flip_stored_bit(path: Path, dataset: str) -> None:
    """Flip one bit in the middle of the dataset's first stored chunk, as a disk or a transfer would."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(0)
    at = info.byte_offset + info.size // 2
    with open(path, "r+b") as fh:
        fh.seek(at)
        b = fh.read(1)
        fh.seek(at)
        fh.write(bytes([b[0] ^ 0x04]))


def copy_table(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    shutil.copyfile(digest_sidecar(src), digest_sidecar(dst))
    return dst


def temps_in(directory: Path) -> list[Path]:
    return [p for p in directory.rglob(".*.tmp-*")] if directory.exists() else []


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@contextlib.contextmanager
def tmpfs(path: Path, *options: str):
    """A real tmpfs at ``path`` (root only: else the test that needs it is skipped)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                         capture_output=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# ------------------------------------------------------------------------------------- feature dump bytes
def test_every_dataset_of_a_dump_is_checksummed(tiny_dump):
    with h5py.File(tiny_dump["dump"], "r") as f:
        assert f.attrs["format_version"] == io.FORMAT_VERSION == "1.2"
        unchecked = [d for d in datasets_of(tiny_dump["dump"]) if not f[d].fletcher32]
    assert unchecked == []
    names = datasets_of(tiny_dump["dump"])
    assert {"classifier/weight", "classifier/bias", "train/pgd/labels", "train/pgd/predictions",
            "train/targeted/targets", "test/clean/features"} <= set(names)


def test_a_flipped_bit_in_any_dataset_of_a_dump_is_refused_naming_it(tiny_dump, tmp_path, capsys):
    src = tiny_dump["dump"]
    undisturbed = evaluate_dump(src)
    for name in datasets_of(src):
        bad = tmp_path / f"{name.replace('/', '_')}.h5"
        shutil.copyfile(src, bad)
        flip_stored_bit(bad, name)
        with pytest.raises(io.DumpError) as e:
            evaluate_dump(bad)
        msg = str(e.value)
        assert str(bad) in msg and f"/{name}" in msg and "Fletcher-32" in msg and FIX in msg, msg
        code, _, err = cli(capsys, "inspect", bad)
        assert code == 2 and f"/{name}" in err and "Traceback" not in err, (name, err)
        bad.unlink()
    # the untouched file still gives the same numbers
    pd.testing.assert_frame_equal(evaluate_dump(src), undisturbed)


def test_metrics_cli_on_a_damaged_dump_is_one_line_with_the_command(tiny_dump, tmp_path, capsys):
    bad = tmp_path / "epoch0_linf_eps64.h5"
    shutil.copyfile(tiny_dump["dump"], bad)
    flip_stored_bit(bad, "train/pgd/labels")
    out = tmp_path / "m.csv"
    code, _, err = cli(capsys, "metrics", "--dump", bad, "--out", out)
    assert code == EXIT_BAD_INPUT
    assert_one_error_line(err, str(bad), "/train/pgd/labels", f"snakemake --cores 1 {FIX} {bad}")
    assert not out.exists() and temps_in(tmp_path) == []
    # the loaders name it too
    with pytest.raises(io.DumpError, match="/train/pgd/labels"):
        io.load_features(bad, "train", "pgd")
    with pytest.raises(io.DumpError, match="/train/pgd/labels"):
        io.samples_frame(bad)


@pytest.mark.parametrize("where,key,value", [("/", "epoch", 21), ("/", "method", "at"),
                                             ("train/pgd", "accuracy", 0.5), ("/", "num_classes", 9)])
def test_an_edited_attribute_of_a_dump_is_refused(tiny_dump, tmp_path, capsys, where, key, value):
    bad = tmp_path / "dump.h5"
    shutil.copyfile(tiny_dump["dump"], bad)
    with h5py.File(bad, "r+") as f:
        f[where].attrs[key] = value
    with pytest.raises(io.DumpError, match=r"attributes or layout changed.*--forcerun"):
        evaluate_dump(bad)
    code, _, err = cli(capsys, "inspect", bad)
    assert code == 2 and "attributes or layout changed" in err


def legacy_copy(src: Path, dst: Path) -> Path:
    """``src`` as ncpipe wrote dumps before format 1.2: integer datasets unchecksummed, no layout digest."""
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        for name in datasets_of(dst):
            d = f[name]
            if d.dtype.kind == "i":
                data, attrs = d[()], dict(d.attrs)
                del f[name]
                f.create_dataset(name, data=data)
                f[name].attrs.update(attrs)
        del f.attrs[io.LAYOUT_DIGEST]
        f.attrs["format_version"] = "1.1"
    return dst


def test_older_dumps_still_read_but_never_say_verified(tiny_dump, tmp_path, capsys):
    old = legacy_copy(tiny_dump["dump"], tmp_path / "old.h5")
    pd.testing.assert_frame_equal(evaluate_dump(old), evaluate_dump(tiny_dump["dump"]))
    code, out, _ = cli(capsys, "inspect", old)
    assert code == 0 and "NOT CHECKABLE" in out and "/train/pgd/labels" in out
    code, out, _ = cli(capsys, "inspect", old, "--verify", "--rows", "2", "--checkpoint",
                       tiny_dump["checkpoint"])
    assert code == EXIT_NOT_SUPPORTED and "NOT VERIFIED" in out and "\n  VERIFIED" not in out
    # a current dump verifies; a changed byte in it never does
    code, out, _ = cli(capsys, "inspect", tiny_dump["dump"], "--verify", "--rows", "2", "--checkpoint",
                       tiny_dump["checkpoint"])
    assert code == 0 and out.rstrip().endswith("VERIFIED")
    bad = tmp_path / "bad.h5"
    shutil.copyfile(tiny_dump["dump"], bad)
    flip_stored_bit(bad, "test/targeted/targets")
    code, out, err = cli(capsys, "inspect", bad, "--verify", "--checkpoint", tiny_dump["checkpoint"])
    assert code == 2 and "VERIFIED" not in out and "/test/targeted/targets" in err


# ------------------------------------------------------------------------------------------ layerwise file
def test_a_flipped_bit_in_any_dataset_of_a_layerwise_file_is_refused(tiny_layerwise, tmp_path, capsys):
    names = datasets_of(tiny_layerwise)
    with h5py.File(tiny_layerwise, "r") as f:
        assert all(f[n].fletcher32 for n in names)
    kinds = {n.rsplit("/", 1)[1] for n in names}
    assert kinds == {"features", "labels", "indices"}
    names.sort(key=lambda n: (n.rsplit("/", 1)[1] != "labels", n.rsplit("/", 1)[1] != "indices", n))
    for i, name in enumerate(names):
        bad = tmp_path / "lw.h5"
        shutil.copyfile(tiny_layerwise, bad)
        flip_stored_bit(bad, name)
        _, layer, kind, _ = name.split("/")
        with pytest.raises(io.DumpError, match=f"/{name}.*{FIX}"):
            io.load_layer(bad, layer, kind)
        if i < 3:  # every reader goes through the same open_dump; one of each kind suffices
            with pytest.raises(io.DumpError, match=f"/{name}"):
                io.to_xarray(bad)
            code, _, err = cli(capsys, "inspect", bad)
            assert code == 2 and f"/{name}" in err
    code, _, _ = cli(capsys, "inspect", tiny_layerwise)
    assert code == 0


def test_metrics_on_a_layerwise_file_and_a_contradicting_regime_are_refused(tiny_dump, tiny_layerwise,
                                                                            tmp_path, capsys):
    code, _, err = cli(capsys, "metrics", "--dump", tiny_layerwise, "--out", tmp_path / "m.csv")
    assert code == EXIT_NOT_SUPPORTED
    assert_one_error_line(err, "layerwise file")
    code, _, err = cli(capsys, "metrics", "--dump", tiny_dump["dump"], "--regime", "trades_linf32",
                       "--out", tmp_path / "m.csv")
    assert code == EXIT_USAGE
    assert_one_error_line(err, "--regime trades_linf32 contradicts", "method st")
    assert not (tmp_path / "m.csv").exists()
    code, _, _ = cli(capsys, "metrics", "--dump", tiny_dump["dump"], "--regime", "st", "--out",
                     tmp_path / "m.csv")
    assert code == 0


def test_layerwise_with_a_contradicting_regime_is_refused(tiny_dump, tmp_path, capsys):
    from tiny_dump import WILDCARDS, tiny_config

    spec = grid.layerwise_spec(tiny_config(), WILDCARDS)
    out = {"--out-csv": tmp_path / "l.csv", "--out-h5": tmp_path / "l.h5"}
    code, _, err = cli(capsys, "layerwise", "--spec", spec, "--checkpoint", tiny_dump["checkpoint"],
                       "--regime", "at_linf64", *(x for kv in out.items() for x in kv))
    assert code == EXIT_USAGE
    assert_one_error_line(err, "--regime at_linf64 contradicts", "trained as st")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------- tables
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Any]:
    """A tiny finished training (3 epochs, checkpoints 1 and 3) at the workflow's own paths."""
    root = tmp_path_factory.mktemp("trained")
    spec = tiny_train_spec(epochs=3, checkpoints=[1, 3])
    outs = {e: str(root / f"ckpt/epoch{e}.pt") for e in spec["checkpoints"]}
    log = root / paths.format_path(paths.TRAIN_LOG, dataset="mnist5k", arch="vgg11bn", regime="st", seed=3)
    torch.set_num_threads(1)
    run_training(spec, outs, str(log), str(root / ".resume"), code_digest="code-A")
    return {"root": root, "spec": spec, "outs": outs, "log": log}


def tiny_train_spec(epochs: int, checkpoints: list[int]) -> dict[str, Any]:
    cfg = validate_config({
        "datasets": ["mnist5k"], "archs": ["vgg11bn"], "methods": ["st"], "seeds": [3],
        "data": {"train_per_class": 4, "test_per_class": 2}, "model": {"width": 0.1},
        "train": {"epochs": epochs, "checkpoints": checkpoints, "batch_size": 20, "lr": 0.05},
        "runtime": {"device": "cpu", "deterministic": True},
    })
    wildcards = {"dataset": "mnist5k", "arch": "vgg11bn", "regime": "st", "seed": 3}
    return json.loads(grid.train_spec(cfg, wildcards))


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated_mid_row":
        path.write_bytes(data[: int(len(data) * 0.6)])
    elif how == "last_row_dropped":
        path.write_bytes(data[: data.rstrip(b"\n").rindex(b"\n") + 1])
    elif how == "digit_changed":  # one value, every row still well formed
        text = data.decode()
        i = next(i for i in range(len(text) - 1, 0, -1) if text[i].isdigit() and text[i] != "7")
        path.write_bytes((text[:i] + "7" + text[i + 1:]).encode())
    elif how == "no_digest":
        digest_sidecar(path).unlink()
    else:
        raise AssertionError(how)


HOW = ["truncated_mid_row", "last_row_dropped", "digit_changed", "no_digest"]


@pytest.fixture(scope="module")
def metrics_table(tmp_path_factory, tiny_dump) -> Path:
    out = tmp_path_factory.mktemp("tables") / paths.format_path(
        paths.METRICS, dataset="mnist5k", arch="vgg11bn", regime="st", seed=1, epoch=0, norm="linf", eps="64")
    threads = torch.get_num_threads()
    main(["--threads", "1", "metrics", "--dump", str(tiny_dump["dump"]), "--out", str(out)])
    torch.set_num_threads(threads)  # BLAS sums depend on the thread count: compare runs made alike
    return out


@pytest.mark.parametrize("how", HOW)
def test_a_damaged_metrics_table_is_refused_by_aggregate(metrics_table, tmp_path, capsys, how):
    good = copy_table(metrics_table, tmp_path / "good" / metrics_table.name)
    assert aggregate_metrics([good]) == aggregate_metrics([metrics_table])
    bad = copy_table(metrics_table, tmp_path / "bad" / metrics_table.name)
    damage(bad, how)
    out = tmp_path / "metrics.csv"
    code, _, err = cli(capsys, "aggregate", "--out", out, good, bad)
    assert code == EXIT_BAD_INPUT
    assert_one_error_line(err, f"metrics table {bad}", f"{FIX} {bad}")
    assert not out.exists()


@pytest.mark.parametrize("how", HOW)
def test_a_damaged_layerwise_table_is_refused(tiny_layerwise, tmp_path, capsys, how):
    src = tiny_layerwise.with_suffix(".csv")
    assert digest_sidecar(src).is_file()
    bad = copy_table(src, tmp_path / src.name)
    damage(bad, how)
    code, _, err = cli(capsys, "aggregate-layerwise", "--out", tmp_path / "layerwise.csv", bad)
    assert code == EXIT_BAD_INPUT
    assert_one_error_line(err, f"layerwise table {bad}", FIX)
    code, _, _ = cli(capsys, "aggregate-layerwise", "--out", tmp_path / "layerwise.csv", src)
    assert code == 0


@pytest.mark.parametrize("how", HOW)
def test_a_damaged_training_log_is_refused(trained, tmp_path, capsys, monkeypatch, how):
    rel = trained["log"].relative_to(trained["root"])
    monkeypatch.chdir(tmp_path)
    copy_table(trained["log"], tmp_path / rel)
    code, _, _ = cli(capsys, "train-logs", "--out", "all.csv", rel)
    assert code == 0
    all_logs = pd.read_csv("all.csv")
    assert list(all_logs.epoch) == [1, 2, 3]
    # the figure and table stages check the aggregated table as well
    pd.testing.assert_frame_equal(read_table("all.csv"), all_logs)
    damage(Path("all.csv"), "digit_changed")
    with pytest.raises(ArtifactError, match=r"all\.csv does not match the digest"):
        read_table("all.csv")
    damage(tmp_path / rel, how)
    code, _, err = cli(capsys, "train-logs", "--out", "all2.csv", rel)
    assert code == EXIT_BAD_INPUT
    assert_one_error_line(err, f"training log {rel}", FIX)


def test_table_readers_check_rows_and_columns_too(tmp_path):
    p = tmp_path / "t.csv"
    write_csv_verified(pd.DataFrame({"a": [1, 2], "b": [0.5, 0.25]}), p)
    assert read_csv_verified(p).equals(pd.DataFrame({"a": [1, 2], "b": [0.5, 0.25]}))
    rec = json.loads(digest_sidecar(p).read_text())
    assert rec["rows"] == 2 and rec["columns"] == ["a", "b"] and rec["bytes"] == p.stat().st_size
    rec["rows"] = 3
    digest_sidecar(p).write_text(json.dumps(rec))
    with pytest.raises(ArtifactError, match="not the 3 rows"):
        read_csv_verified(p)


# --------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("field", ["epoch", "spec", "meta", "weights", "record"])
def test_an_edited_checkpoint_field_is_refused(trained, tmp_path, field):
    payload = torch.load(trained["outs"][3], weights_only=False)
    if field == "record":  # the adversarial record of AT/TRADES checkpoints: a made-up one here
        payload["train_adversarial"] = {"features": torch.ones(4, 3), "predictions": torch.zeros(4),
                                        "method": "at", "adversary": {"norm": "linf"}}
        save_atomic(payload, tmp_path / "with_record.pt")
        payload = torch.load(tmp_path / "with_record.pt", weights_only=False)
        payload["train_adversarial"]["predictions"][2] = 1
    elif field == "epoch":
        payload["epoch"] = 4  # the 20 -> 21
    elif field == "spec":
        payload["spec"]["optim"]["lr"] = 0.5
    elif field == "meta":
        payload["meta"]["seed"] = 4
    else:
        payload["model"]["linear.bias"][0] += 1e-6
    bad = tmp_path / "epoch3.pt"
    torch.save(payload, bad)  # the bytes changed, the recorded digest did not
    with pytest.raises(CorruptCheckpointError, match=rf"{bad} is corrupted.*{FIX} {bad}"):
        load_checkpoint(bad)


def test_a_checkpoint_holding_another_epoch_than_its_name_is_refused(trained, tmp_path):
    payload = torch.load(trained["outs"][3], weights_only=False)
    payload["epoch"] = 4
    save_atomic(payload, tmp_path / "epoch3.pt")  # a consistent digest, but the wrong file
    with pytest.raises(CorruptCheckpointError,
                       match=r"holds epoch 4, not the epoch 3 its name says.*--forcerun"):
        load_checkpoint(tmp_path / "epoch3.pt")
    save_atomic(payload, tmp_path / "epoch4.pt")
    assert load_checkpoint(tmp_path / "epoch4.pt")[1]["epoch"] == 4


def test_older_checkpoints_load_and_their_epoch_is_still_checked(trained, tmp_path, caplog):
    payload = torch.load(trained["outs"][3], weights_only=False)
    del payload["payload_sha256"]
    payload["model_sha256"] = state_digest(payload["model"])  # what older ncpipe versions wrote
    torch.save(payload, tmp_path / "epoch3.pt")
    with caplog.at_level(logging.WARNING, logger="ncpipe.checkpoint"):
        load_checkpoint(tmp_path / "epoch3.pt")
    assert "older ncpipe" in caplog.text
    payload["epoch"] = 4
    torch.save(payload, tmp_path / "epoch3.pt")
    with pytest.raises(CorruptCheckpointError, match="holds epoch 4"):
        load_checkpoint(tmp_path / "epoch3.pt")


def test_payload_digest_sees_every_kind_of_value():
    base = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "spec": {"a": [1, 2.5, None, True]},
            "rng": (np.arange(3, dtype=np.uint32), "MT19937", 1.0)}
    d = payload_digest(base)
    assert payload_digest({**base, "payload_sha256": "x"}) == d  # its own field is not part of it
    for change in [{"epoch": 4}, {"spec": {"a": [1, 2.5, None, False]}},
                   {"spec": {"a": [1, 2.5000001, None, True]}}, {"model": {"w": torch.arange(4.0).double()}},
                   {"rng": (np.arange(3, dtype=np.uint64), "MT19937", 1.0)},
                   {"extra": 0}]:
        assert payload_digest({**base, **change}) != d, change


def test_features_cli_on_an_edited_checkpoint_is_one_line(tiny_dump, tmp_path, capsys):
    from tiny_dump import WILDCARDS, tiny_config

    bad = tmp_path / "epoch0.pt"
    payload = torch.load(tiny_dump["checkpoint"], weights_only=False)
    payload["epoch"] = 1
    torch.save(payload, bad)
    out = tmp_path / "features" / "x.h5"
    code, _, err = cli(capsys, "features", "--spec", grid.features_spec(tiny_config(), WILDCARDS),
                       "--checkpoint", bad, "--out", out)
    assert code == EXIT_BAD_INPUT
    assert_one_error_line(err, f"checkpoint {bad} is corrupted", f"{FIX} {bad}")
    assert not out.exists() and temps_in(tmp_path) == []


# ----------------------------------------------------------------------------------------------- resume
def weights(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["model"]


def assert_same_run(outs_a: dict[int, str], outs_b: dict[int, str]) -> None:
    for e in outs_a:
        wa, wb = weights(outs_a[e]), weights(outs_b[e])
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), e


def test_a_code_change_between_kill_and_resume_restarts_from_epoch_0(trained, tmp_path, caplog,
                                                                     torch_global_state):
    spec = trained["spec"]
    outs = {e: str(tmp_path / f"epoch{e}.pt") for e in spec["checkpoints"]}
    log, resume = tmp_path / "train_log.csv", tmp_path / ".resume"
    run_training(spec, outs, str(log), str(resume), code_digest="code-OLD", stop_after_epoch=2)
    assert (resume / "state.pt").exists()
    with caplog.at_level(logging.INFO, logger="ncpipe.train"):
        run_training(spec, outs, str(log), str(resume), code_digest="code-A")
    assert "made by other training code" in caplog.text and "training from epoch 0" in caplog.text
    assert "resuming" not in caplog.text
    assert_same_run(trained["outs"], outs)  # exactly a fresh run of the new code
    a = pd.read_csv(log).drop(columns="seconds")
    pd.testing.assert_frame_equal(a, pd.read_csv(trained["log"]).drop(columns="seconds"))


def test_the_same_code_resumes(trained, tmp_path, caplog, torch_global_state):
    spec = trained["spec"]
    outs = {e: str(tmp_path / f"epoch{e}.pt") for e in spec["checkpoints"]}
    run_training(spec, outs, str(tmp_path / "log.csv"), str(tmp_path / ".r"), code_digest="code-A",
                 stop_after_epoch=2)
    with caplog.at_level(logging.INFO, logger="ncpipe.train"):
        run_training(spec, outs, str(tmp_path / "log.csv"), str(tmp_path / ".r"), code_digest="code-A")
    assert "from the end of epoch 2" in caplog.text
    assert_same_run(trained["outs"], outs)


def test_the_code_digest_follows_the_train_stages_modules(tmp_path):
    pkg = tmp_path / "ncpipe"
    shutil.copytree(REPO / "ncpipe", pkg, ignore=shutil.ignore_patterns("__pycache__", "schemas"))
    before = {s: code_digest(s, pkg) for s in STAGE_MODULES}
    assert before["train"] == code_digest("train")
    (pkg / "train.py").write_text((pkg / "train.py").read_text() + "\n# changed\n")
    assert code_digest("train", pkg) != before["train"]
    assert code_digest("figures", pkg) == before["figures"]
    (pkg / "figures.py").write_text((pkg / "figures.py").read_text() + "\n# changed\n")
    assert code_digest("figures", pkg) != before["figures"]
    # the stage list lives in ncpipe.stages, which no stage imports: editing it changes no stage's code
    assert "stages" not in {m for mods in STAGE_MODULES.values() for m in mods}
    assert "from ncpipe.stages import STAGE_MODULES" in (REPO / "workflow/rules/common.smk").read_text()


def test_a_second_trainer_of_one_cell_refuses_while_the_first_lives(trained, tmp_path, capsys,
                                                                    torch_global_state):
    """A real first trainer (a subprocess), a second one in this process; then the first is killed."""
    spec = tiny_train_spec(epochs=30, checkpoints=[30])
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    resume = tmp_path / ".resume"
    args = ["train", "--spec", f"@{spec_file}", "--log-csv", str(tmp_path / "log.csv"), "--resume-dir",
            str(resume), str(tmp_path / "epoch30.pt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "ncpipe", "--threads", "1", *args], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (resume / "state.pt").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(BusyError, match=rf"PID {first.pid} on {socket.gethostname()}"):
            run_training(spec, {30: str(tmp_path / "epoch30.pt")}, str(tmp_path / "log.csv"), str(resume))
        code, _, err = cli(capsys, *args)
        assert code == EXIT_BUSY
        assert_one_error_line(err, "already running", f"PID {first.pid}", "trainer.lock")
        assert first.poll() is None, "the refused trainer must not disturb the running one"
    finally:
        first.kill()
        first.wait()
    # the first one died holding the lock: the next trainer cleans it and resumes to the uninterrupted result
    assert (resume / "trainer.lock").exists()
    main(args)
    fresh = tmp_path / "fresh"
    run_training(spec, {30: str(fresh / "epoch30.pt")}, str(fresh / "log.csv"), str(fresh / ".resume"),
                 code_digest=code_digest("train"))
    assert_same_run({30: str(tmp_path / "epoch30.pt")}, {30: str(fresh / "epoch30.pt")})
    assert not resume.exists()


def test_a_stale_lock_of_a_dead_pid_is_cleaned(trained, tmp_path, caplog, torch_global_state):
    spec = trained["spec"]
    resume = tmp_path / ".resume"
    resume.mkdir()
    (resume / "trainer.lock").write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    outs = {e: str(tmp_path / f"epoch{e}.pt") for e in spec["checkpoints"]}
    with caplog.at_level(logging.INFO):
        run_training(spec, outs, str(tmp_path / "log.csv"), str(resume), code_digest="code-A")
    assert "stale lock" in caplog.text
    assert_same_run(trained["outs"], outs)


# ------------------------------------------------------------------------------------- temporary files
def test_stale_temporary_files_of_dead_processes_are_removed(metrics_table, tiny_dump, tmp_path, capsys,
                                                             torch_global_state):
    out = tmp_path / "metrics" / "epoch0_linf_eps64.csv"
    out.parent.mkdir()
    stale = out.with_name(f".{out.name}.tmp-{dead_pid()}")
    stale.write_bytes(b"x" * 4096)
    sleeper = subprocess.Popen(["sleep", "60"])
    live = out.with_name(f".{out.name}.tmp-{sleeper.pid}")
    live.write_bytes(b"y")
    other = out.with_name(f".other.csv.tmp-{dead_pid()}")  # another output's: not this run's business
    other.write_bytes(b"z")
    try:
        code, _, _ = cli(capsys, "--threads", "1", "metrics", "--dump", tiny_dump["dump"], "--out", out)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert code == 0 and not stale.exists() and live.exists() and other.exists()
    assert out.read_bytes() == metrics_table.read_bytes()  # and the result is the undisturbed one


# ------------------------------------------------------------------------------------ full / read-only
def test_a_full_disk_stops_a_dump_before_hdf5_starts(tiny_dump, tmp_path, capsys, monkeypatch):
    from tiny_dump import WILDCARDS, tiny_config

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("ncpipe.utils.shutil.disk_usage", lambda _p: usage(1 << 30, (1 << 30) - 4096, 4096))
    out = tmp_path / "features" / "epoch0_linf_eps64.h5"
    code, _, err = cli(capsys, "features", "--spec", grid.features_spec(tiny_config(), WILDCARDS),
                       "--checkpoint", tiny_dump["checkpoint"], "--out", out)
    assert code == EXIT_CANNOT_WRITE
    assert_one_error_line(err, f"cannot write {out}", "MiB free")
    assert not out.exists() and temps_in(tmp_path) == []


def test_a_write_failing_with_enospc_is_one_line_and_leaves_no_temp(tiny_dump, tmp_path, capsys, monkeypatch):
    class Full:  # the csv writer of utils.write_csv_verified (a Table: the metrics stage uses no pandas)
        def __init__(self, fh, **_):
            self.fh = fh

        def writerow(self, row):
            self.fh.write("partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        writerows = writerow

    monkeypatch.setattr("ncpipe.utils.csv.writer", Full)
    out = tmp_path / "m" / "x.csv"
    code, _, err = cli(capsys, "metrics", "--dump", tiny_dump["dump"], "--out", out)
    assert code == EXIT_CANNOT_WRITE
    assert_one_error_line(err, f"cannot write {out}", "no space left")
    assert not out.exists() and temps_in(tmp_path) == []


def test_a_real_full_tmpfs(tiny_dump, tmp_path, capsys):
    from tiny_dump import WILDCARDS, tiny_config

    with tmpfs(tmp_path / "small", "size=96k") as small:
        out = small / "features" / "epoch0_linf_eps64.h5"
        code, _, err = cli(capsys, "features", "--spec", grid.features_spec(tiny_config(), WILDCARDS),
                           "--checkpoint", tiny_dump["checkpoint"], "--out", out)
        assert code == EXIT_CANNOT_WRITE
        assert_one_error_line(err, f"cannot write {out}")
        assert not out.exists() and temps_in(small) == []
        # a table larger than the space left: the real ENOSPC of the write
        big = pd.DataFrame({"x": np.arange(40_000, dtype=float) / 7})
        with pytest.raises(OutputError, match=r"no space left"):
            write_csv_verified(big, small / "big.csv")
        with pytest.raises(OutputError, match=r"no space left"):  # and without pandas
            write_csv_verified(Table(["x"], [[v] for v in big["x"].tolist()]), small / "big.csv")
        assert list(small.rglob("*big*")) == []


def test_a_read_only_output_directory(tiny_dump, tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "ro", "size=1m") as ro:
        out = ro / "metrics" / "x.csv"
        code, _, err = cli(capsys, "metrics", "--dump", tiny_dump["dump"], "--out", out)
        assert code == EXIT_CANNOT_WRITE
        assert_one_error_line(err, f"cannot write {out}", "read-only")


def test_a_forbidden_output_directory_simulated(tmp_path):
    def refuse(*_a, **_k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    with pytest.raises(OutputError, match="permission denied"):
        with atomic_output(tmp_path / "x.csv") as tmp:
            refuse(tmp)
    assert temps_in(tmp_path) == []


# -------------------------------------------------------------------------------------- bad CLI input
@pytest.mark.parametrize("args,code,needle", [
    (["metrics", "--dump", "missing.h5", "--out", "m.csv"], EXIT_BAD_INPUT, "missing.h5 does not exist"),
    (["inspect", "missing.h5"], EXIT_BAD_INPUT, "missing.h5 does not exist"),
    (["aggregate", "--out", "a.csv", "missing.csv"], EXIT_BAD_INPUT, "missing.csv does not exist"),
    (["aggregate-layerwise", "--out", "a.csv", "missing.csv"], EXIT_BAD_INPUT, "missing.csv does not exist"),
    (["train-logs", "--out", "a.csv", "results/mnist5k/vgg11bn/st/seed1/train_log.csv"], EXIT_BAD_INPUT,
     "does not exist"),
    (["train", "--spec", "{not json", "--log-csv", "l.csv", "--resume-dir", "r", "e.pt"], EXIT_USAGE,
     "Expecting"),
    (["train", "--spec", '{"arch": "vgg11bn"}', "--log-csv", "l.csv", "--resume-dir", "r", "e.pt"],
     EXIT_USAGE, "--spec"),
    (["features", "--spec", '{"bogus": 1}', "--checkpoint", "c.pt", "--out", "o.h5"], EXIT_USAGE, "bogus"),
    (["layerwise", "--spec", '{"bogus": 1}', "--checkpoint", "c.pt", "--out-csv", "o.csv", "--out-h5",
      "o.h5"], EXIT_USAGE, "bogus"),
    (["tables", "--table", "missing.csv", "--outdir", "t", "accuracy_final__mnist5k__linf32"], EXIT_BAD_INPUT,
     "missing.csv"),
    (["figures", "--table", "missing.csv", "--outdir", "f", "--spec",
      '{"formats": ["png"], "dpi": 50, "context": "paper"}', "nc_vs_epoch/x"], EXIT_BAD_INPUT, "missing.csv"),
    (["figures", "--table", "missing.csv", "--outdir", "f", "--spec",
      '{"formats": ["png"], "dpi": 50, "context": "paper"}', "x"], EXIT_USAGE, "<family>/<stem>"),
    (["leap-table", "--outdir", "t", "--stem", "leap_matrix__mnist5k__vgg11bn__linf32", "missing.h5"],
     EXIT_BAD_INPUT, "missing.h5"),
])
def test_user_errors_are_one_line_and_a_documented_exit_code(tmp_path, capsys, monkeypatch, args, code,
                                                             needle):
    monkeypatch.chdir(tmp_path)
    got, _, err = cli(capsys, *args)
    assert got == code, err
    assert_one_error_line(err, needle)


def test_argument_errors_exit_with_the_usage_code(capsys):
    code, _, err = cli(capsys, "no-such-command")
    assert code == EXIT_USAGE and "invalid choice" in err and "Traceback" not in err


def test_debug_keeps_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NCPIPE_DEBUG", "1")
    code, _, err = cli(capsys, "metrics", "--dump", "missing.h5", "--out", "m.csv")
    assert code == EXIT_BAD_INPUT and "Traceback" in err
