"""``ncpipe summary RESULTS_DIR``: the default-run tables of the README, as Markdown, from a finished run.

The README's default-run section is this output pasted verbatim, so its numbers come from a run and can be
regenerated instead of retyped. Everything is read from the run's tidy tables (``metrics.csv``,
``train_logs.csv``, optionally ``layerwise.csv``); values are means over seeds when a run has several.
Output is deterministic: rows and columns follow fixed orders, never the order of the input files.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from .metrics import AUTOATTACK_IMAGES_SUFFIX

SIGNIFICANT = 3
METHOD_ORDER = {"st": 0, "at": 1, "trades": 2}
# Perturbation kinds in the order the tables show them, with the words a reader sees.
KIND_LABELS = {
    "clean": "clean",
    "pgd": "PGD",
    "targeted": "targeted PGD",
    "gaussian": "Gaussian noise",
    "sign": "random sign",
    "train_adv": "adversarial examples trained on (`train_adv`)",
}
LEAP_METRICS = ("leap_share_own", "leap_share_target", "leap_share_other")
LEAP_HEADER = "nearest clean mean:"
# Fixed section titles: tests compare the README's block with them, so rename them in one place only.
TITLES = {
    "nc1": "NC1 over training",
    "accuracy": "Accuracy at the final checkpoint",
    "leap": "The leap at the final checkpoint",
    "ratios": "Headline ratios",
    "layerwise": "Layerwise NCC accuracy at the final checkpoint",
}
BEGIN = "<!-- summary:begin -->"
END = "<!-- summary:end -->"


class SummaryError(ValueError):
    """The results directory lacks a table, or a table lacks what the summary needs."""


def fmt(x: float, digits: int = SIGNIFICANT) -> str:
    """``x`` to ``digits`` significant digits, fixed-point (``0.448``, ``6.46``, ``140``, ``1230``)."""
    if x is None or not math.isfinite(x):
        return "n/a"
    if x == 0:
        return "0"
    rounded = float(f"{x:.{digits}g}")
    exponent = math.floor(math.log10(abs(rounded)))
    if exponent < -4:
        return f"{x:.{digits - 1}e}"
    return f"{rounded:.{max(0, digits - 1 - exponent)}f}"


def pct(x: float) -> str:
    return fmt(100.0 * x) if x is not None and math.isfinite(x) else "n/a"


def ratio(a: float, b: float) -> str:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return "n/a"
    return f"{fmt(a / b)}x"


def _table(header: list[str], rows: Iterable[list[str]], right_from: int = 1) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    return ["| " + " | ".join(r) + " |" for r in (header, align, *rows)]


def _regime_key(regime: str) -> tuple[int, str]:
    return (METHOD_ORDER.get(regime.split("_")[0], len(METHOD_ORDER)), regime)


def _threat(norm: str, eps: float) -> str:
    return f"{'l_inf' if norm == 'linf' else 'l_2' if norm == 'l2' else norm} {eps:g}/255"


def commit_of(directory: str | os.PathLike) -> str:
    """The commit at ``directory`` lives, ``+ uncommitted changes`` if tracked files differ."""
    try:
        head = subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} + uncommitted changes" if dirty else head


class _Cell:
    """One (dataset, arch, threat) slice of metrics.csv, averaged over seeds, with lookups by identity."""

    def __init__(self, df: pd.DataFrame) -> None:
        keys = ["regime", "epoch", "split", "perturbation", "grouping", "metric"]
        self.values = df.groupby(keys, sort=True)["value"].mean().to_dict()
        self.regimes = sorted(df["regime"].unique(), key=_regime_key)
        self.epochs = sorted(int(e) for e in df["epoch"].unique())
        self.last = {r: int(df.loc[df["regime"] == r, "epoch"].max()) for r in self.regimes}
        self.first = {r: int(df.loc[df["regime"] == r, "epoch"].min()) for r in self.regimes}
        self.kinds = {r: [k for k in KIND_LABELS
                          if ((df["regime"] == r) & (df["perturbation"] == k)).any()] for r in self.regimes}

    def get(self, regime: str, epoch: int, split: str, kind: str, metric: str,
            grouping: str = "true") -> float:
        return self.values.get((regime, epoch, split, kind, grouping, metric), float("nan"))


def _nc1_table(cell: _Cell) -> list[str]:
    header = ["regime", "data", *(f"epoch {e}" for e in cell.epochs)]
    rows = [[f"`{r}`", KIND_LABELS[k], *(fmt(cell.get(r, e, "train", k, "nc1")) for e in cell.epochs)]
            for r in cell.regimes for k in cell.kinds[r]]
    return [f"#### {TITLES['nc1']}", "",
            "NC1 = Tr(Sw Sb^+) (`nc1`) of the training split, classes grouped by true label, per checkpoint:",
            "",
            *_table(header, rows, right_from=2)]


ACCURACY_COLUMNS = [  # (header, metric, split, perturbation)
    ("network, train, clean", "accuracy", "train", "clean"),
    ("network, train, PGD (robust)", "accuracy", "train", "pgd"),
    ("network, test, clean", "accuracy", "test", "clean"),
    ("network, test, PGD (robust)", "accuracy", "test", "pgd"),
    ("NCC, train, clean", "ncc_train_means_accuracy", "train", "clean"),
    ("NCC, train, PGD", "ncc_train_means_accuracy", "train", "pgd"),
    ("NCC, test, clean", "ncc_train_means_accuracy", "test", "clean"),
    ("NCC, test, PGD", "ncc_train_means_accuracy", "test", "pgd"),
]
# Beside the PGD column of the same classifier and split, where metrics.csv has autoattack rows for it (the
# accuracy table's "train/test AutoAttack" and "NCC test AutoAttack", ncpipe.tables); a run without them keeps
# exactly the columns above.
AUTOATTACK_COLUMNS = {  # PGD header -> (header, metric, split, perturbation)
    "network, train, PGD (robust)": ("network, train, AutoAttack (robust)", "accuracy", "train",
                                     "autoattack"),
    "network, test, PGD (robust)": ("network, test, AutoAttack (robust)", "accuracy", "test", "autoattack"),
    "NCC, train, PGD": ("NCC, train, AutoAttack", "ncc_train_means_accuracy", "train", "autoattack"),
    "NCC, test, PGD": ("NCC, test, AutoAttack", "ncc_train_means_accuracy", "test", "autoattack"),
}


# Where AutoAttack attacked a fixed subset (attack.autoattack.per_class > 0), metrics.csv also has PGD on
# that subset (``metrics.on_autoattack_images`` of the pgd kind). Its column comes between PGD
# on the whole split and AutoAttack, whose header then says that it is on the subset: the AutoAttack gap is
# read off the same images, not partly off another sample.
SUBSET_PGD_LABEL = "PGD on AutoAttack's images"
SUBSET_AA_SUFFIX = " on its images"


def _accuracy_columns(cell: _Cell) -> list[tuple[str, str, str, str]]:
    present = {(k[2], k[3], k[5]) for k in cell.values if k[3] == "autoattack" and k[4] == "true"}
    subset = {(k[2], k[5]) for k in cell.values if k[3] == "pgd" and k[4] == "true"
              and k[5].endswith(AUTOATTACK_IMAGES_SUFFIX)}
    cols = []
    for col in ACCURACY_COLUMNS:
        cols.append(col)
        aa = AUTOATTACK_COLUMNS.get(col[0])
        if aa is not None and (aa[2], aa[3], aa[1]) in present:
            if (aa[2], aa[1] + AUTOATTACK_IMAGES_SUFFIX) in subset:
                head = aa[0].split(", ")
                pgd_head = ", ".join([*head[:2], SUBSET_PGD_LABEL])
                cols.append((pgd_head, aa[1] + AUTOATTACK_IMAGES_SUFFIX, aa[2], "pgd"))
                aa = (aa[0] + SUBSET_AA_SUFFIX, *aa[1:])
            cols.append(aa)
    return cols


def _accuracy_table(cell: _Cell, per_class: int | None = None) -> list[str]:
    """``per_class``: AutoAttack's images per class where it attacked a subset (None: not known here)."""
    columns = _accuracy_columns(cell)
    header = ["regime", "epoch", *(c[0] for c in columns)]
    rows = [[f"`{r}`", str(cell.last[r]),
             *(pct(cell.get(r, cell.last[r], s, k, m)) for _, m, s, k in columns)]
            for r in cell.regimes]
    aa = ("; *AutoAttack*: robust accuracy under AutoAttack (the `autoattack` kind, on the samples it "
          "attacks)" if len(columns) > len(ACCURACY_COLUMNS) else "")
    if any(m.endswith(AUTOATTACK_IMAGES_SUFFIX) for _, m, _, _ in columns):
        first = f"first {per_class}" if per_class else "first `attack.autoattack.per_class`"
        aa = (f"; *AutoAttack on its images*: robust accuracy under AutoAttack (the `autoattack` kind) on "
              f"the fixed subset it attacks, the {first} images of each class of the split; "
              f"*{SUBSET_PGD_LABEL}*: PGD on those same images (`accuracy{AUTOATTACK_IMAGES_SUFFIX}`, "
              f"`ncc_train_means_accuracy{AUTOATTACK_IMAGES_SUFFIX}`), beside PGD on the whole split")
    return [f"#### {TITLES['accuracy']}", "",
            "Accuracy in %. *network*: argmax of the network's logits (`accuracy`); *NCC*: nearest "
            "clean class mean of the training split at the same checkpoint (`ncc_train_means_accuracy`); "
            f"*PGD*: the evaluation attack on that checkpoint{aa}; labels are the true ones:", "",
            *_table(header, rows)]


