"""Per-rule job-seconds of a finished run, from Snakemake's ``benchmark:`` files, as a Markdown table.

    python benchmarks/job_overhead.py results                      # one run
    python benchmarks/job_overhead.py results --before old/results  # before / after, e.g. for the README

Sums the wall seconds (``s``) and CPU seconds (``cpu_time``) of every ``results/benchmarks/{rule}/**/*.tsv``
(a file with several rows, from ``benchmark: repeat(...)``, counts as their mean) and reports the CPU-only
bookkeeping rules (every rule not named by ``--science``) against the training job-seconds: the issue's target
is bookkeeping <= 0.5 x training. Job-seconds of concurrent jobs on a shared machine include waiting for the
cores, so compare runs made under the same load.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

SCIENCE = ("train", "features", "layerwise")


@dataclass
class RuleCost:
    jobs: int = 0
    seconds: float = 0.0
    cpu: float = 0.0


def rule_costs(results: Path) -> dict[str, RuleCost]:
    root = results / "benchmarks"
    if not root.is_dir():
        raise SystemExit(f"{root} not found: pass a results directory of a finished run")
    costs: dict[str, RuleCost] = {}
    for rule_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        cost = costs.setdefault(rule_dir.name, RuleCost())
        for tsv in sorted(rule_dir.rglob("*.tsv")):
            with tsv.open(newline="") as fh:
                rows = list(csv.DictReader(fh, delimiter="\t"))
            if not rows:
                continue
            cost.jobs += 1
            cost.seconds += sum(float(r["s"]) for r in rows) / len(rows)
            cost.cpu += sum(_float(r.get("cpu_time")) for r in rows) / len(rows)
    return costs


def _float(x: str | None) -> float:
    try:
        return float(x) if x not in (None, "", "NA", "-") else 0.0
    except ValueError:
        return 0.0


def _totals(costs: dict[str, RuleCost], science: tuple[str, ...]) -> dict[str, float]:
    book = sum(c.seconds for r, c in costs.items() if r not in science)
    train = costs.get("train", RuleCost()).seconds
    book_cpu = sum(c.cpu for r, c in costs.items() if r not in science)
    train_cpu = costs.get("train", RuleCost()).cpu
    return {"bookkeeping": book, "training": train, "ratio": book / train if train else float("nan"),
            "all": sum(c.seconds for c in costs.values()), "bookkeeping_cpu": book_cpu,
            "training_cpu": train_cpu, "ratio_cpu": book_cpu / train_cpu if train_cpu else float("nan"),
            "all_cpu": sum(c.cpu for c in costs.values())}


def table(after: dict[str, RuleCost], before: dict[str, RuleCost] | None, science: tuple[str, ...]) -> str:
    rules = sorted(set(after) | set(before or {}), key=lambda r: (r not in science, r))
    kind = {r: "science" if r in science else "bookkeeping" for r in rules}
    lines = []
    if before is None:
        lines += ["| rule | kind | jobs | job-seconds | s per job | CPU seconds |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in rules:
            c = after[r]
            lines.append(f"| {r} | {kind[r]} | {c.jobs} | {c.seconds:.1f} | {_per(c)} | {c.cpu:.1f} |")
    else:
        lines += ["| rule | kind | jobs before | jobs after | before s | after s | before CPU s "
                  "| after CPU s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rules:
            b, a = before.get(r, RuleCost()), after.get(r, RuleCost())
            lines.append(f"| {r} | {kind[r]} | {b.jobs} | {a.jobs} | {b.seconds:.1f} | {a.seconds:.1f} | "
                         f"{b.cpu:.1f} | {a.cpu:.1f} |")
    lines.append("")
    for label, costs in (("before", before), ("after" if before else "run", after)):
        if costs is None:
            continue
        t = _totals(costs, science)
        lines.append(f"- {label}: bookkeeping {t['bookkeeping']:.1f} job-s, training {t['training']:.1f} "
                     f"job-s, ratio {t['ratio']:.2f} (target <= 0.5); all rules {t['all']:.1f} job-s; CPU: "
                     f"bookkeeping {t['bookkeeping_cpu']:.1f} s, training {t['training_cpu']:.1f} s, ratio "
                     f"{t['ratio_cpu']:.2f}, all rules {t['all_cpu']:.1f} s")
    return "\n".join(lines) + "\n"


def _per(c: RuleCost) -> str:
    return f"{c.seconds / c.jobs:.2f}" if c.jobs else "-"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="results directory of a finished run (the 'after' run)")
    p.add_argument("--before", type=Path, default=None, help="results directory of the run to compare with")
    p.add_argument("--science", default=",".join(SCIENCE),
                   help="comma-separated rules that are not bookkeeping (default: %(default)s)")
    a = p.parse_args(argv)
    science = tuple(s for s in a.science.split(",") if s)
    before = rule_costs(a.before) if a.before else None
    sys.stdout.write(table(rule_costs(a.results), before, science))


if __name__ == "__main__":
    main()
