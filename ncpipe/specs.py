"""Typed specs: the values that cross the process boundary between the workflow and a stage.

What belongs here: one frozen dataclass per rule's ``--spec`` (:class:`TrainSpec`, :class:`FeaturesSpec`,
:class:`LayerwiseSpec`) and their parts (:class:`DataSpec`, :class:`RuntimeSpec`, :class:`Storage`,
:class:`LayerwiseOptions`, :class:`Optim`, :class:`Adversary`, :class:`TradesSpec`), plus :class:`Threat`, the
one place where the config's 1/255 units become pixel units.  ``grid.py`` builds them from the config,
``cli.py`` parses them with ``from_json``; ``to_json`` writes the same JSON the rules have always passed
(sorted keys), so Snakemake's params trigger and the training resume hash see no change.

Defaults come from the schema only: a section given without some of its keys (a hand-written spec in a test
or a notebook) gets them from ``ncpipe/schemas/config.schema.yaml`` by :func:`schema_default`; consumers
never re-default keys with literals.  Unknown keys are refused, naming the key and the allowed ones.

The module imports no torch: the Snakefile imports it (through grid.py) at parse time.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from .config import load_schema

S = TypeVar("S", bound="Spec")


def schema_default(*keys: str) -> Any:
    """The schema's default of a config key: ``schema_default("runtime", "amp")`` is False."""
    node: dict[str, Any] = load_schema()
    for k in keys:
        if "properties" not in node and "items" in node:  # a list of sections (config `external`)
            node = node["items"]
        node = node["properties"][k]
    if "default" not in node:
        raise KeyError(f"config key {'.'.join(keys)} has no default in the schema")
    return node["default"]


class SpecError(ValueError):
    """A spec has an unknown or a missing key; the message names it and the allowed keys."""


