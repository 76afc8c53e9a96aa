"""Adversarial attacks and random-noise baselines of the paper, written from its description (§1.4-1.6).

Every function works in pixel space: ``x`` is a float batch in [0, 1] (the models normalise internally), and
``epsilon`` / ``step`` / ``sigma`` are in pixel units (the paper's l_inf threat is 8/255 with steps of 2/255
and 10 iterations; its l_2 threat is 128/255).  All attacks are batched, take gradients with respect to the
input only (``torch.autograd.grad``, so no parameter ``.grad`` is ever touched), and run on the model's
device.

Guarantee: every perturbation returned by :func:`pgd`, :func:`trades_attack`, :func:`random_sign`,
:func:`random_sign_l2` and :func:`gaussian_l2` lies in its ball and keeps the input in [0, 1] *exactly* in
float32 (checked element/sample-wise, and the few values that rounding pushed an ulp outside are nudged
back), so downstream code can assert it without tolerances.

Randomness comes from ``generator`` when given (CPU or device generator; samples are drawn on the generator's
device and moved), otherwise from the global RNG.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .config import load_schema, schema_enum

# Relative margin by which l_2 projections aim inside the ball, so that float32 rounding of x + delta (half an
# ulp per pixel) cannot push a sample's norm past epsilon.  1e-5 of epsilon has no measurable effect.
_L2_SAFETY = 1e-5
_TINY = 1e-12


# ------------------------------------------------------------------------------------------------ helpers
def _check_norm(norm: str) -> None:
    _ball(norm)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    # The perturbation is kept in at least fp32 even when the forward passes run under autocast.
    if not x.is_floating_point():
        raise TypeError(f"attacks expect float pixels in [0, 1], got dtype {x.dtype}")
    return torch.promote_types(x.dtype, torch.float32)


def _randn(shape: torch.Size, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal samples shaped ``shape`` on ``like``'s device, drawn from ``generator``'s device."""
    if generator is None:
        return torch.randn(shape, device=like.device, dtype=like.dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)


