"""PreconditionedSharpnessMonitor: :math:`\\lambda_1(P^{-1}H)` of adaptive optimizers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import lightning as L
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_eos.callbacks._faults import OnError
from lightning_eos.callbacks._measurement_set import LossFnType
from lightning_eos.callbacks.sharpness import SharpnessMonitor
from lightning_eos.curvature import (
    HessianOperator,
    HVPMethod,
    LanczosResult,
    MeasurementMode,
    NonFiniteCurvatureError,
    PreconditionedOperator,
    StopRule,
)
from lightning_eos.optim.preconditioners import (
    PreconditionerNotReadyError,
    read_preconditioner,
    track_preconditioner,
    unwrap_optimizer,
)
from lightning_eos.thresholds import UnsupportedOptimizerError

if TYPE_CHECKING:
    from lightning.pytorch import Trainer


class PreconditionedSharpnessMonitor(SharpnessMonitor):
    """Measure the preconditioned sharpness :math:`\\lambda_1(P_t^{-1}H_t)` every N steps.

    Under an adaptive optimizer the quantity at the edge of stability is the top
    eigenvalue of the preconditioned Hessian :math:`P_t^{-1/2}H_tP_t^{-1/2}` (paper 002,
    §2 and §4): with :math:`P_t` frozen, the optimizer is unstable iff it exceeds the
    threshold of the underlying momentum method, :math:`38/\\eta` for Adam with
    :math:`\\beta_1 = 0.9`. :math:`P_t` is read from the live optimizer after each step
    (:func:`lightning_eos.optim.read_preconditioner`), so it is the denominator of the
    step just taken. Logged at ``trainer.global_step``:

    ======================================  ====================================================
    ``eos/preconditioned_sharpness``        :math:`\\lambda_1(P^{-1}H)`
    ``eos/preconditioned_eig_2`` ..         :math:`\\lambda_2(P^{-1}H), \\dots`
    ``eos/preconditioned_threshold``        the live optimizer's threshold on it
    ``eos/preconditioned_sharpness_ratio``  :math:`\\lambda_1(P^{-1}H)` / threshold
    ``eos/preconditioned_sharpness_error``  its rigorous error bar (Ritz residual)
    ``eos/sharpness``, ``eos/eig_2`` ..     :math:`\\lambda_i(H)`, with ``raw_sharpness=True``
                                            (and ``eos/sharpness_error``)
    ``eos/lanczos_iters``                   Hessian-vector products of both eigensolves
    ======================================  ====================================================

    The progress bar shows the last ``eos/preconditioned_sharpness_ratio`` as
    ``λ1(P⁻¹H)/thr``; W&B gets the chart ``eos/charts/preconditioned_sharpness`` and the
    run config ``eos.preconditioned_threshold`` when it is known at the start (a fixed
    number; ``"auto"`` needs a first step). See :class:`SharpnessMonitor`.

    No threshold is logged for the raw sharpness: an adaptive optimizer's stability does
    not depend on :math:`\\lambda_1(H)` alone (Adam keeps raising it at the adaptive edge,
    paper 002 §6). With coupled (L2) weight decay :math:`w` the measured matrix is
    :math:`P^{-1}(H + wI)`, the Hessian of the objective the optimizer descends.

    Before the first step there is no preconditioner; only the raw sharpness is measured.
    A preconditioner with NaN entries (a NaN gradient reached Adam's second moment) skips
    the measurement, like a non-finite loss does (see :class:`SharpnessMonitor`).
    Everything else -- measurement set, train/eval mode, warm starts, DDP, the
    non-perturbation guarantee -- is that of :class:`SharpnessMonitor`, whose arguments
    this takes too.

    Args:
        every_n_steps: measure when ``trainer.global_step`` is a multiple of this.
        top_k: number of top eigenvalues of each operator.
        raw_sharpness: also measure :math:`\\lambda_i(H)` on the same measurement set (a
            second Lanczos run on the same Hessian operator).
        threshold: ``"auto"`` reads it from the optimizer
            (:func:`~lightning_eos.thresholds.preconditioned_threshold`), a number fixes it,
            ``None`` logs none.
        **others: see :class:`SharpnessMonitor`.

    Example:
        >>> monitor = PreconditionedSharpnessMonitor(every_n_steps=5)
        >>> monitor.state_key.startswith("PreconditionedSharpnessMonitor{'every_n_steps': 5")
        True
    """

    _threshold_is_sam_edge = False  # the threshold is on lambda_1(P^-1 H)

    def __init__(
        self,
        every_n_steps: int = 10,
        top_k: int = 1,
        raw_sharpness: bool = True,
        num_samples: int | None = 2048,
        chunk_size: int | None = None,
        loss_fn: LossFnType | None = None,
        dataloader: DataLoader | None = None,
        threshold: float | Literal["auto"] | None = "auto",
        mode: MeasurementMode = "train",
        tol: float = 1e-3,
        stop_rule: StopRule = "residual",
        max_iter: int = 100,
        hvp_method: HVPMethod = "double_backward",
        measure_at_start: bool = True,
        seed: int = 0,
        alignment: bool = False,
        progress_bar: bool = True,
        on_error: OnError = "skip",
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps,
            top_k=top_k,
            num_samples=num_samples,
            chunk_size=chunk_size,
            loss_fn=loss_fn,
            dataloader=dataloader,
            threshold=threshold,
            mode=mode,
            tol=tol,
            stop_rule=stop_rule,
            max_iter=max_iter,
            hvp_method=hvp_method,
            measure_at_start=measure_at_start,
            seed=seed,
            alignment=alignment,
            progress_bar=progress_bar,
            on_error=on_error,
        )
        self.raw_sharpness = raw_sharpness
        self._reading_threshold: float | None = None  # of the last measurement's reading
        self._tracker: Any = None

    def _optimizer(self, trainer: Trainer) -> Any:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"{type(self).__name__} needs exactly one optimizer, found "
                f"{len(trainer.optimizers)}."
            )
        return unwrap_optimizer(trainer.optimizers[0])

    @override
    def _check_optimizer(self, trainer: Trainer) -> None:
        optimizer = self._optimizer(trainer)
        try:  # an unknown optimizer fails here, at setup, not at the first measurement
            read_preconditioner(optimizer)
        except PreconditionerNotReadyError:
            pass

    @override
    def on_train_start(self, trainer: Trainer, pl_module: L.LightningModule) -> None:
        self._tracker = track_preconditioner(self._optimizer(trainer))
        super().on_train_start(trainer, pl_module)

    @override
    def teardown(self, trainer: Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._tracker is not None:  # also after an exception
            self._tracker.remove()
            self._tracker = None

    @override
    def _operators(self, trainer: Trainer, hessian: HessianOperator) -> dict[str, Any]:
        operators = {"hessian": hessian} if self.raw_sharpness else {}
        self._reading_threshold = None
        try:  # the optimizer may have been swapped (FreezePreconditioner): read it now
            reading = read_preconditioner(self._optimizer(trainer))
        except (PreconditionerNotReadyError, UnsupportedOptimizerError) as err:
            # nothing to read yet, or a state the registry cannot fold (training goes on)
            if trainer.global_step > 0:
                self._skips.warn_once(
                    f"no-preconditioner:{type(err).__name__}",
                    f"No preconditioned sharpness at step {trainer.global_step}: {err} (said "
                    "once; the raw sharpness is still measured).",
                )
            return operators
        self._reading_threshold = reading.threshold
        diagonal, shift = reading.flat(hessian.params)
        if bool(diagonal.isnan().any()) or bool((diagonal <= 0).any()):
            raise NonFiniteCurvatureError(
                f"The preconditioner of {type(self._optimizer(trainer)).__name__} holds NaN "
                "or non-positive entries (e.g. a NaN gradient reached Adam's exp_avg_sq)."
            )
        operators["preconditioned"] = PreconditionedOperator(hessian, diagonal, shift)
        return operators

    @override
    def _metrics(self, trainer: Trainer, results: dict[str, LanczosResult]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if "preconditioned" in results:
            values = results["preconditioned"].eigenvalues.tolist()
            metrics["eos/preconditioned_sharpness"] = values[0]
            metrics["eos/preconditioned_sharpness_error"] = results["preconditioned"].error_bound
            metrics.update(
                {f"eos/preconditioned_eig_{i}": v for i, v in enumerate(values[1:], start=2)}
            )
            threshold = self._preconditioned_threshold()
            if threshold is not None:
                metrics["eos/preconditioned_threshold"] = threshold
                if threshold > 0:
                    metrics["eos/preconditioned_sharpness_ratio"] = values[0] / threshold
        if "hessian" in results:
            values = results["hessian"].eigenvalues.tolist()
            metrics["eos/sharpness"] = values[0]
            metrics["eos/sharpness_error"] = results["hessian"].error_bound
            metrics.update({f"eos/eig_{i}": v for i, v in enumerate(values[1:], start=2)})
        return metrics

    @override
    def _thresholds_unmeasured(self, trainer: Trainer) -> dict[str, float]:
        threshold = self._preconditioned_threshold()  # "auto" is read at a measurement
        return {} if threshold is None else {"preconditioned_threshold": threshold}

    def _preconditioned_threshold(self) -> float | None:
        if self.threshold == "auto":
            return self._reading_threshold
        return None if self.threshold is None else float(self.threshold)
