"""Curvature of a loss, in plain torch: no Lightning import anywhere below this package.

Hessian-vector products
    :class:`HessianOperator` -- mean loss over chunks, weighted by sample count.
    :class:`PreconditionedOperator` -- :math:`P^{-1/2}(H + s)P^{-1/2}` for a diagonal
    preconditioner.
Gradient noise (paper 004)
    :class:`GradientMoments`, :func:`interaction_aware_sharpness`, :class:`IASResult`,
    :func:`expected_loss_change`, :func:`sampling_coefficient`,
    :func:`batch_concentration`.
Eigensolvers
    :func:`lanczos`, :class:`LanczosResult` -- top-k with warm start and residual stop.
Measurement hygiene
    :func:`measurement_context` -- buffers, modes and RNG restored after a measurement.
Batches
    :func:`rechunk`, :func:`batch_size`.
"""

from lightning_eos.curvature._batches import batch_size, rechunk
from lightning_eos.curvature.context import MeasurementMode, measurement_context, preserved_rng
from lightning_eos.curvature.gradient_moments import (
    BatchCoupledLossError,
    GradientMoments,
    IASResult,
    batch_concentration,
    expected_loss_change,
    has_batchnorm,
    interaction_aware_sharpness,
    loss_at,
    sampling_coefficient,
)
from lightning_eos.curvature.hessian import (
    FailedOnAnotherProcessError,
    HessianOperator,
    HVPMethod,
    LossFn,
    NonFiniteCurvatureError,
    flatten,
    unflatten,
)
from lightning_eos.curvature.lanczos import LanczosResult, StopRule, lanczos
from lightning_eos.curvature.preconditioned import PreconditionedOperator

__all__ = [
    # Hessian-vector products
    "HessianOperator",
    "HVPMethod",
    "LossFn",
    "NonFiniteCurvatureError",
    "FailedOnAnotherProcessError",
    "PreconditionedOperator",
    "flatten",
    "unflatten",
    # gradient noise
    "BatchCoupledLossError",
    "GradientMoments",
    "IASResult",
    "batch_concentration",
    "expected_loss_change",
    "has_batchnorm",
    "interaction_aware_sharpness",
    "loss_at",
    "sampling_coefficient",
    # eigensolvers
    "LanczosResult",
    "StopRule",
    "lanczos",
    # measurement hygiene
    "MeasurementMode",
    "measurement_context",
    "preserved_rng",
    # batches
    "batch_size",
    "rechunk",
]
