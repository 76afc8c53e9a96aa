"""The experiment grid: which jobs exist, and which config values each job receives.

Snakemake's ``params`` trigger compares values by ``repr``, so every rule receives *only* the slice of the
config that it uses (built here): changing an attack parameter never retrains, changing a figure option never
re-attacks,
and adding a seed or an epsilon only adds jobs.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from . import paths
from .specs import (
    EXTERNAL_ARCH,
    EXTERNAL_EPOCH,
    EXTERNAL_METHOD,
    Adversary,
    AutoAttackSpec,
    DataSpec,
    ExternalSpec,
    FeaturesSpec,
    FigureSpec,
    LayerwiseOptions,
    LayerwiseSpec,
    MetricsOptions,
    Optim,
    RuntimeSpec,
    Storage,
    TargetedBudget,
    Threat,
    TradesSpec,
    TrainSpec,
)


def fmt_eps(eps: float) -> str:
    """8 -> '8', 0.5 -> '0.5': epsilons in 1/255 units print without a trailing .0 so paths stay stable."""
    f = float(eps)
    return str(int(f)) if f.is_integer() else repr(f)


def regime_id(method: str, adversary: dict[str, Any] | None) -> str:
    """'st' for standard training; 'at_linf8', 'trades_l2128' for robust training with its training threat."""
    if method == "st":
        return "st"
    assert adversary is not None
    return f"{method}_{adversary['norm']}{fmt_eps(adversary['epsilon'])}"


def method_of(regime: str) -> str:
    return regime.split("_", 1)[0]


def external_regime(name: str) -> str:
    return f"{EXTERNAL_METHOD}_{name}"


def is_external(regime: str) -> bool:
    return method_of(regime) == EXTERNAL_METHOD


# How figures and tables name the training methods (in this order), norms and regimes: defined once.
METHOD_LABELS = {"st": "ST", "at": "AT", "trades": "TRADES", EXTERNAL_METHOD: "external"}
TRAIN_ATTACK = {"at": "PGD ", "trades": "KL-PGD "}  # the inner attack each robust method trains against
NORM_LABELS = {"linf": "ℓ∞", "l2": "ℓ2"}


def regime_label(regime: str) -> str:
    """The one reader-facing name of a regime id: 'st' -> 'ST', 'at_linf32' -> 'AT, PGD ℓ∞ 32/255'."""
    method, _, train_threat = regime.partition("_")
    label = METHOD_LABELS.get(method, method)
    if method == EXTERNAL_METHOD:
        return f"{label}: {train_threat}"
    m = re.fullmatch(r"(linf|l2)([0-9.]+)", train_threat)
    if m is None:
        return f"{label} [{train_threat}]" if train_threat else label
    return f"{label}, {TRAIN_ATTACK.get(method, '')}{NORM_LABELS[m.group(1)]} {m.group(2)}/255"


@dataclass(frozen=True)
class Run:
    dataset: str
    arch: str
    regime: str
    seed: int

    @property
    def method(self) -> str:
        return method_of(self.regime)

    def wildcards(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "arch": self.arch, "regime": self.regime, "seed": self.seed}


@dataclass(frozen=True)
class Cell:
    run: Run
    epoch: int
    norm: str
    eps: str

    def wildcards(self) -> dict[str, Any]:
        return {**self.run.wildcards(), "epoch": self.epoch, "norm": self.norm, "eps": self.eps}


def trained_runs(config: dict[str, Any]) -> list[Run]:
    """The runs with a train job: datasets x archs x methods x seeds."""
    adv = config["train"]["adversary"]
    return [
        Run(d, a, regime_id(m, adv), int(s))
        for d in config["datasets"]
        for a in config["archs"]
        for m in config["methods"]
        for s in config["seeds"]
    ]


def external_entries(config: dict[str, Any]) -> list[dict[str, Any]]:
    return list(config.get("external") or [])


def external_arch(entry: dict[str, Any]) -> str:
    return str(entry.get("arch") or EXTERNAL_ARCH)


def external_runs(config: dict[str, Any]) -> list[Run]:
    """One run per external checkpoint (no train job): regime ``ext_<name>``, the entry's seed."""
    return [Run(e["dataset"], external_arch(e), external_regime(e["name"]), int(e.get("seed", 0)))
            for e in external_entries(config)]