def _rand(shape: torch.Size | tuple[int, ...], like: torch.Tensor,
          generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.rand(shape, device=like.device, dtype=like.dtype)
    return torch.rand(shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)


def _view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample vector ``v`` (B,) shaped to broadcast against ``x`` (B, ...)."""
    return v.view(-1, *([1] * (x.dim() - 1)))


def _l2_norms(d: torch.Tensor) -> torch.Tensor:
    return d.flatten(1).norm(p=2, dim=1)


def _autocast(x: torch.Tensor, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, dtype=amp_dtype)


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool | None) -> Iterator[None]:
    """Run with the model in train/eval mode (None: leave it), then restore every submodule's own flag.

    Restoring per submodule (not ``model.train(old)``) keeps deliberately frozen parts, e.g. BN layers a
    caller put in eval mode inside a training model, as they were.
    """
    if training is None:
        yield
        return
    saved = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _project_linf_exact(x: torch.Tensor, x_adv: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Clamp ``x_adv`` into [x - eps, x + eps] ∩ [0, 1] so that ``|x_adv - x| <= eps`` holds exactly.

    ``x + eps`` is rounded, so the float difference can exceed eps by an ulp; the offending entries are moved
    one ulp towards ``x`` until the check passes.  The bound used is eps rounded *down* to the working
    precision, so the check holds both in float32 (how tests compare a tensor with a Python float) and in
    exact arithmetic.
    """
    eps_t = torch.tensor(epsilon, dtype=x.dtype)
    if eps_t.item() > epsilon:
        eps_t = torch.nextafter(eps_t, torch.zeros_like(eps_t))
    eps_w = eps_t.item()
    x_adv = torch.minimum(torch.maximum(x_adv, x - eps_w), x + eps_w).clamp_(0.0, 1.0)
    for _ in range(8):
        # float64 difference of two float32 values is exact, so this is the true distance
        bad = (x_adv.double() - x.double()).abs() > eps_w
        if not bool(bad.any()):
            break
        x_adv = torch.where(bad, torch.nextafter(x_adv, x), x_adv)
    return x_adv


def _project_l2_exact(x: torch.Tensor, x_adv: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Make every sample's ``||x_adv - x||_2 <= eps`` hold exactly (float32 and float64 norms), in [0, 1].

    Shrinking delta towards 0 keeps ``x + delta`` in the box because the box is convex and contains ``x``.
    """
    x_adv = x_adv.clamp(0.0, 1.0)
    shrink = 1.0 - _L2_SAFETY
    for _ in range(20):
        d = x_adv - x
        n64 = _l2_norms(d.double())
        bad = (n64 > epsilon) | (_l2_norms(d) > epsilon)
        if not bool(bad.any()):
            return x_adv
        target = epsilon * shrink
        factor = torch.where(bad, (target / n64.clamp_min(_TINY)).clamp(max=1.0), torch.ones_like(n64))
        x_adv = (x + d * _view(factor.to(d.dtype), d)).clamp_(0.0, 1.0)
        shrink *= 1.0 - 10 * _L2_SAFETY  # a sample that still fails moves further inside next round
    # unreachable in practice; fall back to the clean point rather than return an out-of-ball sample
    bad = _l2_norms((x_adv - x).double()) > epsilon
    return torch.where(_view(bad, x), x, x_adv)


class _Linf:
    """The l_inf ball: uniform start, signed steps, coordinate-wise clamp."""

    def start(self, x: torch.Tensor, epsilon: float, generator: torch.Generator | None) -> torch.Tensor:
        return (2.0 * _rand(x.shape, x, generator) - 1.0) * epsilon

    def ascend(self, delta: torch.Tensor, grad: torch.Tensor, step: float) -> torch.Tensor:
        return delta + step * grad.sign()

    def clip(self, delta: torch.Tensor, epsilon: float) -> torch.Tensor:
        return delta.clamp(-epsilon, epsilon)

    def project(self, x: torch.Tensor, x_adv: torch.Tensor, epsilon: float) -> torch.Tensor:
        return _project_linf_exact(x, x_adv, epsilon)


class _L2:
    """The l_2 ball: r * eps * g / ||g|| start (r ~ U(0, 1)), normalised-gradient steps, radial rescaling."""

    def start(self, x: torch.Tensor, epsilon: float, generator: torch.Generator | None) -> torch.Tensor:
        g = _randn(x.shape, x, generator)
        r = _rand((x.shape[0],), x, generator)
        return g * _view(r * epsilon / _l2_norms(g).clamp_min(_TINY), g)

    def ascend(self, delta: torch.Tensor, grad: torch.Tensor, step: float) -> torch.Tensor:
        # normalised gradient; a zero gradient (saturated softmax) gives a zero step instead of NaN
        return delta + step * grad / _view(_l2_norms(grad).clamp_min(_TINY), grad)

    def clip(self, delta: torch.Tensor, epsilon: float) -> torch.Tensor:
        return delta * _view((epsilon / _l2_norms(delta).clamp_min(_TINY)).clamp(max=1.0), delta)

    def project(self, x: torch.Tensor, x_adv: torch.Tensor, epsilon: float) -> torch.Tensor:
        d = x_adv - x
        n = _l2_norms(d)
        d = d * _view((epsilon * (1.0 - _L2_SAFETY) / n.clamp_min(_TINY)).clamp(max=1.0), d)
        return _project_l2_exact(x, x + d, epsilon)


# Each threat norm's geometry, in the schema's order; adding a norm is one entry here (and the schema's enum).
BALLS: dict[str, _Linf | _L2] = {"linf": _Linf(), "l2": _L2()}
NORMS = tuple(BALLS)


def _ball(norm: str) -> _Linf | _L2:
    if norm not in BALLS:
        raise ValueError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")
    return BALLS[norm]


def project(x: torch.Tensor, x_adv: torch.Tensor, *, norm: str, epsilon: float) -> torch.Tensor:
    """Project ``x_adv`` onto the ``norm`` ball of radius ``epsilon`` around ``x`` intersected with [0, 1].

    For l_2 this is radial rescaling followed by a box clamp (the paper's renorm + clamp), not the exact
    Euclidean projection onto the intersection; both are standard in PGD.
    """
    return _ball(norm).project(x, x_adv, epsilon)


def _random_start(x: torch.Tensor, norm: str, epsilon: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """The paper's PGD start: uniform in the l_inf ball, or r * eps * g / ||g|| with r ~ U(0, 1) for l_2."""
    return (x + _ball(norm).start(x, epsilon, generator)).clamp(0.0, 1.0) - x


def _ascent_step(delta: torch.Tensor, grad: torch.Tensor, norm: str, step: float) -> torch.Tensor:
    return _ball(norm).ascend(delta, grad, step)


def _project_delta(x: torch.Tensor, delta: torch.Tensor, norm: str, epsilon: float) -> torch.Tensor:
    """Cheap in-loop projection (ball, then box); the exact float guard runs once, on the final output."""
    return (x + _ball(norm).clip(delta, epsilon)).clamp(0.0, 1.0) - x


def _project_delta_box_first(x: torch.Tensor, delta: torch.Tensor, norm: str, epsilon: float) -> torch.Tensor:
    """In-loop projection in the other order (box, then ball), the authors' TRADES l_2 order.

    Feasible without a second clamp: shrinking a delta whose end point is in the box towards 0 keeps it there,
    since the box is convex and contains ``x``.
    """
    return _ball(norm).clip((x + delta).clamp(0.0, 1.0) - x, epsilon)


# TRADES's in-loop l_2 projection orders (config ``train.trades_l2_projection``, names from the schema's
# enum).  At l_inf both orders give the same point, so the l_inf attack always takes ball_then_box's code.
TRADES_L2_PROJECTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, str, float], torch.Tensor]] = {
    "box_then_ball": _project_delta_box_first,
    "ball_then_box": _project_delta,
}
if set(TRADES_L2_PROJECTIONS) != set(schema_enum("train", "trades_l2_projection")):
    raise RuntimeError("attacks.TRADES_L2_PROJECTIONS differs from the schema's train.trades_l2_projection")
AUTHORS_TRADES_L2_PROJECTION = "box_then_ball"


def _trades_projection(norm: str, l2_projection: str
                       ) -> Callable[[torch.Tensor, torch.Tensor, str, float], torch.Tensor]:
    if l2_projection not in TRADES_L2_PROJECTIONS:
        raise ValueError(f"unknown TRADES l_2 projection {l2_projection!r} (train.trades_l2_projection); "
                         f"known: {', '.join(TRADES_L2_PROJECTIONS)}")
    return TRADES_L2_PROJECTIONS[l2_projection] if norm == "l2" else _project_delta


def _step_zero_gradient_randomly(delta: torch.Tensor, grad: torch.Tensor, step: float,
                                 generator: torch.Generator | None) -> torch.Tensor:
    """The authors' TRADES l_2 step: where a sample's gradient is exactly zero its normalised gradient (a NaN
    for them) is replaced by an unnormalised N(0, I) sample, so it still moves, by about step * sqrt(D).

    The noise is drawn only when some gradient is zero, so without one the generator's stream and the result
    are those of the plain step.  The authors subtract (SGD on -KL) where this adds; N(0, I) is symmetric.
    """
    stepped = _ascent_step(delta, grad, "l2", step)
    zero = _l2_norms(grad) == 0
    if bool(zero.any()):
        # added to the plain step's result (which left these rows where they were), so that every other row
        # keeps the plain step's rounding bit for bit
        stepped[zero] += step * _randn(stepped[zero].shape, stepped, generator)
    return stepped


