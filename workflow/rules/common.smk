# The grid, the paths and the per-rule config slices all come from the ncpipe package (one source of truth).
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from ncpipe import grid, paths
from ncpipe.config import ConfigError, validate_config

try:
    validate_config(config)  # fills defaults; names the bad key and the allowed values
except ConfigError as err:
    raise WorkflowError(f"invalid configuration: {err}") from None
validate(config, schema="../schemas/config.schema.yaml")

# Clusters' shared file systems often refuse HDF5's file locks; the SLURM plugin exports the environment.
os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")

# Run the CLI of the interpreter that runs Snakemake, whether or not its venv is activated.
shell.prefix(f"export PATH={Path(sys.executable).parent}:$PATH; ")

REPO = Path(workflow.basedir).parent


wildcard_constraints:
    dataset="|".join(config["datasets"]),
    arch="|".join(config["archs"]),
    regime=r"(st|at_[a-z0-9]+|trades_[a-z0-9]+)[0-9.]*",
    seed=r"\d+",
    epoch=r"\d+",
    norm="linf|l2",
    eps=r"[0-9.]+",
    family=r"[a-z0-9_]+",
    stem=r"[A-Za-z0-9_.\-]+",


# The ncpipe modules each stage runs; declared as inputs so a content change reruns exactly that stage
# (small inputs are checksum-compared, so a bare `touch` reruns nothing).
STAGE_MODULES = {
    "train": ["__init__", "data", "models", "attacks", "train", "utils"],
    "features": ["__init__", "data", "models", "attacks", "train", "extract", "io", "utils"],
    "metrics": ["metrics", "evaluate", "io"],
    "layerwise": ["__init__", "data", "models", "attacks", "train", "extract", "io", "utils", "metrics", "layerwise"],
    "figures": ["figures"],
}


def code(stage):
    return [os.path.relpath(REPO / "ncpipe" / f"{m}.py") for m in STAGE_MODULES[stage]]


def checkpoint_outputs(wildcards=None):
    epochs = sorted(config["train"]["checkpoints"])
    return expand(paths.CHECKPOINT, epoch=epochs, allow_missing=True)


def figure_outputs():
    from ncpipe.figures import FAMILIES, figure_stems

    return [
        paths.format_path(paths.FIGURE, name=f"{fam}/{stem}", ext=ext)
        for fam in FAMILIES
        for stem in figure_stems(config, fam)
        for ext in config["figures"]["formats"]
    ]


def all_targets():
    layerwise = [paths.ALL_LAYERWISE] if config["layerwise"]["enabled"] else []
    return [paths.ALL_METRICS, *layerwise, *figure_outputs()]
