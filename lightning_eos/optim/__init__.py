"""Optimizers and schedules of the papers, and the preconditioner registry of adaptive ones.

Momentum (learning rate read live; ``match_gd`` gives gradient descent's threshold)
    :class:`GeneralizedMomentum` (paper 004, Thm. 2), :class:`HeavyBall` (paper 001,
    eq. 1), :class:`Nesterov`, :class:`EMAHeavyBall`, :class:`EMANesterov` (paper 002,
    Table 1).
Adaptive optimizers
    :class:`Adam` (bias correction, AMSGrad, exponent switches), :class:`Padam`,
    :class:`Nadam` (EMA Nesterov, no bias correction), :class:`FrozenAdam`.
Sharpness-aware minimization
    :class:`SAM`, around any of the above.
Schedules
    :class:`LinearWarmup` -- a linear ramp between absolute learning rates (paper 001,
    App. B; paper 002, Fig. 7).
Preconditioners
    :func:`read_preconditioner` -- :math:`P_t` and the threshold on
    :math:`\\lambda_1(P^{-1}H)` from a live optimizer; :func:`track_preconditioner`,
    :func:`register_preconditioner`, :func:`supported_optimizers`.
"""

from lightning_eos.optim.adaptive import Adam, FrozenAdam, Nadam, Padam
from lightning_eos.optim.momentum import (
    EMAHeavyBall,
    EMANesterov,
    GeneralizedMomentum,
    HeavyBall,
    Nesterov,
)
from lightning_eos.optim.preconditioners import (
    Preconditioner,
    PreconditionerNotReadyError,
    StepBlock,
    read_preconditioner,
    register_preconditioner,
    supported_optimizers,
    track_preconditioner,
    unwrap_optimizer,
)
from lightning_eos.optim.sam import SAM
from lightning_eos.optim.schedules import LinearWarmup

__all__ = [
    # momentum
    "EMAHeavyBall",
    "EMANesterov",
    "GeneralizedMomentum",
    "HeavyBall",
    "Nesterov",
    # adaptive optimizers
    "Adam",
    "FrozenAdam",
    "Nadam",
    "Padam",
    # sharpness-aware minimization
    "SAM",
    # schedules
    "LinearWarmup",
    # preconditioners
    "Preconditioner",
    "PreconditionerNotReadyError",
    "StepBlock",
    "read_preconditioner",
    "register_preconditioner",
    "supported_optimizers",
    "track_preconditioner",
    "unwrap_optimizer",
]
