# The grid, the paths and the per-rule config slices all come from the ncpipe package (one source of truth).
import logging
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate
from snakemake_interface_logger_plugins.common import LogEvent

from ncpipe import families, grid, paths
from ncpipe.config import SCHEMA_PATH, ConfigError, validate_config

try:
    validate_config(config)  # fills defaults; names the bad key and the allowed values
except ConfigError as err:
    raise WorkflowError(f"invalid configuration: {err}") from None
validate(config, schema=str(SCHEMA_PATH))  # package data: the one schema

# External checkpoints (config `external`): each entry's file is loaded into its model once here, so a missing or
# malformed file, a state dict that does not load or a missing module fails before any job, naming the key.
if config.get("external"):
    from ncpipe.external import validate_external

    try:
        validate_external(config)
    except ConfigError as err:
        raise WorkflowError(f"invalid configuration: {err}") from None

# Clusters' shared file systems often refuse HDF5's file locks; the SLURM plugin exports the environment.
os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")

# Run the CLI of the interpreter that runs Snakemake, whether or not its venv is activated.
shell.prefix(f"export PATH={Path(sys.executable).parent}:$PATH; ")

REPO = Path(workflow.basedir).parent

# A dry run reports the plan.  Shell commands (the profiles' `printshellcmds`, meant for real runs) are never
# printed by `-n`; the ~10-line block of every job is printed only for plans of up to DRY_RUN_LISTED jobs (a
# paper grid would print 50,000 lines), else the job table alone.  `snakemake -n --verbose` lists everything.
DRY_RUN_LISTED = 500


class _DryRunPlan(logging.Filter):
    _large = None

    def large(self):
        if self._large is None:
            try:  # an internal API: if it moves, list every job as Snakemake does
                self._large = sum(1 for _ in workflow.dag.needrun_jobs()) > DRY_RUN_LISTED
            except Exception:
                self._large = False
        return self._large

    def filter(self, record):
        event = getattr(record, "event", None)
        if event == LogEvent.SHELLCMD:
            return False
        if event in (LogEvent.JOB_INFO, LogEvent.GROUP_INFO):
            return not self.large()
        # one "Would remove temporary output" line per features.keep-temporary dump: a job's detail too
        if str(record.msg).startswith("Would remove temporary output"):
            return not self.large()
        return True


_out = workflow.output_settings  # None where Snakemake parses the workflow without output settings
if getattr(_out, "dryrun", False) and not getattr(_out, "verbose", False):
    logging.getLogger("snakemake.logging").addFilter(_DryRunPlan())


# patterns from paths.WILDCARD_PATTERNS (one home); dataset and arch narrowed to the config's own lists
wildcard_constraints:
    dataset="|".join(config["datasets"]),
    arch="|".join(sorted({*config["archs"], *(r.arch for r in grid.external_runs(config))})),
    regime=paths.WILDCARD_PATTERNS["regime"],
    seed=paths.WILDCARD_PATTERNS["seed"],
    epoch=paths.WILDCARD_PATTERNS["epoch"],
    norm=paths.WILDCARD_PATTERNS["norm"],
    eps=paths.WILDCARD_PATTERNS["eps"],
    family=paths.WILDCARD_PATTERNS["family"],
    stem=paths.WILDCARD_PATTERNS["stem"],


# The ncpipe modules each stage runs (ncpipe.stages, which the trainer's resume key uses too); declared as
# inputs so a content change reruns exactly that stage (small inputs are checksum-compared, so a bare `touch`
# reruns nothing).
from ncpipe.stages import STAGE_MODULES


def code(stage):
    return [os.path.relpath(REPO / "ncpipe" / f"{m}.py") for m in STAGE_MODULES[stage]]


def checkpoint_outputs(wildcards=None):
    epochs = sorted(config["train"]["checkpoints"])
    return expand(paths.CHECKPOINT, epoch=epochs, allow_missing=True)


# Report metadata of a figure rule's outputs: the labels name the wildcards in the family's file stem.
REPORT_LABELS = {
    "dataset": ("dataset", "{dataset}"),
    "arch": ("architecture", "{arch}"),
    "regime": ("training", "{regime}"),
    "norm": ("evaluation threat", "{norm} {eps}/255"),
}


def figure_rule_outputs(family):
    """The output patterns of the figure_<family> rule, one per format (the first goes into the report)."""
    fam = families.FAMILIES[family]
    keys = [k for k in REPORT_LABELS if k in families.stem_keys(family)]
    sub = " / ".join(f"{{{k}}}" for k in ("dataset", "arch") if k in keys)
    labels = dict(REPORT_LABELS[k] for k in keys)
    formats = config["figures"]["formats"]
    out = [families.figure_path(family, fam.stem, ext) for ext in formats]
    out[0] = report(out[0], caption=f"../report/{family}.rst", category=fam.category, subcategory=sub,
                    labels=labels)
    return out


def family_figure_outputs(family):
    """Every file of a one-job family (each figure in every format); the first format of each goes into the
    report, labelled from its stem (the rule has no wildcards)."""
    fam = families.FAMILIES[family]
    keys = [k for k in REPORT_LABELS if k in families.stem_keys(family)]
    out = []
    for stem in families.figure_stems(config, family):
        w = families.parse_stem(family, stem)
        sub = " / ".join(w[k] for k in ("dataset", "arch") if k in keys)
        labels = {REPORT_LABELS[k][0]: REPORT_LABELS[k][1].format(**w) for k in keys}
        for i, ext in enumerate(config["figures"]["formats"]):
            path = families.figure_path(family, stem, ext)
            out.append(report(path, caption=f"../report/{family}.rst", category=fam.category,
                              subcategory=sub, labels=labels) if i == 0 else path)
    return out


def figure_outputs():
    # only families whose input table some rule makes (the layerwise table comes with the layerwise rules)
    produced = {str(o) for r in workflow.rules for o in r.output}
    return families.figure_targets(config, produced)


def figure_and_table_targets():
    """Every figure and table file of the config, the input of the `figures` rule (call after all rules)."""
    return [*figure_outputs(), *families.table_targets(config)]


def aggregated_tables():
    """The aggregated tidy tables that the `all` rule asks for next to the figures."""
    return [paths.ALL_METRICS, *([paths.ALL_LAYERWISE] if config["layerwise"]["enabled"] else [])]


# A missing dataset fails here, before any job starts, naming the directory and files it expects (with
# `data.download: true` the missing ones are fetched once, in this one process).  `onstart` does not run for
# dry runs (`snakemake -n` plans the full grid with no data present) nor in cluster-submitted jobs.
onstart:
    from ncpipe.data import DatasetMissingError, ensure_datasets

    try:
        _needed = {
            j.wildcards["dataset"]
            for j in workflow.dag.needrun_jobs()
            if (j.rule.name in ("train", "features") or j.rule.name.startswith("layerwise"))
            and "dataset" in j.wildcards.keys()
        }
    except Exception:  # an internal API: if it moves, check every dataset of the config
        _needed = set(config["datasets"])
    try:
        ensure_datasets(sorted(_needed & set(config["datasets"])), config["data"]["dir"], config["data"]["download"])
    except DatasetMissingError as err:
        raise WorkflowError(str(err)) from None
