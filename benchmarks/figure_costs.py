"""Where a figure job's seconds go, per job of a finished run, as a Markdown table.

    python benchmarks/figure_costs.py                     # the default config's figure jobs, from results/
    python benchmarks/figure_costs.py --configfile config/config.yaml --results results --repeat 3

Each figure job of the config (the same commands the figure rules run: one per aggregated table, one per leap
matrix and per simplex picture) runs in a fresh interpreter, as a Snakemake job does, and is split into: the
interpreter's start and the imports (matplotlib, seaborn, pandas), building each figure (data selection,
Axes, artists), laying it out (``tight_layout`` and the legend/title placement of ``finish``), the tight crop,
and saving each format.  Outputs go to a temporary directory; the results directory is only read.  The
minimum over ``--repeat`` runs of each job is reported (a shared machine's noise only ever adds time).  The
last line is the floor that no faster building or layout can remove: starting and importing once per job plus
rendering and encoding every file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("imports", "build", "layout", "crop", "save_png", "save_pdf")


def _child(job: dict) -> dict:
    """Run one figure job in this process with each stage timed (the parent starts a fresh interpreter)."""
    t0 = time.perf_counter()
    from matplotlib.figure import Figure

    from ncpipe import figures

    times = dict.fromkeys(STAGES, 0.0)
    times["imports"] = time.perf_counter() - t0
    active: set[str] = set()

    def timed(owner: object, name: str, stage) -> None:
        inner = getattr(owner, name)

        def wrapper(*a, **k):
            key = stage(a, k) if callable(stage) else stage
            if key in active:  # tight_layout inside finish: counted once, as finish's
                return inner(*a, **k)
            active.add(key)
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                active.discard(key)
                times[key] += time.perf_counter() - t

        setattr(owner, name, wrapper)

    # building = the drawing function minus the layout it ends with (finish, or tight_layout itself)
    timed(figures, "_draw", "build")
    timed(figures, "finish", "layout")
    timed(Figure, "tight_layout", "layout")
    timed(figures, "fit_to_content", "crop")
    timed(Figure, "savefig", lambda a, k: f"save_{k.get('format', 'png')}")
    from ncpipe.cli import main

    t = time.perf_counter()
    main(job["argv"])
    total = time.perf_counter() - t
    times["build"] -= min(times["layout"], times["build"])  # finish/tight_layout run inside _draw
    return {"times": times, "in_process": times["imports"] + total}


def figure_jobs(config: dict, outdir: str) -> list[dict]:
    """The argv of each figure job of ``config``, as the figure rules build it, writing under ``outdir``."""
    from ncpipe import families, grid

    spec = grid.figures_spec(config)
    jobs = []
    for table, path in families.TABLES.items():
        fams = families.table_families(config, table)
        names = [f"{f}/{s}" for f in fams for s in families.figure_stems(config, f)]
        if names:
            jobs.append({"job": families.table_rule(table), "figures": len(names),
                         "argv": ["figures", "--table", path, "--outdir", outdir, "--spec", spec, *names]})
    for stem in families.figure_stems(config, "leap_matrix"):
        sel = families.parse_stem("leap_matrix", stem)
        table = families.family_table("leap_matrix").format(**sel)
        jobs.append({"job": f"figure_leap_matrix {stem}", "figures": 1,
                     "argv": ["figures", "--table", table, "--outdir", outdir, "--spec", spec,
                              f"leap_matrix/{stem}"]})
    for stem in families.figure_stems(config, "simplex_projection"):
        dumps = families.simplex_dumps(config, families.parse_stem("simplex_projection", stem))
        jobs.append({"job": f"figure_simplex_projection {stem}", "figures": 1,
                     "argv": ["simplex-figure", "--outdir", f"{outdir}/simplex_projection", "--spec", spec,
                              "--stem", stem, *dumps]})
    return jobs


def _run(job: dict, repeat: int) -> dict:
    best: dict | None = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True,
                             text=True, check=False)
        wall = time.perf_counter() - t
        if out.returncode != 0:
            raise SystemExit(f"{job['job']} failed:\n{out.stderr[-2000:]}")
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        # the interpreter's own start (before the child's first line) belongs with the imports
        rec["times"]["imports"] += wall - rec["in_process"]
        rec["wall"] = wall
        if best is None or wall < best["wall"]:
            best = rec
    assert best is not None
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configfile", default="config/config.yaml")
    ap.add_argument("--results", default="results", help="a finished run's results directory (read only)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        import logging

        logging.disable(logging.INFO)
        print(json.dumps(_child(json.loads(a.child))))
        return
    import yaml

    from ncpipe.config import validate_config

    with open(a.configfile) as fh:
        config = validate_config(yaml.safe_load(fh))
    results = Path(a.results).resolve()
    if not (results / "metrics.csv").is_file():
        raise SystemExit(f"{results}/metrics.csv not found: pass --results of a finished run")
    with tempfile.TemporaryDirectory() as tmp:
        # the tables' paths are relative to the workflow's directory, where results/ lives
        os.chdir(results.parent)
        jobs = figure_jobs(config, tmp)
        rows = [(j, _run(j, a.repeat)) for j in jobs]
    print("| job | figures | " + " | ".join(STAGES) + " | total |")
    print("|---|---:|" + "---:|" * (len(STAGES) + 1))
    sums = dict.fromkeys(STAGES, 0.0)
    for job, rec in rows:
        for s in STAGES:
            sums[s] += rec["times"][s]
        cells = " | ".join(f"{rec['times'][s]:.2f}" for s in STAGES)
        print(f"| {job['job']} | {job['figures']} | {cells} | {rec['wall']:.2f} |")
    total = sum(r["wall"] for _, r in rows)
    figs = sum(j["figures"] for j, _ in rows)
    print(f"| all {len(rows)} jobs | {figs} | " + " | ".join(f"{sums[s]:.2f}" for s in STAGES)
          + f" | {total:.2f} |")
    floor = sums["imports"] + sums["save_png"] + sums["save_pdf"]
    print(f"\n- floor (start + imports once per job, then saving every file): {floor:.1f} s of {total:.1f} s "
          f"({100 * floor / total:.0f} %); building {sums['build']:.1f} s, layout + crop "
          f"{sums['layout'] + sums['crop']:.1f} s")


if __name__ == "__main__":
    main()
