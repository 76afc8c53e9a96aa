"""Command-line entry points, one per workflow stage (``ncpipe <stage> ...``).

Rules call these through ``shell:``; Snakemake tracks the rule text, and the stage's modules are declared as
rule inputs, so a content change to the code reruns exactly the stages that use it (a bare ``touch`` does
not).

Exit statuses (README, "When something goes wrong"): 0 success; 1 an unexpected error (a bug: traceback) or
``inspect --verify`` found a mismatch; 2 a missing, truncated or corrupted input file; 3 a readable input that
the request does not apply to; 4 an invalid configuration, spec or argument; 5 an output that cannot be
written (disk full, read-only, permission); 6 another trainer of the same cell is running; 7 training
diverged.  Known errors print one ``ERROR`` line and no traceback (set ``NCPIPE_DEBUG=1`` or pass
``--debug`` for one).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .utils import set_threads, setup_logging, write_csv_verified

log = logging.getLogger("ncpipe")

# The stages that compute with torch; the others never import it (a torch import is ~2 s of a small job).
TORCH_STAGES = frozenset({"train", "features", "layerwise", "inspect"})


def _spec(s: str) -> dict:
    return json.loads(Path(s[1:]).read_text()) if s.startswith("@") else json.loads(s)


def cmd_train(a: argparse.Namespace) -> None:
    from .specs import TrainSpec
    from .stages import code_digest
    from .train import run_training
    from .utils import UsageError

    spec = TrainSpec.from_dict(_spec(a.spec), "--spec")
    epochs = list(spec.checkpoints)
    if len(epochs) != len(a.checkpoints):
        raise UsageError(f"got {len(a.checkpoints)} checkpoint paths for checkpoint epochs {epochs}")
    run_training(spec, dict(zip(epochs, a.checkpoints, strict=True)), a.log_csv, a.resume_dir,
                 code_digest=code_digest("train"))


def cmd_features(a: argparse.Namespace) -> None:
    from .extract import extract_features
    from .specs import FeaturesSpec

    extract_features(FeaturesSpec.from_dict(_spec(a.spec), "--spec"), a.checkpoint, a.out)


def cmd_metrics(a: argparse.Namespace) -> None:
    from .evaluate import evaluate_table

    write_csv_verified(evaluate_table(a.dump, regime=a.regime, pinv_cutoff=a.pinv_cutoff), a.out)


def cmd_aggregate(a: argparse.Namespace) -> None:
    from .tidy import aggregate_metrics

    table = aggregate_metrics(a.tables)
    write_csv_verified(table, a.out)
    log.info("%d rows from %d tables -> %s", len(table), len(a.tables), a.out)


def cmd_layerwise(a: argparse.Namespace) -> None:
    from .layerwise import run_layerwise
    from .specs import LayerwiseSpec

    run_layerwise(LayerwiseSpec.from_dict(_spec(a.spec), "--spec"), a.checkpoint, a.out_csv, a.out_h5,
                  regime=a.regime)


def cmd_aggregate_layerwise(a: argparse.Namespace) -> None:
    from .tidy import aggregate_layerwise

    table = aggregate_layerwise(a.tables)
    write_csv_verified(table, a.out)
    log.info("%d rows from %d layerwise tables -> %s", len(table), len(a.tables), a.out)


def cmd_figures(a: argparse.Namespace) -> None:
    from .figures import draw_figures
    from .specs import FigureSpec

    spec = FigureSpec.from_dict(_spec(a.spec), "--spec")
    for path in draw_figures(a.table, a.names, a.outdir, spec):
        log.info("wrote %s", path)


def cmd_tables(a: argparse.Namespace) -> None:
    from .tables import write_accuracy_tables

    for path in write_accuracy_tables(a.table, a.stems, a.outdir):
        log.info("wrote %s", path)


def cmd_leap_table(a: argparse.Namespace) -> None:
    from .tables import write_leap_tables

    for path in write_leap_tables(a.dumps, a.stem, a.outdir):
        log.info("wrote %s", path)


def cmd_simplex_figure(a: argparse.Namespace) -> None:
    from .figures import draw_simplex_files
    from .specs import FigureSpec

    spec = FigureSpec.from_dict(_spec(a.spec), "--spec")
    for path in draw_simplex_files(a.dumps, a.stem, a.outdir, spec):
        log.info("wrote %s", path)


def cmd_train_logs(a: argparse.Namespace) -> None:
    from .tidy import aggregate_train_logs

    table = aggregate_train_logs(a.logs)
    write_csv_verified(table, a.out)
    log.info("%d rows from %d training logs -> %s", len(table), len(a.logs), a.out)


def cmd_summary(a: argparse.Namespace) -> None:
    from .summary import SummaryError, summarize

    try:
        text = summarize(a.results_dir)
        if a.readme:
            from .summary import replace_block
            from .utils import atomic_output

            updated = replace_block(Path(a.readme).read_text(), text)
            with atomic_output(a.readme) as tmp:
                tmp.write_text(updated)
            log.info("replaced the summary block of %s", a.readme)
            return
    except SummaryError as err:
        print(f"ncpipe summary: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    sys.stdout.write(text)


def cmd_inspect(a: argparse.Namespace) -> None:
    from .inspect import EXIT_NOT_SUPPORTED, EXIT_UNREADABLE, NotSupportedError, run
    from .io import DumpError

    try:
        text, status = run(a.file, as_json=a.json, verify=a.verify, checkpoint=a.checkpoint, rows=a.rows,
                           data_dir=a.data_dir)
    except NotSupportedError as err:  # a readable file asked for something this ncpipe cannot do with it
        print(f"ncpipe inspect: {err}", file=sys.stderr)
        raise SystemExit(EXIT_NOT_SUPPORTED) from None
    except DumpError as err:  # a clear one-line message, no traceback, for a bad file
        print(f"ncpipe inspect: {err}", file=sys.stderr)
        raise SystemExit(EXIT_UNREADABLE) from None
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `ncpipe inspect F | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if status:
        raise SystemExit(status)


def cmd_plan(a: argparse.Namespace) -> None:
    from .config import ConfigError, load_config
    from .plan import format_plan, plan, to_json

    try:
        config = load_config(a.configfile)
    except (ConfigError, OSError) as err:
        print(f"ncpipe plan: {a.configfile}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    p = plan(config)
    print(to_json({"configfile": a.configfile, **p}) if a.json else format_plan(p, a.configfile), flush=True)


EXIT_BUG = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_SUPPORTED = 3
EXIT_USAGE = 4
EXIT_CANNOT_WRITE = 5
EXIT_BUSY = 6
EXIT_DIVERGED = 7


def _known_errors() -> list[tuple[type[BaseException], int]]:
    """User-facing error classes and their exit statuses, most specific first (imported lazily: the
    bookkeeping commands must not pay for torch)."""
    from .config import ConfigError
    from .io import DumpError, NotSupportedError
    from .specs import SpecError
    from .utils import ArtifactError, BusyError, OutputError, UsageError

    known: list[tuple[type[BaseException], int]] = [
        (NotSupportedError, EXIT_NOT_SUPPORTED), (DumpError, EXIT_BAD_INPUT), (ArtifactError, EXIT_BAD_INPUT),
        (OutputError, EXIT_CANNOT_WRITE), (BusyError, EXIT_BUSY), (ConfigError, EXIT_USAGE),
        (SpecError, EXIT_USAGE), (UsageError, EXIT_USAGE), (FileNotFoundError, EXIT_BAD_INPUT),
        (IsADirectoryError, EXIT_BAD_INPUT), (json.JSONDecodeError, EXIT_USAGE),
    ]
    # only a loaded module can have raised its error class
    if "ncpipe.checkpoint" in sys.modules:
        from .checkpoint import CorruptCheckpointError

        known.insert(0, (CorruptCheckpointError, EXIT_BAD_INPUT))
    if "ncpipe.train" in sys.modules:
        from .train import TrainingDivergedError

        known.insert(0, (TrainingDivergedError, EXIT_DIVERGED))
    return known


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ncpipe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (Snakemake's threads:)")
    p.add_argument("--debug", action="store_true",
                   help="print a traceback for every error (also: environment NCPIPE_DEBUG=1)")
    p.add_argument("--gpus", type=int, default=0,
                   help="GPUs the job was scheduled with (the rule's resources.gpu); inside a SLURM job a "
                        "torch stage that then sees no CUDA device exits at start with status 75 "
                        "(EX_TEMPFAIL)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train one run and write its checkpoints and log")
    t.add_argument("--spec", required=True, help="JSON spec (or @file)")
    t.add_argument("--log-csv", required=True)
    t.add_argument("--resume-dir", required=True)
    t.add_argument("checkpoints", nargs="+",
                   help="output paths, one per spec['checkpoints'] epoch, same order")
    t.set_defaults(fn=cmd_train)

    f = sub.add_parser("features", help="attack a checkpoint and dump features to HDF5")
    f.add_argument("--spec", required=True)
    f.add_argument("--checkpoint", required=True)
    f.add_argument("--out", required=True)
    f.set_defaults(fn=cmd_features)

    m = sub.add_parser("metrics", help="Neural-Collapse metrics of one dump as a tidy CSV")
    m.add_argument("--dump", required=True)
    m.add_argument("--regime", default=None)
    m.add_argument("--pinv-cutoff", choices=["float32", "float64"], default="float32",
                   help="NC1 pseudo-inverse cutoff (config metrics.pinv_cutoff; float32: the authors')")
    m.add_argument("--out", required=True)
    m.set_defaults(fn=cmd_metrics)

    g = sub.add_parser("aggregate", help="concatenate tidy tables")
    g.add_argument("--out", required=True)
    g.add_argument("tables", nargs="*")
    g.set_defaults(fn=cmd_aggregate)

    lw = sub.add_parser("layerwise", help="per-layer NC1 / NCC accuracy of a checkpoint, clean and PGD")
    lw.add_argument("--spec", required=True, help="JSON spec (or @file), grid.layerwise_spec")
    lw.add_argument("--checkpoint", required=True)
    lw.add_argument("--regime", default=None, help="regime id for the table (default: from the checkpoint)")
    lw.add_argument("--out-csv", required=True)
    lw.add_argument("--out-h5", required=True)
    lw.set_defaults(fn=cmd_layerwise)

    gl = sub.add_parser("aggregate-layerwise", help="concatenate per-checkpoint layerwise tables")
    gl.add_argument("--out", required=True)
    gl.add_argument("tables", nargs="*")
    gl.set_defaults(fn=cmd_aggregate_layerwise)

    fg = sub.add_parser("figures", help="draw figures of the families that read one aggregated table")
    fg.add_argument("--table", required=True)
    fg.add_argument("--outdir", required=True, help="the figures directory; a figure goes to <family>/<stem>")
    fg.add_argument("--spec", required=True)
    fg.add_argument("names", nargs="+", help="<family>/<stem>, e.g. nc_vs_epoch/mnist5k__vgg11bn__st__linf32")
    fg.set_defaults(fn=cmd_figures)

    tb = sub.add_parser("tables", help="final-epoch accuracy tables (CSV + LaTeX) from the metrics table")
    tb.add_argument("--table", required=True)
    tb.add_argument("--outdir", required=True)
    tb.add_argument("stems", nargs="+", help="accuracy_final__{dataset}__{norm}{eps}")
    tb.set_defaults(fn=cmd_tables)

    lt = sub.add_parser("leap-table", help="leap matrices (CSV, HTML, LaTeX) of final feature dumps")
    lt.add_argument("--outdir", required=True)
    lt.add_argument("--stem", required=True, help="leap_matrix__{dataset}__{arch}__{norm}{eps}")
    lt.add_argument("dumps", nargs="+", help="final-checkpoint feature dumps, one per regime/seed")
    lt.set_defaults(fn=cmd_leap_table)

    sp = sub.add_parser("simplex-figure", help="simplex_projection figure of one run (dumps)")
    sp.add_argument("--outdir", required=True)
    sp.add_argument("--spec", required=True)
    sp.add_argument("--stem", required=True, help="{dataset}__{arch}__{regime}__{norm}{eps}")
    sp.add_argument("dumps", nargs="+", help="feature dumps of the checkpoints to draw, one row each")
    sp.set_defaults(fn=cmd_simplex_figure)

    tl = sub.add_parser("train-logs", help="concatenate per-run training logs with their run identity")
    tl.add_argument("--out", required=True)
    tl.add_argument("logs", nargs="*", help="per-run train_log.csv paths, as the workflow names them")
    tl.set_defaults(fn=cmd_train_logs)
    sm = sub.add_parser("summary", help="the README's default-run tables, as Markdown, from a finished run")
    sm.add_argument("results_dir", help="a results directory (metrics.csv, train_logs.csv, layerwise.csv)")
    sm.add_argument("--readme", default=None,
                    help="replace the block between the summary markers of this file instead of printing")
    sm.set_defaults(fn=cmd_summary)
    ins = sub.add_parser("inspect", help="summarise a feature dump or layerwise file; --verify provenance")
    ins.add_argument("file", help="an HDF5 file written by `ncpipe features` or the layerwise stage")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("--verify", action="store_true",
                     help="check the checkpoint's sha256 and recompute a few clean features from it")
    ins.add_argument("--checkpoint", default=None, help="checkpoint to verify (default: the recorded one)")
    ins.add_argument("--rows", type=int, default=8, help="rows per split that --verify recomputes")
    ins.add_argument("--data-dir", default=None, help="override the recorded data directory for --verify")
    ins.set_defaults(fn=cmd_inspect)

    pl = sub.add_parser("plan", help="jobs per rule, image passes and storage of a config's grid (no run)")
    pl.add_argument("--configfile", default="config/config.yaml",
                    help="the config, as given to snakemake --configfile (default: the demo config)")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.set_defaults(fn=cmd_plan)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    set_threads(args.threads, load_torch=args.command in TORCH_STAGES)
    _run_on_device(args)


def _run_on_device(args: argparse.Namespace) -> None:
    """Run the stage; a GPU asked for and not there: a clear one-line error, exit status 75, no traceback."""
    if args.command not in TORCH_STAGES:
        _run(args)
        return
    from .runtime import EXIT_NO_GPU, DeviceUnavailableError, require_gpu

    try:
        require_gpu(args.gpus)
        _run(args, passthrough=(DeviceUnavailableError,))
    except DeviceUnavailableError as err:
        log.error("%s", err)
        raise SystemExit(EXIT_NO_GPU) from None


def _run(args: argparse.Namespace, passthrough: tuple[type[BaseException], ...] = ()) -> None:
    debug = args.debug or os.environ.get("NCPIPE_DEBUG", "") not in ("", "0")
    try:
        args.fn(args)
    except passthrough:
        raise
    except Exception as err:
        status = next((code for cls, code in _known_errors() if isinstance(err, cls)), None)
        if status is None or debug:
            log.exception("%s: %s", type(err).__name__, err)  # a bug: keep the traceback
            raise SystemExit(EXIT_BUG if status is None else status) from None
        log.error("ncpipe %s: %s", args.command, err)
        raise SystemExit(status) from None


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
