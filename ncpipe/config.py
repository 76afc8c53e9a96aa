"""Config loading and validation against ``ncpipe/schemas/config.schema.yaml`` (the single schema).

The schema is package data: an installed ncpipe (wheel, not only an editable clone) reads it, and the
workflow's ``common.smk`` validates against this same file.

The workflow validates with Snakemake's ``validate`` (which also fills defaults); this module re-runs the same
schema with jsonschema to turn a failure into one line that names the offending key and the allowed values,
and adds the checks a JSON schema cannot express (checkpoint epochs within the run, finite numbers, ...).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

# jsonschema is imported where a config is validated: the stages that only read the schema's enums (every
# metrics job) would pay ~0.06 s for it.
if TYPE_CHECKING:  # pragma: no cover
    import jsonschema

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config key has a wrong name, type or value; the message names the key."""


@functools.cache
def _parsed_schema() -> dict[str, Any]:
    # Parsed once per process, with libyaml where PyYAML has it: the pure-Python loader took ~0.1 s of every
    # bookkeeping job (io, specs and attacks all read the schema at import).
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(SCHEMA_PATH) as fh:
        return yaml.load(fh, Loader=loader)  # a safe loader, C or Python


def load_schema() -> dict[str, Any]:
    """The config schema as a dict of the caller's own (a deep copy: callers may change it freely)."""
    return copy.deepcopy(_parsed_schema())


@functools.cache
def schema_enum(*keys: str) -> tuple[str, ...]:
    """The allowed values of a config list, in the schema's order: ``schema_enum("attack", "kinds")``.

    The schema is the single list of names (perturbation kinds, splits, ...); modules take theirs from here.
    """
    node: dict[str, Any] = _parsed_schema()
    for k in keys:
        node = node["properties"][k]
    return tuple(node.get("items", node)["enum"])


def _key(path: Iterable[Any]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<top level>"


def _describe(err: jsonschema.ValidationError) -> str:
    key = _key(err.absolute_path)
    v = err.validator
    if v == "enum":
        return f"config key '{key}': {err.instance!r} is not allowed; allowed values: {err.validator_value}"
    if v == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed)) if isinstance(err.instance, dict) else []
        where = f"under '{key}'" if err.absolute_path else "at the top level"
        return f"config key(s) {extra} unknown {where}; allowed keys: {allowed}"
    if v == "required" and isinstance(err.instance, dict):
        missing = [k for k in err.validator_value if k not in err.instance]
        names = [f"{key}.{k}" if err.absolute_path else k for k in missing]
        return f"config key(s) {names} missing: required, and they have no default"
    if v == "type":
        msg = f"config key '{key}': {err.instance!r} has the wrong type; expected {err.validator_value}"
        if isinstance(err.instance, str) and len(list(err.absolute_path)) > 1:
            # Snakemake's `--config section='{key: value}'` delivers every nested value as a string
            msg += ("; `snakemake --config` passes values inside a section as strings: put the override in "
                    "a YAML file and add it with --configfile config/config.yaml override.yaml")
        return msg
    return f"config key '{key}': {err.message}"


def _fill_defaults(instance: Any, schema: dict[str, Any], root: dict[str, Any]) -> None:
    if "$ref" in schema:
        ref = schema["$ref"].split("/")[-1]
        schema = {**root["$defs"][ref], **{k: v for k, v in schema.items() if k != "$ref"}}
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:  # sections in a list (config `external`) get their defaults too
            _fill_defaults(item, schema["items"], root)
        return
    if not isinstance(instance, dict):
        return
    for name, sub in schema.get("properties", {}).items():
        if name not in instance and "default" in sub:
            instance[name] = copy.deepcopy(sub["default"])
        if name in instance:
            _fill_defaults(instance[name], sub, root)


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate ``config`` in place (filling defaults) and return it; raise ConfigError naming the bad key."""
    import jsonschema

    schema = load_schema()
    _fill_defaults(config, schema, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(list(e.absolute_path)), str(e.message)))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        raise ConfigError(_describe(best))
    _semantic_checks(config)
    return config


def _non_finite(instance: Any, path: tuple[Any, ...] = ()) -> Iterable[tuple[Any, ...]]:
    """Paths of NaN/inf numbers: YAML's .nan and .inf pass every minimum/maximum check of a JSON schema."""
    if isinstance(instance, float) and not math.isfinite(instance):
        yield path
    elif isinstance(instance, dict):
        for k, v in instance.items():
            yield from _non_finite(v, (*path, k))
    elif isinstance(instance, list):
        for i, v in enumerate(instance):
            yield from _non_finite(v, (*path, i))