def runs(config: dict[str, Any]) -> list[Run]:
    """Every run whose checkpoints are evaluated: the trained ones, then the external ones."""
    return [*trained_runs(config), *external_runs(config)]


def external_entry(config: dict[str, Any], regime: str) -> dict[str, Any]:
    for e in external_entries(config):
        if external_regime(e["name"]) == regime:
            return e
    raise KeyError(f"no external model named {regime.removeprefix(EXTERNAL_METHOD + '_')!r} in config "
                   f"'external' (names: {[e['name'] for e in external_entries(config)]})")


def run_epochs(config: dict[str, Any], regime: str) -> list[int]:
    """The evaluated epochs of a run: the checkpoint epochs, or an external model's one."""
    return [EXTERNAL_EPOCH] if is_external(regime) else sorted(config["train"]["checkpoints"])


def run_final_epoch(config: dict[str, Any], regime: str) -> int:
    return EXTERNAL_EPOCH if is_external(regime) else final_epoch(config)


def has_probes(config: dict[str, Any], run: Run) -> bool:
    """Whether the layerwise analysis can probe the run's model (external non-registry: needs probes)."""
    if not is_external(run.regime):
        return True
    e = external_entry(config, run.regime)
    return bool(e.get("probes")) or bool(e.get("arch"))


def threats(config: dict[str, Any]) -> list[tuple[str, str]]:
    return [(norm, fmt_eps(e)) for norm, t in config["attack"]["threats"].items() for e in t["epsilons"]]


def final_epoch(config: dict[str, Any]) -> int:
    return int(config["train"]["epochs"])


def cells(config: dict[str, Any], *, final_only: bool = False, external: bool = True) -> list[Cell]:
    """Every evaluated checkpoint x threat (``external=False``: of the trained runs only)."""
    return [Cell(r, e, n, eps)
            for r in (runs(config) if external else trained_runs(config))
            for e in ([run_final_epoch(config, r.regime)] if final_only else run_epochs(config, r.regime))
            for n, eps in threats(config)]


def layerwise_cells(config: dict[str, Any]) -> list[Cell]:
    """The layerwise jobs: final checkpoint x threat of every run whose model has probes."""
    return [c for c in cells(config, final_only=True) if has_probes(config, c.run)]


def checkpoint_input(config: dict[str, Any], wildcards: Any) -> str:
    """The checkpoint file a cell evaluates: the train job's, or an external model's own file."""
    wc = _wc(wildcards)
    if is_external(wc["regime"]):
        return str(external_entry(config, wc["regime"])["checkpoint"])
    return paths.format_path(paths.CHECKPOINT, **wc, epoch=wildcards["epoch"])


def expand(pattern: str, items: list[Run] | list[Cell]) -> list[str]:
    return [paths.format_path(pattern, **it.wildcards()) for it in items]


def _wc(wildcards: Any) -> dict[str, Any]:
    return {k: wildcards[k] for k in ("dataset", "arch", "regime", "seed")}


# ------------------------------------------------------------------------------------------- rule params
# Each returns the rule's ``--spec`` as JSON (a typed spec of ncpipe.specs, serialised with sorted keys).
def data_spec(config: dict[str, Any], dataset: str) -> DataSpec:
    return DataSpec.from_dict({**config["data"], "name": dataset}, "data")


def runtime_spec(config: dict[str, Any]) -> RuntimeSpec:
    return RuntimeSpec.from_dict(config["runtime"], "runtime")


def train_spec_of(config: dict[str, Any], wildcards: Any) -> TrainSpec:
    wc = _wc(wildcards)
    method = method_of(wc["regime"])
    tr = config["train"]
    return TrainSpec(
        data=data_spec(config, wc["dataset"]),
        arch=wc["arch"],
        width=config["model"]["width"],
        method=method,
        seed=int(wc["seed"]),
        optim=Optim.from_dict({k: tr[k] for k in (f.name for f in dataclasses.fields(Optim))}, "train"),
        checkpoints=tuple(sorted(tr["checkpoints"])),
        runtime=runtime_spec(config),
        adversary=Adversary.from_dict(tr["adversary"], "train.adversary") if method != "st" else None,
        record_adversarial=tr["record_adversarial"] if method != "st" else None,
        record_dtype=tr["record_dtype"] if method != "st" and tr["record_adversarial"] else None,
        at_attack_mode=tr["at_attack_mode"] if method == "at" else None,
        at_final_pass=tr["at_final_pass"] if method == "at" else None,
        trades=TradesSpec(tr["trades_beta"], tr["trades_bn_quirk"], tr["trades_step"],
                          tr["trades_project_start"], tr["trades_l2_projection"],
                          tr["trades_l2_zero_gradient"])
        if method == "trades" else None,
    )


