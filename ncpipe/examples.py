"""A model ncpipe did not train, for config/external_example.yaml: a tiny plain-PyTorch CNN and its factory.

``python -m ncpipe.examples OUT.pt`` trains it for a few epochs with a plain PyTorch loop on the embedded
MNIST subset and writes ``torch.save(model.state_dict(), OUT.pt)``, the way any researcher's script saves a
model; the config then analyses that file through ``factory: ncpipe.examples:make``.  The network normalises
nothing itself: the config's ``mean`` / ``std`` (MNIST's) are what it was trained with.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

MEAN, STD = (0.1307,), (0.3081,)


class TinyNet(nn.Module):
    """conv -> pool -> conv -> pool -> fc -> classifier ``head`` (the last nn.Linear; its input: 32-d)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8, pixels: int = 28) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * (pixels // 4) ** 2, 32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(F.relu(self.fc(x.flatten(1))))


def make(in_channels: int = 1, num_classes: int = 10, width: int = 8, pixels: int = 28) -> TinyNet:
    """The factory the config names (``ncpipe.examples:make``): an untrained TinyNet."""
    return TinyNet(in_channels, num_classes, width, pixels)


def train_and_save(out: str | Path, x: torch.Tensor, y: torch.Tensor, epochs: int = 5, seed: int = 0,
                   width: int = 8) -> Path:
    """Plain PyTorch: Adam on ``x`` (float pixels in [0, 1]) normalised by MNIST's mean/std, then save."""
    torch.manual_seed(seed)
    model = make(x.shape[1], int(y.max()) + 1, width, x.shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xn = (x - MEAN[0]) / STD[0]
    for _ in range(epochs):
        perm = torch.randperm(len(xn))
        for i in range(0, len(xn), 50):
            idx = perm[i:i + 50]
            opt.zero_grad()
            F.cross_entropy(model(xn[idx]), y[idx]).backward()
            opt.step()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ncpipe.examples", description=__doc__.splitlines()[0])
    p.add_argument("out", help="where to write the state dict (config/external_example.yaml reads "
                               "external_example/tiny.pt)")
    p.add_argument("--per-class", type=int, default=50, help="training images per class")
    p.add_argument("--epochs", type=int, default=5)
    a = p.parse_args(argv)
    from .data import load_dataset, to_float  # only the pixels come from ncpipe; training is plain PyTorch

    data = load_dataset("mnist5k", train_per_class=a.per_class)
    print(train_and_save(a.out, to_float(data.x_train), data.y_train, epochs=a.epochs))


if __name__ == "__main__":
    main()
