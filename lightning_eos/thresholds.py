"""Stability thresholds on the top Hessian eigenvalue, one function per formula.

On a quadratic :math:`\\tfrac12\\lambda\\theta^2` each method is a linear recursion;
the threshold is the :math:`\\lambda` at which a root of its characteristic polynomial
leaves the unit circle through :math:`-1` (paper 002, App. A; paper 001, eq. 1;
paper 004, Thm. 2). With learning rate :math:`\\eta` and momentum :math:`\\beta`:

* GD, :math:`\\theta_{t+1} = \\theta_t - \\eta g_t`: :math:`z = 1 - \\eta\\lambda`, so
  :math:`\\lambda < 2/\\eta`.
* heavy ball, :math:`\\theta_{t+1} = \\theta_t - \\eta g_t + \\beta(\\theta_t-\\theta_{t-1})`:
  :math:`z^2 - (1+\\beta-\\eta\\lambda)z + \\beta`; at :math:`z=-1`,
  :math:`\\lambda = (2+2\\beta)/\\eta`.
* Nesterov, gradient at :math:`\\theta_t + \\beta(\\theta_t-\\theta_{t-1})`:
  :math:`z^2 - (1+\\beta)(1-\\eta\\lambda)z + \\beta(1-\\eta\\lambda)`; at :math:`z=-1`,
  :math:`\\lambda = (2+2\\beta)/((1+2\\beta)\\eta)`.
* EMA forms (:math:`m_t = \\beta m_{t-1} + (1-\\beta) g_t`) are the above with
  learning rate :math:`(1-\\beta)\\eta`.
* generalized momentum of paper 004,
  :math:`\\delta_t = \\beta_1\\delta_{t-1} - \\eta\\nabla L(\\theta_t + \\beta_2\\delta_{t-1})`:
  :math:`\\lambda = (2/\\eta)(1+\\beta_1)/(1+2\\beta_2)` (heavy ball at
  :math:`\\beta_2 = 0`, Nesterov at :math:`\\beta_2=\\beta_1`).
* SAM: paper 003, Prop. 2; the IAS edge of SGD: paper 004, eq. 17.
* every EMA-form update with decoupled decay, :func:`ema_update_threshold`; it covers
  all of the above but SAM and the adaptive optimizers with a frozen preconditioner.

:func:`stability_threshold` reads a live optimizer (``torch.optim.SGD`` or one of
:mod:`lightning_eos.optim.momentum`) and returns the threshold that applies to
:math:`\\lambda_1(H)` of the *unregularized* loss;
:func:`preconditioned_threshold` reads an adaptive one and returns the threshold on
:math:`\\lambda_1(P^{-1}H)` (paper 002, App. A.2).
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "UndefinedThresholdError",
    "UnsupportedOptimizerError",
    "ema_heavy_ball_threshold",
    "ema_nesterov_threshold",
    "gd_threshold",
    "generalized_momentum_threshold",
    "heavy_ball_threshold",
    "ias_threshold",
    "lssr_learning_rate",
    "sgd_ias_threshold",
    "ema_update_threshold",
    "nesterov_threshold",
    "preconditioned_threshold",
    "sam_edge",
    "sam_threshold",
    "stability_threshold",
]


class UnsupportedOptimizerError(TypeError):
    """The optimizer has no known stability threshold."""


class UndefinedThresholdError(ValueError):
    """The optimizer is supported, but its settings right now define no single threshold.

    A learning rate of 0 (a warmup from 0, a schedule annealed to 0, a frozen param group)
    leaves the method unconditionally stable: :math:`2/\\eta` has no finite value. Param
    groups with different thresholds (layer-wise learning rates) have no common one on
    :math:`\\lambda_1(H)`. The monitors then log the sharpness without a threshold.
    """


class GroupsDisagreeError(UnsupportedOptimizerError, UndefinedThresholdError):
    """The param groups imply different thresholds; no single one exists.

    An :class:`UndefinedThresholdError` (the monitors measure without a threshold) that is
    also an :class:`UnsupportedOptimizerError`, as it was before that class existed.
    """


def _check_lr(lr: float) -> None:
    if lr == 0:
        raise UndefinedThresholdError(
            "The learning rate is 0: the step does not move, and the threshold "
            "(e.g. 2/lr) is undefined."
        )
    if not lr > 0:
        raise ValueError(f"The learning rate must be positive, got {lr}.")


def gd_threshold(lr: float) -> float:
    """Gradient descent: :math:`2/\\eta`.

    >>> gd_threshold(0.01)
    200.0
    """
    _check_lr(lr)
    return 2.0 / lr


def heavy_ball_threshold(lr: float, beta: float) -> float:
    """Standard (Polyak) heavy ball, torch SGD momentum: :math:`(2+2\\beta)/\\eta`.

    Paper 001, eq. 1 (its maximum stable sharpness); paper 002, App. A.

    >>> heavy_ball_threshold(0.5, 0.5)
    6.0
    """
    _check_lr(lr)
    return (2.0 + 2.0 * beta) / lr


def ema_heavy_ball_threshold(lr: float, beta: float) -> float:
    """EMA heavy ball (:math:`m = \\beta m + (1-\\beta) g`): :math:`(2+2\\beta)/((1-\\beta)\\eta)`.

    Paper 002, App. A; this is Adam's 38/η at :math:`\\beta_1 = 0.9`.

    >>> round(ema_heavy_ball_threshold(1.0, 0.9), 6)
    38.0
    """
    _check_lr(lr)
    return (2.0 + 2.0 * beta) / ((1.0 - beta) * lr)


def nesterov_threshold(lr: float, beta: float) -> float:
    """Standard Nesterov momentum: :math:`(2+2\\beta)/((1+2\\beta)\\eta)`. Paper 002, App. A.

    >>> round(nesterov_threshold(1.0, 0.9), 6)
    1.357143
    """
    _check_lr(lr)
    return (2.0 + 2.0 * beta) / ((1.0 + 2.0 * beta) * lr)


def ema_nesterov_threshold(lr: float, beta: float) -> float:
    """EMA Nesterov: :math:`(2+2\\beta)/((1-\\beta)(1+2\\beta)\\eta)`. Paper 002, App. A."""
    _check_lr(lr)
    return (2.0 + 2.0 * beta) / ((1.0 - beta) * (1.0 + 2.0 * beta) * lr)


def ema_update_threshold(
    grad_lr: float, momentum_lr: float, beta: float, decay: float = 0.0
) -> float:
    """Threshold of every EMA-form update, with decoupled decay (paper 002, App. A).

    The update is :math:`m' = \\beta m + (1-\\beta) g`,
    :math:`\\theta' = (1-c)\\theta - a\\,g - b\\,m'`, with :math:`a` = ``grad_lr``,
    :math:`b` = ``momentum_lr``, :math:`c` = ``decay`` (decoupled weight decay, e.g.
    AdamW's :math:`\\eta w`). On :math:`\\tfrac12\\lambda
    \\theta^2` the state :math:`(\\theta, m)` evolves by a 2x2 matrix with trace
    :math:`T = 1 + \\beta - c - (a + b(1-\\beta))\\lambda` and determinant
    :math:`D = \\beta(1 - c - a\\lambda)`. A root crosses :math:`-1` when
    :math:`1 + T + D = 0`:

    .. math:: \\lambda^* = \\frac{(1+\\beta)(2-c)}{a(1+\\beta) + b(1-\\beta)} .

    Below it both roots are inside the unit circle: :math:`1 - T + D =
    (1-\\beta)(c + (a+b)\\lambda) > 0` keeps them off :math:`+1`, and
    :math:`a\\lambda^* \\le 2 - c` gives :math:`|D| \\le \\beta`. Special cases (paper 002,
    Table 1 and Lemmas 1-2, which derive them with :math:`(1-\\beta)\\eta` in place of
    :math:`\\eta` in the recurrences of its [8]): GD is :math:`a=\\eta, b=0`; EMA heavy
    ball :math:`a=0, b=\\eta`; EMA Nesterov :math:`a=(1-\\beta)\\eta, b=\\beta\\eta`;
    standard heavy ball (buffer :math:`\\beta\\,buf + g`, i.e. :math:`m = (1-\\beta)buf`)
    is :math:`a=0, b=\\eta/(1-\\beta)`. AdamW's decoupled decay :math:`c=\\eta w` multiplies
    the EMA heavy ball threshold by :math:`1 - \\eta w/2`.

    >>> round(ema_update_threshold(0.0, 1.0, 0.9), 6)  # EMA heavy ball, 38/eta
    38.0
    >>> nesterov = ema_update_threshold(0.1, 0.9, 0.9)
    >>> math.isclose(nesterov, ema_nesterov_threshold(1.0, 0.9))
    True
    """
    if not (grad_lr >= 0 and momentum_lr >= 0):
        raise ValueError(f"Need nonnegative step sizes: {grad_lr}, {momentum_lr}.")
    if grad_lr + momentum_lr == 0:
        raise UndefinedThresholdError("Both step sizes are 0: the threshold is undefined.")
    if not 0 <= beta < 1:
        raise ValueError(f"beta={beta} must be in [0, 1).")
    if not 0 <= decay < 2:
        raise ValueError(f"decay={decay} must be in [0, 2): the decay alone would diverge.")
    return (1.0 + beta) * (2.0 - decay) / (grad_lr * (1.0 + beta) + momentum_lr * (1.0 - beta))


def generalized_momentum_threshold(lr: float, beta1: float, beta2: float) -> float:
    """Generalized momentum of paper 004 (Thm. 2): :math:`(2/\\eta)(1+\\beta_1)/(1+2\\beta_2)`.

    >>> math.isclose(generalized_momentum_threshold(0.1, 0.9, 0.0), heavy_ball_threshold(0.1, 0.9))
    True
    """
    _check_lr(lr)
    return (2.0 / lr) * (1.0 + beta1) / (1.0 + 2.0 * beta2)


def sam_edge(lr: float, rho: float, grad_norm: float) -> float:
    """SAM's edge, paper 003, Prop. 2.

    .. math:: \\frac{\\lVert g\\rVert}{2\\rho}
        \\left(\\sqrt{1 + \\frac{8\\rho}{\\eta \\lVert g\\rVert}} - 1\\right)

    It tends to :math:`2/\\eta` as :math:`\\rho \\to 0`.

    >>> abs(sam_edge(0.1, 1e-9, 1.0) - 20.0) < 1e-4
    True
    """
    _check_lr(lr)
    if rho == 0:
        return 2.0 / lr
    if grad_norm < 0:
        raise ValueError("The gradient norm cannot be negative.")
    if grad_norm == 0:
        return 0.0  # the limit: the edge shrinks like sqrt(2|g|/(rho eta))
    return grad_norm / (2.0 * rho) * (math.sqrt(1.0 + 8.0 * rho / (lr * grad_norm)) - 1.0)


def ias_threshold(lr: float, rho_b: float) -> float:
    """Edge of the interaction-aware sharpness for SGD at batch size b: :math:`2\\rho_b/\\eta`.

    Paper 004, eq. 16 (:math:`\\rho_b` from eq. 17).
    """
    _check_lr(lr)
    return 2.0 * rho_b / lr


def lssr_learning_rate(
    batch_size: int,
    reference_batch_size: int,
    reference_lr: float,
    rho: float,
    n: int,
    replacement: bool = False,
) -> float:
    """The Linear and Saturation Scaling Rule: the learning rate that keeps :math:`\\rho_b/\\eta`.

    Paper 004, §5: SGD bounds the IAS by :math:`2\\rho_b/\\eta`, so batch sizes trained
    with the same :math:`\\rho_b/\\eta` are regularized alike. With
    :math:`\\rho_b = 1/(\\tfrac{\\gamma_{n,b}}{b}\\tfrac1\\rho + 1 - \\tfrac{\\gamma_{n,b}}{b})`
    (eq. 17, :func:`lightning_eos.curvature.batch_concentration`),

    .. math:: \\eta(b) = \\eta_{\\rm ref}\\,\\rho_b / \\rho_{b_{\\rm ref}},

    linear in :math:`b` while :math:`b \\ll 1/\\rho` (the linear scaling rule) and
    saturating once :math:`\\rho_b \\to 1`.

    Args:
        batch_size: the new batch size :math:`b`.
        reference_batch_size: the batch size of a pair known to train well.
        reference_lr: its learning rate.
        rho: :math:`\\rho = \\operatorname{tr}(S_n)/\\operatorname{tr}(S_1)`, the
            concentration of per-sample gradients (``eos/rho`` of the IAS monitor).
        n: the training set size (batches are drawn from it).
        replacement: batches drawn with replacement (:math:`\\gamma_{n,b} = 1`).

    Example:
        Paper 004, Fig. 5 (left): :math:`n = 8192`, :math:`\\rho = 2^{-7}`. From
        :math:`(b, \\eta) = (128, 0.01)`, going to :math:`b = 1024` the linear rule says
        :math:`\\eta = 0.08`; LSSR says :math:`\\rho_{1024}/\\rho_{128} = 0.902/0.506`:

        >>> round(lssr_learning_rate(1024, 128, 0.01, rho=2**-7, n=8192), 4)
        0.0178
        >>> round(lssr_learning_rate(16, 128, 0.01, rho=2**-7, n=8192), 5)  # near-linear
        0.00222
    """
    from lightning_eos.curvature.gradient_moments import batch_concentration

    _check_lr(reference_lr)
    scale = batch_concentration(rho, n, batch_size, replacement) / batch_concentration(
        rho, n, reference_batch_size, replacement
    )
    return reference_lr * scale


def sgd_ias_threshold(optimizer: Any, rho_b: float) -> float:
    """The edge of the interaction-aware sharpness for a live SGD or momentum optimizer.

    It is :math:`\\rho_b` times :func:`stability_threshold`.

    Paper 004, eq. 16: plain SGD is unstable when :math:`\\lVert H\\rVert_{S_b} >
    2\\rho_b/\\eta`. With momentum the factor :math:`\\gamma(\\beta_1,\\beta_2) =
    (1+\\beta_1)/(1+2\\beta_2)` of Theorem 2 multiplies it (App. C.6 and Fig. 38 show it
    for full-batch GD with heavy ball and Nesterov momentum; for small batches with
    momentum it is this same extension, not a theorem of the paper). Weight decay is
    refused: the noise moments are those of the loss, not of the decayed objective.

    Example:
        >>> p = [torch.nn.Parameter(torch.zeros(1))]
        >>> sgd_ias_threshold(torch.optim.SGD(p, lr=0.5), rho_b=0.25)
        1.0
    """
    from lightning_eos.optim.momentum import _EMAMomentum

    optimizer = _unwrap(optimizer)
    threshold = stability_threshold(optimizer)  # a clear error for unknown optimizers
    if isinstance(optimizer, _EMAMomentum):
        raise UnsupportedOptimizerError(
            "The IAS edge is known for SGD and the generalized momentum of paper 004 "
            "(HeavyBall, Nesterov, GeneralizedMomentum), not for the EMA forms."
        )
    if any(g.get("weight_decay", 0) for g in optimizer.param_groups):
        raise UnsupportedOptimizerError(
            "The IAS edge 2 rho_b / eta (paper 004) is known for SGD without weight decay."
        )
    if not 0 < rho_b <= 1 + 1e-12:
        raise ValueError(f"rho_b={rho_b} must lie in (0, 1].")
    return rho_b * threshold


def _sgd_threshold(group: dict[str, Any]) -> float:
    lr, beta = float(group["lr"]), float(group.get("momentum", 0.0))
    dampening = float(group.get("dampening", 0.0))
    if group.get("maximize", False):
        raise UnsupportedOptimizerError("SGD with maximize=True has no descent threshold.")
    if beta > 0 and dampening >= 1.0:
        raise UnsupportedOptimizerError("SGD with dampening=1 never feeds gradients in.")
    if beta == 0.0:
        base = gd_threshold(lr)
    elif group.get("nesterov", False):  # torch forbids dampening with nesterov
        base = nesterov_threshold(lr, beta)
    else:
        # b = beta*b + (1 - dampening)*g: heavy ball with learning rate (1 - dampening)*lr
        base = heavy_ball_threshold((1.0 - dampening) * lr, beta)
    # the optimizer descends L + wd/2 |theta|^2, whose Hessian is H + wd*I
    return base - float(group.get("weight_decay", 0.0))


def _unwrap(optimizer: Any) -> Any:
    # LightningOptimizer keeps the torch optimizer in `_optimizer`
    inner = getattr(optimizer, "_optimizer", None)
    return _unwrap(inner) if inner is not None else optimizer


def stability_threshold(optimizer: Any) -> float:
    """The threshold on :math:`\\lambda_1(H)` implied by a live optimizer's param groups.

    Reads the current learning rate (after schedulers and warmup) and the momentum
    settings. Supported:

    * ``torch.optim.SGD`` (plain GD, heavy-ball momentum with or without dampening,
      Nesterov);
    * :class:`~lightning_eos.optim.HeavyBall` (:func:`heavy_ball_threshold`),
      :class:`~lightning_eos.optim.Nesterov` (:func:`nesterov_threshold`),
      :class:`~lightning_eos.optim.GeneralizedMomentum`
      (:func:`generalized_momentum_threshold`),
      :class:`~lightning_eos.optim.EMAHeavyBall` (:func:`ema_heavy_ball_threshold`) and
      :class:`~lightning_eos.optim.EMANesterov` (:func:`ema_nesterov_threshold`), at the
      step size they take; with ``match_gd=True`` that is :math:`2/\\eta` for all of them.

    ``weight_decay`` :math:`w` (coupled, added to the gradient) adds :math:`wI` to the
    Hessian the optimizer sees, so it lowers the threshold on the raw loss by :math:`w`.

    Args:
        optimizer: a ``torch.optim.Optimizer`` or Lightning's ``LightningOptimizer``.

    Raises:
        UnsupportedOptimizerError: for other optimizers and unsupported settings.
        UndefinedThresholdError: a param group has learning rate 0, or the groups' thresholds
            differ (:class:`GroupsDisagreeError`); one scalar threshold does not exist then.

    Example:
        >>> from lightning_eos.optim import HeavyBall
        >>> p = [torch.nn.Parameter(torch.zeros(1))]
        >>> stability_threshold(torch.optim.SGD(p, lr=0.5, momentum=0.5))
        6.0
        >>> stability_threshold(HeavyBall(p, lr=0.5, momentum=0.5, weight_decay=1.0))
        5.0
        >>> stability_threshold(HeavyBall(p, lr=0.5, momentum=0.5, match_gd=True))
        4.0
    """
    # lazily: lightning_eos.optim imports this module
    from lightning_eos.optim.momentum import _MomentumOptimizer

    optimizer = _unwrap(optimizer)
    if _is_sam(optimizer):
        raise UnsupportedOptimizerError(
            "SAM's threshold depends on the gradient norm: use sam_threshold(optimizer, "
            "grad_norm) (SharpnessMonitor does, on its measurement set)."
        )
    if isinstance(optimizer, _MomentumOptimizer):
        group_threshold = optimizer._threshold
    elif type(optimizer) is torch.optim.SGD:
        group_threshold = _sgd_threshold
    else:
        raise UnsupportedOptimizerError(
            f"No stability threshold is known for {type(optimizer).__name__}. Supported: "
            "torch.optim.SGD (GD, momentum, dampening, nesterov) and lightning_eos.optim's "
            "HeavyBall, Nesterov, GeneralizedMomentum, EMAHeavyBall and EMANesterov. For an "
            "adaptive optimizer use preconditioned_threshold. Pass threshold=None to measure "
            "the sharpness without a threshold, or a number to fix one."
        )
    values, undefined = set(), None
    for group in optimizer.param_groups:  # unsupported settings of any group come first
        try:
            values.add(group_threshold(group))
        except UndefinedThresholdError as err:
            undefined = undefined or err
    if undefined is not None:
        raise undefined
    if len(values) > 1:
        raise GroupsDisagreeError(
            "The param groups imply different thresholds "
            f"({sorted(values)}); a single threshold on lambda_1(H) does not exist."
        )
    return values.pop()


def preconditioned_threshold(optimizer: Any) -> float:
    """The threshold on :math:`\\lambda_1(P^{-1}H)` implied by an adaptive optimizer.

    Paper 002, App. A.2 (Prop. 1): with the preconditioner frozen, preconditioned
    momentum is the plain method on :math:`f(P^{-1/2}x)`, so it diverges iff
    :math:`\\lambda_1(P^{-1/2}HP^{-1/2})` exceeds the plain method's threshold
    (:func:`ema_update_threshold` with the optimizer's step sizes). Adam's bias
    correction of the first moment enters as the step size :math:`\\eta/(1-\\beta_1^t)`.
    The preconditioner :math:`P` is the one
    :func:`lightning_eos.optim.read_preconditioner` rebuilds; see it for each optimizer.

    Raises:
        UnsupportedOptimizerError: the optimizer has no registered preconditioner.
        lightning_eos.optim.PreconditionerNotReadyError: it has not stepped yet.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.Adam([p], lr=0.01)
        >>> p.grad = torch.ones(2); opt.step()
        >>> round(preconditioned_threshold(opt), 6)  # 38/eta times (1 - 0.9)
        380.0
    """
    from lightning_eos.optim.preconditioners import read_preconditioner

    return read_preconditioner(optimizer).threshold


def _is_sam(optimizer: Any) -> bool:
    groups = getattr(optimizer, "param_groups", [])
    return hasattr(optimizer, "base_optimizer") and bool(groups) and "rho" in groups[0]


def sam_threshold(optimizer: Any, grad_norm: float) -> float:
    """The SAM-edge of a live :class:`~lightning_eos.optim.SAM` over plain gradient descent.

    Paper 003, Prop. 2: :func:`sam_edge` of the learning rate, :math:`\\rho` and the
    full-batch gradient norm :math:`\\lVert g\\rVert` at the current iterate. It is derived
    for SAM around gradient descent (SGD without momentum or weight decay) and plain,
    not adaptive, SAM; other settings raise :class:`UnsupportedOptimizerError`.

    Example:
        >>> from lightning_eos.optim import SAM
        >>> opt = SAM([torch.nn.Parameter(torch.zeros(1))], torch.optim.SGD, rho=0.1, lr=0.5)
        >>> round(sam_threshold(opt, grad_norm=2.0), 6) == round(sam_edge(0.5, 0.1, 2.0), 6)
        True
    """
    optimizer = _unwrap(optimizer)
    if not _is_sam(optimizer):
        raise UnsupportedOptimizerError(f"{type(optimizer).__name__} is not SAM.")
    base = optimizer.base_optimizer
    plain = type(base) is torch.optim.SGD and all(
        g.get("momentum", 0) == 0 and g.get("weight_decay", 0) == 0 and not g.get("maximize")
        for g in base.param_groups
    )
    if not plain or any(g["adaptive"] for g in optimizer.param_groups):
        raise UnsupportedOptimizerError(
            "The SAM-edge (paper 003, Prop. 2) is known for plain SAM around gradient descent: "
            "SAM(params, torch.optim.SGD, lr=..., rho=...) without momentum, weight decay or "
            "adaptive=True. Pass threshold=None (or a number) to measure anyway."
        )
    values = {sam_edge(float(g["lr"]), float(g["rho"]), grad_norm) for g in optimizer.param_groups}
    if len(values) > 1:
        raise GroupsDisagreeError("SAM param groups with different (lr, rho) have no single edge.")
    return values.pop()
