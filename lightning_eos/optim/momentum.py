"""Momentum methods of the papers, with the learning rate read live from the param groups.

Every optimizer here is a linear recursion on a quadratic, with a known threshold on
:math:`\\lambda_1(H)` (:mod:`lightning_eos.thresholds`). With learning rate
:math:`\\eta_t` (``group["lr"]``, read at every step, so schedulers, warmup and callbacks
change it) and gradient :math:`g_t`:

* :class:`GeneralizedMomentum` -- paper 004, Thm. 2:
  :math:`\\delta_t = \\beta_1\\delta_{t-1} - \\eta_t\\nabla L(\\theta_t + \\beta_2\\delta_{t-1})`,
  :math:`\\theta_{t+1} = \\theta_t + \\delta_t`; threshold
  :math:`(2/\\eta)(1+\\beta_1)/(1+2\\beta_2)`.
* :class:`HeavyBall` -- Polyak's heavy ball in the form of paper 001, eq. (1)
  (:math:`\\beta_2 = 0`); threshold :math:`(2+2\\beta)/\\eta`.
* :class:`Nesterov` -- standard Nesterov (:math:`\\beta_2 = \\beta_1`); threshold
  :math:`(2+2\\beta)/((1+2\\beta)\\eta)`, paper 002, App. A.
* :class:`EMAHeavyBall`, :class:`EMANesterov` -- the EMA forms of paper 002, Table 1,
  :math:`m_t = \\beta m_{t-1} + (1-\\beta) g_t`; thresholds those above at learning rate
  :math:`(1-\\beta)\\eta`.

Shared param-group keys: ``lr``, ``momentum`` (:math:`\\beta`, :math:`\\beta_1`),
``weight_decay`` :math:`w` (coupled: :math:`g \\leftarrow g + w\\theta`, so the
threshold on :math:`\\lambda_1` of the raw loss drops by :math:`w`) and ``match_gd``.
With ``match_gd=True``, ``lr`` is gradient descent's learning rate :math:`\\eta_{GD}` and
each step uses :math:`\\eta = \\gamma\\,\\eta_{GD}`, with :math:`\\gamma` the factor by which
the method's threshold exceeds :math:`2/\\eta`, so that its maximum stable sharpness is
GD's :math:`2/\\eta_{GD}` (paper 001, §2.1: :math:`\\eta_{PHB} = (1+\\beta)\\eta_{GD}`).
:math:`\\gamma` is computed from the group's current values at every step, so a callback
that changes ``momentum`` mid-run (GD :math:`\\leftrightarrow` PHB) keeps the MSS at
:math:`2/\\eta_{GD}`.

:func:`lightning_eos.thresholds.stability_threshold` reads the threshold of any of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_eos.thresholds import (
    ema_heavy_ball_threshold,
    ema_nesterov_threshold,
    gd_threshold,
    generalized_momentum_threshold,
    heavy_ball_threshold,
    nesterov_threshold,
)

__all__ = ["EMAHeavyBall", "EMANesterov", "GeneralizedMomentum", "HeavyBall", "Nesterov"]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]


def _closure_loss(closure: Callable[[], Any] | None) -> Any:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _decayed_grad(p: Tensor, weight_decay: float) -> Tensor:
    """The gradient of :math:`L + \\tfrac{w}{2}\\lVert\\theta\\rVert^2` at the stored ``p``."""
    grad = p.grad
    if grad.is_sparse:
        raise RuntimeError(
            "The momentum optimizers of lightning_eos take dense gradients; use a dense "
            "nn.Embedding (sparse=False)."
        )
    return grad if weight_decay == 0 else grad.add(p, alpha=weight_decay)


class _MomentumOptimizer(Optimizer):
    """Validation, ``match_gd`` and the threshold of one param group; subclasses step.

    A subclass defines :meth:`_gain`, :math:`\\gamma` with threshold
    :math:`2\\gamma/\\eta`, and :meth:`_closed_form`, the threshold function of
    :mod:`lightning_eos.thresholds` that gives it.
    """

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        self._check_group(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (its missing keys from the defaults) and validate its values."""
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _check_group(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        if not group["lr"] >= 0:
            raise ValueError(f"{name}: lr={group['lr']!r}; pass a float learning rate >= 0.")
        if not 0 <= group["momentum"] < 1:
            raise ValueError(
                f"{name}: momentum={group['momentum']!r} must lie in [0, 1) (0 is gradient "
                "descent); pass e.g. momentum=0.9."
            )
        if not group["weight_decay"] >= 0:
            raise ValueError(
                f"{name}: weight_decay={group['weight_decay']!r}; pass a coefficient >= 0."
            )
        if not isinstance(group["match_gd"], bool):
            raise TypeError(f"{name}: match_gd={group['match_gd']!r}; pass True or False.")

    def _gain(self, group: dict[str, Any]) -> float:
        """:math:`\\gamma`: the threshold is :math:`2\\gamma/\\eta`."""
        raise NotImplementedError

    def _closed_form(self, lr: float, group: dict[str, Any]) -> float:
        raise NotImplementedError

    def _lr(self, group: dict[str, Any]) -> float:
        """The step size :math:`\\eta_t`: ``lr``, times :math:`\\gamma` with ``match_gd``."""
        lr = float(group["lr"])
        return lr * self._gain(group) if group["match_gd"] else lr

    def _threshold(self, group: dict[str, Any]) -> float:
        """The threshold on :math:`\\lambda_1(H)` of the loss without the decay term."""
        if group["match_gd"]:
            # 2 gamma / (gamma lr) by construction; exact, so equal groups agree to the bit
            base = gd_threshold(float(group["lr"]))
        else:
            base = self._closed_form(self._lr(group), group)
        # the method descends L + w/2 |theta|^2, whose Hessian is H + w I
        return base - float(group["weight_decay"])


class GeneralizedMomentum(_MomentumOptimizer):
    """Generalized momentum of paper 004 (Thm. 2; App. C.6), gradient at a look-ahead point.

    .. math::

        \\delta_t = \\beta_1 \\delta_{t-1} - \\eta_t \\nabla L(\\theta_t + \\beta_2\\delta_{t-1}),
        \\qquad \\theta_{t+1} = \\theta_t + \\delta_t,

    with :math:`\\beta_1` = ``momentum``, :math:`\\beta_2` = ``lookahead`` and
    :math:`\\delta_{-1} = 0` (the first step is a GD step). :math:`\\beta_2 = 0` is Polyak's
    heavy ball (:class:`HeavyBall`), :math:`\\beta_2 = \\beta_1` Nesterov
    (:class:`Nesterov`). On a quadratic it diverges iff :math:`\\lambda_1(H) >
    (2/\\eta)(1+\\beta_1)/(1+2\\beta_2)`
    (:func:`~lightning_eos.thresholds.generalized_momentum_threshold`).

    **Stored point.** To step without a closure, the parameters hold the look-ahead point
    :math:`y_t = \\theta_t + \\beta_2\\delta_{t-1}`, where the gradient is taken (as
    ``torch.optim.SGD(nesterov=True)`` does), and the step is

    .. math:: y_{t+1} = y_t + (1+\\beta_2)\\delta_t - \\beta_2\\delta_{t-1} .

    Losses, gradients and Hessians measured on the model are therefore those at
    :math:`y_t`; the iterate is :math:`\\theta_t = y_t - \\beta_2\\delta_{t-1}`. The state
    ``"displacement"`` is :math:`\\delta_{t-1} = \\theta_t - \\theta_{t-1}` and
    ``"lookahead"`` the :math:`\\beta_2` that built the stored point: a new ``lookahead``
    set in the group takes effect from the next gradient on (this step's gradient was
    taken at the old point). Coupled weight decay adds :math:`w y_t`, the gradient of
    :math:`\\tfrac w2\\lVert y\\rVert^2` at the point where :math:`\\nabla L` is taken.

    Args:
        params: parameters or param groups.
        lr: :math:`\\eta` (GD's learning rate with ``match_gd``), read live from the group.
        momentum: :math:`\\beta_1 \\in [0, 1)`.
        lookahead: :math:`\\beta_2 \\in [0, 1)`.
        weight_decay: :math:`w`, added to the gradient as :math:`w y_t` (L2).
        match_gd: step with :math:`\\eta\\,(1+\\beta_1)/(1+2\\beta_2)` so that the threshold
            is gradient descent's :math:`2/\\eta`.

    Example:
        On :math:`\\tfrac12\\lambda\\theta^2` the threshold is :math:`(2/\\eta)(1.5)/(1.5)`:

        >>> theta = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
        >>> opt = GeneralizedMomentum([theta], lr=0.1, momentum=0.5, lookahead=0.25)
        >>> for _ in range(400):
        ...     theta.grad = 19.5 * theta.detach(); opt.step()  # just below 20
        >>> theta.abs().item() < 1e-3
        True
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        momentum: float = 0.9,
        lookahead: float = 0.0,
        weight_decay: float = 0.0,
        match_gd: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            lookahead=lookahead,
            weight_decay=weight_decay,
            match_gd=match_gd,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        if not 0 <= group["lookahead"] < 1:
            raise ValueError(
                f"GeneralizedMomentum: lookahead={group['lookahead']!r} must lie in [0, 1); "
                "0 is heavy ball, lookahead=momentum is Nesterov."
            )

    def _lookahead(self, group: dict[str, Any]) -> float:
        """:math:`\\beta_2` of the group."""
        return float(group["lookahead"])

    def _gain(self, group: dict[str, Any]) -> float:
        beta1, beta2 = float(group["momentum"]), self._lookahead(group)
        return (1.0 + beta1) / (1.0 + 2.0 * beta2)

    def _closed_form(self, lr: float, group: dict[str, Any]) -> float:
        return generalized_momentum_threshold(lr, float(group["momentum"]), self._lookahead(group))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = _closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2, lr = float(group["momentum"]), self._lookahead(group), self._lr(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = _decayed_grad(p, group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["displacement"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["lookahead"] = beta2
                delta = state["displacement"]
                if state["lookahead"]:
                    p.add_(delta, alpha=-state["lookahead"])  # back to theta_t
                delta.mul_(beta1).add_(grad, alpha=-lr)
                p.add_(delta, alpha=1.0 + beta2)  # theta_{t+1} + beta2 delta_t
                state["lookahead"] = beta2
        return loss


class _FixedLookahead(GeneralizedMomentum):
    """A :class:`GeneralizedMomentum` whose look-ahead is fixed by the method, not a key."""

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        match_gd: bool = False,
    ) -> None:
        # no "lookahead" key: the method sets it (0, or the momentum); a group with one is refused
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, match_gd=match_gd)
        _MomentumOptimizer.__init__(self, params, defaults)  # skips the lookahead argument

    def _check_group(self, group: dict[str, Any]) -> None:
        _MomentumOptimizer._check_group(self, group)
        if "lookahead" in group:
            raise ValueError(
                f"{type(self).__name__} sets the look-ahead itself; use "
                "GeneralizedMomentum(lookahead=...) for another one."
            )


class HeavyBall(_FixedLookahead):
    """Polyak's heavy ball in the form of paper 001, eq. (1).

    .. math:: w_{t+1} = w_t - \\eta_t \\nabla L(w_t) + \\beta (w_t - w_{t-1}),

    i.e. :class:`GeneralizedMomentum` with no look-ahead; the parameters are the iterate
    :math:`w_t` and the state ``"displacement"`` is :math:`w_t - w_{t-1}` (zero at the
    start). Its maximum stable sharpness is :math:`2(1+\\beta)/\\eta` (paper 001, §1;
    :func:`~lightning_eos.thresholds.heavy_ball_threshold`), or :math:`2/\\eta` with
    ``match_gd``, which steps with :math:`\\eta_{PHB} = (1+\\beta)\\eta` as paper 001 does
    to compare PHB with GD at equal MSS (§2.1).

    **Not torch's momentum under a schedule.** ``torch.optim.SGD(momentum=β)`` keeps
    :math:`b_t = \\beta b_{t-1} + g_t` and steps :math:`-\\eta_t b_t`, so

    .. math:: w_{t+1} - w_t = \\beta\\,\\frac{\\eta_t}{\\eta_{t-1}}\\,(w_t - w_{t-1})
        - \\eta_t g_t :

    torch rescales the past displacement by the ratio of learning rates, eq. (1) does
    not. At a constant learning rate the two coincide; during a warmup
    (:math:`\\eta_t > \\eta_{t-1}`) torch carries more than :math:`\\beta` of the last
    displacement, eq. (1) exactly :math:`\\beta`.

    **Switching GD and PHB.** ``momentum=0`` is plain gradient descent; the displacement
    is still recorded, so a callback that sets ``group["momentum"]`` from 0 to
    :math:`\\beta` continues from the last GD displacement, as :math:`w_t - w_{t-1}` in
    eq. (1) implies (paper 001, Fig. 3: GD :math:`\\to` PHB and PHB :math:`\\to` GD).

    Args:
        params: parameters or param groups.
        lr: :math:`\\eta_t` (GD's learning rate with ``match_gd``), read live from the group.
        momentum: :math:`\\beta \\in [0, 1)`.
        weight_decay: :math:`w`, added to the gradient as :math:`w\\,w_t` (L2).
        match_gd: step with :math:`(1+\\beta)\\eta` so that the MSS is :math:`2/\\eta`.

    Example:
        At a constant learning rate it is ``torch.optim.SGD(momentum=β)``:

        >>> g = torch.Generator().manual_seed(0)
        >>> a = torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
        >>> b = torch.nn.Parameter(a.detach().clone())
        >>> ours, theirs = HeavyBall([a], lr=0.1), torch.optim.SGD([b], lr=0.1, momentum=0.9)
        >>> for _ in range(5):
        ...     a.grad, b.grad = a.detach() ** 3, b.detach() ** 3
        ...     ours.step(); theirs.step()
        >>> torch.allclose(a, b, rtol=1e-14, atol=0)
        True
    """

    def _lookahead(self, group: dict[str, Any]) -> float:
        return 0.0

    def _closed_form(self, lr: float, group: dict[str, Any]) -> float:
        return heavy_ball_threshold(lr, float(group["momentum"]))


class Nesterov(_FixedLookahead):
    """Standard Nesterov momentum: :class:`GeneralizedMomentum` with lookahead = momentum.

    .. math::

        \\delta_t = \\beta \\delta_{t-1} - \\eta_t \\nabla L(\\theta_t + \\beta\\delta_{t-1}),
        \\qquad \\theta_{t+1} = \\theta_t + \\delta_t .

    The parameters hold the look-ahead point :math:`\\theta_t + \\beta\\delta_{t-1}` (see
    :class:`GeneralizedMomentum`); the look-ahead follows ``group["momentum"]`` when a
    callback changes it. At a constant learning rate it is
    ``torch.optim.SGD(momentum=β, nesterov=True)``. Threshold
    :math:`(2+2\\beta)/((1+2\\beta)\\eta)` (paper 002, App. A, Table 1;
    :func:`~lightning_eos.thresholds.nesterov_threshold`); ``match_gd`` steps with
    :math:`\\eta(1+\\beta)/(1+2\\beta)` to make it :math:`2/\\eta`.

    Args:
        params: parameters or param groups.
        lr: :math:`\\eta_t` (GD's learning rate with ``match_gd``), read live from the group.
        momentum: :math:`\\beta \\in [0, 1)`, also the look-ahead.
        weight_decay: :math:`w`, added to the gradient as :math:`w\\theta` (L2).
        match_gd: make the threshold gradient descent's :math:`2/\\eta`.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> a = torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
        >>> b = torch.nn.Parameter(a.detach().clone())
        >>> ours = Nesterov([a], lr=0.1, momentum=0.9)
        >>> theirs = torch.optim.SGD([b], lr=0.1, momentum=0.9, nesterov=True)
        >>> for _ in range(5):
        ...     a.grad, b.grad = a.detach() ** 3, b.detach() ** 3
        ...     ours.step(); theirs.step()
        >>> torch.allclose(a, b, rtol=1e-13, atol=0)
        True
    """

    def _lookahead(self, group: dict[str, Any]) -> float:
        return float(group["momentum"])

    def _closed_form(self, lr: float, group: dict[str, Any]) -> float:
        return nesterov_threshold(lr, float(group["momentum"]))


class _EMAMomentum(_MomentumOptimizer):
    """EMA momentum :math:`m_t = \\beta m_{t-1} + (1-\\beta) g_t`; subclasses pick the step."""

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        match_gd: bool = False,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, match_gd=match_gd)
        super().__init__(params, defaults)

    def _direction(self, exp_avg: Tensor, grad: Tensor, beta: float) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = _closure_loss(closure)
        for group in self.param_groups:
            beta, lr = float(group["momentum"]), self._lr(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = _decayed_grad(p, group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg = state["exp_avg"].mul_(beta).add_(grad, alpha=1.0 - beta)
                p.add_(self._direction(exp_avg, grad, beta), alpha=-lr)
        return loss


class EMAHeavyBall(_EMAMomentum):
    """EMA heavy ball, EMAHB(:math:`\\eta, \\beta`) of paper 002 (§2, Table 1).

    .. math::

        m_t = \\beta m_{t-1} + (1-\\beta) g_t, \\qquad \\theta_{t+1} = \\theta_t - \\eta_t m_t,

    with :math:`m_{-1} = 0` (state ``"exp_avg"``). It is Adam's momentum without a
    preconditioner. On a quadratic it diverges iff :math:`\\lambda_1(H) >
    (2+2\\beta)/((1-\\beta)\\eta)` (paper 002, App. A, Lemma 2;
    :func:`~lightning_eos.thresholds.ema_heavy_ball_threshold`); ``match_gd`` steps with
    :math:`\\eta(1+\\beta)/(1-\\beta)` to make it :math:`2/\\eta`.

    Args:
        params: parameters or param groups.
        lr: :math:`\\eta_t` (GD's learning rate with ``match_gd``), read live from the group.
        momentum: :math:`\\beta \\in [0, 1)`.
        weight_decay: :math:`w`, added to the gradient as :math:`w\\theta` (L2).
        match_gd: make the threshold gradient descent's :math:`2/\\eta`.

    Example:
        Paper 002, Fig. 2: on :math:`\\tfrac12 x^2` at :math:`\\beta = 0.9`, learning
        rates above 38 diverge.

        >>> x = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
        >>> opt = EMAHeavyBall([x], lr=38.5, momentum=0.9)
        >>> for _ in range(300):
        ...     x.grad = x.detach().clone(); opt.step()
        >>> x.abs().item() > 1e3
        True
    """

    def _gain(self, group: dict[str, Any]) -> float:
        beta = float(group["momentum"])
        return (1.0 + beta) / (1.0 - beta)

    def _closed_form(self, lr: float, group: dict[str, Any]) -> float:
        return ema_heavy_ball_threshold(lr, float(group["momentum"]))

    def _direction(self, exp_avg: Tensor, grad: Tensor, beta: float) -> Tensor:
        return exp_avg


class EMANesterov(_EMAMomentum):
    """EMA Nesterov, EMANESTEROV(:math:`\\eta, \\beta`) of paper 002 (Table 1).

    .. math::

        m_t = \\beta m_{t-1} + (1-\\beta) g_t, \\qquad
        \\theta_{t+1} = \\theta_t - \\eta_t\\,(\\beta m_t + (1-\\beta) g_t),

    with :math:`m_{-1} = 0` (state ``"exp_avg"``): :class:`~lightning_eos.optim.Nadam`
    without a preconditioner. In :func:`~lightning_eos.thresholds.ema_update_threshold`'s
    terms, :math:`a = (1-\\beta)\\eta`, :math:`b = \\beta\\eta`. It diverges iff
    :math:`\\lambda_1(H) > (2+2\\beta)/((1-\\beta)(1+2\\beta)\\eta)` (paper 002, App. A,
    Lemma 1; :func:`~lightning_eos.thresholds.ema_nesterov_threshold`); ``match_gd`` steps
    with :math:`\\eta(1+\\beta)/((1-\\beta)(1+2\\beta))` to make it :math:`2/\\eta`.

    Args:
        params: parameters or param groups.
        lr: :math:`\\eta_t` (GD's learning rate with ``match_gd``), read live from the group.
        momentum: :math:`\\beta \\in [0, 1)`.
        weight_decay: :math:`w`, added to the gradient as :math:`w\\theta` (L2).
        match_gd: make the threshold gradient descent's :math:`2/\\eta`.

    Example:
        >>> from lightning_eos.thresholds import stability_threshold
        >>> p = [torch.nn.Parameter(torch.zeros(1))]
        >>> round(stability_threshold(EMANesterov(p, lr=1.0, momentum=0.5)), 6)  # 3/(0.5*2)
        3.0
        >>> stability_threshold(EMANesterov(p, lr=0.1, momentum=0.5, match_gd=True))
        20.0
    """

    def _gain(self, group: dict[str, Any]) -> float:
        beta = float(group["momentum"])
        return (1.0 + beta) / ((1.0 - beta) * (1.0 + 2.0 * beta))

    def _closed_form(self, lr: float, group: dict[str, Any]) -> float:
        return ema_nesterov_threshold(lr, float(group["momentum"]))

    def _direction(self, exp_avg: Tensor, grad: Tensor, beta: float) -> Tensor:
        return exp_avg.mul(beta).add_(grad, alpha=1.0 - beta)
