"""Which ncpipe modules each workflow stage runs: the one list that Snakemake and the trainer both use.

``workflow/rules/common.smk`` declares ``STAGE_MODULES[stage]`` as inputs of the stage's rules, so a content
change to one of them reruns exactly that stage; ``ncpipe train`` keys its resume state by
``code_digest("train")`` over the same files, so a run interrupted under old code never continues under new
code.  No stage imports this module (the CLI does, for the trainer): editing these lists must not itself
count as a change of any stage's code.
"""

from __future__ import annotations

import os
from pathlib import Path

from .utils import module_digest

STAGE_MODULES: dict[str, list[str]] = {
    "train": ["__init__", "config", "specs", "data", "models", "attacks", "runtime", "checkpoint", "train",
              "utils", "progress", "grid", "paths"],
    "features": ["__init__", "config", "specs", "data", "models", "attacks", "runtime", "checkpoint",
                 "session", "extract", "io", "utils", "progress", "grid", "paths", "external"],
    "metrics": ["config", "metrics", "evaluate", "io", "utils", "leap"],
    "layerwise": ["__init__", "config", "specs", "data", "models", "attacks", "runtime", "checkpoint",
                  "session", "io", "utils", "metrics", "layerwise", "grid", "paths", "progress", "external"],
    "figures": ["config", "figures", "families", "io", "paths", "grid", "specs", "utils", "leap"],
    "tables": ["tables", "families", "paths", "grid", "specs", "config", "utils", "leap", "metrics", "io",
               "tidy"],
}

PACKAGE_DIR = Path(__file__).resolve().parent


def module_files(stage: str, package_dir: str | os.PathLike | None = None) -> list[Path]:
    """The source files of ``stage``'s modules."""
    root = Path(package_dir) if package_dir else PACKAGE_DIR
    return [root / f"{m}.py" for m in STAGE_MODULES[stage]]


def code_digest(stage: str, package_dir: str | os.PathLike | None = None) -> str:
    """sha256 over the names and contents of ``stage``'s modules (the files Snakemake reruns it for)."""
    return module_digest(STAGE_MODULES[stage], package_dir)