def _step_zero_gradient_still(delta: torch.Tensor, grad: torch.Tensor, step: float,
                              generator: torch.Generator | None) -> torch.Tensor:
    return _ascent_step(delta, grad, "l2", step)


# TRADES's l_2 rule for a sample whose KL gradient is exactly zero (config ``train.trades_l2_zero_gradient``,
# names from the schema's enum).  The authors' l_inf TRADES step (sign(0) = 0) and their PGD have no such
# rule, so l_inf always takes the plain step.
TRADES_L2_ZERO_GRADIENTS: dict[str, Callable[[torch.Tensor, torch.Tensor, float, torch.Generator | None],
                                             torch.Tensor]] = {
    "random": _step_zero_gradient_randomly,
    "zero_step": _step_zero_gradient_still,
}
if set(TRADES_L2_ZERO_GRADIENTS) != set(schema_enum("train", "trades_l2_zero_gradient")):
    raise RuntimeError("attacks.TRADES_L2_ZERO_GRADIENTS differs from the schema's "
                       "train.trades_l2_zero_gradient")
AUTHORS_TRADES_L2_ZERO_GRADIENT = "random"


def _trades_ascent(norm: str, l2_zero_gradient: str
                   ) -> Callable[[torch.Tensor, torch.Tensor, float, torch.Generator | None], torch.Tensor]:
    if l2_zero_gradient not in TRADES_L2_ZERO_GRADIENTS:
        raise ValueError(f"unknown TRADES l_2 zero-gradient rule {l2_zero_gradient!r} "
                         f"(train.trades_l2_zero_gradient); known: {', '.join(TRADES_L2_ZERO_GRADIENTS)}")
    if norm == "l2":
        return TRADES_L2_ZERO_GRADIENTS[l2_zero_gradient]
    return lambda delta, grad, step, generator: _ascent_step(delta, grad, norm, step)


# ------------------------------------------------------------------------------------------------ targets
def _next_targets(y: torch.Tensor, num_classes: int, generator: torch.Generator | None) -> torch.Tensor:
    return (y + 1) % num_classes


def _random_targets(y: torch.Tensor, num_classes: int, generator: torch.Generator | None) -> torch.Tensor:
    # a uniform offset in 1..C-1 gives a uniform label among the C-1 other classes
    if generator is None:
        off = torch.randint(1, num_classes, y.shape, device=y.device)
    else:
        off = torch.randint(1, num_classes, y.shape, generator=generator, device=generator.device)
        off = off.to(y.device)
    return (y + off) % num_classes


TARGET_RULES: dict[str, Callable[[torch.Tensor, int, torch.Generator | None], torch.Tensor]] = {
    "next": _next_targets,
    "random": _random_targets,
}


