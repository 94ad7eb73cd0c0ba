"""Read the diagonal preconditioner :math:`P_t` of a live adaptive optimizer.

An adaptive optimizer moves :math:`\\theta_{t} = (1-c)\\theta_{t-1} - P_t^{-1}(a\\,g_t +
b\\,m_t)` with :math:`m_t = \\beta m_{t-1} + (1-\\beta) g_t` (paper 002, §2). Frozen at
:math:`P_t`, that is a plain momentum method on :math:`f(P^{-1/2}x)` (App. A.2, Prop. 1),
so it is unstable iff the preconditioned sharpness :math:`\\lambda_1(P^{-1}H)` exceeds
:func:`~lightning_eos.thresholds.ema_update_threshold` of :math:`(a, b, \\beta, c)`.
:func:`read_preconditioner` rebuilds, from the optimizer's state after a step, the
:math:`P_t` that step divided by (tested by replaying the step by hand) and the
threshold. For each registered optimizer, :math:`P_t` and :math:`(a, b, \\beta)`:

* ``torch.optim.Adam``, ``AdamW`` (also ``amsgrad``, with :math:`\\max_s \\nu_s`):
  :math:`P = \\sqrt{\\nu_t/(1-\\beta_2^t)}+\\epsilon`; :math:`(0, \\eta/(1-\\beta_1^t),
  \\beta_1)`, so bias correction of the first moment is a larger step size.
* ``torch.optim.NAdam``: :math:`P = \\sqrt{\\nu_t/(1-\\beta_2^t)}+\\epsilon`;
  :math:`(\\eta\\frac{1-\\mu_t}{1-\\Pi_t}, \\eta\\frac{\\mu_{t+1}}{1-\\Pi_t\\mu_{t+1}},
  \\beta_1)` with :math:`\\mu_t = \\beta_1(1 - \\tfrac12 0.96^{t\\psi})`,
  :math:`\\Pi_t = \\prod_{s\\le t}\\mu_s`.
* ``torch.optim.RMSprop``: :math:`P = \\sqrt{\\nu_t}+\\epsilon` (centered:
  :math:`\\sqrt{\\nu_t - \\bar g_t^2}+\\epsilon`); :math:`(\\eta, 0, 0)`, or with momentum
  :math:`\\mu` (``buf = mu buf + g/P``, standard heavy ball) :math:`(0, \\eta/(1-\\mu), \\mu)`.
* ``torch.optim.Adagrad``: :math:`P = \\sqrt{\\sum_{s\\le t} g_s^2}+\\epsilon`;
  :math:`(\\eta/(1+(t-1)\\delta), 0, 0)` with ``lr_decay`` :math:`\\delta`.
* ``torch.optim.Adafactor``: see below; :math:`(\\rho_t, 0, 0)`.
* ours: ``Adam``, ``Padam``: :math:`P = (\\hat\\nu_t/c_2)^p+\\epsilon`;
  :math:`(0, \\eta/c_1, \\beta_1)`. ``Nadam``: :math:`P = \\sqrt{\\nu_t}+\\epsilon`;
  :math:`((1-\\beta_1)\\eta, \\beta_1\\eta, \\beta_1)`. ``FrozenAdam``: its :math:`P`;
  :math:`(0, \\eta, \\beta_1)`.

Decoupled weight decay (AdamW, ``decoupled_weight_decay=True``, Adafactor) is
:math:`c = \\eta w`; coupled (L2) weight decay :math:`w` makes the optimizer descend
:math:`L + \\tfrac w2\\lVert\\theta\\rVert^2`, so the matrix whose stability matters is
:math:`P^{-1}(H + wI)` and :attr:`Preconditioner.l2` carries :math:`w`.

Adafactor (``torch.optim.Adafactor``) divides by :math:`\\sqrt{\\max(V_t, \\epsilon_1^2)}`
(its factored second moment) and steps
:math:`\\alpha = \\max(\\epsilon_2, \\mathrm{RMS}(\\theta_{t-1}))\\,\\rho_t / \\max(1,
\\mathrm{RMS}(u_t)/d)` per tensor, with the relative step size
:math:`\\rho_t = \\min(\\eta, t^{-1/2})`. Those two scalars are not in its state, so
:func:`track_preconditioner` records them with step hooks, and the preconditioner is
:math:`P = \\sqrt{\\max(V_t,\\epsilon_1^2)}\\,\\rho_t/\\alpha`, the step size :math:`\\rho_t`.

Param groups (or tensors) with different step sizes: the :math:`P` of each is scaled by
its threshold over the first one's, so one threshold holds for all (exact when they
share :math:`\\beta`, :math:`a/b` and :math:`c`; with different decoupled decays
:math:`c_g` the frozen dynamics no longer separate, and the folded threshold is an
approximation whose error is of the order of :math:`\\max_g c_g`). Parameters the
optimizer does not move get :math:`P = \\infty` (their rows drop out).

New optimizers: :func:`register_preconditioner`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_eos.optim.adaptive import Adam, FrozenAdam, Nadam, Padam
from lightning_eos.thresholds import UnsupportedOptimizerError, ema_update_threshold

__all__ = [
    "Preconditioner",
    "PreconditionerNotReadyError",
    "StepBlock",
    "read_preconditioner",
    "register_preconditioner",
    "supported_optimizers",
    "track_preconditioner",
    "unwrap_optimizer",
]


class PreconditionerNotReadyError(RuntimeError):
    """The optimizer has not taken a (tracked) step yet, so it has no preconditioner."""


@dataclass
class StepBlock:
    """Parameters that share one step rule: :math:`\\theta' = (1-c)\\theta - P^{-1}(a g + b m')`."""

    params: list[Tensor]
    diagonal: list[Tensor]
    grad_lr: float
    momentum_lr: float
    beta: float
    momentum: str
    decay: float = 0.0
    l2: float = 0.0
    # the threshold to report instead of the first block's (P is scaled to match)
    reference_threshold: float | None = None

    @property
    def threshold(self) -> float:
        return ema_update_threshold(self.grad_lr, self.momentum_lr, self.beta, self.decay)


@dataclass(frozen=True)
class Preconditioner:
    """The frozen-preconditioner view of an adaptive optimizer's last step.

    Attributes:
        params: the parameters the optimizer moved.
        diagonal: :math:`P` for each of them, same shapes.
        l2: the coupled (L2) weight decay of each, added to :math:`H`.
        threshold: the threshold on :math:`\\lambda_1(P^{-1}(H + \\mathrm{diag}(l2)))`.
        momentum: ``"none"``, ``"heavy_ball"``, ``"ema_heavy_ball"``, ``"ema_nesterov"``
            or ``"nadam"``.
    """

    params: tuple[Tensor, ...]
    diagonal: tuple[Tensor, ...]
    l2: tuple[float, ...]
    threshold: float
    momentum: str

    def flat(self, params: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        """:math:`P` and the L2 shift as flat vectors in the order of ``params``.

        Parameters the optimizer did not move get :math:`P = \\infty`; the shift is
        ``None`` when there is no L2 decay.
        """
        index = {id(p): i for i, p in enumerate(self.params)}
        diagonal, shift = [], []
        for p in params:
            i = index.get(id(p))
            if i is None:
                diagonal.append(torch.full((p.numel(),), math.inf, dtype=p.dtype, device=p.device))
                shift.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
            else:
                diagonal.append(self.diagonal[i].reshape(-1).to(p.dtype))
                shift.append(torch.full((p.numel(),), self.l2[i], dtype=p.dtype, device=p.device))
        l2 = torch.cat(shift) if any(self.l2) else None
        return torch.cat(diagonal), l2


Reader = Callable[[Any], list[StepBlock]]
_READERS: dict[type, Reader] = {}


def register_preconditioner(optimizer_type: type) -> Callable[[Reader], Reader]:
    """Register ``reader(optimizer) -> list[StepBlock]`` for an optimizer class (exact type)."""

    def decorate(reader: Reader) -> Reader:
        _READERS[optimizer_type] = reader
        return reader

    return decorate


def supported_optimizers() -> list[str]:
    """Names of the optimizer classes with a registered preconditioner."""

    def name(t: type) -> str:
        for package in ("torch.optim", "lightning_eos.optim"):  # the public import path
            if (
                t.__module__.startswith(package)
                and getattr(__import__(package, fromlist=["_"]), t.__name__, None) is t
            ):
                return f"{package}.{t.__name__}"
        return f"{t.__module__}.{t.__qualname__}"

    return sorted(name(t) for t in _READERS)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer behind ``LightningOptimizer`` and wrappers with ``base_optimizer``."""
    while True:
        inner = getattr(optimizer, "_optimizer", None)  # LightningOptimizer
        if inner is None:
            inner = getattr(optimizer, "base_optimizer", None)  # SAM-style wrappers
        if inner is None or inner is optimizer:
            return optimizer
        optimizer = inner


