"""External checkpoints: models ncpipe did not train, analysed like trained ones (config ``external``).

What belongs here: rebuilding an external model from its entry (:func:`load_external`: a registered
architecture or an importable factory ``package.module:function`` plus a state dict, or a whole pickled
model), the wrapper that gives it ncpipe's model interface (:class:`ExternalModel`: pixels in [0, 1]
normalised inside, the penultimate feature read as the input of the classifier ``nn.Linear``), and the
parse-time check of every entry (:func:`validate_external`), which the workflow runs before any job so that a
missing file, a state dict that does not load or a module that does not exist is reported naming its key.

An external model has no training spec: its "checkpoint" dict (what :func:`ncpipe.session.open_evaluation`
hands the stages) carries ``epoch`` 0, ``meta`` (dataset, arch, classes, normalisation, method ``ext``,
regime ``ext_<name>``, seed) and ``spec`` (the entry itself), and the file's sha256 goes into every output's
provenance as for trained checkpoints.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ConfigError
from .models import ARCHS, NCModel, Normalize, build_model
from .specs import EXTERNAL_EPOCH, EXTERNAL_METHOD, ExternalSpec


class ExternalModelError(ConfigError):
    """An external model's entry does not give a usable model; the message names the key."""


class ExternalModel(NCModel):
    """An arbitrary ``nn.Module`` (``inner``) behind ncpipe's model interface.

    ``inner`` receives normalised inputs; the penultimate feature is the input of ``classifier`` (an
    ``nn.Linear`` inside ``inner``), captured by a forward pre-hook, and the layerwise probes are the
    outputs of the modules named in ``probes``.
    """

    def __init__(self, inner: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], classifier: str,
                 probes: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.inner = inner
        self.classifier_name = classifier
        self.probe_names = tuple(probes)

    @property
    def linear(self) -> nn.Linear:  # type: ignore[override]
        return self.inner.get_submodule(self.classifier_name)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.normalize(x))

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen: list[torch.Tensor] = []
        handle = self.linear.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
        try:
            logits = self.inner(self.normalize(x))
        finally:
            handle.remove()
        if len(seen) != 1:
            raise RuntimeError(f"the classifier {self.classifier_name!r} ran {len(seen)} times in one "
                               "forward pass; its input is not one penultimate feature")
        return seen[0].flatten(1), logits

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]

    def probe_layers(self) -> list[tuple[str, nn.Module]]:
        return [(n, self.inner.get_submodule(n)) for n in self.probe_names]


def _fail(key: str, msg: str) -> ExternalModelError:
    return ExternalModelError(f"config key '{key}': {msg}")


