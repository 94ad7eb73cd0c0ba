"""SharpnessMonitor: the top Hessian eigenvalues of the training loss, every N steps."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
    XLAStrategy,
)
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_eos.callbacks import _dashboard
from lightning_eos.callbacks._arguments import check_choice, check_int, check_positive
from lightning_eos.callbacks._execution import measurement_execution
from lightning_eos.callbacks._faults import OnError, SkipLog, gather_errors
from lightning_eos.callbacks._history_file import log_eos_metrics, new_run_id
from lightning_eos.callbacks._measurement_set import (
    LossFnType,
    measurement_chunks,
    training_step_loss,
    training_step_sandbox,
)
from lightning_eos.curvature import (
    FailedOnAnotherProcessError,
    HessianOperator,
    HVPMethod,
    LanczosResult,
    MeasurementMode,
    NonFiniteCurvatureError,
    StopRule,
    flatten,
    lanczos,
    measurement_context,
    unflatten,
)
from lightning_eos.optim import SAM
from lightning_eos.thresholds import (
    UndefinedThresholdError,
    UnsupportedOptimizerError,
    sam_threshold,
    stability_threshold,
)

if TYPE_CHECKING:
    from lightning.pytorch import Trainer


#: measurements kept in a checkpoint: what resuming (and a catapult spanning the resume)
#: needs; the full history is in the logs and eos_history.csv
CHECKPOINT_HISTORY = 32

#: tol is divided by this without a warm start (the first measurement, after unfreezing):
#: a random start vector may hardly contain the top eigenvector, and the stricter residual
#: keeps Lanczos going until it shows (benchmarks/lambda1_reliability.py: lambda_2 was
#: reported in 0.25% of cold starts at tol and 0.04% at tol / 10, for 17% more products)
COLD_TOL_FACTOR = 10.0

# subclasses of the supported strategies whose parameters are partitioned or on XLA devices
_SHARDED_OR_XLA = (DeepSpeedStrategy, XLAStrategy, SingleDeviceXLAStrategy)


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


def _abs_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a @ b).abs() / (a.norm() * b.norm()).clamp_min(torch.finfo(a.dtype).tiny))


def _rank_zero_value(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    dist.broadcast(tensor, src=0)
    return tensor


class SharpnessMonitor(Callback):
    """Measure the sharpness :math:`\\lambda_1(H)` of the training loss every N steps.

    After every ``every_n_steps``-th optimizer step (and before the first one), the
    monitor computes the top ``top_k`` eigenvalues of the Hessian of the mean training
    loss over a fixed measurement set, by Lanczos on exact Hessian-vector products,
    warm-started from the previous measurement. It logs, at ``trainer.global_step``,
    through every attached logger:

    ========================  ===================================================
    ``eos/sharpness``         :math:`\\lambda_1(H)`
    ``eos/eig_2`` ..          :math:`\\lambda_2(H), \\dots, \\lambda_k(H)`
    ``eos/threshold``         the live optimizer's threshold (e.g. :math:`2/\\eta`)
    ``eos/sharpness_ratio``   :math:`\\lambda_1(H)` / threshold
    ``eos/sharpness_error``   a rigorous error bar: an eigenvalue of :math:`H` lies
                              within it of ``eos/sharpness`` (the Ritz residual,
                              see :func:`~lightning_eos.curvature.lanczos`)
    ``eos/lanczos_iters``     Hessian-vector products spent on the measurement
    ``eos/loss``              the mean loss on the measurement set
    ``eos/skipped_measurements``  measurements skipped so far (see below)
    ========================  ===================================================

    Besides these scalars (see :mod:`lightning_eos.callbacks._dashboard`):

    ==========================  ===================================================
    progress bar ``λ1/thr``     the last ``eos/sharpness_ratio``, while training
                                (Lightning's progress-bar metrics, no logger,
                                nothing computed; ``progress_bar=False`` hides it)
    run config ``eos``          every logger's hyperparameters at the start:
                                ``{"eos": {"optimizer": ..., "lr": ..., <other
                                hyperparameters of the first param group>,
                                "threshold": ...}}``; a threshold not known at the
                                start (SAM's before a measurement) is left out
    W&B metric definitions      ``eos/*`` against ``trainer/global_step``; summary
                                max of ``eos/sharpness`` and ``eos/eig_i``, last of
                                ratios and thresholds, min of ``eos/loss``
    W&B chart                   ``eos/charts/sharpness``: ``eos/sharpness`` and
                                ``eos/threshold`` (the SAM-edge under SAM) at the
                                end of training
    ==========================  ===================================================

    A failing W&B call (no network) warns and training goes on.

    Under :class:`~lightning_eos.optim.SAM` (over plain gradient descent) the threshold
    is the SAM-edge of paper 003, Prop. 2, from the full-batch gradient norm on the
    measurement set, also logged as ``eos/sam_edge`` (with ``eos/grad_norm``), and the
    top three eigenvalues are measured by default. ``alignment=True`` adds
    ``eos/grad_alignment`` :math:`= |\\cos(q_1, \\nabla L(w))|` and, under SAM,
    ``eos/sam_grad_alignment`` :math:`= |\\cos(q_1, \\nabla L(w + e))|` with
    :math:`e = \\rho\\,\\nabla L/\\lVert\\nabla L\\rVert` (paper 003, Fig. 6).

    The measurement does not change the run: parameters, optimizer state, ``.grad``,
    BatchNorm buffers and RNG streams are the same with and without the monitor. It
    runs in float32 with autocast disabled, on the unwrapped LightningModule. In
    ``mode="train"`` BatchNorm uses batch statistics (the training loss) and dropout is
    off; see :func:`lightning_eos.curvature.measurement_context`. Inputs are converted as
    Lightning converts training batches; under ``bf16-true``/``16-true`` the weights are
    measured in float32 (cast and cast back exactly), under ``64-true`` in float64, and a
    ``torch.compile``'d module runs eagerly (see :mod:`lightning_eos.callbacks._execution`).

    Nothing raised inside a measurement reaches training: the measurement is skipped with
    one warning per kind of failure, counted in ``eos/skipped_measurements``, and the run
    goes on (``on_error="raise"`` re-raises, for debugging). Where the threshold is
    undefined (a learning rate of 0 in a param group, groups with different thresholds)
    the sharpness is logged without threshold and ratio. When the set of trainable
    parameters changes (unfreezing), the next measurement starts cold.

    Args:
        every_n_steps: measure when ``trainer.global_step`` is a multiple of this.
        top_k: number of top eigenvalues; ``None``: 3 when training with SAM, else 1.
        num_samples: size of the measurement set, drawn once per fit, deterministically
            from ``seed``, from the training data; ``None`` for the whole training set.
        chunk_size: samples per forward pass in a measurement; ``None`` for the
            training loader's batch size. Chunks are weighted by their sample count.
        loss_fn: ``loss_fn(module, batch) -> mean loss``; default: the loss returned by
            ``training_step``, with ``self.log`` silenced and torchmetrics states restored
            (other side effects of ``training_step`` do happen; pass ``loss_fn`` then).
        dataloader: measure on this loader's data instead of the training data.
        threshold: ``"auto"`` reads it from the optimizer (see
            :func:`~lightning_eos.thresholds.stability_threshold`), a number fixes it,
            ``None`` logs no threshold.
        mode: ``"train"`` or ``"eval"`` module mode during measurements.
        tol: Lanczos stops when every top-``k`` eigenvalue's error is below ``tol``
            relative: rigorously (the residual, ``eos/sharpness_error`` <= ``tol`` times the
            sharpness) with the default ``stop_rule``.
        stop_rule: ``"residual"`` (the rigorous bound) or ``"gap"`` (a sharper estimate, about
            30% cheaper, that can accept a converged :math:`\\lambda_2`); see
            :func:`~lightning_eos.curvature.lanczos`.
        max_iter: at most this many Hessian-vector products per measurement.
        hvp_method: ``"double_backward"`` or ``"forward_over_reverse"`` (falls back).
        measure_at_start: also measure before the first step.
        seed: seed of the subset and of Lanczos' random start vectors.
        alignment: also log the alignment of the top eigenvector with the gradients.
        progress_bar: show the ratio to the threshold in the progress bar.
        on_error: ``"skip"`` a measurement that fails (warn, count, train on) or
            ``"raise"`` its error.

    Example:
        >>> monitor = SharpnessMonitor(every_n_steps=10, top_k=2)
        >>> monitor.state_key.startswith("SharpnessMonitor{'every_n_steps': 10, 'top_k': 2")
        True
    """

    _threshold_is_sam_edge = True  # under SAM, eos/threshold is the SAM-edge (on lambda_1(H))
    _needs_spectra = True  # a measurement without any eigenvalue logs nothing

    def __init__(
        self,
        every_n_steps: int = 10,
        top_k: int | None = None,
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
        check_int("every_n_steps", every_n_steps)
        check_int("top_k", top_k, optional=True)
        check_int("num_samples", num_samples, optional=True)
        check_int("chunk_size", chunk_size, optional=True)
        check_int("max_iter", max_iter)
        check_int("seed", seed, minimum=0)
        check_positive("tol", tol)
        check_choice("mode", mode, ("train", "eval"))
        check_choice("stop_rule", stop_rule, ("gap", "residual"))
        methods = ("double_backward", "forward_over_reverse", "finite_difference")
        check_choice("hvp_method", hvp_method, methods)
        check_choice("on_error", on_error, ("skip", "raise"))
        if threshold not in ("auto", None):
            try:
                check_positive("threshold", threshold)
            except ValueError:
                raise ValueError(
                    f"threshold={threshold!r}; use 'auto', a finite number > 0 or None."
                ) from None
        self.every_n_steps, self.top_k = every_n_steps, top_k
        self.num_samples, self.chunk_size = num_samples, chunk_size
        self.loss_fn, self.dataloader, self.threshold = loss_fn, dataloader, threshold
        self.mode, self.tol, self.stop_rule, self.max_iter = mode, tol, stop_rule, max_iter
        self.hvp_method, self.measure_at_start, self.seed = hvp_method, measure_at_start, seed
        self.alignment, self.progress_bar, self.on_error = alignment, progress_bar, on_error
        self._k = top_k or 1  # top_k=None: 3 under SAM (paper 003 follows three), else 1
        self._extras: dict[str, float] = {}
        #: the measurements of this process, oldest first (after a resume: the last
        #: CHECKPOINT_HISTORY of the checkpoint, then the new ones)
        self.history: list[dict[str, float]] = []
        self._last_step: int | None = None
        self._warm_starts: dict[str, torch.Tensor] = {}  # per operator, for the next Lanczos
        self._warm_params: list[tuple[str, tuple[int, ...]]] | None = None  # they belong to
        self._chunks: list[Any] | None = None
        self._skips = SkipLog()
        self.run_id: str | None = None  # see lightning_eos.callbacks._history_file

    @property
    def skipped_measurements(self) -> int:
        """Measurements skipped so far because they failed (``eos/skipped_measurements``)."""
        return self._skips.count

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps,
            top_k=self.top_k,
            num_samples=self.num_samples,
            chunk_size=self.chunk_size,
            mode=self.mode,
        )

    # --- validation -------------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer, pl_module: L.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        supported = isinstance(strategy, (SingleDeviceStrategy, DDPStrategy))
        if not supported or isinstance(strategy, _SHARDED_OR_XLA):
            raise ValueError(
                f"{type(self).__name__} supports single-device training and DDP (strategy="
                "'ddp', 'ddp_spawn', 'ddp_find_unused_parameters_true'), not "
                f"{type(strategy).__name__}: its parameters are sharded or replaced, so "
                "Hessian-vector products of the module are not the model's. For sharded "
                "parameters, HessianOperator(method='finite_difference') on gathered "
                "parameters is the building block."
            )
        if self.loss_fn is None and not pl_module.automatic_optimization:
            raise ValueError(
                f"{type(self).__name__} cannot call training_step under manual optimization; "
                "pass `loss_fn(module, batch)`."
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: L.LightningModule) -> None:
        self._chunks = None  # a new fit may train on new data
        self.run_id = self.run_id or new_run_id()  # a resumed run keeps its checkpoint's
        self._k = self.top_k or (3 if self._sam(trainer) is not None else 1)
        self._check_trainable(pl_module)
        self._check_optimizer(trainer)

    def _check_trainable(self, pl_module: L.LightningModule) -> None:
        """Fail at setup if there is nothing to measure, or fewer parameters than ``top_k``."""
        dim = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        if dim == 0:
            raise ValueError(
                f"{type(self).__name__}: every parameter of {type(pl_module).__name__} is "
                "frozen (requires_grad=False), so the training loss has no Hessian to "
                "measure. Unfreeze the parameters you train before fit starts."
            )
        if self._k > dim:
            raise ValueError(
                f"{type(self).__name__}: top_k={self._k} exceeds the {dim} trainable "
                "parameters (the Hessian's side); lower top_k."
            )

    @staticmethod
    def _sam(trainer: Trainer) -> Any:
        """The SAM optimizer being trained, or ``None``."""
        optimizers = trainer.optimizers  # the strategy's: torch optimizers, not wrappers
        return optimizers[0] if len(optimizers) == 1 and isinstance(optimizers[0], SAM) else None

    def _check_optimizer(self, trainer: Trainer) -> None:
        """Fail at setup, with a clear error, if ``threshold="auto"`` cannot be met.

        An unsupported optimizer fails here. A threshold that is only undefined for the
        current settings (a learning rate of 0 at the start of a warmup, groups with
        different rates) does not: the sharpness is measured without it.
        """
        if self.threshold == "auto":
            if len(trainer.optimizers) != 1:
                raise ValueError(
                    f"threshold='auto' needs exactly one optimizer, found "
                    f"{len(trainer.optimizers)}; pass a number or None."
                )
            try:
                if self._sam(trainer) is not None:
                    sam_threshold(trainer.optimizers[0], grad_norm=1.0)  # plain SAM over GD
                else:
                    stability_threshold(trainer.optimizers[0])  # a clear error if unknown
            except UndefinedThresholdError:
                pass

    # --- schedule ---------------------------------------------------------------------

    @override
    def on_train_start(self, trainer: Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:  # every rank continues rank 0's warm start after a resume
            warm = {k: v.detach().cpu() for k, v in self._warm_starts.items()}
            self._warm_starts, self._last_step = trainer.strategy.broadcast(
                (warm, self._last_step), src=0
            )
        _dashboard.define_eos_metrics(trainer, self._k)  # before the first value is logged
        self._measurement_set(trainer)  # a loader we cannot measure on fails here, at setup
        if self.measure_at_start:
            self._maybe_measure(trainer, pl_module)
        elif self._last_step is None:
            self._last_step = trainer.global_step  # step 0 is not measured at batch end either
        _dashboard.log_run_config(trainer, self)

    @override
    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._maybe_measure(trainer, pl_module)
        if self.progress_bar:
            _dashboard.show_in_progress_bar(pl_module, self.history)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: L.LightningModule) -> None:
        _dashboard.log_charts(trainer, self)

    def _maybe_measure(self, trainer: Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step == self._last_step:
            return  # also skips the extra batches of gradient accumulation
        self._last_step = step
        metrics = self._measure_or_skip(trainer, pl_module)
        if metrics is None:
            return
        self.history.append({"step": step, **metrics})
        log_eos_metrics(trainer, step, metrics)

    def _measure_or_skip(
        self, trainer: Trainer, pl_module: L.LightningModule
    ) -> dict[str, float] | None:
        """:meth:`measure`, with any failure turned into a skipped, counted measurement.

        Under DDP every rank calls it and learns every rank's error (one collective).
        """
        error: Exception | None = None
        metrics = None
        try:
            metrics = self.measure(trainer, pl_module)
        except Exception as err:  # noqa: BLE001 - a monitor must not stop training
            error = err
        errors = gather_errors(trainer, error)
        if not errors:
            return None if metrics is None else {**metrics, **self._skip_count()}
        if self.on_error == "raise":
            if error is not None:
                raise error
            raise FailedOnAnotherProcessError(f"The measurement failed on other ranks: {errors}")
        self._skips.skip(type(self).__name__, trainer.global_step, errors, error)
        log_eos_metrics(trainer, trainer.global_step, self._skip_count())
        return None

    def _skip_count(self) -> dict[str, float]:
        return {"eos/skipped_measurements": float(self.skipped_measurements)}

    # --- measurement ------------------------------------------------------------------

    def _loss_fn(self) -> LossFnType:
        return self.loss_fn or training_step_loss

    def _measurement_set(self, trainer: Trainer) -> list[Any]:
        if self._chunks is None:
            error: Exception | None = None
            try:
                loader = self.dataloader or trainer.train_dataloader
                if loader is None:
                    raise ValueError(f"{type(self).__name__} found no training data to measure on.")
                chunks = measurement_chunks(
                    loader,
                    self.num_samples,
                    self.chunk_size,
                    self.seed,
                    rank=trainer.global_rank,
                    world_size=trainer.world_size,
                )
            except Exception as err:  # noqa: BLE001 - raised below, once every rank knows
                error = err
            if trainer.world_size > 1:  # a rank that failed must not leave the others waiting
                flag = torch.tensor([float(error is not None)], device=trainer.strategy.root_device)
                if _all_reduce_sum(flag).item() > 0 and error is None:
                    raise FailedOnAnotherProcessError(
                        "Building the measurement set failed on another rank."
                    )
            if error is not None:
                raise error
            self._chunks = chunks
        return self._chunks

    def _threshold_now(self, trainer: Trainer) -> float | None:
        if self.threshold == "auto":
            if self._threshold_is_sam_edge and self._sam(trainer) is not None:
                return self._extras.get("eos/sam_edge")  # measured with the gradient norm
            return self._auto_threshold(trainer, stability_threshold, trainer.optimizers[0])
        return None if self.threshold is None else float(self.threshold)

    def _auto_threshold(self, trainer: Trainer, formula: Any, *args: Any) -> float | None:
        """``formula(*args)``, or ``None`` (with a warning, once) where it is undefined.

        A learning rate of 0 or param groups with different thresholds leave the threshold
        undefined; a threshold of 0 or below (weight decay above what the step can take)
        means the step is unstable at any sharpness. Either way no ratio is logged.
        """
        try:
            threshold = float(formula(*args))
        except UndefinedThresholdError as err:
            self._skips.warn_once(
                "undefined-threshold",
                f"{type(self).__name__}: no threshold at step {trainer.global_step} ({err}); "
                "the sharpness is logged without threshold and ratio while this lasts.",
            )
            return None
        if threshold <= 0:
            self._skips.warn_once(
                "nonpositive-threshold",
                f"{type(self).__name__}: the optimizer's threshold is {threshold:.4g} <= 0 at "
                f"step {trainer.global_step}: its step is unstable at any sharpness (e.g. "
                "weight decay above 2/lr). No ratio is logged.",
            )
        return threshold

    def _config_thresholds(self, trainer: Trainer) -> dict[str, float]:
        """The thresholds for the run config: measured now, else known without measuring."""
        latest = self.history[-1] if self.history else None
        if latest is not None and latest["step"] == trainer.global_step:
            names = _dashboard.CONFIG_THRESHOLDS
            return {name: latest[key] for key, name in names.items() if key in latest}
        return self._thresholds_unmeasured(trainer)

    def _thresholds_unmeasured(self, trainer: Trainer) -> dict[str, float]:
        """The threshold on :math:`\\lambda_1(H)` if the optimizer tells it (SAM's does not)."""
        try:
            threshold = self._threshold_now(trainer)
        except (UnsupportedOptimizerError, ValueError):
            return {}
        return {} if threshold is None else {"threshold": threshold}

    def _hessian(
        self,
        trainer: Trainer,
        pl_module: L.LightningModule,
        prepare: Any,
        reuse_graph: bool | None = None,
    ) -> HessianOperator:
        return HessianOperator(
            pl_module,
            self._loss_fn(),
            self._measurement_set(trainer),
            method=self.hvp_method,
            reuse_graph=reuse_graph,
            prepare_chunk=prepare,
            seed=self.seed,
            reduce=_all_reduce_sum if trainer.world_size > 1 else None,
        )

    def _extra_metrics(
        self,
        trainer: Trainer,
        pl_module: L.LightningModule,
        hessian: HessianOperator,
        results: dict[str, LanczosResult],
    ) -> dict[str, float]:
        """Gradient quantities, inside the measurement: the SAM-edge and the alignments.

        Paper 003: the SAM-edge (Prop. 2) needs the full-batch gradient norm at :math:`w`;
        Fig. 6 compares the top eigenvector :math:`q_1` with :math:`\\nabla L(w)` and with
        SAM's gradient :math:`\\nabla L(w + e)`, :math:`e = \\rho\\, g/\\lVert g\\rVert`.
        """
        extras = {"eos/loss": hessian.loss()}
        sam = self._sam(trainer)
        if sam is None and not self.alignment:
            return extras
        gradient = hessian.gradient()
        norm = float(gradient.norm())
        extras["eos/grad_norm"] = norm
        if sam is not None and self.threshold == "auto" and self._threshold_is_sam_edge:
            edge = self._auto_threshold(trainer, sam_threshold, sam, norm)
            if edge is not None:
                extras["eos/sam_edge"] = edge
        if not self.alignment or "hessian" not in results:
            return extras
        q1 = results["hessian"].eigenvectors[0].to(gradient)
        extras["eos/grad_alignment"] = _abs_cosine(q1, gradient)
        if sam is not None:  # SAM's own ascent step, per group (rho, ASAM)
            grads = [g.detach() for g in unflatten(gradient, hessian.params)]
            shift = flatten(sam.perturbation(list(hessian.params), grads))
            shifted = self._gradient_at(trainer, pl_module, hessian, shift)
            extras["eos/sam_grad_alignment"] = _abs_cosine(q1, shifted)
        return extras

    def _gradient_at(
        self, trainer: Trainer, pl_module: L.LightningModule, hessian: HessianOperator, shift: Any
    ) -> torch.Tensor:
        """:math:`\\nabla L(w + \\text{shift})` on the measurement set; :math:`w` is restored."""
        saved = [p.detach().clone() for p in hessian.params]
        with torch.no_grad():
            for p, s in zip(hessian.params, unflatten(shift, hessian.params), strict=True):
                p.add_(s)
        try:
            return self._hessian(trainer, pl_module, hessian._prepare, reuse_graph=False).gradient()
        finally:
            with torch.no_grad():
                for p, value in zip(hessian.params, saved, strict=True):
                    p.copy_(value)

    def _operators(self, trainer: Trainer, hessian: HessianOperator) -> dict[str, Any]:
        """The symmetric operators to measure, by name (subclasses add their own)."""
        return {"hessian": hessian}

    def _spectra(self, trainer: Trainer, pl_module: L.LightningModule) -> dict[str, LanczosResult]:
        """Top eigenpairs of every operator of :meth:`_operators`, on one measurement set."""
        self._measurement_set(trainer)  # built (and any error agreed) before the context
        self._forget_warm_starts_of_other_parameters(trainer, pl_module)
        distributed = trainer.world_size > 1
        # fresh random directions at every step, the same on every rank and after a resume
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + trainer.global_step)
        results = {}
        with (
            measurement_execution(trainer, pl_module) as prepare,
            measurement_context(pl_module, self.mode),
            training_step_sandbox(pl_module),
        ):
            hessian = self._hessian(trainer, pl_module, prepare)
            for name, operator in self._operators(trainer, hessian).items():
                warm = self._warm_starts.get(name)
                results[name] = lanczos(
                    operator,
                    self._k,
                    init=warm,
                    tol=self.tol if warm is not None else self.tol / COLD_TOL_FACTOR,
                    max_iter=self.max_iter,
                    generator=generator,
                    stop_rule=self.stop_rule,
                    agree=_rank_zero_value if distributed else None,
                )
            self._extras = self._extra_metrics(trainer, pl_module, hessian, results)
        for name, result in results.items():
            if not torch.isfinite(result.eigenvalues).all():
                raise NonFiniteCurvatureError(f"Lanczos ({name}) found a non-finite eigenvalue.")
            if not result.converged:
                self._skips.warn_once(
                    f"not-converged:{name}",
                    f"Lanczos ({name}) did not reach tol={self.tol} in {self.max_iter} "
                    f"products at step {trainer.global_step}; the best estimate is logged with "
                    "its error bar (eos/*_error). Raise max_iter for a tighter value.",
                )
        for name, result in results.items():
            self._warm_starts[name] = result.restart_vectors.detach()
        return results

    def _forget_warm_starts_of_other_parameters(
        self, trainer: Trainer, pl_module: L.LightningModule
    ) -> None:
        """Start Lanczos cold when the trainable parameters are not those of the warm start.

        Unfreezing a backbone, freezing a layer or resuming into a model with another
        trainable set changes the space the saved eigenvectors live in.
        """
        named = pl_module.named_parameters()
        trainable = [(name, tuple(p.shape)) for name, p in named if p.requires_grad]
        dim = sum(math.prod(shape) for _, shape in trainable)
        known = self._warm_params if self._warm_params is not None else trainable
        changed = known != trainable or any(v.shape[-1] != dim for v in self._warm_starts.values())
        if changed and self._warm_starts:
            self._skips.warn_once(
                "trainable-changed",
                f"{type(self).__name__}: the trainable parameters changed before step "
                f"{trainer.global_step} (e.g. unfreezing); Lanczos starts cold there (said once).",
            )
            self._warm_starts = {}
        self._warm_params = trainable

    def measure(self, trainer: Trainer, pl_module: L.LightningModule) -> dict[str, float] | None:
        """Measure now and return the metrics (``None``: nothing to measure yet).

        Raises whatever went wrong; the training hooks turn that into a skipped measurement
        (:meth:`_measure_or_skip`). Under DDP this runs collectives: call it on every rank,
        never from a rank-zero-only function.
        """
        results = self._spectra(trainer, pl_module)
        if not results and self._needs_spectra:
            return None  # nothing to measure yet (no preconditioner before the first step)
        metrics = {**self._metrics(trainer, results), **self._extras}
        if results:
            metrics["eos/lanczos_iters"] = float(sum(r.num_iterations for r in results.values()))
        return metrics

    def _metrics(self, trainer: Trainer, results: dict[str, LanczosResult]) -> dict[str, float]:
        if "hessian" not in results:
            return {}
        hessian = results["hessian"]
        eigenvalues = hessian.eigenvalues.tolist()
        metrics = {"eos/sharpness": eigenvalues[0], "eos/sharpness_error": hessian.error_bound}
        metrics.update({f"eos/eig_{i}": v for i, v in enumerate(eigenvalues[1:], start=2)})
        threshold = self._threshold_now(trainer)
        if threshold is not None:
            metrics["eos/threshold"] = threshold
            if threshold > 0:  # the SAM-edge is 0 at a zero gradient
                metrics["eos/sharpness_ratio"] = eigenvalues[0] / threshold
        return metrics

    # --- persistence ------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        warm = {k: v.detach().cpu() for k, v in self._warm_starts.items()}
        return {
            "last_step": self._last_step,
            "warm_starts": warm,
            "warm_params": self._warm_params,
            "history": self.history[-CHECKPOINT_HISTORY:],
            "skipped_measurements": self.skipped_measurements,
            "run_id": self.run_id,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step")
        self._warm_starts = dict(state_dict.get("warm_starts", {}))
        if state_dict.get("warm_start") is not None:  # checkpoints before warm starts by operator
            self._warm_starts.setdefault("hessian", state_dict["warm_start"])
        self._warm_params = state_dict.get("warm_params")
        self.history = list(state_dict.get("history", []))[-CHECKPOINT_HISTORY:]
        self._skips.count = int(state_dict.get("skipped_measurements", 0))
        self.run_id = state_dict.get("run_id") or self.run_id