def _semantic_checks(config: dict[str, Any]) -> None:
    for path in _non_finite(config):
        raise ConfigError(f"config key '{_key(path)}': must be a finite number, got {_get(config, path)}")
    tr = config["train"]
    bad = [e for e in tr["checkpoints"] if e > tr["epochs"]]
    if bad:
        raise ConfigError(
            f"config key 'train.checkpoints': epochs {bad} lie beyond train.epochs = {tr['epochs']}; "
            f"allowed values: 0..{tr['epochs']}"
        )
    if tr["epochs"] not in tr["checkpoints"]:
        raise ConfigError(
            f"config key 'train.checkpoints': must include the last epoch ({tr['epochs']}), which the "
            "layerwise analysis and the final-model tables read"
        )
    keep = config["features"]["keep"]
    if isinstance(keep, list) and not set(keep) <= set(tr["checkpoints"]):
        raise ConfigError(
            f"config key 'features.keep': epochs {sorted(set(keep) - set(tr['checkpoints']))} are not "
            "checkpoints; allowed values: all, final, or epochs of train.checkpoints "
            f"{sorted(tr['checkpoints'])}"
        )
    if sorted(tr["lr_milestones"]) != list(tr["lr_milestones"]):
        raise ConfigError(f"config key 'train.lr_milestones': must be increasing, got {tr['lr_milestones']}")
    _external_checks(config)
    if "mnist5k" in config["datasets"]:
        for key in ("train_per_class", "test_per_class"):
            n = config["data"].get(key)
            limit = 400 if key == "train_per_class" else 100
            if n is not None and n > limit:
                raise ConfigError(
                    f"config key 'data.{key}': mnist5k has {limit} per class in that split, got {n}"
                )


def _external_checks(config: dict[str, Any]) -> None:
    """The entries of ``external`` as a schema cannot check them (their files: ncpipe.external)."""
    ext = config.get("external") or []
    if not config["methods"] and not ext:
        raise ConfigError("config key 'methods': empty, and 'external' lists no model: nothing to analyse; "
                          "allowed values: st, at, trades")
    seen: set[str] = set()
    for i, e in enumerate(ext):
        key = f"external[{i}]"
        if e["name"] in seen:
            raise ConfigError(f"config key '{key}.name': {e['name']!r} is used twice; names must be unique")
        seen.add(e["name"])
        if e["dataset"] not in config["datasets"]:
            raise ConfigError(f"config key '{key}.dataset': {e['dataset']!r} is not in 'datasets'; allowed "
                              f"values: {config['datasets']}")
        if e["format"] == "state_dict" and (e["arch"] is None) == (e["factory"] is None):
            raise ConfigError(f"config key '{key}.arch' / '{key}.factory': a state dict needs exactly one "
                              "of them (a registered architecture, or package.module:function)")
        if len(e["mean"]) != len(e["std"]):
            raise ConfigError(f"config key '{key}.std': {len(e['std'])} values, but mean has "
                              f"{len(e['mean'])}; give one per input channel")


def _get(config: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        config = config[p]
    return config


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    with open(path) as fh:
        config = yaml.safe_load(fh) or {}
    if overrides:
        config.update(overrides)
    return validate_config(config)