def train_spec(config: dict[str, Any], wildcards: Any) -> str:
    return train_spec_of(config, wildcards).to_json()


def storage_spec(config: dict[str, Any]) -> Storage:
    """How a job stores feature matrices (``features.keep`` is the workflow's business, not a job's)."""
    return Storage.from_dict({k: v for k, v in config["features"].items() if k != "keep"}, "features")


def threat_spec(config: dict[str, Any], norm: str, eps: str) -> Threat:
    t = config["attack"]["threats"][norm]
    return Threat(norm=norm, epsilon=float(eps), step=t["step"], steps=t["steps"],
                  restarts=config["attack"]["restarts"])


def _kinds_of(config: dict[str, Any], wildcards: Any) -> tuple[str, ...]:
    """The config's kinds, less autoattack at a run's non-final epochs when it attacks the final one only."""
    kinds = tuple(config["attack"]["kinds"])
    aa = config["attack"].get("autoattack") or {}
    if "autoattack" in kinds and aa.get("final_only", True):
        if int(wildcards["epoch"]) != run_final_epoch(config, wildcards["regime"]):
            kinds = tuple(k for k in kinds if k != "autoattack")
    return kinds


def features_spec_of(config: dict[str, Any], wildcards: Any) -> FeaturesSpec:
    a = config["attack"]
    budget = TargetedBudget.from_dict(a["targeted"], "attack.targeted")
    kinds = _kinds_of(config, wildcards)
    external = None
    if is_external(wildcards["regime"]):
        external = ExternalSpec.from_dict(external_entry(config, wildcards["regime"]), "external")
    return FeaturesSpec(
        data=data_spec(config, wildcards["dataset"]),
        threat=threat_spec(config, wildcards["norm"], wildcards["eps"]),
        kinds=kinds,
        splits=tuple(a["splits"]),
        target_rule=a["target_rule"],
        batch_size=a["batch_size"],
        storage=storage_spec(config),
        runtime=runtime_spec(config),
        targeted=None if budget.is_identity() else budget,
        autoattack=(AutoAttackSpec.from_dict(a.get("autoattack") or {}, "attack.autoattack")
                    if "autoattack" in kinds else None),
        external=external,
    )


def features_spec(config: dict[str, Any], wildcards: Any) -> str:
    return features_spec_of(config, wildcards).to_json()


def layerwise_spec_of(config: dict[str, Any], wildcards: Any) -> LayerwiseSpec:
    f = features_spec_of(config, wildcards)
    parts = {x.name: getattr(f, x.name) for x in dataclasses.fields(f)}
    return LayerwiseSpec(**{**parts, "kinds": ("clean", "pgd"), "splits": ("train",), "targeted": None,
                            "autoattack": None},
                         layerwise=LayerwiseOptions.from_dict(config["layerwise"], "layerwise"),
                         metrics=MetricsOptions.from_dict(config["metrics"], "metrics"))


def layerwise_spec(config: dict[str, Any], wildcards: Any) -> str:
    return layerwise_spec_of(config, wildcards).to_json()


def figures_spec_of(config: dict[str, Any]) -> FigureSpec:
    """Config ``figures``, with the targeted kind's budget where it is drawn and differs from the threat's."""
    budget = TargetedBudget.from_dict(config["attack"]["targeted"], "attack.targeted")
    drawn = "targeted" in config["attack"]["kinds"] and not budget.is_identity()
    spec = FigureSpec.from_dict(config["figures"], "figures")
    return dataclasses.replace(spec, targeted=budget if drawn else None)


def figures_spec(config: dict[str, Any]) -> str:
    return figures_spec_of(config).to_json()