def _reader(optimizer: Any) -> Reader:
    reader = _READERS.get(type(optimizer))
    if reader is None:
        raise UnsupportedOptimizerError(
            f"No preconditioner is known for {type(optimizer).__name__}. Supported: "
            f"{', '.join(supported_optimizers())}. Register one with "
            "lightning_eos.optim.register_preconditioner."
        )
    return reader


def read_preconditioner(optimizer: Any) -> Preconditioner:
    """The preconditioner and threshold of the optimizer's last step (see the module doc).

    Raises:
        UnsupportedOptimizerError: no reader for this optimizer (the message lists the
            supported ones), ``maximize=True``, or param groups with different momentum.
        PreconditionerNotReadyError: no parameter has stepped yet.
    """
    optimizer = unwrap_optimizer(optimizer)
    # a zero step size (lr=0 to freeze a group, a schedule annealed to 0) moves nothing
    blocks = [b for b in _reader(optimizer)(optimizer) if b.params and b.grad_lr + b.momentum_lr]
    if not blocks:
        raise PreconditionerNotReadyError(
            f"{type(optimizer).__name__} has not stepped yet (or steps with learning rate "
            "0): no preconditioner to read."
        )
    reference = blocks[0]
    for block in blocks[1:]:
        if block.momentum != reference.momentum or not _same_dynamics(block, reference):
            raise UnsupportedOptimizerError(
                "The param groups use different momentum (beta or Nesterov mix); no single "
                "threshold on the preconditioned sharpness exists."
            )
    threshold = reference.threshold
    if reference.reference_threshold is not None:
        threshold = reference.reference_threshold
    params, diagonal, l2 = [], [], []
    for block in blocks:
        scale = block.threshold / threshold  # P -> P * T_block / T keeps lambda/T per block
        for p, d in zip(block.params, block.diagonal, strict=True):
            params.append(p)
            diagonal.append(d if scale == 1.0 else d * scale)
            l2.append(block.l2)
    return Preconditioner(tuple(params), tuple(diagonal), tuple(l2), threshold, reference.momentum)


