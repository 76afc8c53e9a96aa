"""The cost of a config's grid before anything runs: jobs per rule, passes per stage, storage per kind.

``ncpipe plan --configfile FILE [--json]``.  The job counts come from the same grid functions the rules expand
(``ncpipe.grid``, ``ncpipe.families``), so they equal Snakemake's dry run of an empty results directory
(tests/test_grid_plans.py checks it for every shipped config).  Passes are counted in *image passes*: one
forward (or backward) pass of one image through the network; AutoAttack's are an upper bound (every point
attacked by every one of its attacks for every iteration, where it attacks only the points still robust).
Storage is computed from the models' exact
tensor sizes (built on the CPU, one dummy forward pass for the probe shapes) and the configured dtype; HDF5
compression is not counted, so feature sizes are upper bounds (gzip saves little on float features).

What is kept on disk is decided by one function per artifact kind (``retention``): the storage forecast is
``kept files x bytes per file``, and a retention policy (e.g. ``features.keep``) changes only that function.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from . import families, grid
from .data import DATASETS

GB = 1e9
_INT64 = 8
_DTYPE_BYTES = {"float32": 4, "float16": 2}
# metrics CSV: about 32 rows per (split, perturbation kind) of ~90 bytes (measured on the demo's tables)
_METRIC_ROWS_PER_GROUP, _CSV_ROW_BYTES = 32, 90


def split_sizes(config: dict[str, Any], dataset: str) -> dict[str, int]:
    """Images per split the stages read (balanced subsets where data.*_per_class is set)."""
    ds, d = DATASETS[dataset], config["data"]
    out = {}
    for split, n in (("train", ds.train), ("test", ds.test)):
        per_class = d.get(f"{split}_per_class")
        out[split] = n if per_class is None else min(n, per_class * ds.classes)
    return out


@dataclass(frozen=True)
class ModelShape:
    feature_dim: int
    checkpoint_bytes: int  # tensors of the model's state dict
    probe_dims: dict[str, int]  # per-sample size of each layerwise probe's output, as stored (after pooling)


def model_shape(arch: str, dataset: str, width: float, pool: int = 0) -> ModelShape:
    """Sizes of one model, measured on a CPU instance and one dummy image."""
    from .models import build_model

    ds = DATASETS[dataset]
    model = build_model(arch, num_classes=ds.classes, in_channels=ds.channels, mean=(0.5,) * ds.channels,
                        std=(0.5,) * ds.channels, width=width, stem=ds.stem).eval()
    return _measure(model, dataset, pool)


def external_shape(config: dict[str, Any], run: grid.Run) -> ModelShape:
    """Sizes of an external run's model (config ``external``): its architecture, no weights needed, so the
    plan works before the checkpoint file exists (a whole pickled model, format ``model``, is read)."""
    from .external import InputShape, build_external
    from .specs import ExternalSpec

    entry = grid.external_entry(config, run.regime)
    key = f"external[{grid.external_entries(config).index(entry)}]"
    ds = DATASETS[run.dataset]
    model = build_external(ExternalSpec.from_dict(entry, key), InputShape(ds.classes, ds.channels, ds.pixels,
                                                                          ds.stem), key, weights=False)
    return _measure(model, run.dataset, int(config["layerwise"].get("pool", 0)))


def _measure(model: Any, dataset: str, pool: int) -> ModelShape:
    import torch

    ds = DATASETS[dataset]
    ckpt = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    dims: dict[str, int] = {}

    def hook(name: str):
        def fn(_m: Any, _i: Any, out: torch.Tensor) -> None:
            shape = list(out.shape[1:])
            if pool > 0 and len(shape) == 3 and (shape[1] > pool or shape[2] > pool):
                shape = [shape[0], pool, pool]  # layerwise.pool: adaptive average pooling of kept maps
            dims[name] = int(torch.tensor(shape).prod())
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.probe_layers()]
    with torch.no_grad():
        model(torch.zeros(1, ds.channels, ds.pixels, ds.pixels))
    for h in handles:
        h.remove()
    return ModelShape(model.feature_dim, ckpt, dims)


# --------------------------------------------------------------------------------------------------- jobs
def jobs(config: dict[str, Any]) -> dict[str, int]:
    """Jobs per rule of a from-scratch run, in the order of Snakemake's job table (no rules with 0 jobs)."""
    layerwise = bool(config["layerwise"]["enabled"])
    produced = {families.TABLES["metrics"], families.TABLES["train_logs"]}
    if layerwise:
        produced.add(families.TABLES["layerwise"])
    kept = set(families.kept_dump_epochs(config))
    cells = grid.cells(config)
    n = {
        "train": len(grid.trained_runs(config)),
        "features": sum(1 for c in cells if c.epoch in kept),  # features.keep: the kept dumps' rule
        "features_temp": sum(1 for c in cells if c.epoch not in kept),
        "layerwise": len(grid.layerwise_cells(config)) if layerwise else 0,
        "train_logs": int(bool(grid.trained_runs(config))),  # only the training curves read it
        "aggregate_layerwise": int(layerwise),
        "metrics": len(grid.cells(config)),
        "aggregate": 1,
        "accuracy_table": len(families.table_stems(config)),
    }
    n["leap_table"] = len(families.leap_table_stems(config))
    for fam, f in families.FAMILIES.items():
        if f.table not in families.TABLES:  # per-threat inputs (leap tables, feature dumps): a job per figure
            n[families.figure_rule(fam)] = len(families.figure_stems(config, fam))
    for table, path in families.TABLES.items():  # one job draws every family of a table (rules/figures.smk)
        if path in produced:
            n[families.table_rule(table)] = int(bool(families.table_families(config, table)))
    n["figures"] = n["all"] = 1
    return {k: v for k, v in n.items() if v}