def _leap_table(cell: _Cell) -> list[str]:
    present = [m for m in LEAP_METRICS if any(k[5] == m for k in cell.values)]
    header = ["regime", "attack", "targeted success", *(f"{LEAP_HEADER} {m.split('_')[-1]} class"
                                                        for m in present)]
    rows = []
    for r in cell.regimes:
        e = cell.last[r]
        for kind in ("pgd", "targeted") if present else ("targeted",):
            if kind not in cell.kinds[r]:
                continue
            success = pct(cell.get(r, e, "train", kind, "accuracy", "target")) if kind == "targeted" else "-"
            rows.append([f"`{r}`", KIND_LABELS[kind], success,
                         *(pct(_leap_value(cell, r, e, kind, m)) for m in present)])
    note = ("the shares of perturbed points whose nearest clean class mean is their own class, the target "
            "class or another class (`leap_share_*`)" if present else
            "`metrics.csv` of this run has no `leap_share_*` metrics")
    return [f"#### {TITLES['leap']}", "",
            "Training split, in %. *targeted success*: share of targeted-PGD points the network assigns to "
            f"their target class (`accuracy` with `grouping = target`); {note}:", "",
            *_table(header, rows, right_from=2)]


def _leap_value(cell: _Cell, regime: str, epoch: int, kind: str, metric: str) -> float:
    # the leap shares are defined against true labels; take that grouping if the table has several
    for grouping in ("true", "target", "predicted"):
        v = cell.get(regime, epoch, "train", kind, metric, grouping)
        if math.isfinite(v):
            return v
    return float("nan")