def _same_dynamics(a: StepBlock, b: StepBlock) -> bool:
    def shape(block: StepBlock) -> tuple[float, float]:
        return block.beta, block.grad_lr / (block.grad_lr + block.momentum_lr)

    return all(
        math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
        for x, y in zip(shape(a), shape(b), strict=True)
    )


def _check_not_maximize(group: dict[str, Any]) -> None:
    if group.get("maximize", False):
        raise UnsupportedOptimizerError("maximize=True ascends; it has no stability threshold.")


def _weight_decay(group: dict[str, Any], decoupled: bool) -> tuple[float, float]:
    """(decay c, l2) of a group."""
    wd = float(group.get("weight_decay", 0.0))
    return (float(group["lr"]) * wd, 0.0) if decoupled else (0.0, wd)


def _per_param_blocks(
    optimizer: Optimizer, key: str, block: Callable[[dict[str, Any], Tensor, dict], StepBlock]
) -> list[StepBlock]:
    """One block per parameter that has stepped (step counts, so step sizes, may differ).

    A parameter has stepped when its state has ``key`` and, if it has a step count, the
    count is positive (Adagrad creates its state before the first step).
    """
    blocks = []
    for group in optimizer.param_groups:
        _check_not_maximize(group)
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if key in state and float(state.get("step", 1)) > 0:
                _check_real(p)
                blocks.append(block(group, p, state))
    return blocks


def _check_real(p: Tensor) -> None:
    if p.is_complex():
        raise UnsupportedOptimizerError(
            "Complex parameters are not supported: the Hessian of a real loss in complex "
            "parameters is not the matrix the preconditioner acts on entrywise."
        )


# --- torch.optim ----------------------------------------------------------------------


@register_preconditioner(torch.optim.Adam)
@register_preconditioner(torch.optim.AdamW)
def _torch_adam(optimizer: torch.optim.Adam) -> list[StepBlock]:
    decoupled_default = isinstance(optimizer, torch.optim.AdamW)

    def block(group: dict[str, Any], p: Tensor, state: dict) -> StepBlock:
        beta1, beta2 = (float(b) for b in group["betas"])
        t = float(state["step"])
        nu = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
        diagonal = (nu.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
        decay, l2 = _weight_decay(group, group.get("decoupled_weight_decay", decoupled_default))
        lr = float(group["lr"]) / (1 - beta1**t)
        return StepBlock([p], [diagonal], 0.0, lr, beta1, "ema_heavy_ball", decay, l2)

    return _per_param_blocks(optimizer, "exp_avg_sq", block)


@register_preconditioner(torch.optim.NAdam)
def _torch_nadam(optimizer: torch.optim.NAdam) -> list[StepBlock]:
    def block(group: dict[str, Any], p: Tensor, state: dict) -> StepBlock:
        beta1, beta2 = (float(b) for b in group["betas"])
        t, lr, psi = float(state["step"]), float(group["lr"]), group["momentum_decay"]
        mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * psi))
        mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
        product = float(state["mu_product"])  # includes mu_t
        diagonal = state["exp_avg_sq"].div(1 - beta2**t).sqrt().add_(group["eps"])
        grad_lr = lr * (1.0 - mu) / (1.0 - product)
        momentum_lr = lr * mu_next / (1.0 - product * mu_next)
        decay, l2 = _weight_decay(group, group.get("decoupled_weight_decay", False))
        return StepBlock([p], [diagonal], grad_lr, momentum_lr, beta1, "nadam", decay, l2)

    return _per_param_blocks(optimizer, "exp_avg_sq", block)


