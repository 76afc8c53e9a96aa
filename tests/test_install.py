"""ncpipe as a user installs it: the wheel, outside the repository.

Builds the wheel (no isolation, no dependencies: seconds), unpacks it with ``pip install --target`` into a
temporary folder, and from a working directory outside the clone, with ``PYTHONPATH`` naming only that folder
(the dependencies come from this interpreter's site-packages), imports every module, runs ``ncpipe inspect``
on a feature dump and a layerwise file, and opens both with ``to_xarray``.  A run-time file left outside the
package (the config schema once lived in workflow/) fails here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in (REPO / "ncpipe").glob("*.py") if p.stem != "__main__")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    # built from a copy of what the wheel is made of, so setuptools' build/ never lands in the clone
    src = root / "src"
    shutil.copytree(REPO / "ncpipe", src / "ncpipe", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src)],
                   check=True, cwd=root, capture_output=True)
    (wheel,) = (root / "dist").glob("ncpipe-*.whl")
    target = root / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)],
                   check=True, cwd=root, capture_output=True)
    return target


def run_outside(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_wheel_carries_the_schema_and_every_module(installed: Path) -> None:
    assert (installed / "ncpipe" / "schemas" / "config.schema.yaml").is_file()
    assert sorted(p.stem for p in (installed / "ncpipe").glob("*.py") if p.stem != "__main__") == MODULES
    assert not (installed / "workflow").exists()


def test_every_module_imports_outside_the_repository(installed: Path, tmp_path: Path) -> None:
    code = (f"import importlib, ncpipe; assert ncpipe.__file__.startswith({str(installed)!r}); "
            f"[importlib.import_module('ncpipe.' + m) for m in {MODULES!r}]; "
            "from ncpipe.config import SCHEMA_PATH; print(SCHEMA_PATH)")
    r = run_outside(installed, tmp_path, "-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(installed))


def test_inspect_and_xarray_outside_the_repository(installed: Path, tmp_path: Path,
                                                   tiny_dump: dict[str, Path], tiny_layerwise: Path) -> None:
    pytest.importorskip("xarray")
    for path, kind in ((tiny_dump["dump"], "features"), (tiny_layerwise, "layerwise")):
        r = run_outside(installed, tmp_path, "-m", "ncpipe", "inspect", str(path))
        assert r.returncode == 0, r.stderr
        assert f"ncpipe {kind} file" in r.stdout
    code = ("import sys; from ncpipe import io; "
            "d = io.to_xarray(sys.argv[1]); w = io.to_xarray(sys.argv[2]); "
            "print(dict(d.sizes)['perturbation'], len(w.attrs['layers']), int(w.sizes['sample']))")
    r = run_outside(installed, tmp_path, "-c", code, str(tiny_dump["dump"]), str(tiny_layerwise))
    assert r.returncode == 0, r.stderr
    kinds, layers, samples = map(int, r.stdout.split())
    assert kinds == 5 and layers == 8 and samples == 20