def _ratios_table(cell: _Cell) -> list[str]:
    header = ["regime", "PGD NC1 / clean NC1, last epoch", "Gaussian NC1 / clean NC1, last epoch",
              "NC1 on `train_adv` / clean NC1, last epoch", "clean NC1 first epoch / last epoch"]
    rows = []
    for r in cell.regimes:
        first, last = cell.first[r], cell.last[r]
        clean = cell.get(r, last, "train", "clean", "nc1")
        rows.append([f"`{r}`", *(ratio(cell.get(r, last, "train", k, "nc1"), clean)
                                 for k in ("pgd", "gaussian", "train_adv")),
                     ratio(cell.get(r, first, "train", "clean", "nc1"), clean)])
    return [f"#### {TITLES['ratios']}", "",
            "From the NC1 table above (training split, true labels):", "", *_table(header, rows)]


def _layerwise_table(lw: pd.DataFrame) -> list[str]:
    lw = lw[(lw["metric"] == "ncc_accuracy_clean_means") & (lw["split"] == "train")]
    if lw.empty:
        return []
    layers = lw.groupby("layer")["layer_index"].min().sort_values(kind="stable")
    values = lw.groupby(["regime", "perturbation", "layer"])["value"].mean().to_dict()
    epochs = lw.groupby("regime")["epoch"].max().to_dict()
    pairs = {(r, k) for r, k, _ in values}
    rows = [[f"`{r}`", str(int(epochs[r])), KIND_LABELS.get(k, k),
             *(pct(values.get((r, k, layer), float("nan"))) for layer in layers.index)]
            for r in sorted(set(lw["regime"]), key=_regime_key) for k in KIND_LABELS if (r, k) in pairs]
    return [f"#### {TITLES['layerwise']}", "",
            "Accuracy in % of the nearest-class-mean rule with each probe layer's clean class means, "
            "training split, true labels (`ncc_accuracy_clean_means` of `layerwise.csv`), probes from input "
            "to output:",
            "", *_table(["regime", "epoch", "data", *(f"`{layer}`" for layer in layers.index)], rows,
                        right_from=3)]


