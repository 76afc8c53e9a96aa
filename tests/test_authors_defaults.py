"""The authors' training details are the defaults (issue 13): each pinned to the authors' formula, written
here as a plain reference from their description (paper.md 1.4), on a case where ncpipe's variant differs."""

from __future__ import annotations

import copy
import functools
import inspect
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from ncpipe import attacks, grid
from ncpipe.config import ConfigError, load_config, validate_config
from ncpipe.models import build_model
from ncpipe.specs import SpecError, TradesSpec, TrainSpec, schema_default
from ncpipe.train import train_step
from tests.test_grid_plans import ROOT


def authors_trades_linf(model: torch.nn.Module, x: torch.Tensor, noise: torch.Tensor, eps: float, step: float,
                        steps: int) -> torch.Tensor:
    """The authors' l_inf TRADES attack: start x + 0.001 * noise (no clamp), signed KL steps, clip, clamp."""
    with torch.no_grad():
        p = F.softmax(model(x), dim=1)
    x_adv = x + 0.001 * noise
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.kl_div(F.log_softmax(model(x_adv), dim=1), p, reduction="sum")
        (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step * g.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    return x_adv


def test_trades_start_is_the_authors_unprojected_one(trained_mnist_model):
    model, x, y, _ = trained_mnist_model
    eps, step, steps = 32 / 255, 8 / 255, 5
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    kw: dict[str, Any] = {"norm": "linf", "epsilon": eps, "step": step, "steps": steps}
    ref = authors_trades_linf(model, x, noise, eps, step, steps)
    mine = attacks.trades_attack(model, x, **kw, generator=torch.Generator().manual_seed(7))
    projected = attacks.trades_attack(model, x, **kw, project_start=True,
                                      generator=torch.Generator().manual_seed(7))

    def acc(xa: torch.Tensor) -> float:
        with torch.no_grad():
            return (model(xa).argmax(1) == y).float().mean().item()

    def differing(xa: torch.Tensor) -> float:
        return ((xa - ref).abs() > 1e-6).float().mean().item()

    assert acc(mine) == acc(ref)
    # the same points but where a vanishing gradient (saturated softmax) has a rounding-dependent sign
    assert differing(mine) < 0.01
    # MNIST's saturated pixels: the projected start takes its first gradient elsewhere (0.60 of the pixels
    # and accuracy 0.556 vs the authors' 0.592 on the demo's ST model)
    assert differing(projected) > 0.2



def _trades_loss_arguments(monkeypatch: pytest.MonkeyPatch, spec: TrainSpec) -> dict[str, Any]:
    """The keyword arguments the training step of ``spec`` calls ``attacks.trades_loss`` with."""
    seen: dict[str, Any] = {}

    def spy(model, x, y, **kw):
        seen.update(kw)
        raise StopIteration

    monkeypatch.setattr(attacks, "trades_loss", spy)
    with pytest.raises(StopIteration):
        train_step(torch.nn.Identity(), torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), spec,
                   torch.Generator(), None)
    return seen

def test_l2_trades_step_is_the_authors_2_eps_over_steps_and_at_keeps_its_step(monkeypatch):
    c = load_config(ROOT / "config" / "paper_l2.yaml")
    wc = {"dataset": "cifar10", "arch": "vgg11bn", "seed": 1}
    trades = grid.train_spec_of(c, {**wc, "regime": "trades_l2128"})
    at = grid.train_spec_of(c, {**wc, "regime": "at_l2128"})
    assert trades.trades is not None and trades.trades.step == pytest.approx(25.6)
    assert at.adversary is not None and at.adversary.step == 15
    # the schema default (no trades_step) is the same rule; a number is ncpipe's switch
    del c["train"]["trades_step"]
    validate_config(c)
    assert grid.train_spec_of(c, {**wc, "regime": "trades_l2128"}).trades.step == pytest.approx(25.6)
    c["train"]["trades_step"] = 15
    assert grid.train_spec_of(c, {**wc, "regime": "trades_l2128"}).trades.step == 15
    # and the training step hands that step to the attack, in pixels
    seen = _trades_loss_arguments(monkeypatch, trades)
    assert seen["step"] == pytest.approx(25.6 / 255) and seen["project_start"] is False


