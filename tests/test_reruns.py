"""Exact reruns: after a completed miniature run, `snakemake -n` plans exactly the jobs that a change affects.

One real run of the whole workflow (one 0.1-width VGG, standard training, 3 epochs, 5 images per class, one
epsilon, clean + PGD on the train split; ``features.keep: final``, so the middle epoch's dump is temporary)
in a temporary directory holding copies of ``workflow/`` and of the package sources that the rules declare
as inputs (so editing them here never touches the repository); then one dry run per change, parsed from the
per-job listing and the ``Job stats`` table (these are marked slow).
A fast static check verifies that each stage declares, as inputs, every package module its code imports.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from ncpipe import families

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or "snakemake"
MINI: dict[str, Any] = {
    "data": {"train_per_class": 5, "test_per_class": 5},
    "datasets": ["mnist5k"], "archs": ["vgg11bn"], "methods": ["st"], "seeds": [1],
    "model": {"width": 0.1},
    "train": {"epochs": 3, "checkpoints": [1, 2, 3], "batch_size": 25, "lr": 0.05},
    "attack": {"threats": {"linf": {"epsilons": [64], "step": 32, "steps": 2}}, "kinds": ["clean", "pgd"],
               "splits": ["train"]},
    "layerwise": {"enabled": False},
    # the storage policy: the epoch-2 dump is temporary (removed once read); the first and final ones, which
    # the simplex figure reads, are kept
    "features": {"keep": "final"},
    "figures": {"formats": ["png"], "dpi": 50},
    "runtime": {"device": "cpu"},
}


# rules with one job per (run, checkpoint, threat) cell; everything else aggregates
PER_CELL = {"features", "features_temp", "metrics"}
FIGURES_OF_METRICS = {families.table_rule("metrics")}


def snakemake(root: Path, config: dict[str, Any], *args: str) -> str:
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run([SNAKEMAKE, *args, "--configfile", "run.yaml"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    return out


def plan(root: Path, config: dict[str, Any]) -> tuple[Counter[str], list[tuple[str, dict[str, str]]]]:
    """(jobs per rule from the `Job stats` table, [(rule, wildcards)] of every planned job) of a dry run."""
    out = snakemake(root, config, "-n", "--cores", "1")
    if "Nothing to be done" in out:
        return Counter(), []
    table = out[out.index("Job stats:"):]
    counts: Counter[str] = Counter()
    for line in table.splitlines()[3:]:
        name, n = line.split()
        if name == "total":
            break
        counts[name] = int(n)
    jobs: list[tuple[str, dict[str, str]]] = []
    for line in out.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            jobs.append((m.group(1), {}))
        elif (m := re.match(r"^\s+wildcards: (.*)$", line)) and jobs:
            jobs[-1][1].update(kv.split("=", 1) for kv in m.group(1).split(", "))
    assert Counter(rule for rule, _ in jobs) == counts, "job listing and Job stats disagree"
    return counts, jobs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reruns")
    shutil.copytree(REPO / "workflow", root / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "ncpipe").mkdir()
    for src in (REPO / "ncpipe").glob("*.py"):
        shutil.copy2(src, root / "ncpipe" / src.name)
    snakemake(root, MINI, "--cores", "2")
    assert (root / "results" / "metrics.csv").exists()
    features = root / "results" / "mnist5k" / "vgg11bn" / "st" / "seed1" / "features"
    assert sorted(p.name for p in features.iterdir()) == ["epoch1_linf_eps64.h5", "epoch3_linf_eps64.h5"]
    return root


def dumps(counts: Counter[str]) -> int:
    """Feature-dump jobs of a plan, kept (rule features) and temporary (features_temp) ones."""
    return counts["features"] + counts["features_temp"]


def with_changes(**changes: Any) -> dict[str, Any]:
    """A copy of MINI with dotted keys replaced."""
    cfg = copy.deepcopy(MINI)
    for key, value in changes.items():
        *parents, last = key.split("__")
        node = cfg
        for k in parents:
            node = node[k]
        node[last] = value
    return cfg


@pytest.mark.slow
def test_completed_run_plans_nothing_even_after_touching_the_code(workdir):
    """A bare `touch` of every package module (newer mtime, same content) reruns nothing."""
    later = (workdir / "results" / "metrics.csv").stat().st_mtime + 60
    sources = list((workdir / "ncpipe").glob("*.py"))
    times = {src: (src.stat().st_atime_ns, src.stat().st_mtime_ns) for src in sources}
    try:
        for src in sources:
            os.utime(src, (later, later))
        counts, _ = plan(workdir, MINI)
    finally:  # a module dated in the future fails every later job of this workdir (Snakemake's clock check)
        for src, ns in times.items():
            os.utime(src, ns=ns)
    assert counts == Counter()


@pytest.mark.slow
def test_adding_an_epsilon_plans_only_that_epsilons_jobs(workdir):
    cfg = with_changes(attack__threats={"linf": {"epsilons": [64, 32], "step": 32, "steps": 2}})
    counts, jobs = plan(workdir, cfg)
    assert dumps(counts) == 3 and counts["metrics"] == 3  # one per checkpoint epoch, all at eps 32
    assert all(wc["eps"] == "32" for rule, wc in jobs if rule in PER_CELL), jobs
    assert "train" not in counts and "train_logs" not in counts, counts
    # the rest hangs off the aggregated table (figures of every epsilon read it); the training-log figure not
    downstream = {"aggregate", "accuracy_table", "figures", "all"} | FIGURES_OF_METRICS
    # the new threat's own leap table and feature-reading figures are new targets, one each
    per_threat = {"leap_table", "figure_leap_matrix", "figure_simplex_projection"}
    assert set(counts) - PER_CELL <= downstream | per_threat, counts
    assert counts["aggregate"] == 1
    assert families.table_rule("train_logs") not in counts


@pytest.mark.slow
def test_adding_a_seed_plans_only_that_seeds_jobs(workdir):
    counts, jobs = plan(workdir, with_changes(seeds=[1, 2]))
    assert counts["train"] == 1 and dumps(counts) == 3 and counts["metrics"] == 3, counts
    assert all(wc["seed"] == "2" for rule, wc in jobs if rule in PER_CELL | {"train"}), jobs
    assert counts["aggregate"] == 1


@pytest.mark.slow
def test_changing_a_figure_option_plans_only_figures(workdir):
    counts, _ = plan(workdir, with_changes(figures={"formats": ["png"], "dpi": 60}))
    assert counts, "the dpi is a param of the figure rules: they must rerun"
    figure_rules = ("figure_", "figures_")
    assert all(rule.startswith(figure_rules) or rule in ("figures", "all") for rule in counts), counts


@pytest.mark.slow
def test_changing_an_attack_parameter_never_retrains(workdir):
    more_steps = {"linf": {"epsilons": [64], "step": 32, "steps": 3}}
    counts, _ = plan(workdir, with_changes(attack__threats=more_steps))
    assert dumps(counts) == 3 and "train" not in counts, counts


@pytest.mark.slow
@pytest.mark.parametrize(("module", "expected", "forbidden"), [
    ("models.py", {"train"}, set()),
    # the removed (temporary) epoch-2 dump is re-made from its kept checkpoint; the kept dump is reused
    ("metrics.py", {"metrics", "aggregate", "features_temp"}, {"train", "features"}),
])
def test_editing_a_stage_module_reruns_that_stage(workdir, module, expected, forbidden):
    src = workdir / "ncpipe" / module
    original = src.read_bytes()
    try:
        src.write_bytes(original + b"\n# an edit\n")
        counts, jobs = plan(workdir, MINI)
        assert expected <= set(counts), counts
        assert not forbidden & set(counts), counts
        if module == "metrics.py":
            assert [wc["epoch"] for rule, wc in jobs if rule == "features_temp"] == ["2"], jobs
    finally:
        src.write_bytes(original)


@pytest.mark.slow
def test_a_metrics_code_change_reattacks_at_most_and_never_retrains(workdir):
    """The real rerun after a metrics-code change: the removed dump is re-made from the checkpoint and removed
    again; checkpoints are untouched, nothing is trained."""
    src = workdir / "ncpipe" / "metrics.py"
    run = workdir / "results" / "mnist5k" / "vgg11bn" / "st" / "seed1"
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    original, stamp = src.read_bytes(), src.stat()
    try:
        src.write_bytes(original + b"\n# an edit\n")
        out = snakemake(workdir, MINI, "--cores", "2")
    finally:  # the original bytes and dates: later tests of this workdir start from a completed run
        src.write_bytes(original)
        os.utime(src, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        snakemake(workdir, MINI, "--cores", "2")
    assert "rule train:" not in out and "rule features:" not in out and "rule features_temp:" in out
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == before
    assert sorted(p.name for p in (run / "features").iterdir()) == ["epoch1_linf_eps64.h5",
                                                                      "epoch3_linf_eps64.h5"]


# ------------------------------------------------------------------------------ the declared code inputs
STAGE_ENTRY = {"train": "train", "features": "extract", "metrics": "evaluate", "layerwise": "layerwise",
               "figures": "figures", "tables": "tables"}


def package_imports(module: str) -> set[str]:
    """ncpipe modules that ``module`` imports anywhere in its source (function-level imports included)."""
    pkg = REPO / "ncpipe"
    found = set()
    for node in ast.walk(ast.parse((pkg / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:  # from . import x, __version__
                found.update(a.name for a in node.names if (pkg / f"{a.name}.py").exists())
                found.update("__init__" for a in node.names if a.name == "__version__")
    return found


def import_closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(package_imports(m))
    return seen


def stage_modules() -> dict[str, list[str]]:
    text = (REPO / "workflow" / "rules" / "common.smk").read_text()
    assert "from ncpipe.stages import STAGE_MODULES" in text, "common.smk must use the one list"
    from ncpipe.stages import STAGE_MODULES

    return STAGE_MODULES


def test_package_imports_sees_function_level_imports():
    assert {"session", "io", "specs"} <= package_imports("extract")
    assert {"checkpoint", "data", "layerwise"} <= package_imports("inspect")  # imported inside verify_dump
    # no evaluating stage borrows the trainer
    assert "train" not in import_closure("extract") | import_closure("layerwise")
    assert "grid" in import_closure("layerwise") and "paths" in import_closure("layerwise")


@pytest.mark.parametrize("stage", sorted(STAGE_ENTRY))
def test_each_stage_declares_every_module_it_imports(stage):
    """Editing any module a stage's code reaches must rerun that stage; a module missing here would not."""
    declared = stage_modules()[stage]
    missing = import_closure(STAGE_ENTRY[stage]) - set(declared)
    assert not missing, f"STAGE_MODULES[{stage!r}] in common.smk lacks {sorted(missing)}"
    assert all((REPO / "ncpipe" / f"{m}.py").exists() for m in declared), declared