def _config_line(df: pd.DataFrame, logs: pd.DataFrame | None) -> str:
    seeds = sorted(int(s) for s in df["seed"].unique())
    parts = [
        "datasets " + ", ".join(sorted(df["dataset"].unique())),
        "archs " + ", ".join(sorted(df["arch"].unique())),
        "regimes " + ", ".join(sorted(df["regime"].unique(), key=_regime_key)),
        "seeds " + ", ".join(map(str, seeds)) + (" (values are means over seeds)" if len(seeds) > 1 else ""),
        "checkpoints " + ", ".join(str(int(e)) for e in sorted(df["epoch"].unique())),
        "evaluation threats " + ", ".join(_threat(n, e) for n, e in
                                          sorted(set(zip(df["norm"], df["epsilon"], strict=True)))),
    ]
    if logs is not None and not logs.empty:
        parts.insert(4, f"{int(logs['epoch'].max())} training epochs")
    return "Run: " + "; ".join(parts) + "."


def _dump_of(root: Path, df: pd.DataFrame, regime: str) -> Path | None:
    """The feature dump of ``regime``'s last checkpoint (first dataset, arch, seed, threat), if it exists."""
    part = df[df["regime"] == regime].sort_values(["dataset", "arch", "seed", "norm", "epsilon"],
                                                  kind="stable")
    if part.empty:
        return None
    row = part.iloc[0]
    epoch = int(df.loc[df["regime"] == regime, "epoch"].max())
    run = root / str(row["dataset"]) / str(row["arch"]) / regime / f"seed{int(row['seed'])}" / "features"
    found = sorted(run.glob(f"epoch{epoch}_{row['norm']}_eps*.h5"))
    return found[0] if found else None


def _final_dump_attrs(root: Path, df: pd.DataFrame) -> dict[str, dict]:
    """regime -> the root attributes of its final-checkpoint dump (regimes without a readable one: none)."""
    regimes = sorted(df["regime"].unique(), key=_regime_key)
    dumps = {r: d for r in regimes if (d := _dump_of(root, df, r)) is not None}
    if not dumps:
        return {}
    from .io import DumpError, attrs_dict, open_dump  # h5py only when there is a dump to read

    attrs = {}
    for r, path in dumps.items():
        try:
            with open_dump(path) as f:
                attrs[r] = attrs_dict(f)
        except DumpError:
            continue
    return attrs


def _autoattack_per_class(attrs: dict[str, dict]) -> int | None:
    """``attack.autoattack.per_class`` as a final dump's config records it (> 0), or None."""
    for a in attrs.values():
        try:
            n = (json.loads(a.get("config", "{}")).get("autoattack") or {}).get("per_class")
        except (TypeError, ValueError, AttributeError):
            continue
        if isinstance(n, int) and n > 0:
            return n
    return None