# ------------------------------------------------------------------------------------------------- passes
def _train_passes_per_image(config: dict[str, Any], method: str) -> tuple[int, int]:
    """(forward, backward) passes per training image and epoch."""
    steps = int(config["train"]["adversary"]["steps"])
    if method == "st":
        return 1, 1
    if method == "at":  # PGD steps, the update on the adversarial batch, a clean forward for the logs
        final = int(bool(config["train"]["at_final_pass"]) and config["train"]["at_attack_mode"] == "train")
        return steps + 2 + final, steps + 1  # + the authors' unused objective pass (train.at_final_pass)
    # TRADES: the clean target, the KL-PGD steps, the loss's clean and adversarial passes
    return steps + 3, steps + 2


def autoattack_passes(options: dict[str, Any] | None, num_classes: int) -> tuple[int, int]:
    """(forward, backward) passes per image of ``attacks.autoattack``: an upper bound, exact for a point that
    stays robust through every attack (each attack sees only the points that all earlier ones left robust,
    and torchattacks' attacks drop a point once fooled).  Counted on torchattacks 3.5.1's code.

    ``options``: config ``attack.autoattack`` (version, attacks, steps, square_queries).
    """
    from . import attacks

    o = {**attacks.AUTOATTACK_DEFAULTS, **(options or {})}
    steps, queries = int(o["steps"]), int(o["square_queries"])
    targets = num_classes - 1  # APGD-T and FAB-T target every class but the true one (n_classes - 1)
    fwd, bwd = 1, 0  # the clean forward that selects the points to attack
    for name in attacks.autoattack_sequence(o):
        restarts, eot = attacks.autoattack_member_runs(name, str(o["version"]))
        if name in ("apgd-ce", "apgd-dlr"):  # the start's gradient and one per iteration, each over EOT draws
            f = b = restarts * eot * (steps + 1)
        elif name == "apgd-t":  # per target and restart: a clean forward choosing the target, then as APGD
            b = targets * restarts * (steps + 1)
            f = targets * restarts + b
        elif name == "fab-t":  # per target and restart: 2 clean forwards, per iteration a gradient and a
            f, b = targets * restarts * (3 + 2 * steps), targets * restarts * steps  # check, the final check
        elif name == "fab":  # untargeted: one backward per class and iteration
            f, b = restarts * (2 + 2 * steps), restarts * num_classes * steps
        else:  # square: the initial square's query, one per query, the final check; no gradients
            f, b = restarts * (queries + 2), 0
        fwd += 1 + f + 1  # + the attack's own clean accuracy pass, + ncpipe's check of its candidates
        bwd += b
    return fwd, bwd