# ------------------------------------------------------------------ the commands that error messages advise
def _advised(message: str) -> list[str]:
    """The `snakemake ...` arguments of a "regenerate it with:" message (without the executable)."""
    import shlex

    m = re.search(r"regenerate it with: (snakemake .*?) \(plus", message)
    assert m, message
    return shlex.split(m.group(1))[1:]


@contextlib.contextmanager
def _same_mtime(path: Path):
    """Damage as bit rot or a bad copy does it: the bytes change, the time stamps do not."""
    st = path.stat()
    yield
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.slow
def test_the_advised_command_regenerates_an_edited_checkpoint(workdir, monkeypatch):
    """The issue's trap: after damage, plain `snakemake` does nothing; the advised command retrains the run
    (deterministically: the same weights) and everything made from it."""
    import torch

    from ncpipe.checkpoint import CorruptCheckpointError, load_checkpoint

    monkeypatch.chdir(workdir)
    ckpt = Path("results/mnist5k/vgg11bn/st/seed1/checkpoints/epoch1.pt")
    table = workdir / "results" / "metrics.csv"
    weights, metrics = load_checkpoint(ckpt)[1]["model"], table.read_bytes()
    payload = torch.load(ckpt, weights_only=False)
    payload["epoch"] = 2
    with _same_mtime(ckpt):  # damage, not an update
        torch.save(payload, ckpt)
    assert plan(workdir, MINI)[0] == Counter()  # Snakemake cannot see the damage
    with pytest.raises(CorruptCheckpointError) as e:
        load_checkpoint(ckpt)
    snakemake(workdir, MINI, *_advised(str(e.value)))
    again = load_checkpoint(ckpt)[1]
    assert again["epoch"] == 1 and all(torch.equal(again["model"][k], weights[k]) for k in weights)
    assert table.read_bytes() == metrics
    assert plan(workdir, MINI)[0] == Counter()


