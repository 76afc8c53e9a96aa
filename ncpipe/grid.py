"""The experiment grid: which jobs exist, and which config values each job receives.

Snakemake's ``params`` trigger compares values by ``repr``, so every rule receives *only* the slice of the
config that it uses (built here): changing an attack parameter never retrains, changing a figure option never
re-attacks,
and adding a seed or an epsilon only adds jobs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import paths


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


def runs(config: dict[str, Any]) -> list[Run]:
    adv = config["train"]["adversary"]
    return [
        Run(d, a, regime_id(m, adv), int(s))
        for d in config["datasets"]
        for a in config["archs"]
        for m in config["methods"]
        for s in config["seeds"]
    ]


def threats(config: dict[str, Any]) -> list[tuple[str, str]]:
    return [(norm, fmt_eps(e)) for norm, t in config["attack"]["threats"].items() for e in t["epsilons"]]


def final_epoch(config: dict[str, Any]) -> int:
    return int(config["train"]["epochs"])


def cells(config: dict[str, Any], *, final_only: bool = False) -> list[Cell]:
    epochs = [final_epoch(config)] if final_only else sorted(config["train"]["checkpoints"])
    return [Cell(r, e, n, eps) for r in runs(config) for e in epochs for n, eps in threats(config)]


def expand(pattern: str, items: list[Run] | list[Cell]) -> list[str]:
    return [paths.format_path(pattern, **it.wildcards()) for it in items]


def _wc(wildcards: Any) -> dict[str, Any]:
    return {k: wildcards[k] for k in ("dataset", "arch", "regime", "seed")}


# ------------------------------------------------------------------------------------------- rule params
def _dump(spec: dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True)


def data_spec(config: dict[str, Any], dataset: str) -> dict[str, Any]:
    d = config["data"]
    return {"name": dataset, "dir": d["dir"], "train_per_class": d["train_per_class"],
            "test_per_class": d["test_per_class"], "download": d["download"]}


def runtime_spec(config: dict[str, Any]) -> dict[str, Any]:
    return dict(config["runtime"])


def train_spec(config: dict[str, Any], wildcards: Any) -> str:
    wc = _wc(wildcards)
    method = method_of(wc["regime"])
    tr = config["train"]
    spec: dict[str, Any] = {
        "data": data_spec(config, wc["dataset"]),
        "arch": wc["arch"],
        "width": config["model"]["width"],
        "method": method,
        "seed": int(wc["seed"]),
        "optim": {k: tr[k] for k in ("epochs", "batch_size", "lr", "momentum", "weight_decay",
                                     "lr_milestones",
                                     "lr_decay")},
        "checkpoints": sorted(tr["checkpoints"]),
        "runtime": runtime_spec(config),
    }
    if method != "st":
        spec["adversary"] = dict(tr["adversary"])
        spec["record_adversarial"] = tr["record_adversarial"]
    if method == "at":
        spec["at_attack_mode"] = tr["at_attack_mode"]
    if method == "trades":
        spec["trades"] = {"beta": tr["trades_beta"], "bn_quirk": tr["trades_bn_quirk"]}
    return _dump(spec)


def threat_spec(config: dict[str, Any], norm: str, eps: str) -> dict[str, Any]:
    t = config["attack"]["threats"][norm]
    return {"norm": norm, "epsilon": float(eps), "step": t["step"], "steps": t["steps"],
            "restarts": config["attack"]["restarts"]}


def features_spec(config: dict[str, Any], wildcards: Any) -> str:
    a = config["attack"]
    spec = {
        "data": data_spec(config, wildcards["dataset"]),
        "threat": threat_spec(config, wildcards["norm"], wildcards["eps"]),
        "kinds": list(a["kinds"]),
        "splits": list(a["splits"]),
        "target_rule": a["target_rule"],
        "batch_size": a["batch_size"],
        "storage": dict(config["features"]),
        "runtime": runtime_spec(config),
    }
    tg = a.get("targeted", {})
    if any(float(tg.get(k, 1)) != 1.0 for k in ("epsilon_factor", "step_factor", "steps_factor")):
        # only when it differs from the authors' same-budget attack, so paper-config jobs keep their params
        spec["targeted"] = dict(tg)
    return _dump(spec)


def layerwise_spec(config: dict[str, Any], wildcards: Any) -> str:
    spec = json.loads(features_spec(config, wildcards))
    spec["kinds"] = ["clean", "pgd"]
    spec.pop("targeted", None)  # no targeted kind here
    spec["splits"] = ["train"]
    spec["layerwise"] = dict(config["layerwise"])
    return _dump(spec)


def figures_spec(config: dict[str, Any]) -> str:
    return _dump(dict(config["figures"]))