def _attack_passes(config: dict[str, Any], norm: str, kind: str, num_classes: int) -> tuple[int, int]:
    """(forward, backward) passes per image of one perturbation kind in a features job."""
    if kind == "train_adv":
        return 0, 0  # recorded by training; the features job copies them
    if kind in ("pgd", "targeted"):  # each step, the restarts' selection (if several), the features
        t, r = config["attack"]["threats"][norm], int(config["attack"]["restarts"])
        return r * int(t["steps"]) + (r if r > 1 else 0) + 1, r * int(t["steps"])
    if kind == "autoattack":  # the attack (an upper bound), the features
        f, b = autoattack_passes(config["attack"].get("autoattack"), num_classes)
        return f + 1, b
    return 1, 0  # clean, noise: the features pass


def _kind_images(config: dict[str, Any], cell: grid.Cell, split: str, kind: str) -> int:
    """Images of ``split`` that ``kind`` perturbs in the cell's features job (0: the kind skips it)."""
    n = split_sizes(config, cell.run.dataset)[split]
    if kind != "autoattack":
        return n
    spec = grid.features_spec_of(config, cell.wildcards())  # the job's own spec: epochs and splits attacked
    aa = spec.autoattack
    if kind not in spec.kinds or aa is None or split not in aa.splits:
        return 0
    return n if aa.per_class <= 0 else min(n, aa.per_class * DATASETS[cell.run.dataset].classes)