class Spec:
    """Base of the typed specs: dict/JSON round trip with schema defaults for missing keys.

    ``SCHEMA`` names the config section whose defaults fill a missing key (``()``: no defaults, every key is
    required); fields whose value is ``None`` and that carry ``metadata={"omit_none": True}`` are left out of
    the JSON (method-specific sections of the training spec).
    """

    SCHEMA: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if v is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = v.to_dict() if isinstance(v, Spec) else (list(v) if isinstance(v, tuple) else v)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: type[S], d: dict[str, Any] | S, where: str = "spec") -> S:
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict):
            raise SpecError(f"{where}: expected a mapping, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise SpecError(f"{where}: unknown key(s) {unknown}; allowed keys: {sorted(fields)}")
        hints = typing.get_type_hints(cls)
        kw: dict[str, Any] = {}
        for name, f in fields.items():
            sub = _spec_class(hints[name])
            if name in d:
                kw[name] = _convert(hints[name], d[name], f"{where}.{name}")
            elif f.metadata.get("absent_none"):  # an optional section (autoattack, external): absent is None
                continue
            elif sub is not None and sub.SCHEMA:  # a whole section left out: all of it from the schema
                kw[name] = sub.from_dict({}, f"{where}.{name}")
            elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            elif cls.SCHEMA:
                try:
                    kw[name] = _convert(hints[name], schema_default(*cls.SCHEMA, name), f"{where}.{name}")
                except KeyError:
                    raise SpecError(f"{where}: key {name!r} missing, and the schema has no default") from None
            else:
                raise SpecError(f"{where}: key {name!r} missing; required keys: {sorted(fields)}")
        return cls(**kw)

    @classmethod
    def from_json(cls: type[S], s: str) -> S:
        return cls.from_dict(json.loads(s))


def _spec_class(hint: Any) -> type[Spec] | None:
    """The Spec subclass a field holds (``X`` or ``X | None``), else None."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else ()
    for h in (hint, *args):
        if isinstance(h, type) and issubclass(h, Spec):
            return h
    return None


def _convert(hint: Any, value: Any, where: str) -> Any:
    """A nested spec from its dict; a list field to a tuple (the specs are frozen); anything else as given."""
    sub = _spec_class(hint)
    if sub is not None and value is not None:
        return sub.from_dict(value, where)
    if isinstance(value, list):
        return tuple(value)
    return value


# ----------------------------------------------------------------------------------------------- parts
@dataclass(frozen=True)
class DataSpec(Spec):
    SCHEMA: ClassVar[tuple[str, ...]] = ("data",)
    name: str
    dir: str
    train_per_class: int | None
    test_per_class: int | None
    download: bool


@dataclass(frozen=True)
class RuntimeSpec(Spec):
    SCHEMA: ClassVar[tuple[str, ...]] = ("runtime",)
    device: str
    amp: bool
    channels_last: bool
    compile: bool
    deterministic: bool


@dataclass(frozen=True)
class Storage(Spec):
    """How feature matrices are stored (config ``features``)."""

    SCHEMA: ClassVar[tuple[str, ...]] = ("features",)
    dtype: str
    compression: str


@dataclass(frozen=True)
class LayerwiseOptions(Spec):
    SCHEMA: ClassVar[tuple[str, ...]] = ("layerwise",)
    enabled: bool
    per_class: int
    pool: int


@dataclass(frozen=True)
class MetricsOptions(Spec):
    """How the NC metrics are computed (config ``metrics``): the NC1 pseudo-inverse cutoff."""

    SCHEMA: ClassVar[tuple[str, ...]] = ("metrics",)
    pinv_cutoff: str


@dataclass(frozen=True)
class Optim(Spec):
    SCHEMA: ClassVar[tuple[str, ...]] = ("train",)
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    lr_milestones: tuple[float, ...]
    lr_decay: float


@dataclass(frozen=True)
class Threat(Spec):
    """One threat model in the config's 1/255 units; the only place they are converted to pixel units."""

    norm: str
    epsilon: float
    step: float
    steps: int
    restarts: int = 1

    @property
    def epsilon_px(self) -> float:
        return self.epsilon / 255.0

    @property
    def step_px(self) -> float:
        return self.step / 255.0

    def attack_kwargs(self) -> dict[str, Any]:
        """Pixel-unit keyword arguments of ``attacks.perturb`` / ``attacks.pgd``."""
        return {"norm": self.norm, "epsilon": self.epsilon_px, "step": self.step_px, "steps": self.steps,
                "restarts": self.restarts}

    def attrs(self) -> dict[str, Any]:
        """The threat as HDF5 root attributes: pixel units plus ``epsilon_255``."""
        return {"norm": self.norm, "epsilon": self.epsilon_px, "epsilon_255": self.epsilon,
                "step": self.step_px, "steps": self.steps, "restarts": self.restarts}


@dataclass(frozen=True)
class TargetedBudget(Spec):
    """The targeted kind's budget relative to the evaluation threat (config ``attack.targeted``).

    The authors attack with the same budget as untargeted PGD (all factors 1); the demo config raises it so
    that the leap to the target class is visible on MNIST (docs/deviations.md).
    """

    SCHEMA: ClassVar[tuple[str, ...]] = ("attack", "targeted")
    epsilon_factor: float
    step_factor: float
    steps_factor: int

    def is_identity(self) -> bool:
        return self.epsilon_factor == 1 and self.step_factor == 1 and self.steps_factor == 1

    def epsilon_of(self, epsilon: float) -> float:
        """The targeted kind's epsilon (1/255 units) for an evaluation threat's."""
        return epsilon * self.epsilon_factor

    def apply(self, threat: Threat) -> Threat:
        return Threat(threat.norm, self.epsilon_of(threat.epsilon), threat.step * self.step_factor,
                      threat.steps * self.steps_factor, threat.restarts)


@dataclass(frozen=True)
class AutoAttackSpec(Spec):
    """The autoattack kind's settings (config ``attack.autoattack``): its attacks and the samples attacked."""

    SCHEMA: ClassVar[tuple[str, ...]] = ("attack", "autoattack")
    version: str
    attacks: tuple[str, ...]
    steps: int
    square_queries: int
    seed: int
    splits: tuple[str, ...]
    per_class: int
    final_only: bool

    def options(self) -> dict[str, Any]:
        """The keyword options of ``attacks.autoattack`` (the sample selection stays with the stage)."""
        return {"version": self.version, "attacks": list(self.attacks), "steps": self.steps,
                "square_queries": self.square_queries, "seed": self.seed}


@dataclass(frozen=True)
class Adversary(Spec):
    """The training threat (config ``train.adversary``): a :class:`Threat` without restarts."""

    norm: str
    epsilon: float
    step: float
    steps: int

    def threat(self) -> Threat:
        return Threat(self.norm, self.epsilon, self.step, self.steps)


def authors_trades_step(adversary: Adversary) -> float:
    """The step of the authors' TRADES attack (1/255 units): ``--pgd-alpha`` at l_inf; at l_2 their attack
    ignores it and steps with lr = 2 * epsilon / steps (25.6 at 128/255 and 10 steps)."""
    if adversary.norm == "l2":
        return 2.0 * adversary.epsilon / adversary.steps
    return adversary.step


@dataclass(frozen=True)
class TradesSpec(Spec):
    """TRADES's options (config ``train.trades_*``); ``step`` None means :func:`authors_trades_step`."""

    beta: float
    bn_quirk: bool
    step: float | None = None
    project_start: bool = False
    l2_projection: str = field(default_factory=lambda: schema_default("train", "trades_l2_projection"))
    l2_zero_gradient: str = field(default_factory=lambda: schema_default("train", "trades_l2_zero_gradient"))

    def __post_init__(self) -> None:
        train = load_schema()["properties"]["train"]["properties"]
        for key, value in (("trades_l2_projection", self.l2_projection),
                           ("trades_l2_zero_gradient", self.l2_zero_gradient)):
            allowed = train[key]["enum"]
            if value not in allowed:
                raise SpecError(f"train.{key}: {value!r} is not one of {allowed}")

    def threat(self, adversary: Adversary) -> Threat:
        """The threat TRADES's inner attack runs with: the training threat with TRADES's own step."""
        step = authors_trades_step(adversary) if self.step is None else self.step
        return Threat(adversary.norm, adversary.epsilon, step, adversary.steps)


# External checkpoints (config ``external``): cells without a train job, regime ``ext_<name>``, one epoch.
EXTERNAL_METHOD = "ext"
EXTERNAL_EPOCH = 0  # the epoch wildcard of an external model's only cell
EXTERNAL_ARCH = "custom"  # the arch wildcard of an external model not built from the registry


@dataclass(frozen=True)
class ExternalSpec(Spec):
    """One external checkpoint (an entry of config ``external``): how to rebuild and read the model."""

    SCHEMA: ClassVar[tuple[str, ...]] = ("external",)
    name: str
    dataset: str
    checkpoint: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    arch: str | None
    width: float
    factory: str | None
    factory_kwargs: dict[str, Any]
    format: str
    state_dict_key: str | None
    feature_module: str | None
    probes: tuple[str, ...]
    seed: int

    @property
    def regime(self) -> str:
        return f"{EXTERNAL_METHOD}_{self.name}"

    @property
    def arch_label(self) -> str:
        return self.arch or EXTERNAL_ARCH


# ----------------------------------------------------------------------------------------- rule specs
_OPT = {"omit_none": True}
_ABSENT = {"omit_none": True, "absent_none": True}  # left out of the JSON, and None when the JSON lacks it


@dataclass(frozen=True)
class TrainSpec(Spec):
    """``ncpipe train --spec``: one training run (built by ``grid.train_spec``)."""

    data: DataSpec
    arch: str
    width: float
    method: str
    seed: int
    optim: Optim
    checkpoints: tuple[int, ...]
    runtime: RuntimeSpec
    adversary: Adversary | None = field(default=None, metadata=_OPT)
    record_adversarial: bool | None = field(default=None, metadata=_OPT)
    record_dtype: str | None = field(default=None, metadata=_OPT)
    at_attack_mode: str | None = field(default=None, metadata=_OPT)
    at_final_pass: bool | None = field(default=None, metadata=_OPT)
    trades: TradesSpec | None = field(default=None, metadata=_OPT)

    def __post_init__(self) -> None:
        # the method-specific keys a hand-written spec leaves out get the schema's defaults, only where the
        # method uses them (an ST spec stays free of them, as the grid writes it)
        if self.method != "st" and self.record_adversarial is None:
            object.__setattr__(self, "record_adversarial", schema_default("train", "record_adversarial"))
        if self.method != "st" and self.record_adversarial and self.record_dtype is None:
            object.__setattr__(self, "record_dtype", schema_default("train", "record_dtype"))
        for key in ("at_attack_mode", "at_final_pass"):
            if self.method == "at" and getattr(self, key) is None:
                object.__setattr__(self, key, schema_default("train", key))
        if self.method != "st" and self.adversary is None:
            raise SpecError(f"training spec: method {self.method!r} needs an 'adversary'")
        if self.method == "trades" and self.trades is None:
            raise SpecError("training spec: method 'trades' needs 'trades' (beta, bn_quirk)")
        if self.method == "trades" and self.trades is not None and self.trades.step is None:
            # the spec a job receives shows the step it trains with (25.6 for the authors' l_2 rule)
            assert self.adversary is not None
            object.__setattr__(self, "trades", dataclasses.replace(
                self.trades, step=authors_trades_step(self.adversary)))


@dataclass(frozen=True)
class FeaturesSpec(Spec):
    """``ncpipe features --spec``: one checkpoint x one evaluation threat (``grid.features_spec``)."""

    SCHEMA: ClassVar[tuple[str, ...]] = ("attack",)
    data: DataSpec
    threat: Threat
    kinds: tuple[str, ...]
    splits: tuple[str, ...]
    target_rule: str
    batch_size: int
    storage: Storage
    runtime: RuntimeSpec
    # left out of the JSON when it is the authors' same-budget attack, so paper-config jobs keep their params
    targeted: TargetedBudget | None = field(default=None, metadata=_OPT)
    # present only where the kinds include autoattack, so other jobs keep their params
    autoattack: AutoAttackSpec | None = field(default=None, metadata=_ABSENT)
    # an external checkpoint's recipe (config ``external``); trained cells leave it out
    external: ExternalSpec | None = field(default=None, metadata=_ABSENT)

    def kind_options(self, kind: str) -> dict[str, Any] | None:
        """A kind's own options for ``attacks.perturb`` (autoattack's), else None."""
        if kind == "autoattack":
            return (self.autoattack or AutoAttackSpec.from_dict({}, "attack.autoattack")).options()
        return None

    def threat_of(self, kind: str) -> Threat:
        """The threat a perturbation kind runs with: the targeted kind's scaled by ``targeted``."""
        if kind == "targeted" and self.targeted is not None:
            return self.targeted.apply(self.threat)
        return self.threat


@dataclass(frozen=True)
class FigureSpec(Spec):
    """``ncpipe figures / simplex-figure --spec``: config ``figures`` plus the targeted kind's budget.

    The budget is here because the figures that draw the targeted kind say in their title how it differs from
    the evaluation threat named by the file (the demo's is 2x epsilon, 3x steps); a change of it redraws them.
    """

    SCHEMA: ClassVar[tuple[str, ...]] = ("figures",)
    formats: tuple[str, ...]
    dpi: int
    context: str
    targeted: TargetedBudget | None = field(default=None, metadata=_ABSENT)  # None: the threat's own


@dataclass(frozen=True)
class LayerwiseSpec(FeaturesSpec):
    """``ncpipe layerwise --spec``: the features spec plus the layerwise options (``grid.layerwise_spec``)."""

    layerwise: LayerwiseOptions = field(default=None)  # type: ignore[assignment]
    metrics: MetricsOptions = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.layerwise is None:
            object.__setattr__(self, "layerwise", LayerwiseOptions.from_dict({}, "layerwise"))
        if self.metrics is None:
            object.__setattr__(self, "metrics", MetricsOptions.from_dict({}, "metrics"))