def test_demo_and_paper_trades_use_the_authors_bn_quirk():
    for name in ("config.yaml", "paper.yaml"):
        c = load_config(ROOT / "config" / name)
        spec = grid.train_spec_of(c, {"dataset": c["datasets"][0], "arch": "vgg11bn", "seed": 1,
                                      "regime": grid.regime_id("trades", c["train"]["adversary"])})
        assert spec.trades is not None and spec.trades.bn_quirk is True


def _at_spec(final_pass: bool) -> TrainSpec:
    c = validate_config({
        "datasets": ["mnist5k"], "archs": ["vgg11bn"], "methods": ["at"], "seeds": [1],
        "train": {"epochs": 1, "checkpoints": [1], "at_final_pass": final_pass,
                  "adversary": {"norm": "linf", "epsilon": 32, "step": 8, "steps": 3}},
        "runtime": {"device": "cpu"},
    })
    return grid.train_spec_of(c, {"dataset": "mnist5k", "arch": "vgg11bn", "seed": 1, "regime": "at_linf32"})


def _running_means(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([m.running_mean for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)])


def test_at_makes_the_authors_bn_updates_per_batch():
    torch.manual_seed(0)
    base = build_model("vgg11bn", num_classes=10, in_channels=1, mean=(0.5,), std=(0.5,), width=0.1,
                       stem="cifar").train()
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    eps, step, steps = 32 / 255, 8 / 255, 3

    # the authors' batch: train-mode PGD, its unused final objective pass, the update's and the logging pass
    ref = copy.deepcopy(base)
    x_adv = attacks.pgd(ref, x, y, norm="linf", epsilon=eps, step=step, steps=steps, eval_mode=False,
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        F.cross_entropy(ref(x_adv), y, reduction="none")  # the selection objective, unused with 1 restart
    ref(x_adv)
    with torch.no_grad():
        ref(x)

    mine = copy.deepcopy(base)
    train_step(mine, x, y, _at_spec(True), torch.Generator().manual_seed(1), None)
    torch.testing.assert_close(_running_means(mine), _running_means(ref), rtol=0, atol=1e-7)
    variant = copy.deepcopy(base)
    train_step(variant, x, y, _at_spec(False), torch.Generator().manual_seed(1), None)
    assert (_running_means(variant) - _running_means(ref)).abs().max().item() > 1e-4


# ------------------------------------------------------------------ TRADES's l_2 projection order (row 24)
def _numpy_project(x: np.ndarray, delta: np.ndarray, eps: float, order: str) -> np.ndarray:
    """The two orders, per sample: box = clip x + delta into [0, 1]; ball = scale by min(1, eps / ||d||)."""
    def box(d: np.ndarray) -> np.ndarray:
        return np.clip(x + d, 0.0, 1.0) - x

    def ball(d: np.ndarray) -> np.ndarray:
        n = np.sqrt((d.reshape(len(d), -1) ** 2).sum(axis=1))
        return d * np.minimum(1.0, eps / np.maximum(n, 1e-300)).reshape(-1, *[1] * (d.ndim - 1))

    return ball(box(delta)) if order == "box_then_ball" else box(ball(delta))


def _numpy_trades_l2(w: np.ndarray, b: np.ndarray, x: np.ndarray, noise: np.ndarray, eps: float, step: float,
                     steps: int, order: str = "box_then_ball", draw: Any = None) -> np.ndarray:
    """TRADES's l_2 attack on the linear model z = W x + b, from its closed-form KL gradient W^T (q - p):
    each step normalises the gradient per image and, where ``draw`` is given (the authors' zero-gradient
    rule), replaces the rows whose gradient is exactly zero by ``draw(k)`` (k standard normal rows); without
    it those rows do not move.  ``order``: the in-loop projection."""
    def softmax(xx: np.ndarray) -> np.ndarray:
        z = xx.reshape(len(xx), -1) @ w.T + b
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p = softmax(x)
    delta = 0.001 * noise
    for _ in range(steps):
        g = ((softmax(x + delta) - p) @ w).reshape(x.shape)
        n = np.sqrt((g.reshape(len(g), -1) ** 2).sum(axis=1))
        direction = g / np.maximum(n, 1e-300).reshape(-1, 1, 1, 1)
        zero = n == 0
        if draw is not None and zero.any():
            direction[zero] = draw(int(zero.sum()))
        delta = _numpy_project(x, delta + step * direction, eps, order)
    return x + delta


def _edge_case() -> tuple[torch.nn.Module, torch.Tensor]:
    """Two 2 x 2 images with a pixel near the top edge whose KL gradient is +-(1, 1, 0, 0) (the start noise
    picks the sign): a step of 1.0 leaves the ball (eps 0.3) and the box either way.  By hand, for one step
    of the sign the noise gives: image 1 (0.95, 0.5) - (0.71, 0.71): box first (-0.245, -0.173), ball first
    (-0.212, -0.212); image 2 (0.5, 0.97) + (0.71, 0.71): box first (0.299, 0.018), ball first (0.212, 0.03),
    shorter than eps."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
        model[1].bias.zero_()
    x = torch.tensor([[0.95, 0.5, 0.5, 0.5], [0.5, 0.97, 0.2, 0.6]], dtype=torch.float64).view(2, 1, 2, 2)
    return model, x


@pytest.mark.parametrize("steps", [1, 3])
def test_trades_l2_orders_match_a_numpy_reference_and_differ_near_the_box_edge(steps):
    model, x = _edge_case()
    eps, step = 0.3, 1.0
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).numpy()
    w, b = model[1].weight.detach().numpy(), model[1].bias.detach().numpy()
    got = {}
    for order in attacks.TRADES_L2_PROJECTIONS:
        ref = _numpy_trades_l2(w, b, x.numpy(), noise, eps, step, steps, order)
        got[order] = attacks.trades_attack(model, x, norm="l2", epsilon=eps, step=step, steps=steps,
                                           l2_projection=order, generator=torch.Generator().manual_seed(5))
        # the final exact guard may pull the point in by 1e-5 of eps, nothing more
        np.testing.assert_allclose(got[order].numpy(), ref, rtol=0, atol=1e-5)
    gap = (got["box_then_ball"] - got["ball_then_box"]).flatten(1).norm(dim=1)
    assert (gap > 0.05).all()
    # box first rescales after the clamp, so it keeps the whole budget; ball first can lose some to the clamp
    norms = {k: (v - x).flatten(1).norm(dim=1) for k, v in got.items()}
    assert torch.allclose(norms["box_then_ball"], torch.full((2,), eps, dtype=torch.float64), atol=1e-5)
    assert (norms["ball_then_box"] < eps - 0.05).any()


def test_trades_l2_both_orders_stay_inside_ball_and_box(trained_mnist_model):
    model, x, _, _ = trained_mnist_model
    x = x[:100]
    eps, steps = 128 / 255, 5
    model_e, x_e = _edge_case()
    cases = [(model, x, eps, 2 * eps / steps), (model_e, x_e.float(), 0.3, 1.0)]
    for m, xx, e, st in cases:
        outs = {}
        for order in attacks.TRADES_L2_PROJECTIONS:
            xa = attacks.trades_attack(m.float(), xx, norm="l2", epsilon=e, step=st, steps=steps,
                                       l2_projection=order, generator=torch.Generator().manual_seed(2))
            assert xa.dtype == torch.float32
            assert bool(((xa >= 0) & (xa <= 1)).all())
            d = xa - xx
            assert bool((d.flatten(1).norm(dim=1) <= e).all())
            assert bool((d.double().flatten(1).norm(dim=1) <= e).all())
            outs[order] = xa
        # MNIST's saturated pixels: the orders differ on (nearly) every digit, by a few % of eps
        differ = ((outs["box_then_ball"] - outs["ball_then_box"]).flatten(1).norm(dim=1) > 1e-4 * e)
        assert differ.float().mean().item() > 0.5


# Each l_2 TRADES switch: config key -> (the attack's argument, the authors' value (the default), ncpipe's
# value, the registry of its values, a case on which the values give different points)
L2_TRADES_SWITCHES = {
    "trades_l2_projection": ("l2_projection", "box_then_ball", "ball_then_box", attacks.TRADES_L2_PROJECTIONS,
                             "_edge_case"),
    "trades_l2_zero_gradient": ("l2_zero_gradient", "random", "zero_step", attacks.TRADES_L2_ZERO_GRADIENTS,
                                "_saturated_case"),
}


@pytest.mark.parametrize("key", list(L2_TRADES_SWITCHES))
def test_an_l2_trades_switch_defaults_to_the_authors_value_everywhere(key):
    arg, authors, _, registry, _ = L2_TRADES_SWITCHES[key]
    assert schema_default("train", key) == authors and authors in registry
    assert getattr(attacks, f"AUTHORS_TRADES_{arg.upper()}") == authors
    for fn in (attacks.trades_attack, attacks.trades_loss, attacks._trades_attack_eval):
        assert inspect.signature(fn).parameters[arg].default == authors
    assert getattr(TradesSpec(6.0, True), arg) == authors
    wc = {"arch": "vgg11bn", "seed": 1}
    for name in ("config.yaml", "paper.yaml", "paper_l2.yaml", "imagenette.yaml"):
        c = load_config(ROOT / "config" / name)
        spec = grid.train_spec_of(c, {**wc, "dataset": c["datasets"][0],
                                      "regime": grid.regime_id("trades", c["train"]["adversary"])})
        assert spec.trades is not None and getattr(spec.trades, arg) == authors, name


def test_linf_trades_ignores_the_l2_projection_order():
    # l_inf: the two projections commute, and both names run the same code (bit-identical)
    model, x = _edge_case()
    kw: dict[str, Any] = {"norm": "linf", "epsilon": 0.1, "step": 0.05, "steps": 3}
    a, b = (attacks.trades_attack(model, x, **kw, l2_projection=o, generator=torch.Generator().manual_seed(1))
            for o in attacks.TRADES_L2_PROJECTIONS)
    assert torch.equal(a, b)


def test_an_unknown_trades_l2_projection_is_refused_naming_the_key():
    bad = {"datasets": ["mnist5k"], "archs": ["vgg11bn"], "methods": ["trades"], "seeds": [1],
           "train": {"checkpoints": [1], "trades_l2_projection": "radial"}}
    with pytest.raises(ConfigError, match=r"train\.trades_l2_projection.*box_then_ball"):
        validate_config(bad)
    with pytest.raises(SpecError, match="trades_l2_projection"):
        TradesSpec(6.0, True, l2_projection="radial")
    model, x = _edge_case()
    with pytest.raises(ValueError, match="trades_l2_projection"):
        attacks.trades_attack(model, x, norm="l2", epsilon=0.3, step=1.0, steps=1, l2_projection="radial")


# ------------------------------------------------------------------ TRADES's l_2 zero-gradient rule (row 29)
def _saturated_case() -> tuple[torch.nn.Module, torch.Tensor]:
    """Two 2 x 2 images under z = 1e4 * (x_1 - x_2, 0): image 1's logit gap (8500) saturates the float64
    softmax, so its KL gradient is exactly zero, and stays so anywhere in the 0.3-ball (the gap cannot fall
    below 4000 there); image 2 starts at a gap of 0, so its gradient is never zero."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1e4, -1e4, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
        model[1].bias.zero_()
    x = torch.tensor([[0.95, 0.1, 0.5, 0.5], [0.5, 0.5, 0.2, 0.6]], dtype=torch.float64).view(2, 1, 2, 2)
    return model, x


def _standard_rows(shape: tuple[int, ...], gen: torch.Generator, k: int) -> np.ndarray:
    return torch.randn((k, *shape), generator=gen, dtype=torch.float64).numpy()


@pytest.mark.parametrize("steps", [1, 3])
def test_trades_l2_zero_gradient_rules_match_a_numpy_reference_and_move_only_the_zero_rows(steps):
    model, x = _saturated_case()
    eps, step = 0.3, 1.0
    w, b = model[1].weight.detach().numpy(), model[1].bias.detach().numpy()
    got, noise = {}, None
    for rule in attacks.TRADES_L2_ZERO_GRADIENTS:
        # the reference takes the attack's draws in the attack's order: the start, then one row per step
        g_ref = torch.Generator().manual_seed(7)
        noise = torch.randn(x.shape, generator=g_ref, dtype=torch.float64).numpy()
        draw = functools.partial(_standard_rows, x.shape[1:], g_ref) if rule == "random" else None
        ref = _numpy_trades_l2(w, b, x.numpy(), noise, eps, step, steps, draw=draw)
        got[rule] = attacks.trades_attack(model, x, norm="l2", epsilon=eps, step=step, steps=steps,
                                          l2_zero_gradient=rule, generator=torch.Generator().manual_seed(7))
        np.testing.assert_allclose(got[rule].numpy(), ref, rtol=0, atol=1e-5)
        assert bool(((got[rule] >= 0) & (got[rule] <= 1)).all())
        assert bool(((got[rule] - x).flatten(1).norm(dim=1) <= eps).all())
    assert noise is not None
    # image 1: zero_step leaves it at its (box-clamped) start; the authors' random step (length ~ 2) is cut
    # back to the ball's surface
    start = np.clip(x.numpy() + 0.001 * noise, 0.0, 1.0)
    np.testing.assert_allclose(got["zero_step"][0].numpy(), start[0], rtol=0, atol=1e-12)
    assert (got["random"][0] - x[0]).norm().item() == pytest.approx(eps, rel=1e-4)
    # image 2's gradient is never zero: the two rules give it bit-identical steps
    assert torch.equal(got["random"][1], got["zero_step"][1])


class _Saturate(torch.nn.Module):
    """A trained model whose logits are multiplied by 1e6 on the rows ``rows``: their softmax saturates in
    float32 (every gap above 1e-4 becomes > 100), so their KL gradient is exactly zero."""

    def __init__(self, model: torch.nn.Module, rows: torch.Tensor) -> None:
        super().__init__()
        self.model, self.rows = model, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.ones(len(x), 1)
        scale[self.rows] = 1e6
        return self.model(x) * scale


def test_trades_l2_zero_gradient_on_a_trained_model_steps_only_the_saturated_digits(trained_mnist_model):
    model, x, _, _ = trained_mnist_model
    x = x[:12]
    rows = torch.zeros(len(x), dtype=torch.bool)
    rows[::3] = True
    m = _Saturate(model, rows)
    eps, steps = 128 / 255, 2
    outs, states = {}, {}
    for rule in attacks.TRADES_L2_ZERO_GRADIENTS:
        gen = torch.Generator().manual_seed(3)
        outs[rule] = attacks.trades_attack(m, x, norm="l2", epsilon=eps, step=2 * eps / steps, steps=steps,
                                           l2_zero_gradient=rule, generator=gen)
        states[rule] = gen.get_state()
        d = outs[rule] - x
        assert bool(((outs[rule] >= 0) & (outs[rule] <= 1)).all())
        assert bool((d.flatten(1).norm(dim=1) <= eps).all())
        assert bool((d.double().flatten(1).norm(dim=1) <= eps).all())
    n = {k: (v - x).flatten(1).norm(dim=1) for k, v in outs.items()}
    # the saturated digits: a random step of length ~ 25.6/255 * 28, projected back to the sphere, versus none
    assert bool((n["random"][rows] > 0.99 * eps).all()) and bool((n["zero_step"][rows] < 0.1 * eps).all())
    # the others are untouched by the rule, bit for bit; only the random rule drew more noise
    assert torch.equal(outs["random"][~rows], outs["zero_step"][~rows])
    assert not torch.equal(states["random"], states["zero_step"])


def test_trades_l2_zero_gradient_rule_draws_nothing_without_a_zero_gradient_and_linf_ignores_it():
    cases = [(_edge_case(), "l2", 0.3, 1.0), (_saturated_case(), "linf", 0.1, 0.05)]
    for (model, x), norm, eps, step in cases:
        outs, states = [], []
        for rule in attacks.TRADES_L2_ZERO_GRADIENTS:
            gen = torch.Generator().manual_seed(1)
            outs.append(attacks.trades_attack(model, x, norm=norm, epsilon=eps, step=step, steps=3,
                                              l2_zero_gradient=rule, generator=gen))
            states.append(gen.get_state())
        assert torch.equal(*outs) and torch.equal(*states), norm


@pytest.mark.parametrize("key", list(L2_TRADES_SWITCHES))
def test_an_l2_trades_switch_reaches_the_attack_from_the_config(monkeypatch, key):
    arg, _, value, registry, case = L2_TRADES_SWITCHES[key]
    c = load_config(ROOT / "config" / "paper_l2.yaml")
    c["train"][key] = value
    validate_config(c)
    wc = {"dataset": "cifar10", "arch": "vgg11bn", "seed": 1, "regime": "trades_l2128"}
    spec = grid.train_spec_of(c, wc)
    assert TrainSpec.from_json(spec.to_json()) == spec
    assert f'"{arg}": "{value}"' in spec.to_json()  # so it is part of the training resume key
    seen = _trades_loss_arguments(monkeypatch, spec)
    assert seen[arg] == value and seen["norm"] == "l2"
    monkeypatch.undo()
    # and trades_loss hands it on to the attack: its x_adv is trades_attack's for the same setting
    model, x = globals()[case]()
    y = torch.zeros(2, dtype=torch.long)
    xs = {}
    for setting in registry:
        kw: dict[str, Any] = {"norm": "l2", "epsilon": 0.3, "step": 1.0, "steps": 2, arg: setting}
        out = attacks.trades_loss(model, x, y, **kw, generator=torch.Generator().manual_seed(4))
        xs[setting] = attacks.trades_attack(model, x, **kw, generator=torch.Generator().manual_seed(4))
        assert torch.equal(out.x_adv, xs[setting])
    first, second = xs.values()
    assert not torch.equal(first, second)  # the case tells the settings apart


def test_an_unknown_trades_l2_zero_gradient_is_refused_naming_the_key():
    bad = {"datasets": ["mnist5k"], "archs": ["vgg11bn"], "methods": ["trades"], "seeds": [1],
           "train": {"checkpoints": [1], "trades_l2_zero_gradient": "nan"}}
    with pytest.raises(ConfigError, match=r"train\.trades_l2_zero_gradient.*random.*zero_step"):
        validate_config(bad)
    with pytest.raises(SpecError, match=r"train\.trades_l2_zero_gradient.*random"):
        TradesSpec(6.0, True, l2_zero_gradient="nan")
    model, x = _saturated_case()
    for norm in ("l2", "linf"):
        with pytest.raises(ValueError, match=r"train\.trades_l2_zero_gradient.*random, zero_step"):
            attacks.trades_attack(model, x, norm=norm, epsilon=0.3, step=1.0, steps=1, l2_zero_gradient="nan")