def _provenance_line(attrs: dict[str, dict]) -> str | None:
    """Scale and attack settings as the final-checkpoint dumps record them (no dumps: no line)."""
    if not attrs:
        return None
    first = attrs[next(iter(attrs))]
    spec = json.loads(first.get("config", "{}"))
    threat, data = spec.get("threat", {}), spec.get("data", {})
    parts = [f"model width {first.get('width', 'n/a')}",
             f"{data.get('train_per_class', 'n/a')} train / {data.get('test_per_class', 'n/a')} test images "
             "per class",
             f"evaluation PGD-{threat.get('steps', 'n/a')}, step {threat.get('step', 'n/a')}/255, "
             f"{threat.get('restarts', 'n/a')} restart(s), target rule `{spec.get('target_rule', 'n/a')}`"]
    if spec.get("targeted"):  # the targeted kind's own budget (config attack.targeted), when it differs
        from .specs import FeaturesSpec, SpecError

        try:
            tg = FeaturesSpec.from_dict(spec, "dump config").threat_of("targeted")
            parts.append(f"targeted PGD-{tg.steps} {_threat(tg.norm, tg.epsilon)}, step {tg.step:g}/255")
        except SpecError:
            pass
    for r, a in attrs.items():
        adv = a.get("training_adversary", "none")
        if adv not in (None, "", "none"):
            t = json.loads(adv)
            budget = _threat(t.get("norm"), float(t.get("epsilon")))
            parts.append(f"`{r}` trained against PGD-{t.get('steps')} {budget}, step {t.get('step')}/255")
    return "Settings recorded in the final-checkpoint dumps: " + "; ".join(parts) + "."


def summarize(results_dir: str | os.PathLike, commit: str | None = None) -> str:
    """The Markdown summary of a finished run under ``results_dir`` (``metrics.csv`` required)."""
    root = Path(results_dir)
    path = root / "metrics.csv"
    if not path.is_file():
        raise SummaryError(f"{path} not found: `ncpipe summary` needs a finished run's results directory")
    df = pd.read_csv(path)
    missing = {"dataset", "arch", "regime", "norm", "epsilon", "seed", "epoch", "split", "perturbation",
               "grouping", "metric", "value"} - set(df.columns)
    if missing:
        raise SummaryError(f"{path} lacks the columns {sorted(missing)}")
    if df.empty:
        raise SummaryError(f"{path} has no rows")
    logs_path = root / "train_logs.csv"
    logs = pd.read_csv(logs_path) if logs_path.is_file() else None
    lw_path = root / "layerwise.csv"
    lw = pd.read_csv(lw_path) if lw_path.is_file() else None

    out = [f"Commit: `{commit if commit is not None else commit_of(root)}`", "", _config_line(df, logs)]
    dump_attrs = _final_dump_attrs(root, df)
    provenance = _provenance_line(dump_attrs)
    if provenance:
        out += ["", provenance]
    aa_per_class = _autoattack_per_class(dump_attrs)
    groups = df.groupby(["dataset", "arch", "norm", "epsilon"], sort=True)
    for (dataset, arch, norm, eps), part in groups:
        cell = _Cell(part)
        out += ["", f"### {dataset}, {arch}, {_threat(norm, float(eps))}", ""]
        out += _nc1_table(cell) + [""] + _accuracy_table(cell, aa_per_class)
        out += [""] + _leap_table(cell)
        out += [""] + _ratios_table(cell)
        if lw is not None:
            sel = lw[(lw["dataset"] == dataset) & (lw["arch"] == arch) & (lw["norm"] == norm)
                     & (lw["epsilon"] == eps)]
            table = _layerwise_table(sel)
            out += [""] + table if table else []
    return "\n".join(out) + "\n"


def structure(markdown: str) -> list[str]:
    """The shape of a summary: its level-4 titles and each table's fixed header cells (no numbers).

    The README's pasted block and a fresh ``summarize`` of any run must agree on this. Left out: the cells
    that depend on the run (epochs, layer names) and the leap-share and AutoAttack columns, present only when
    ``metrics.csv`` has them.
    """
    shape = []
    for line in markdown.splitlines():
        if line.startswith("#### "):
            shape.append(line)
        elif line.startswith("| regime"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            shape.append(" | ".join(c for c in cells if not c.startswith(("epoch ", "`", LEAP_HEADER))
                                    and "AutoAttack" not in c))
    return shape


def readme_block(text: str) -> str:
    """The text between the summary markers of a README (what ``summarize`` printed)."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise SummaryError(f"expected exactly one {BEGIN} ... {END} block")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def replace_block(text: str, block: str) -> str:
    """``text`` (a README) with the summary block between the markers replaced by ``block``."""
    readme_block(text)  # exactly one pair of markers, or a clear error
    head, rest = text.split(BEGIN, 1)
    return head + BEGIN + "\n" + block + END + rest.split(END, 1)[1]
