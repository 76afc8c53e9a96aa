"""How often TRADES's l_2 attack meets an exactly zero KL gradient (docs/deviations.md row 29).

    R=results/mnist5k/vgg11bn
    python benchmarks/trades_zero_gradient.py $R/{st,at_linf32,trades_linf32}/seed1/checkpoints/epoch20.pt

For each checkpoint: the l_2 TRADES attack (by default the paper's l_2 setting: epsilon 128/255, 10 steps,
step 2 * epsilon / steps) on the checkpoint's training split, in eval mode as in training, once per
zero-gradient rule of ``train.trades_l2_zero_gradient``.  Printed: the fraction of images whose KL gradient
is exactly zero at the first step and at any step, the smallest and the median gradient norm, and how far
the two rules' final points lie apart.  The counting wraps the rules of ``attacks.TRADES_L2_ZERO_GRADIENTS``
themselves, so it sees the gradients the attack steps with.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from ncpipe import attacks
from ncpipe.checkpoint import load_checkpoint
from ncpipe.data import load_data, to_float


@contextmanager
def counting(norms: list[torch.Tensor]) -> Iterator[None]:
    """Append each step's per-image KL gradient norms to ``norms`` while the attack runs."""
    saved = dict(attacks.TRADES_L2_ZERO_GRADIENTS)

    def wrap(rule: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def counted(delta: torch.Tensor, grad: torch.Tensor, step: float,
                    generator: torch.Generator | None) -> torch.Tensor:
            norms.append(grad.flatten(1).norm(dim=1))
            return rule(delta, grad, step, generator)
        return counted

    attacks.TRADES_L2_ZERO_GRADIENTS.update({k: wrap(v) for k, v in saved.items()})
    try:
        yield
    finally:
        attacks.TRADES_L2_ZERO_GRADIENTS.update(saved)


def measure(checkpoint: str, epsilon_255: float, steps: int, batch: int) -> dict[str, torch.Tensor]:
    """Per rule: the (steps, N) gradient norms and the final points."""
    model, payload = load_checkpoint(checkpoint)
    data = load_data(payload["spec"])
    x = to_float(data.x_train)
    eps = epsilon_255 / 255
    out: dict[str, torch.Tensor] = {}
    for rule in attacks.TRADES_L2_ZERO_GRADIENTS:
        gen = torch.Generator().manual_seed(int(payload["meta"]["seed"]) * 100_003 + int(payload["epoch"]))
        masks, finals = [], []
        for i in range(0, len(x), batch):
            rows: list[torch.Tensor] = []
            with counting(rows):
                finals.append(attacks.trades_attack(model, x[i:i + batch], norm="l2", epsilon=eps,
                                                    step=2 * eps / steps, steps=steps, l2_zero_gradient=rule,
                                                    generator=gen))
            masks.append(torch.stack(rows))
        out[f"{rule}/norms"] = torch.cat(masks, dim=1)
        out[f"{rule}/x_adv"] = torch.cat(finals)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--epsilon", type=float, default=128.0, help="1/255 units")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=500)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    for ckpt in a.checkpoints:
        r = measure(ckpt, a.epsilon, a.steps, a.batch)
        gap = (r["random/x_adv"] - r["zero_step/x_adv"]).flatten(1).norm(dim=1)
        print(ckpt)
        for rule in attacks.TRADES_L2_ZERO_GRADIENTS:
            n = r[f"{rule}/norms"]
            z = n == 0
            first = z[0].float().mean().item()
            print(f"  {rule:9s} images {z.shape[1]}: zero gradient at step 1 {first:.4f}, "
                  f"at any step {z.any(0).float().mean().item():.4f}, per step "
                  f"{[round(v, 4) for v in z.float().mean(1).tolist()]}; smallest norm {n.min().item():.3g}, "
                  f"median {n.median().item():.3g}")
        print(f"  final points differ on {(gap > 0).float().mean().item():.4f} of the images "
              f"(max l_2 gap {gap.max().item():.4g})")


if __name__ == "__main__":
    main()