def passes(config: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Image passes per stage: ``{stage: {"forward": n, "backward": n}}``."""
    out = {s: {"forward": 0, "backward": 0} for s in ("train", "features", "layerwise")}
    epochs, ckpts = int(config["train"]["epochs"]), len(config["train"]["checkpoints"])
    for run in grid.trained_runs(config):
        n = split_sizes(config, run.dataset)
        f, b = _train_passes_per_image(config, run.method)
        out["train"]["forward"] += epochs * (f * n["train"] + n["test"])  # + test accuracy every epoch
        out["train"]["backward"] += epochs * b * n["train"]
        if run.method != "st" and config["train"]["record_adversarial"]:
            out["train"]["forward"] += ckpts * n["train"]  # features of the recorded adversarial examples
    for cell in grid.cells(config):
        classes = DATASETS[cell.run.dataset].classes
        for split in config["attack"]["splits"]:
            for kind in config["attack"]["kinds"]:
                f, b = _attack_passes(config, cell.norm, kind, classes)
                images = _kind_images(config, cell, split, kind)
                out["features"]["forward"] += f * images
                out["features"]["backward"] += b * images
    if config["layerwise"]["enabled"]:
        for cell in grid.layerwise_cells(config):
            n = split_sizes(config, cell.run.dataset)["train"]
            steps = int(config["attack"]["threats"][cell.norm]["steps"]) * int(config["attack"]["restarts"])
            out["layerwise"]["forward"] += (2 + steps + 2) * n  # attack; 2 passes each, clean and PGD
            out["layerwise"]["backward"] += steps * n
    return out


# ------------------------------------------------------------------------------------------------ storage
@dataclass(frozen=True)
class Artifact:
    kind: str
    files: int  # written by the grid
    kept: int  # on disk at the end, under the retention policy
    bytes_per_file: float
    dtype: str
    retention: str

    @property
    def bytes(self) -> int:
        return int(round(self.kept * self.bytes_per_file))


RECORDED = "recorded adversarial features (epoch{E}.adv.pt)"


def retention(config: dict[str, Any], kind: str) -> tuple[set[int] | None, str]:
    """(epochs whose files of ``kind`` are kept, or None for all; the policy in words).

    Feature dumps follow ``features.keep`` (the others are Snakemake temp() outputs, removed once read;
    re-made by re-attacking their checkpoint when needed again).  Every other kind is kept: checkpoints and
    recorded adversarial features can only be made again by retraining and are never deleted automatically.
    """
    if kind == "feature dumps":
        keep = config["features"]["keep"]
        kept = set(families.kept_dump_epochs(config))
        if keep == "all":
            return None, "all kept"
        return kept, f"kept at epochs {sorted(kept)}, others temporary (features.keep: {keep})"
    return None, "all kept"


def _kept(files: list[int], keep: set[int] | None) -> int:
    return len(files) if keep is None else sum(1 for e in files if e in keep)


def _train_threat(config: dict[str, Any]) -> tuple[str, str]:
    adv = config["train"]["adversary"]
    return adv["norm"], grid.fmt_eps(adv["epsilon"])


def storage(config: dict[str, Any]) -> list[Artifact]:
    """Bytes per artifact kind (files written, files kept, mean size, dtype, retention)."""
    fdtype = config["features"]["dtype"]
    fbytes = _DTYPE_BYTES[fdtype]
    lw = config["layerwise"]
    shapes: dict[tuple[str, str], ModelShape] = {}
    for run in grid.trained_runs(config):
        if (run.arch, run.dataset) not in shapes:
            shapes[(run.arch, run.dataset)] = model_shape(run.arch, run.dataset, config["model"]["width"],
                                                          int(lw.get("pool", 0)))
    # an external model (no checkpoint of ncpipe's: no checkpoint rows) is sized from its own entry
    for run in grid.external_runs(config):
        shapes[(run.regime, run.dataset)] = external_shape(config, run)

    def shape(run: grid.Run) -> ModelShape:
        return shapes[(run.regime if grid.is_external(run.regime) else run.arch, run.dataset)]
    epochs = sorted(config["train"]["checkpoints"])
    record = bool(config["train"]["record_adversarial"])
    rdtype = config["train"]["record_dtype"]
    acc: dict[str, list[float]] = {}  # kind -> [files, kept, bytes kept]

    def add(kind: str, files: list[int], nbytes: float) -> None:
        keep, _ = retention(config, kind)
        a = acc.setdefault(kind, [0, 0, 0.0])
        kept = _kept(files, keep)
        a[0] += len(files)
        a[1] += kept
        a[2] += kept * nbytes

    for run in grid.trained_runs(config):
        sh, n = shapes[(run.arch, run.dataset)], split_sizes(config, run.dataset)
        add("checkpoints", epochs, sh.checkpoint_bytes)
        if run.method != "st" and record:
            add(RECORDED, epochs, n["train"] * (sh.feature_dim * _DTYPE_BYTES[rdtype] + _INT64))
    for cell in grid.cells(config):
        run = cell.run
        sh, n = shape(run), split_sizes(config, run.dataset)
        size, groups = 0.0, 0
        for split in config["attack"]["splits"]:
            for kind in config["attack"]["kinds"]:
                if kind == "train_adv" and not (split == "train" and run.method != "st" and record
                                                and not grid.is_external(run.regime)
                                                and (cell.norm, cell.eps) == _train_threat(config)):
                    continue  # written only where the evaluation threat is the training one
                rows = _kind_images(config, cell, split, kind)
                if rows == 0:
                    continue  # autoattack: not this split or epoch
                # + labels, predictions; targeted: targets (of the whole split); a subset: its indices
                extra = n[split] * _INT64 if kind == "targeted" else (_INT64 * rows if rows < n[split] else 0)
                size += rows * (sh.feature_dim * fbytes + 2 * _INT64) + extra
                groups += 1
        add("feature dumps", [cell.epoch], size)
        add("metrics tables", [cell.epoch], groups * _METRIC_ROWS_PER_GROUP * _CSV_ROW_BYTES)
    if lw["enabled"]:
        for cell in grid.layerwise_cells(config):
            run = cell.run
            sh, n = shape(run), split_sizes(config, run.dataset)
            per_class = int(lw["per_class"])
            classes = DATASETS[run.dataset].classes
            samples = n["train"] if per_class == 0 else min(n["train"], per_class * classes)
            size = 2 * sum(samples * (d * fbytes + 2 * _INT64) for d in sh.probe_dims.values())  # clean, pgd
            add("layerwise dumps", [cell.epoch], size)
    out = []
    for kind, (files, kept, nbytes) in acc.items():
        dtype = {"checkpoints": "float32 (state dict)", "metrics tables": "CSV"}.get(
            kind, rdtype if kind == RECORDED else fdtype)
        out.append(Artifact(kind, int(files), int(kept), nbytes / kept if kept else 0.0, dtype,
                            retention(config, kind)[1]))
    return out


# --------------------------------------------------------------------------------------------------- plan
def passes_notes(config: dict[str, Any]) -> list[str]:
    """What the pass counts are, where not simply exact (printed under the passes table)."""
    if "autoattack" not in config["attack"]["kinds"]:
        return []
    from . import attacks

    o = {**attacks.AUTOATTACK_DEFAULTS, **(config["attack"].get("autoattack") or {})}
    seq = ", ".join(attacks.autoattack_sequence(o))
    return [f"features: an upper bound; AutoAttack ({o['version']}: {seq}; {o['steps']} iterations, "
            f"{o['square_queries']} Square queries) counted as if every point were "
            "attacked by every attack for every iteration, where it attacks only the points still robust"]


def plan(config: dict[str, Any]) -> dict[str, Any]:
    """The whole forecast of a validated config, JSON-ready."""
    arts = storage(config)
    jb = jobs(config)
    return {
        "jobs": jb,
        "jobs_total": sum(jb.values()),
        "passes": passes(config),
        "passes_notes": passes_notes(config),
        "storage": {a.kind: {**asdict(a), "bytes": a.bytes} for a in arts},
        "storage_bytes": sum(a.bytes for a in arts),
    }


def format_plan(p: dict[str, Any], title: str = "") -> str:
    """The plan as plain-text tables (what ``ncpipe plan`` prints without ``--json``)."""
    lines = [f"Plan of {title}" if title else "Plan", ""]
    w = max(len(k) for k in p["jobs"])
    lines += [f"{'rule':<{w}}  {'jobs':>7}", f"{'-' * w}  {'-' * 7}"]
    lines += [f"{k:<{w}}  {v:>7}" for k, v in p["jobs"].items()]
    lines += [f"{'total':<{w}}  {p['jobs_total']:>7}", ""]
    lines += ["image passes (one image through the network once)", f"{'stage':<10}  {'forward':>16}  "
              f"{'backward':>16}"]
    for stage, v in p["passes"].items():
        lines.append(f"{stage:<10}  {v['forward']:>16,}  {v['backward']:>16,}")
    lines += [f"({note})" for note in p.get("passes_notes", [])]
    lines.append("")
    w = max((len(k) for k in p["storage"]), default=len("storage"))
    lines.append(f"{'storage':<{w}}  {'files':>7}  {'kept':>7}  {'MB/file':>9}  {'GB kept':>9}  "
                 "dtype, retention")
    for kind, a in p["storage"].items():
        lines.append(f"{kind:<{w}}  {a['files']:>7}  {a['kept']:>7}  {a['bytes_per_file'] / 1e6:>9.2f}  "
                     f"{a['bytes'] / GB:>9.1f}  {a['dtype']}, {a['retention']}")
    lines.append(f"{'total':<{w}}  {'':>7}  {'':>7}  {'':>9}  {p['storage_bytes'] / GB:>9.1f}")
    lines.append("(feature sizes before HDF5 compression: upper bounds; metrics tables: an estimate)")
    return "\n".join(lines)


def to_json(p: dict[str, Any]) -> str:
    return json.dumps(p, indent=2)
