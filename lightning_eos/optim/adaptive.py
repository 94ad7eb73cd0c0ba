"""The adaptive optimizers of paper 002 that ``torch.optim`` does not offer.

All of them keep a diagonal preconditioner :math:`P_t` and move
:math:`\\theta_{t+1} = \\theta_t - \\eta P_{t+1}^{-1}(\\cdot)` (paper 002, §2):

* :class:`Adam` -- EMA heavy ball on :math:`P = (\\nu/(1-\\beta_2^t))^{p} + \\epsilon`, with
  switches for bias correction (paper 002 runs Adam without it, eq. (1) vs. eq. (2)),
  AMSGrad's running maximum of :math:`\\nu`, the exponent :math:`p` (Padam) and
  decoupled weight decay (AdamW).
* :class:`Padam` -- :class:`Adam` with the partial exponent :math:`p = 1/4` of Fig. 5(e).
* :class:`Nadam` -- EMA Nesterov (paper 002, Table 1) on the rmsprop preconditioner,
  without bias correction.
* :class:`FrozenAdam` -- "frozen Adam" of §4: EMA heavy ball on a fixed :math:`P`,
  i.e. PRECONDEMAHB(:math:`\\eta, \\beta_1, P`), from a given tensor or captured from a
  live optimizer.

Every optimizer here has an entry in :mod:`lightning_eos.optim.preconditioners`, so
:class:`~lightning_eos.callbacks.PreconditionedSharpnessMonitor` reads :math:`P`
from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["Adam", "FrozenAdam", "Nadam", "Padam"]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]


def _check(lr: float, betas: Sequence[float], eps: float, weight_decay: float) -> None:
    if not lr >= 0:
        raise ValueError(f"Invalid learning rate {lr}.")
    if not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"Invalid betas {tuple(betas)}: each must be in [0, 1).")
    if not eps >= 0:
        raise ValueError(f"Invalid eps {eps}.")
    if not weight_decay >= 0:
        raise ValueError(f"Invalid weight_decay {weight_decay}.")


def _closure_loss(closure: Callable[[], Any] | None) -> Any:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _weight_decayed_grad(p: Tensor, group: dict[str, Any]) -> Tensor:
    """Apply weight decay: decoupled shrinks ``p``; coupled (L2) returns ``g + w p``."""
    grad, wd = p.grad, group["weight_decay"]
    if wd == 0:
        return grad
    if group["decoupled_weight_decay"]:
        p.mul_(1 - group["lr"] * wd)
        return grad
    return grad.add(p, alpha=wd)


def _update_moments(p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> Tensor:
    """Count the step, decay the weights, update :math:`m` and :math:`\\nu`; return the gradient.

    :math:`m \\leftarrow \\beta_1 m + (1-\\beta_1) g`, :math:`\\nu \\leftarrow \\beta_2 \\nu +
    (1-\\beta_2) g^2`, with :math:`g` the gradient after coupled weight decay.
    """
    beta1, beta2 = group["betas"]
    if not state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["step"] += 1
    grad = _weight_decayed_grad(p, group)
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    return grad


class Adam(Optimizer):
    """Adam with the switches of paper 002: bias correction, AMSGrad, exponent, decay.

    .. math::

        m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t, \\qquad
        \\nu_t = \\beta_2 \\nu_{t-1} + (1-\\beta_2) g_t^2, \\qquad
        \\theta_t = \\theta_{t-1} - \\frac{\\eta}{c_1}\\, \\frac{m_t}{P_t},
        \\qquad P_t = \\Big(\\frac{\\hat\\nu_t}{c_2}\\Big)^{p} + \\epsilon,

    with :math:`\\hat\\nu_t = \\nu_t` (or :math:`\\max_{s\\le t}\\nu_s` with ``amsgrad``) and
    :math:`c_i = 1-\\beta_i^t` with ``bias_correction``, else :math:`c_i = 1`. With
    ``bias_correction=True``, ``exponent=0.5`` this is ``torch.optim.Adam``; without it,
    eq. (1) of paper 002, the setting of its Fig. 1. ``decoupled_weight_decay`` gives
    AdamW's :math:`\\theta \\leftarrow (1-\\eta w)\\theta`, otherwise :math:`w\\theta` is
    added to the gradient.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(1))
        >>> opt = Adam([p], lr=0.1, bias_correction=False)
        >>> p.grad = torch.ones(1); opt.step()
        >>> round(p.item(), 4)  # 1 - 0.1 * 0.1 / (sqrt(0.001) + 1e-8)
        0.6838
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        bias_correction: bool = True,
        amsgrad: bool = False,
        exponent: float = 0.5,
        decoupled_weight_decay: bool = False,
    ) -> None:
        _check(lr, betas, eps, weight_decay)
        if not 0 < exponent <= 1:
            raise ValueError(f"exponent={exponent} must be in (0, 1].")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            amsgrad=amsgrad,
            exponent=exponent,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(params, defaults)

    @staticmethod
    def _denominator(nu: Tensor, group: dict[str, Any], step: float) -> Tensor:
        """:math:`P_t` from :math:`\\hat\\nu_t` (the registry reads it with this too)."""
        beta2, exponent = group["betas"][1], group["exponent"]
        if group["bias_correction"]:
            nu = nu / (1 - beta2**step)
        root = nu.sqrt() if exponent == 0.5 else nu.pow(exponent)
        return root.add_(group["eps"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = _closure_loss(closure)
        for group in self.param_groups:
            beta1 = group["betas"][0]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                _update_moments(p, group, state)
                step = float(state["step"])
                nu = state["exp_avg_sq"]
                if group["amsgrad"]:
                    if "max_exp_avg_sq" not in state:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                    torch.maximum(state["max_exp_avg_sq"], nu, out=state["max_exp_avg_sq"])
                    nu = state["max_exp_avg_sq"]
                c1 = 1 - beta1**step if group["bias_correction"] else 1.0
                denom = self._denominator(nu, group, step)
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / c1)
        return loss


class Padam(Adam):
    """Partially adaptive Adam: :math:`P = \\nu^{p} + \\epsilon`, ``partial`` :math:`= p`.

    Paper 002, Fig. 5(e), runs it with :math:`p = 1/4`, no bias correction, and learning
    rates two orders of magnitude above Adam's.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        partial: float = 0.25,
        bias_correction: bool = False,
        amsgrad: bool = False,
        decoupled_weight_decay: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            amsgrad=amsgrad,
            exponent=partial,
            decoupled_weight_decay=decoupled_weight_decay,
        )


class Nadam(Optimizer):
    """Nadam without bias correction: EMA Nesterov momentum (paper 002, Table 1).

    .. math::

        m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t, \\quad
        \\nu_t = \\beta_2 \\nu_{t-1} + (1-\\beta_2) g_t^2, \\quad
        \\theta_t = \\theta_{t-1} - \\eta\\,\\frac{\\beta_1 m_t + (1-\\beta_1) g_t}
        {\\sqrt{\\nu_t} + \\epsilon} .

    ``torch.optim.NAdam`` differs: it bias-corrects both moments and ramps its momentum
    up on a schedule (Dozat's :math:`\\mu_t`).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        decoupled_weight_decay: bool = False,
    ) -> None:
        _check(lr, betas, eps, weight_decay)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = _closure_loss(closure)
        for group in self.param_groups:
            beta1 = group["betas"][0]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                grad = _update_moments(p, group, state)
                direction = state["exp_avg"].mul(beta1).add_(grad, alpha=1 - beta1)
                denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
                p.addcdiv_(direction, denom, value=-group["lr"])
        return loss


class FrozenAdam(Optimizer):
    """Adam with a frozen preconditioner: PRECONDEMAHB(:math:`\\eta, \\beta_1, P`), paper 002 §4.

    .. math:: m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t, \\qquad
        \\theta_t = \\theta_{t-1} - \\eta P^{-1} m_t .

    On a quadratic it diverges iff :math:`\\lambda_1(P^{-1}H) > (2+2\\beta_1)/((1-\\beta_1)\\eta)`
    (App. A.2); with :math:`P = I` it is EMA heavy ball (Fig. 2: at :math:`\\beta_1=0.9`,
    :math:`\\tfrac12 x^2` diverges iff :math:`\\eta > 38`).

    Args:
        params: parameters or param groups.
        preconditioner: :math:`P`, either one tensor per parameter (in the order of the
            param groups) or a positive number used for every entry; ``None`` to set it
            later with :meth:`set_preconditioner` or :meth:`from_optimizer`.
        lr: :math:`\\eta`.
        beta1: :math:`\\beta_1`.
        weight_decay: :math:`w`; decoupled (AdamW) or added to the gradient (L2).

    Example:
        >>> x = torch.nn.Parameter(torch.ones(1))
        >>> opt = FrozenAdam([x], preconditioner=1.0, lr=38.5, beta1=0.9)
        >>> for _ in range(300):
        ...     x.grad = x.detach().clone(); opt.step()  # f = x^2 / 2
        >>> x.abs().item() > 1e3  # just above 38
        True
    """

    def __init__(
        self,
        params: ParamsT,
        preconditioner: Sequence[Tensor] | float | None = None,
        lr: float = 1e-3,
        beta1: float = 0.9,
        weight_decay: float = 0.0,
        *,
        decoupled_weight_decay: bool = False,
    ) -> None:
        _check(lr, (beta1,), 0.0, weight_decay)
        defaults = dict(
            lr=lr,
            beta1=beta1,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(params, defaults)
        if preconditioner is not None:
            self.set_preconditioner(preconditioner)

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def set_preconditioner(self, preconditioner: Sequence[Tensor] | float) -> None:
        """Fix :math:`P`: one tensor per parameter, or one positive number for all."""
        params = self._params()
        if isinstance(preconditioner, (int, float)):
            preconditioner = [torch.full_like(p, float(preconditioner)) for p in params]
        if len(preconditioner) != len(params):
            raise ValueError(
                f"Got {len(preconditioner)} preconditioner tensors for {len(params)} parameters."
            )
        for p, pc in zip(params, preconditioner, strict=True):
            if pc.shape != p.shape:
                raise ValueError(f"Preconditioner shape {tuple(pc.shape)} != {tuple(p.shape)}.")
            if not bool((pc > 0).all()):
                raise ValueError("The preconditioner must be positive.")
            self.state[p]["preconditioner"] = pc.detach().to(p).clone()

    @classmethod
    def like(cls, optimizer: Optimizer) -> FrozenAdam:
        """A FrozenAdam over the same param groups, without state (to load a checkpoint into).

        Every key of the source groups is kept (``lr``, ``weight_decay``, a scheduler's
        ``initial_lr`` ...); ``beta1`` comes from ``betas``.
        """
        groups = []
        for group in optimizer.param_groups:
            beta1 = group["betas"][0] if "betas" in group else group["beta1"]
            decoupled = bool(group.get("decoupled_weight_decay", False)) or isinstance(
                optimizer, torch.optim.AdamW
            )
            groups.append({**group, "beta1": beta1, "decoupled_weight_decay": decoupled})
        return cls(groups)

    @classmethod
    def from_optimizer(cls, optimizer: Any) -> FrozenAdam:
        """Freeze a live EMA-heavy-ball optimizer (Adam, AdamW, AMSGrad, Padam) in place.

        The new optimizer moves the same parameters with the same param groups (learning
        rates, decay, any scheduler keys), continues from the source's first moment, and
        freezes :math:`P` so that its next step is the source's frozen-preconditioner
        step and :math:`\\lambda_1(P^{-1}H)/\\text{threshold}` is unchanged. With bias
        correction that makes :math:`P = (1-\\beta_1^t)[\\sqrt{\\nu_t/(1-\\beta_2^t)} +
        \\epsilon]`, paper 002 eq. (2).
        """
        from lightning_eos.optim.preconditioners import read_preconditioner, unwrap_optimizer

        source = unwrap_optimizer(optimizer)
        reading = read_preconditioner(source)
        if reading.momentum != "ema_heavy_ball":
            raise ValueError(
                f"FrozenAdam continues EMA heavy-ball momentum; {type(source).__name__} uses "
                f"{reading.momentum} momentum."
            )
        frozen = cls.like(source)
        moved = dict(zip(map(id, reading.params), reading.diagonal, strict=True))
        for group in frozen.param_groups:
            threshold = _frozen_threshold(group)
            for p in group["params"]:
                if id(p) not in moved:
                    continue  # never stepped by the source: no preconditioner, no momentum
                # lambda_1(P^-1 H) / threshold unchanged: P scales like threshold_source / ours
                scale = reading.threshold / threshold
                state = frozen.state[p]
                state["preconditioner"] = (moved[id(p)] * scale).detach().clone()
                state["exp_avg"] = source.state[p]["exp_avg"].detach().clone()
                state["step"] = source.state[p]["step"].detach().clone()
        return frozen

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = _closure_loss(closure)
        for group in self.param_groups:
            beta1 = group["beta1"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "preconditioner" not in state:
                    raise RuntimeError(
                        "FrozenAdam has no preconditioner for a parameter; pass "
                        "`preconditioner=`, call set_preconditioner() or from_optimizer()."
                    )
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["step"] = torch.tensor(0.0)
                state["step"] += 1
                grad = _weight_decayed_grad(p, group)
                state["exp_avg"].lerp_(grad, 1 - beta1)
                p.addcdiv_(state["exp_avg"], state["preconditioner"], value=-group["lr"])
        return loss


def _frozen_threshold(group: dict[str, Any]) -> float:
    from lightning_eos.thresholds import ema_update_threshold

    decay = group["lr"] * group["weight_decay"] if group["decoupled_weight_decay"] else 0.0
    return ema_update_threshold(0.0, group["lr"], group["beta1"], decay)