@register_preconditioner(torch.optim.RMSprop)
def _torch_rmsprop(optimizer: torch.optim.RMSprop) -> list[StepBlock]:
    def block(group: dict[str, Any], p: Tensor, state: dict) -> StepBlock:
        nu = state["square_avg"]
        if group["centered"]:
            nu = nu.addcmul(state["grad_avg"], state["grad_avg"], value=-1)
        diagonal = nu.sqrt().add_(group["eps"])
        lr, mu = float(group["lr"]), float(group["momentum"])
        l2 = float(group["weight_decay"])
        if mu > 0:  # buf = mu * buf + g / P: standard heavy ball on P^{-1} g
            return StepBlock([p], [diagonal], 0.0, lr / (1 - mu), mu, "heavy_ball", l2=l2)
        return StepBlock([p], [diagonal], lr, 0.0, 0.0, "none", l2=l2)

    return _per_param_blocks(optimizer, "square_avg", block)


@register_preconditioner(torch.optim.Adagrad)
def _torch_adagrad(optimizer: torch.optim.Adagrad) -> list[StepBlock]:
    def block(group: dict[str, Any], p: Tensor, state: dict) -> StepBlock:
        t = float(state["step"])
        lr = float(group["lr"]) / (1 + (t - 1) * group["lr_decay"])
        diagonal = state["sum"].sqrt().add_(group["eps"])
        return StepBlock([p], [diagonal], lr, 0.0, 0.0, "none", l2=float(group["weight_decay"]))

    return _per_param_blocks(optimizer, "sum", block)


# --- torch.optim.Adafactor: two per-step scalars recorded by step hooks --------------

_ADAFACTOR = getattr(torch.optim, "Adafactor", None)
_ADAFACTOR_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _adafactor_variance(p: Tensor, state: dict, eps1: float) -> Tensor:
    """:math:`\\max(V_t, \\epsilon_1^2)`, exactly as ``torch.optim.Adafactor`` forms it."""
    if p.dim() > 1:
        row, col = state["row_var"], state["col_var"]
        variance = (row @ col).div_(row.mean(dim=-2, keepdim=True).clamp_(min=eps1))
    else:
        variance = state["variance"].clone()
    return variance.clamp_(min=eps1 * eps1)


class _AdafactorTracker:
    """Records :math:`\\mathrm{RMS}(\\theta_{t-1})` and :math:`\\mathrm{RMS}(u_t)` at every step.

    Read-only: the hooks never touch parameters, state or RNG. The pre-step hook takes
    one norm per parameter; the post-step hook rebuilds the update :math:`u_t` (the
    factored second moment times the gradient) to take its RMS, about the cost of
    Adafactor's own step.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self._optimizer = weakref.ref(optimizer)  # the registry must not keep it alive
        self.record: dict[int, tuple[Tensor, Tensor, float]] = {}
        self._pending: dict[int, Tensor] = {}
        self._handles: list[Any] = []
        _ADAFACTOR_RECORDS[optimizer] = self

    def attach(self) -> _AdafactorTracker:
        optimizer = self._optimizer()
        if not self._handles and optimizer is not None:
            self._handles = [
                optimizer.register_step_pre_hook(self._before),
                optimizer.register_step_post_hook(self._after),
            ]
        return self

    @torch.no_grad()
    def _before(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        # with a closure the gradients do not exist yet: record every parameter
        self._pending = {
            id(p): p.detach().norm(2) for g in optimizer.param_groups for p in g["params"]
        }

    @torch.no_grad()
    def _after(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        stepped = [
            (g, p) for g in optimizer.param_groups for p in g["params"] if p.grad is not None
        ]
        for group, p in stepped:
            state = optimizer.state.get(p, {})
            if "step" not in state or id(p) not in self._pending:
                continue
            eps1 = group["eps"][0]
            eps1 = torch.finfo(p.dtype).eps if eps1 is None else eps1
            update = _adafactor_variance(p, state, eps1).rsqrt_().mul_(p.grad)
            self.record[id(p)] = (self._pending[id(p)], update.norm(2), float(state["step"]))
        self._pending = {}

    def remove(self) -> None:
        """Stop recording; the last record stays readable until the optimizer steps again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def track_preconditioner(optimizer: Any) -> _AdafactorTracker | None:
    """Start recording what :func:`read_preconditioner` needs beyond the state.

    Only ``torch.optim.Adafactor`` needs it (its step size depends on
    :math:`\\mathrm{RMS}(\\theta)` before the step and on the update's RMS). Returns a
    handle with ``remove()``, or ``None`` when nothing needs recording.
    """
    optimizer = unwrap_optimizer(optimizer)
    if _ADAFACTOR is None or type(optimizer) is not _ADAFACTOR:
        return None
    existing = _ADAFACTOR_RECORDS.get(optimizer)
    return (existing or _AdafactorTracker(optimizer)).attach()