@pytest.mark.slow
def test_the_advised_commands_regenerate_a_damaged_dump_and_table(workdir, monkeypatch):
    import h5py

    from ncpipe import io
    from ncpipe.evaluate import evaluate_dump
    from ncpipe.tidy import aggregate_metrics
    from ncpipe.utils import ArtifactError

    monkeypatch.chdir(workdir)
    run = Path("results/mnist5k/vgg11bn/st/seed1")
    dump, table = run / "features/epoch3_linf_eps64.h5", run / "metrics/epoch1_linf_eps64.csv"  # a kept dump
    with h5py.File(dump, "r") as f:
        labels, info = f["train/pgd/labels"][:], f["train/pgd/labels"].id.get_chunk_info(0)
    table_bytes, all_metrics = table.read_bytes(), (workdir / "results/metrics.csv").read_bytes()
    with _same_mtime(dump), open(dump, "r+b") as fh:  # one flipped bit in the labels
        fh.seek(info.byte_offset + 3)
        b = fh.read(1)
        fh.seek(info.byte_offset + 3)
        fh.write(bytes([b[0] ^ 1]))
    assert plan(workdir, MINI)[0] == Counter()
    with pytest.raises(io.DumpError, match="/train/pgd/labels") as e:
        evaluate_dump(dump)
    snakemake(workdir, MINI, *_advised(str(e.value)))
    with h5py.File(dump, "r") as f:
        assert (f["train/pgd/labels"][:] == labels).all()
    assert (workdir / "results/metrics.csv").read_bytes() == all_metrics
    # a table cut short (one at a time: with both damaged, the first rerun stops at the other one, rightly)
    with _same_mtime(table):
        table.write_bytes(table_bytes[: len(table_bytes) // 2])
    assert plan(workdir, MINI)[0] == Counter()
    with pytest.raises(ArtifactError, match="does not match the digest") as e:
        aggregate_metrics([table])
    snakemake(workdir, MINI, *_advised(str(e.value)))
    assert table.read_bytes() == table_bytes
    assert (workdir / "results/metrics.csv").read_bytes() == all_metrics
    assert plan(workdir, MINI)[0] == Counter()
