"""Lightning callbacks: when to measure, on which data, and where to log.

Monitors
    :class:`SharpnessMonitor` -- top Hessian eigenvalues and the optimizer's threshold.
    :class:`PreconditionedSharpnessMonitor` -- :math:`\\lambda_i(P^{-1}H)` of adaptive
    optimizers, their threshold, and the raw sharpness.
    :class:`IASMonitor` -- the interaction-aware sharpness of SGD against
    :math:`2\\rho_b/\\eta`, with the gradient-noise traces behind it.
Interventions
    :class:`FreezePreconditioner` -- swap in frozen Adam at a given step.
    :class:`OptimizerSwitch` -- GD <-> PHB where the sharpness crosses the MSS (paper 001).
    :class:`LearningRateWarmup` -- linear warmup, optionally stopped at the MSS (paper 001).
Training
    :class:`FullBatchAccumulation` -- full-batch GD over equal chunks (gradient accumulation).
Events
    :class:`CatapultDetector` -- loss spikes with a sharpness drop (paper 001), as
    :class:`Catapult` records.
Precision
    :class:`SAMMixedPrecision` -- SAM under ``16-mixed`` (GradScaler).
Figures
    :class:`SharpnessPlot` -- PNG of the sharpness against its threshold at fit end.
"""

from lightning_eos.callbacks.catapult import Catapult, CatapultDetector
from lightning_eos.callbacks.freeze import FreezePreconditioner
from lightning_eos.callbacks.full_batch import FullBatchAccumulation
from lightning_eos.callbacks.ias import IASMonitor
from lightning_eos.callbacks.plot import SharpnessPlot
from lightning_eos.callbacks.preconditioned import PreconditionedSharpnessMonitor
from lightning_eos.callbacks.sam_precision import SAMMixedPrecision
from lightning_eos.callbacks.sharpness import SharpnessMonitor
from lightning_eos.callbacks.switch import OptimizerSwitch
from lightning_eos.callbacks.warmup import LearningRateWarmup

__all__ = [
    "Catapult",
    "CatapultDetector",
    "FreezePreconditioner",
    "FullBatchAccumulation",
    "IASMonitor",
    "LearningRateWarmup",
    "OptimizerSwitch",
    "PreconditionedSharpnessMonitor",
    "SAMMixedPrecision",
    "SharpnessMonitor",
    "SharpnessPlot",
]