if _ADAFACTOR is not None:

    @register_preconditioner(_ADAFACTOR)
    def _torch_adafactor(optimizer: Any) -> list[StepBlock]:
        tracker = _ADAFACTOR_RECORDS.get(optimizer)
        if tracker is None:
            raise PreconditionerNotReadyError(
                "Adafactor's step size needs RMS(theta) before the step and the update's "
                "RMS: call lightning_eos.optim.track_preconditioner(optimizer) before training "
                "(PreconditionedSharpnessMonitor does)."
            )
        blocks = []
        for group in optimizer.param_groups:
            _check_not_maximize(group)
            eps1, eps2 = group["eps"]
            lr, d = float(group["lr"]), float(group["d"])
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                entry = tracker.record.get(id(p))
                if entry is None or "step" not in state or entry[2] != float(state["step"]):
                    continue  # not stepped since tracking started
                eps1_p = torch.finfo(p.dtype).eps if eps1 is None else eps1
                t = float(state["step"])
                rho = min(lr, 1 / t**0.5)
                if rho == 0:
                    continue  # learning rate 0: the parameter does not move
                alpha = max(eps2, entry[0].item() / p.numel() ** 0.5) * rho
                clip = max(1.0, entry[1].item() / (p.numel() ** 0.5 * d))
                diagonal = _adafactor_variance(p, state, eps1_p).sqrt_()
                decay, _ = _weight_decay(group, True)
                block = StepBlock([p], [diagonal], alpha / clip, 0.0, 0.0, "none", decay)
                block.reference_threshold = (2.0 - decay) / rho  # the relative step size
                blocks.append(block)
        return blocks


# --- lightning_eos.optim ----------------------------------------------------------------


@register_preconditioner(Adam)
@register_preconditioner(Padam)
def _adam(optimizer: Adam) -> list[StepBlock]:
    def block(group: dict[str, Any], p: Tensor, state: dict) -> StepBlock:
        beta1 = group["betas"][0]
        t = float(state["step"])
        nu = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
        c1 = 1 - beta1**t if group["bias_correction"] else 1.0
        decay, l2 = _weight_decay(group, group["decoupled_weight_decay"])
        diagonal = Adam._denominator(nu, group, t)
        return StepBlock([p], [diagonal], 0.0, group["lr"] / c1, beta1, "ema_heavy_ball", decay, l2)

    return _per_param_blocks(optimizer, "exp_avg_sq", block)


@register_preconditioner(Nadam)
def _nadam(optimizer: Nadam) -> list[StepBlock]:
    def block(group: dict[str, Any], p: Tensor, state: dict) -> StepBlock:
        beta1, lr = group["betas"][0], group["lr"]
        decay, l2 = _weight_decay(group, group["decoupled_weight_decay"])
        diagonal = state["exp_avg_sq"].sqrt().add_(group["eps"])
        return StepBlock(
            [p], [diagonal], (1 - beta1) * lr, beta1 * lr, beta1, "ema_nesterov", decay, l2
        )

    return _per_param_blocks(optimizer, "exp_avg_sq", block)


@register_preconditioner(FrozenAdam)
def _frozen_adam(optimizer: FrozenAdam) -> list[StepBlock]:
    def block(group: dict[str, Any], p: Tensor, state: dict) -> StepBlock:
        decay, l2 = _weight_decay(group, group["decoupled_weight_decay"])
        return StepBlock(
            [p],
            [state["preconditioner"]],
            0.0,
            group["lr"],
            group["beta1"],
            "ema_heavy_ball",
            decay,
            l2,
        )

    return _per_param_blocks(optimizer, "preconditioner", block)