def _factory(spec: ExternalSpec, key: str) -> nn.Module:
    assert spec.factory is not None
    mod_name, _, fn_name = spec.factory.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as err:
        raise _fail(f"{key}.factory", f"cannot import {spec.factory!r} ({type(err).__name__}: {err}); give "
                    "package.module:function importable by the Python that runs ncpipe") from None
    try:
        model = fn(**dict(spec.factory_kwargs))
    except Exception as err:  # noqa: BLE001 - any failure of user code is reported against its key
        raise _fail(f"{key}.factory_kwargs", f"{spec.factory}(**{dict(spec.factory_kwargs)}) failed: "
                    f"{type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise _fail(f"{key}.factory", f"{spec.factory} returned a {type(model).__name__}, not an nn.Module")
    return model


def _state_dict(obj: Any, spec: ExternalSpec, key: str) -> dict[str, torch.Tensor]:
    if spec.state_dict_key is not None:
        if not isinstance(obj, dict) or spec.state_dict_key not in obj:
            keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise _fail(f"{key}.state_dict_key", f"{spec.state_dict_key!r} is not a key of {spec.checkpoint} "
                        f"(it holds {keys})")
        obj = obj[spec.state_dict_key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        hint = (f"a dict with keys {sorted(map(str, obj))[:8]}: name the one holding the state dict in "
                "state_dict_key" if isinstance(obj, dict) else f"a {type(obj).__name__}")
        raise _fail(f"{key}.checkpoint", f"{spec.checkpoint} is not a state dict of tensors ({hint}); a "
                    "whole pickled model needs format: model")
    return obj


def _read(spec: ExternalSpec, key: str) -> Any:
    path = Path(spec.checkpoint)
    if not path.is_file():
        raise _fail(f"{key}.checkpoint", f"file {str(path)!r} does not exist")
    try:
        # a state dict loads without unpickling code; a whole model needs the pickle (trusted files only)
        return torch.load(path, map_location="cpu", weights_only=spec.format == "state_dict")
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a damaged or foreign file
        raise _fail(f"{key}.checkpoint", f"{str(path)!r} is not a readable torch file ({type(err).__name__}: "
                    f"{str(err)[:300]})") from None


def _last_linear(model: nn.Module) -> str | None:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


@dataclass(frozen=True)
class InputShape:
    """What the model must fit: the dataset's classes, channels, image size and ncpipe model stem."""

    classes: int
    channels: int
    pixels: int
    stem: str


def build_external(spec: ExternalSpec, ds: InputShape, key: str = "external", *,
                   weights: bool = True) -> NCModel:
    """The entry's model in eval mode on the CPU; raise ExternalModelError naming the failing key.

    ``weights=False``: the architecture with its initial weights, the state dict not read (``ncpipe plan``
    sizes the outputs before the file exists); a whole pickled model (format ``model``) is read either way.
    """
    if len(spec.mean) != ds.channels or len(spec.std) != ds.channels:
        raise _fail(f"{key}.mean", f"{spec.dataset} has {ds.channels} channel(s); mean and std need one "
                    f"value each, got {len(spec.mean)} and {len(spec.std)}")
    obj = _read(spec, key) if weights or spec.format == "model" else None
    model: NCModel
    if spec.format == "model":
        if not isinstance(obj, nn.Module):
            raise _fail(f"{key}.format", f"format 'model' expects a pickled nn.Module in {spec.checkpoint}, "
                        f"found a {type(obj).__name__}; a state dict needs format: state_dict")
        inner: nn.Module | None = obj
    else:
        state = _state_dict(obj, spec, key) if weights else None
        if spec.arch is not None:
            if spec.arch not in ARCHS:
                raise _fail(f"{key}.arch", f"{spec.arch!r} is unknown; allowed values: {sorted(ARCHS)}")
            inner = build_model(spec.arch, num_classes=ds.classes, in_channels=ds.channels, mean=spec.mean,
                                std=spec.std, width=spec.width, stem=ds.stem)
            where = f"{key}.arch"
        else:
            inner = _factory(spec, key)
            where = f"{key}.factory"
        try:
            if state is not None:
                inner.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise _fail(where, f"the state dict in {spec.checkpoint} does not load into this model: "
                        f"{str(err)[:600]}") from None
    if isinstance(inner, NCModel) and spec.feature_module is None and not spec.probes:
        model = inner  # a registered architecture: its own features and probes
        got_mean, got_std = model.normalize.mean.flatten(), model.normalize.std.flatten()
        if not (torch.allclose(got_mean, torch.tensor(spec.mean, dtype=torch.float32))
                and torch.allclose(got_std, torch.tensor(spec.std, dtype=torch.float32))):
            raise _fail(f"{key}.mean", f"the checkpoint normalises with mean {got_mean.tolist()}, std "
                        f"{got_std.tolist()}; the entry says {list(spec.mean)}, {list(spec.std)}")
    else:
        model = _wrap(inner, spec, key)
    model.eval()
    _check_forward(model, spec, key, ds.classes, ds.channels, ds.pixels)
    return model


def _wrap(inner: nn.Module, spec: ExternalSpec, key: str) -> ExternalModel:
    modules = dict(inner.named_modules())
    name = spec.feature_module if spec.feature_module is not None else _last_linear(inner)
    if name is None:
        raise _fail(f"{key}.feature_module", "the model has no nn.Linear; name the classifier module whose "
                    "input is the penultimate feature")
    if name not in modules:
        raise _fail(f"{key}.feature_module", f"no module {name!r} in the model; modules: "
                    f"{[n for n in modules if n][:40]}")
    if not isinstance(modules[name], nn.Linear):
        raise _fail(f"{key}.feature_module", f"{name!r} is a {type(modules[name]).__name__}, not an "
                    "nn.Linear; the NC metrics need the classifier's weights (give the final nn.Linear)")
    bad = [p for p in spec.probes if p not in modules or not p]
    if bad:
        raise _fail(f"{key}.probes", f"no module(s) {bad} in the model; modules: "
                    f"{[n for n in modules if n][:40]}")
    return ExternalModel(inner, spec.mean, spec.std, name, spec.probes)


@torch.no_grad()
def _check_forward(model: NCModel, spec: ExternalSpec, key: str, classes: int, channels: int,
                   pixels: int) -> None:
    x = torch.rand(2, channels, pixels, pixels, generator=torch.Generator().manual_seed(0))
    try:
        h, logits = model.forward_features(x)
    except Exception as err:  # noqa: BLE001 - user code: report it against the entry
        raise _fail(f"{key}.{'arch' if spec.arch else 'factory'}", f"the model fails on a {spec.dataset} "
                    f"batch of shape {tuple(x.shape)}: {type(err).__name__}: {str(err)[:300]}") from None
    if logits.ndim != 2 or logits.shape[1] != classes:
        raise _fail(f"{key}.dataset", f"the model outputs shape {tuple(logits.shape)}; {spec.dataset} has "
                    f"{classes} classes")
    w, b = model.linear.weight, model.linear.bias
    direct = h @ w.T + (b if b is not None else 0.0)
    if direct.shape != logits.shape or not torch.allclose(direct, logits, rtol=1e-4, atol=1e-4):
        raise _fail(f"{key}.feature_module", "the model's output is not the classifier applied to its input "
                    "(W h + b); the NC metrics need the final nn.Linear whose output is the logits")


def load_external(spec: ExternalSpec, ds: InputShape, device: torch.device | str = "cpu",
                  key: str = "external") -> tuple[NCModel, dict[str, Any]]:
    """The model (eval mode, on ``device``) and the checkpoint-like dict the evaluating stages read."""
    model = build_external(spec, ds, key)
    meta = {"arch": spec.arch_label, "width": spec.width if spec.arch else None,
            "num_classes": ds.classes, "in_channels": ds.channels, "mean": list(spec.mean),
            "std": list(spec.std), "stem": ds.stem, "dataset": spec.dataset, "method": EXTERNAL_METHOD,
            "seed": spec.seed, "regime": spec.regime, "external": spec.name}
    ckpt = {"epoch": EXTERNAL_EPOCH, "meta": meta, "spec": {"external": spec.to_dict()}}
    return model.to(device).eval(), ckpt


def validate_external(config: dict[str, Any]) -> None:
    """Build every entry of config ``external`` once (the workflow calls it at parse time, before any job)."""
    from .data import DATASETS  # nominal dataset shapes; the stages take them from the loaded data

    for i, entry in enumerate(config.get("external") or []):
        key = f"external[{i}]"
        spec = ExternalSpec.from_dict(entry, key)
        d = DATASETS[spec.dataset]
        build_external(spec, InputShape(d.classes, d.channels, d.pixels, d.stem), key)
