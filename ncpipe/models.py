"""The paper's two architectures, with normalisation inside the model and the penultimate features exposed.

Every model takes pixels in [0, 1] (so attacks and epsilons live in pixel space) and normalises them itself,
as the authors' code does.  ``width`` scales every channel count, so that a CPU run can use a thin network
with the same topology; ``width=1`` gives the paper's 512-d penultimate features.

Two stems per architecture: ``"cifar"`` (small inputs, paper section 1.3) and ``"imagenet"`` (the ImageNette
160 px variants: VGG with the fifth max-pool and fan-out init, PreActResNet18 with a 7x7/2 stem and max-pool).
Both end with a global average pool, which is what the authors' fixed-size pools amount to at their input
sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

ARCHS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ARCHS[name] = fn
        return fn

    return deco


class Normalize(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NCModel(nn.Module):
    """Base: ``body`` maps normalised pixels to the penultimate feature vector, ``linear`` classifies it."""

    normalize: Normalize
    linear: nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return h, self.linear(h)

    def body(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def probe_layers(self) -> list[tuple[str, nn.Module]]:
        """Modules whose outputs the layerwise analysis reads, shallow to deep (paper section 2.8)."""
        raise NotImplementedError

    @property
    def feature_dim(self) -> int:
        return self.linear.in_features


def _ch(c: int, width: float) -> int:
    return max(4, int(round(c * width)))


# --------------------------------------------------------------------------------------------------- VGG11-BN
_VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512]


class VGG11BN(NCModel):
    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        width: float = 1.0,
        stem: str = "cifar",
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        cfg = list(_VGG11) + (["M"] if stem == "imagenet" else [])
        layers: list[nn.Module] = []
        c_in = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                c_out = _ch(int(v), width)
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=True), nn.BatchNorm2d(c_out),
                           nn.ReLU(inplace=True)]
                c_in = c_out
        self.conv = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # fan-in for the CIFAR model, fan-out for the ImageNette one, as in the authors' files
                n = 9 * (m.out_channels if stem == "imagenet" else m.in_channels)
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.conv(x)), 1)

    def probe_layers(self) -> list[tuple[str, nn.Module]]:
        # The module right before each conv after the first and before the classifier: the inputs of
        # conv2..conv8 and of the linear layer.  The last entry (the final ReLU) is the deepest probe, before
        # the average pool.
        mods = list(self.conv)
        conv_idx = [i for i, m in enumerate(mods) if isinstance(m, nn.Conv2d)]
        probes = [(f"conv{k + 1}_in", mods[i - 1]) for k, i in enumerate(conv_idx) if k > 0]
        last_relu = max(i for i, m in enumerate(mods) if isinstance(m, nn.ReLU))
        probes.append(("linear_in_prepool", mods[last_relu]))
        return probes


# ----------------------------------------------------------------------------------------- PreActResNet18
class PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, preact: bool = True) -> None:
        super().__init__()
        self.preact = preact
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x)) if self.preact else x
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


class PreActResNet18(NCModel):
    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        width: float = 1.0,
        stem: str = "cifar",
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        chans = [_ch(c, width) for c in (64, 128, 256, 512)]
        if stem == "imagenet":
            self.conv1 = nn.Sequential(
                nn.Conv2d(in_channels, chans[0], 7, 2, 3, bias=False),
                nn.BatchNorm2d(chans[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            self.conv1 = nn.Conv2d(in_channels, chans[0], 3, 1, 1, bias=False)
        c_in = chans[0]
        stages = []
        for i, (c, s) in enumerate(zip(chans, (1, 2, 2, 2), strict=True)):
            # The ImageNette variant feeds the stem's ReLU output straight into the first block.
            first_preact = not (stem == "imagenet" and i == 0)
            stages.append(nn.Sequential(PreActBlock(c_in, c, s, preact=first_preact), PreActBlock(c, c, 1)))
            c_in = c
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(c_in)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(c_in, num_classes)
        if stem == "imagenet":
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                    nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))

    def body(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return torch.flatten(self.pool(F.relu(self.bn(out))), 1)

    def probe_layers(self) -> list[tuple[str, nn.Module]]:
        # Top-level children as in the authors' hooks; ``bn`` is read before its ReLU, ``linear`` gives logits
        names = ("conv1", "layer1", "layer2", "layer3", "layer4", "bn", "linear")
        return [(n, getattr(self, n)) for n in names]


register("vgg11bn")(VGG11BN)
register("preactresnet18")(PreActResNet18)


def build_model(
    arch: str,
    *,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    width: float = 1.0,
    stem: str = "cifar",
) -> NCModel:
    """Instantiate a registered architecture by name."""
    if arch not in ARCHS:
        raise KeyError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")
    return ARCHS[arch](num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, width=width,
                       stem=stem)


def _check_registry_against_schema() -> None:
    # the schema's enum is what a config may name; the registry is what this code can build: one list
    from .config import schema_enum

    if set(schema_enum("archs")) != set(ARCHS):
        raise RuntimeError(f"the schema's archs enum {sorted(schema_enum('archs'))} differs from the "
                           f"registered architectures {sorted(ARCHS)}; add the name to both")


_check_registry_against_schema()
