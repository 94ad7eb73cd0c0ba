"""Optimizers of the papers and the preconditioner registry of adaptive optimizers.

Optimizers
    :class:`Adam` (bias correction, AMSGrad, exponent switches), :class:`Padam`,
    :class:`Nadam` (EMA Nesterov, no bias correction), :class:`FrozenAdam`,
    :class:`SAM` (sharpness-aware minimization around any of them).
Preconditioners
    :func:`read_preconditioner` -- :math:`P_t` and the threshold on
    :math:`\\lambda_1(P^{-1}H)` from a live optimizer; :func:`track_preconditioner`,
    :func:`register_preconditioner`, :func:`supported_optimizers`.
"""

from lightning_eos.optim.adaptive import Adam, FrozenAdam, Nadam, Padam
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

__all__ = [
    # optimizers
    "Adam",
    "FrozenAdam",
    "Nadam",
    "Padam",
    "SAM",
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