def target_labels(y: torch.Tensor, num_classes: int, rule: str = "next",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Target labels for the targeted attack.

    ``"next"`` is the paper's rule y_t = (y + 1) mod C (section 1.6); ``"random"`` draws a label uniformly
    among the other C - 1 classes (from ``generator`` when given).
    """
    if rule not in TARGET_RULES:
        raise ValueError(f"unknown target rule {rule!r}; known: {', '.join(sorted(TARGET_RULES))}")
    if num_classes < 2:
        raise ValueError("a targeted attack needs at least 2 classes")
    return TARGET_RULES[rule](y, num_classes, generator)


# ------------------------------------------------------------------------------------------------ PGD
def _model_device(model: nn.Module, x: torch.Tensor) -> torch.device:
    """The device the attack runs on: the model's (its first parameter or buffer), else ``x``'s."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return x.device


def attack_objective(model: nn.Module, x_adv: torch.Tensor, labels: torch.Tensor, *, targeted: bool = False,
                     amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-sample quantity PGD maximises: CE(f(x_adv), y), or -CE(f(x_adv), y_t) when ``targeted``.

    Runs in the model's current mode; to compare with :func:`pgd`'s choice, put the model in eval mode.
    """
    with _autocast(x_adv, amp_dtype):
        logits = model(x_adv)
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    return -ce if targeted else ce


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str,
    epsilon: float,
    step: float,
    steps: int,
    restarts: int = 1,
    targets: torch.Tensor | None = None,
    random_start: bool = True,
    eval_mode: bool = True,
    generator: torch.Generator | None = None,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Projected gradient descent (Madry et al.) as the paper describes it; returns ``x_adv``, not delta.

    Paper settings (section 1.6): l_inf eps = 8/255, step = 2/255, 10 steps, 1 restart, uniform random start;
    l_2 eps = 128/255, 10 steps.  Untargeted: ascend CE(f(x + delta), y).  With ``targets`` (the paper's
    y_t = (y + 1) mod C, see :func:`target_labels`): descend CE(f(x + delta), y_t), same eps, step and steps.

    * Random start: l_inf delta ~ U(-eps, eps) per pixel; l_2 delta = r * eps * g / ||g||_2 with
      g ~ N(0, I) and r ~ U(0, 1) per sample; then clamped so x + delta is in [0, 1].
      ``random_start=False`` starts at x.
    * Step: l_inf delta += step * sign(grad); l_2 delta += step * grad / ||grad||_2; each followed by
      projection onto the eps-ball and then the [0, 1] box.  No early stopping.
    * Restarts: each restart runs all ``steps`` from its own random start (drawn in order from ``generator``,
      so restart r of one call sees the start that the r-th of consecutive single-restart calls on the same
      generator sees); per sample, the restart with the highest :func:`attack_objective` is kept (ties: the
      earlier one).  The objective is evaluated on the exactly projected point that is returned.  With one
      restart that evaluation is skipped: in train mode it would only add a BN running-stat update.
    * ``eval_mode=True`` attacks in eval mode (BN uses running stats) and restores each submodule's mode
      afterwards; ``eval_mode=False`` leaves the mode alone: the authors' AT attacks the model in train mode,
      so BN uses batch statistics and updates its running stats during the attack (paper section 1.4).
    * ``amp_dtype`` runs the forward passes under ``torch.autocast``; delta, its updates and the loss stay
      fp32.  The attack runs on the model's device (``x`` and labels are moved there).

    The output satisfies ``|x_adv - x|_inf <= eps`` (l_inf) or per-sample ``||x_adv - x||_2 <= eps`` (l_2) and
    ``0 <= x_adv <= 1`` exactly in float32.
    """
    _check_norm(norm)
    if steps < 0 or restarts < 1:
        raise ValueError(f"need steps >= 0 and restarts >= 1, got steps={steps}, restarts={restarts}")
    if epsilon < 0 or step < 0:
        raise ValueError(f"epsilon and step must be >= 0, got epsilon={epsilon}, step={step}")
    device = _model_device(model, x)
    x = x.detach().to(device=device, dtype=_work_dtype(x))
    targeted = targets is not None
    labels = (targets if targeted else y).to(device)
    if labels.shape != x.shape[:1]:
        raise ValueError(f"need one label per sample: x has {x.shape[0]}, labels {tuple(labels.shape)}")

    best = x
    best_obj = torch.full((x.shape[0],), -torch.inf, device=device)
    with _mode(model, False if eval_mode else None), torch.enable_grad():
        for r in range(restarts):
            delta = _random_start(x, norm, epsilon, generator) if random_start else torch.zeros_like(x)
            for _ in range(steps):
                delta.requires_grad_(True)
                obj = attack_objective(model, x + delta, labels, targeted=targeted, amp_dtype=amp_dtype)
                # summed (not mean) loss: each sample's gradient is independent of the batch size
                (grad,) = torch.autograd.grad(obj.sum(), delta)
                with torch.no_grad():
                    delta = _project_delta(x, _ascent_step(delta.detach(), grad, norm, step), norm, epsilon)
            with torch.no_grad():
                x_adv = project(x, x + delta.detach(), norm=norm, epsilon=epsilon)
                if restarts == 1:
                    return x_adv
                obj = attack_objective(model, x_adv, labels, targeted=targeted, amp_dtype=amp_dtype)
                # the first restart is always taken, so a NaN objective can never leave the clean point
                better = (obj > best_obj) | (r == 0)
                best = torch.where(_view(better, x), x_adv, best)
                best_obj = torch.where(better, obj, best_obj)
    return best


# ------------------------------------------------------------------------------------------------ TRADES
def _kl_rows(logits_ref: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(softmax(ref) || softmax(adv)), computed in fp32 from log-probabilities for stability."""
    lp_ref = F.log_softmax(logits_ref.float(), dim=1)
    lp_adv = F.log_softmax(logits_adv.float(), dim=1)
    return (lp_ref.exp() * (lp_ref - lp_adv)).sum(dim=1)


def _trades_attack_eval(model: nn.Module, x: torch.Tensor, norm: str, epsilon: float, step: float, steps: int,
                        generator: torch.Generator | None, amp_dtype: torch.dtype | None,
                        project_start: bool = False,
                        l2_projection: str = AUTHORS_TRADES_L2_PROJECTION,
                        l2_zero_gradient: str = AUTHORS_TRADES_L2_ZERO_GRADIENT) -> torch.Tensor:
    """The KL inner maximisation, assuming the caller has set the model mode and put ``x`` on its device."""
    project_delta = _trades_projection(norm, l2_projection)
    ascend = _trades_ascent(norm, l2_zero_gradient)
    with torch.no_grad(), _autocast(x, amp_dtype):
        ref = model(x).float()  # the clean distribution is a fixed target of the inner problem
    delta = 0.001 * _randn(x.shape, x, generator)
    if project_start:
        # ncpipe's variant; the authors take the first gradient at the unprojected start, which on saturated
        # MNIST pixels lies outside [0, 1]
        delta = project_delta(x, delta, norm, epsilon)
    with torch.enable_grad():
        for _ in range(steps):
            delta.requires_grad_(True)
            with _autocast(x, amp_dtype):
                logits = model(x + delta)
            (grad,) = torch.autograd.grad(_kl_rows(ref, logits).sum(), delta)
            with torch.no_grad():
                delta = project_delta(x, ascend(delta.detach(), grad, step, generator), norm, epsilon)
    with torch.no_grad():
        # the exact guard; it moves a box_then_ball point by at most 1e-5 of eps (towards x, inside the box)
        return project(x, x + delta.detach(), norm=norm, epsilon=epsilon)


def trades_attack(
    model: nn.Module,
    x: torch.Tensor,
    *,
    norm: str,
    epsilon: float,
    step: float,
    steps: int,
    project_start: bool = False,
    l2_projection: str = AUTHORS_TRADES_L2_PROJECTION,
    l2_zero_gradient: str = AUTHORS_TRADES_L2_ZERO_GRADIENT,
    generator: torch.Generator | None = None,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """TRADES' inner maximisation (Zhang et al. 2019; paper section 1.4); returns ``x_adv``.

    Starts at x + 0.001 * N(0, I), as the authors do *not* projected into [0, 1] (``project_start=True``:
    ncpipe's variant, projected into the ball and the box), and ascends KL(softmax f(x) || softmax f(x_adv))
    with the clean probabilities fixed, for ``steps`` steps, projecting onto the eps-ball and [0, 1] after
    each.  l_inf: signed steps of size ``step`` (paper: eps 8/255, step 2/255, 10 steps).  l_2:
    normalised-gradient steps of size ``step``.  The authors' l_2 variant runs plain SGD on delta with lr
    2 * eps / steps on the normalised gradient, then a box clamp and a renorm to eps; that is the same update
    when ``step = 2 * epsilon / steps`` (``specs.authors_trades_step``, the training default).

    ``l2_projection`` (l_2 only): ``"box_then_ball"``, the authors' order above (clamp into [0, 1], then
    scale delta by min(1, eps / ||delta||)), or ``"ball_then_box"``, ncpipe's (scale, then clamp, as
    :func:`pgd`).  Where a step leaves both the ball and the box they land on different feasible points:
    box first rescales what the clamp left, ball first clamps after rescaling and so ends shorter.

    ``l2_zero_gradient`` (l_2 only): where a sample's KL gradient is exactly zero (a saturated softmax),
    ``"random"``, the authors' rule, steps by ``step * z`` with z ~ N(0, I) drawn from ``generator`` (only
    when such a sample occurs), ``"zero_step"``, ncpipe's, leaves it where it is for that step.

    The model is in eval mode during the attack and each submodule's mode is restored afterwards; see
    :func:`trades_loss` for the authors' variant that never restores it.  The output is inside the ball and
    the box exactly, like :func:`pgd`'s.
    """
    _check_norm(norm)
    x = x.detach().to(device=_model_device(model, x), dtype=_work_dtype(x))
    with _mode(model, False):
        return _trades_attack_eval(model, x, norm, epsilon, step, steps, generator, amp_dtype, project_start,
                                   l2_projection, l2_zero_gradient)


class TradesLoss(NamedTuple):
    """What :func:`trades_loss` returns; both logits carry the graph of the outer loss."""

    loss: torch.Tensor
    logits_clean: torch.Tensor
    logits_adv: torch.Tensor
    x_adv: torch.Tensor


def trades_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    beta: float = 6.0,
    norm: str,
    epsilon: float,
    step: float,
    steps: int,
    bn_quirk: bool = False,
    project_start: bool = False,
    l2_projection: str = AUTHORS_TRADES_L2_PROJECTION,
    l2_zero_gradient: str = AUTHORS_TRADES_L2_ZERO_GRADIENT,
    generator: torch.Generator | None = None,
    amp_dtype: torch.dtype | None = None,
) -> TradesLoss:
    """TRADES objective CE(f(x), y) + beta * (1/B) sum_i KL(softmax f(x_i) || softmax f(x_adv_i)).

    Paper: beta = 6.0 (hard-coded by the authors), the training threat of section 1.6.  ``x_adv`` comes from
    :func:`trades_attack`; in the outer loss the gradient flows through both the clean and the adversarial
    logits (as in TRADES).  The adversarial logits are returned so that a caller logging robust accuracy needs
    no third forward pass (which, in train mode, would update the BN running stats once more).

    ``project_start``, ``l2_projection``, ``l2_zero_gradient``: see :func:`trades_attack` (their defaults are
    the authors').

    ``bn_quirk=False`` (ncpipe's variant; the training default is True, the authors'): the attack runs in eval
    mode and the model's previous modes are restored before the two loss forward passes, so a training model
    uses batch statistics there and updates its BN running stats.

    ``bn_quirk=True`` reproduces a bug in the authors' code (paper.md section 1.4 "Code quirk", section 5.5):
    their TRADES attack calls ``model.eval()`` and never switches back, so the loss forward passes run in eval
    mode, BN normalises with its running stats, and those stats never update (they stay at their initial
    mean 0 / var 1 for the whole run).  Here the model is likewise *left in eval mode when this function
    returns*; calling it every batch reproduces the authors' training exactly in this respect.
    """
    _check_norm(norm)
    device = _model_device(model, x)
    x = x.to(device)
    y = y.to(device)
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        x_adv = _trades_attack_eval(model, x.detach().to(_work_dtype(x)), norm, epsilon, step, steps,
                                    generator, amp_dtype, project_start, l2_projection, l2_zero_gradient)
    finally:
        if not bn_quirk:
            for m, flag in saved:
                m.training = flag
    with _autocast(x, amp_dtype):
        logits_clean = model(x)
        logits_adv = model(x_adv)
    ce = F.cross_entropy(logits_clean.float(), y)
    kl = _kl_rows(logits_clean, logits_adv).mean()  # "batchmean": the KL summed over classes, averaged over B
    return TradesLoss(ce + beta * kl, logits_clean, logits_adv, x_adv)


# ------------------------------------------------------------------------------------------------ noise
def gaussian_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + sigma * N(0, I), i.i.d. per pixel, clamped to [0, 1] (authors' eval.py baseline, sigma = 8/255).

    Unbounded: it lies in no l_inf ball; it is the "same size" as an l_inf threat only through sigma = eps.
    """
    xf = x.to(_work_dtype(x))
    return (xf + sigma * _randn(x.shape, xf, generator)).clamp_(0.0, 1.0)


def gaussian_l2(x: torch.Tensor, radius: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + radius * g / ||g||_2 with g ~ N(0, I) per sample, then clamped to [0, 1].

    The authors' l_2-matched baseline (radius 128/255).  Before clamping the noise has norm ``radius``; the
    clamp can only shorten it, and the result lies in the l_2 ball of that radius exactly.
    """
    xf = x.to(_work_dtype(x))
    g = _randn(x.shape, xf, generator)
    return _project_l2_exact(xf, xf + g * _view(radius / _l2_norms(g).clamp_min(_TINY), g), radius)


def _random_signs(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.where(_randn(x.shape, x, generator) >= 0, 1.0, -1.0).to(x.dtype)


def random_sign(x: torch.Tensor, epsilon: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + eps * s, s uniform in {-1, 1}^D, clamped to [0, 1]: a uniformly random vertex of the l_inf ball.

    The authors' ``linf_label`` baseline (eps = 8/255); ``|x_adv - x| <= eps`` holds exactly.
    """
    xf = x.to(_work_dtype(x))
    return _project_linf_exact(xf, xf + epsilon * _random_signs(xf, generator), epsilon)


def random_sign_l2(x: torch.Tensor, radius: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The l_2 counterpart of :func:`random_sign`: x + (radius / sqrt(D)) * s, s uniform in {-1, 1}^D.

    A random sign pattern of l_2 norm ``radius`` (D = pixels per sample), i.e. a random vertex of the l_inf
    ball inscribed in the l_2 sphere; clamped to [0, 1] and inside the l_2 ball exactly.
    """
    xf = x.to(_work_dtype(x))
    per_pixel = radius / math.sqrt(xf[0].numel()) if len(xf) else 0.0
    return _project_l2_exact(xf, xf + per_pixel * _random_signs(xf, generator), radius)


# ------------------------------------------------------------------------------------------------ kinds
# The kind that training records (AT/TRADES: ncpipe.checkpoint.adversarial_record); this module does not
# make it.
TRAIN_ADV = "train_adv"


@dataclass(frozen=True)
class Request:
    """Everything one :func:`perturb` call receives (pixel units), handed to the kind's entry."""

    norm: str
    epsilon: float
    step: float = 0.0
    steps: int = 0
    restarts: int = 1
    targets: torch.Tensor | None = None
    num_classes: int | None = None
    target_rule: str = "next"
    random_start: bool = True
    generator: torch.Generator | None = None
    amp_dtype: torch.dtype | None = None
    input_numel: int | None = None
    options: Mapping[str, Any] | None = None  # a kind's own settings (autoattack: AUTOATTACK_DEFAULTS keys)

    def base_params(self, kind: str) -> dict[str, Any]:
        return {"kind": kind, "norm": self.norm, "epsilon": self.epsilon,
                "epsilon_255": _in_255(self.epsilon)}


@dataclass(frozen=True)
class Perturbation:
    """One perturbation kind of the features rule: how it is made and what is recorded about it.

    ``make(model, x, y, request)`` returns the perturbed batch; ``params(request)`` every parameter it used,
    for the HDF5 group attributes.  The two sit in one entry so that they cannot drift apart.
    """

    name: str
    make: Callable[[nn.Module, torch.Tensor, torch.Tensor, Request], torch.Tensor]
    params: Callable[[Request], dict[str, Any]]


def _in_255(v: float) -> float:
    return round(v * 255.0, 9)  # 64/255 * 255 prints as 64.0, not 64.00000000000001


def _pgd_params(kind: str, r: Request) -> dict[str, Any]:
    p = {**r.base_params(kind), "step": r.step, "step_255": _in_255(r.step), "steps": r.steps,
         "restarts": r.restarts, "random_start": r.random_start, "model_mode": "eval",
         "loss": "-cross_entropy(target)" if kind == "targeted" else "cross_entropy(true)"}
    if kind == "targeted":
        p["target_rule"] = r.target_rule
    return p


def _make_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, r: Request) -> torch.Tensor:
    return pgd(model, x, y, norm=r.norm, epsilon=r.epsilon, step=r.step, steps=r.steps, restarts=r.restarts,
               random_start=r.random_start, generator=r.generator, amp_dtype=r.amp_dtype)


def _make_targeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, r: Request) -> torch.Tensor:
    targets = r.targets
    if targets is None:
        if r.num_classes is None:
            raise ValueError("the targeted kind needs `targets` or `num_classes`")
        targets = target_labels(y, r.num_classes, r.target_rule, generator=r.generator)
    return pgd(model, x, y, norm=r.norm, epsilon=r.epsilon, step=r.step, steps=r.steps, restarts=r.restarts,
               targets=targets, random_start=r.random_start, generator=r.generator, amp_dtype=r.amp_dtype)


class NoiseVariant(NamedTuple):
    """How a noise kind stands for one threat norm: its function and the parameters it records."""

    variant: str
    fn: Callable[[torch.Tensor, float, torch.Generator | None], torch.Tensor]
    extra: Callable[[Request], dict[str, Any]]


def _sign_l2_extra(r: Request) -> dict[str, Any]:
    p: dict[str, Any] = {"radius": r.epsilon, "bounded": True}
    if r.input_numel is not None:
        p["per_pixel_magnitude"] = r.epsilon / math.sqrt(r.input_numel)
    return p


# Which noise baseline stands for a threat model (paper.md section 5.3): per-pixel sigma = eps / a random
# l_inf vertex for l_inf; the Gaussian direction / a sign pattern rescaled to l_2 norm eps for l_2.
NOISES: dict[str, dict[str, NoiseVariant]] = {
    "gaussian": {
        "linf": NoiseVariant("per_pixel_sigma", gaussian_noise, lambda r: {
            "sigma": r.epsilon, "sigma_255": _in_255(r.epsilon), "bounded": False}),
        "l2": NoiseVariant("l2_norm_matched", gaussian_l2, lambda r: {"radius": r.epsilon, "bounded": True}),
    },
    "sign": {
        "linf": NoiseVariant("linf_vertex", random_sign,
                             lambda r: {"per_pixel_magnitude": r.epsilon, "bounded": True}),
        "l2": NoiseVariant("l2_sign_direction", random_sign_l2, _sign_l2_extra),
    },
}
NOISE_VARIANTS: dict[tuple[str, str], str] = {
    (k, n): v.variant for k, vs in NOISES.items() for n, v in vs.items()}


def _noise(kind: str) -> Perturbation:
    def make(model: nn.Module, x: torch.Tensor, y: torch.Tensor, r: Request) -> torch.Tensor:
        return NOISES[kind][r.norm].fn(x, r.epsilon, r.generator)

    def params(r: Request) -> dict[str, Any]:
        v = NOISES[kind][r.norm]
        return {**r.base_params(kind), "variant": v.variant, "clamped_to_box": True, **v.extra(r)}

    return Perturbation(kind, make, params)


# ------------------------------------------------------------------------------------------- AutoAttack
# AutoAttack (Croce & Hein 2020) through torchattacks' APGD, APGDT, FAB and Square.  The ensemble is run
# here rather than through ``torchattacks.AutoAttack`` so that the iteration count is Croce & Hein's 100 (that
# class leaves APGD/APGD-T/FAB at torchattacks' default of 10), a custom list of attacks is possible, the
# global RNG the attacks reseed is restored afterwards, and the result is projected into the ball exactly like
# every other kind.  Semantics as in AutoAttack: each attack runs only on the points that every earlier attack
# left correctly classified, and a point's adversarial example is the first that fools the model.
AUTOATTACK_VERSIONS: dict[str, tuple[str, ...]] = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
# Croce & Hein's settings of the versions: plus restarts APGD-CE, APGD-DLR and FAB 5 times; rand averages the
# APGD gradients over 20 EOT draws (randomised defences).  ncpipe.plan counts passes from the same constants.
AUTOATTACK_PLUS_RESTARTS = 5
AUTOATTACK_PLUS_RESTARTED = ("apgd-ce", "apgd-dlr", "fab")
AUTOATTACK_RAND_EOT = 20
_AA_SCHEMA = load_schema()["properties"]["attack"]["properties"]["autoattack"]["properties"]
AUTOATTACK_DEFAULTS: dict[str, Any] = {k: _AA_SCHEMA[k]["default"]
                                       for k in ("version", "attacks", "steps", "square_queries", "seed")}
if tuple(_AA_SCHEMA["attacks"]["items"]["enum"]) != AUTOATTACK_ATTACKS:
    raise RuntimeError("the schema's attack.autoattack.attacks enum differs from AUTOATTACK_ATTACKS")


def autoattack_sequence(options: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The attacks an ``autoattack`` kind runs, in order: the version's, or ``attacks`` for ``custom``."""
    o = {**AUTOATTACK_DEFAULTS, **(options or {})}
    if o["version"] == "custom":
        seq = tuple(o["attacks"])
        if not seq:
            raise ValueError("autoattack version 'custom' needs a non-empty 'attacks' list; allowed: "
                             f"{', '.join(AUTOATTACK_ATTACKS)}")
    elif o["version"] in AUTOATTACK_VERSIONS:
        seq = AUTOATTACK_VERSIONS[o["version"]]
    else:
        raise ValueError(f"unknown autoattack version {o['version']!r}; allowed: "
                         f"{', '.join([*AUTOATTACK_VERSIONS, 'custom'])}")
    bad = [a for a in seq if a not in AUTOATTACK_ATTACKS]
    if bad:
        raise ValueError(f"unknown autoattack attack(s) {bad}; allowed: {', '.join(AUTOATTACK_ATTACKS)}")
    return seq


def autoattack_member_runs(name: str, version: str) -> tuple[int, int]:
    """(restarts, EOT iterations) of one attack of an ``autoattack`` version (EOT: APGD-CE/-DLR only)."""
    restarts = AUTOATTACK_PLUS_RESTARTS if version == "plus" and name in AUTOATTACK_PLUS_RESTARTED else 1
    eot = AUTOATTACK_RAND_EOT if version == "rand" and name in ("apgd-ce", "apgd-dlr") else 1
    return restarts, eot


def _autoattack_member(name: str, model: nn.Module, norm: str, epsilon: float, num_classes: int,
                       o: Mapping[str, Any], version: str) -> Any:
    import torchattacks  # a heavy import, needed only by this kind

    ta_norm = {"linf": "Linf", "l2": "L2"}[norm]
    restarts, eot = autoattack_member_runs(name, version)
    common = {"norm": ta_norm, "eps": epsilon, "seed": int(o["seed"]), "n_restarts": restarts}
    if name in ("apgd-ce", "apgd-dlr"):
        return torchattacks.APGD(model, steps=int(o["steps"]), loss=name.split("-")[1], eot_iter=eot,
                                 **common)
    if name == "apgd-t":
        return torchattacks.APGDT(model, steps=int(o["steps"]), n_classes=num_classes, **common)
    if name in ("fab", "fab-t"):
        return torchattacks.FAB(model, steps=int(o["steps"]), multi_targeted=name == "fab-t",
                                n_classes=num_classes, **common)
    return torchattacks.Square(model, n_queries=int(o["square_queries"]), **common)


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, epsilon: float,
               options: Mapping[str, Any] | None = None, num_classes: int | None = None) -> torch.Tensor:
    """AutoAttack of ``x`` (pixels in [0, 1]) against ``model`` in eval mode: the worst case over its attacks.

    ``options``: ``version`` (standard / plus / rand / custom), ``attacks`` (custom's list), ``steps``
    (APGD, APGD-T and FAB iterations), ``square_queries``, ``seed``.  The global RNG state is restored after
    the attacks (they reseed it), the model's train/eval flags too.  Runs in float32 (no autocast).
    """
    o = {**AUTOATTACK_DEFAULTS, **(options or {})}
    seq = autoattack_sequence(o)
    _check_norm(norm)
    device = _model_device(model, x)
    xf = x.to(device=device, dtype=_work_dtype(x)).detach()
    y = y.to(device)
    with _mode(model, False), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with torch.no_grad():
            logits = model(xf)
        c = int(num_classes or logits.shape[1])
        x_adv = xf.clone()
        robust = logits.argmax(1) == y
        for name in seq:
            idx = torch.nonzero(robust).reshape(-1)
            if len(idx) == 0:
                break
            member = _autoattack_member(name, model, norm, epsilon, c, o, o["version"])
            cand = project(xf[idx], member(xf[idx], y[idx]).detach().to(xf.dtype), norm=norm, epsilon=epsilon)
            with torch.no_grad():
                fooled = model(cand).argmax(1) != y[idx]
            x_adv[idx[fooled]] = cand[fooled]
            robust[idx[fooled]] = False
    return x_adv


def _make_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, r: Request) -> torch.Tensor:
    return autoattack(model, x, y, norm=r.norm, epsilon=r.epsilon, options=r.options,
                      num_classes=r.num_classes)


def _autoattack_params(r: Request) -> dict[str, Any]:
    o = {**AUTOATTACK_DEFAULTS, **(r.options or {})}
    return {**r.base_params("autoattack"), "version": o["version"], "attacks": list(autoattack_sequence(o)),
            "steps": int(o["steps"]), "square_queries": int(o["square_queries"]), "seed": int(o["seed"]),
            "model_mode": "eval", "implementation": "torchattacks " + _torchattacks_version()}


def _torchattacks_version() -> str:
    from importlib.metadata import version

    return version("torchattacks")


# The registry of the kinds this module makes (every kind of the schema but TRAIN_ADV; checked at import).
# Adding a kind: its function, one entry here, and its name in the schema's attack.kinds enum.
PERTURBATIONS: dict[str, Perturbation] = {
    p.name: p for p in (
        Perturbation("clean", lambda model, x, y, r: x, lambda r: {"kind": "clean"}),
        Perturbation("pgd", _make_pgd, lambda r: _pgd_params("pgd", r)),
        Perturbation("targeted", _make_targeted, lambda r: _pgd_params("targeted", r)),
        _noise("gaussian"),
        _noise("sign"),
        Perturbation("autoattack", _make_autoattack, _autoattack_params),
    )
}
KINDS = tuple(k for k in schema_enum("attack", "kinds") if k != TRAIN_ADV)
if set(KINDS) != set(PERTURBATIONS):
    raise RuntimeError(f"the schema's attack.kinds {sorted(KINDS)} (without {TRAIN_ADV}) differ from the "
                       f"perturbation registry {sorted(PERTURBATIONS)}")
if NORMS != tuple(load_schema()["$defs"]["threat"]["properties"]["norm"]["enum"]):
    raise RuntimeError(f"the schema's threat norms differ from the norm registry {NORMS}")


def _entry(kind: str, norm: str) -> Perturbation:
    if kind not in KINDS:
        raise ValueError(f"unknown perturbation kind {kind!r}; known: {', '.join(KINDS)}")
    _check_norm(norm)
    return PERTURBATIONS[kind]


def perturb(
    kind: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str,
    epsilon: float,
    step: float = 0.0,
    steps: int = 0,
    restarts: int = 1,
    targets: torch.Tensor | None = None,
    num_classes: int | None = None,
    target_rule: str = "next",
    random_start: bool = True,
    generator: torch.Generator | None = None,
    amp_dtype: torch.dtype | None = None,
    options: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """The one dispatcher of the perturbation kinds of the features rule, for one threat model (pixel units).

    * ``clean``: ``x`` unchanged.
    * ``pgd``: untargeted :func:`pgd` (eval mode).
    * ``targeted``: :func:`pgd` towards ``targets``; when they are not given they are drawn by
      :func:`target_labels` with ``target_rule`` (needs ``num_classes``).
    * ``gaussian``: l_inf threat: i.i.d. N(0, eps^2) per pixel (:func:`gaussian_noise`); l_2 threat: a
      Gaussian direction of norm eps (:func:`gaussian_l2`).
    * ``sign``: l_inf threat: a random vertex of the eps-ball (:func:`random_sign`); l_2 threat: a random sign
      pattern of l_2 norm eps (:func:`random_sign_l2`).
    * ``autoattack``: :func:`autoattack` with ``options`` (version, attacks, steps, square_queries, seed).

    :func:`kind_params` gives the matching record of parameters (both come from the kind's
    :data:`PERTURBATIONS` entry).  Output is on the model's device for the attacks and on ``x``'s device for
    the noise kinds.
    """
    entry = _entry(kind, norm)
    return entry.make(model, x, y, Request(norm, epsilon, step, steps, restarts, targets, num_classes,
                                           target_rule, random_start, generator, amp_dtype, options=options))


def kind_params(
    kind: str,
    *,
    norm: str,
    epsilon: float,
    step: float = 0.0,
    steps: int = 0,
    restarts: int = 1,
    target_rule: str = "next",
    random_start: bool = True,
    input_numel: int | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every parameter :func:`perturb` uses for ``kind`` (same arguments), for the HDF5 group attributes.

    Pixel units, plus ``*_255`` copies in the config's 1/255 units.  ``input_numel`` (pixels per sample) is
    needed to record the per-pixel magnitude of the l_2 sign noise.
    """
    entry = _entry(kind, norm)
    return entry.params(Request(norm, epsilon, step, steps, restarts, target_rule=target_rule,
                                random_start=random_start, input_numel=input_numel, options=options))
