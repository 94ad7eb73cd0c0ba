"""SharpnessMonitor: the top Hessian eigenvalues of the training loss, every N steps."""

from __future__ import annotations

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
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_eos.callbacks import _dashboard
from lightning_eos.callbacks._measurement_set import (
    LossFnType,
    measurement_chunks,
    training_step_loss,
    training_step_sandbox,
)
from lightning_eos.curvature import (
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
    UnsupportedOptimizerError,
    sam_threshold,
    stability_threshold,
)

if TYPE_CHECKING:
    from lightning.pytorch import Trainer


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
    ``eos/lanczos_iters``     Hessian-vector products spent on the measurement
    ``eos/loss``              the mean loss on the measurement set
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
    off; see :func:`lightning_eos.curvature.measurement_context`. With ``*-true`` half
    precision the parameters themselves are half precision, and so are the products (a
    warning says so).

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
        tol: Lanczos stops when every top-``k`` eigenvalue's error estimate is below
            ``tol`` relative.
        stop_rule: ``"gap"`` (sharp estimate) or ``"residual"`` (rigorous bound); see
            :func:`~lightning_eos.curvature.lanczos`.
        max_iter: at most this many Hessian-vector products per measurement.
        hvp_method: ``"double_backward"`` or ``"forward_over_reverse"`` (falls back).
        measure_at_start: also measure before the first step.
        seed: seed of the subset and of Lanczos' random start vector.
        alignment: also log the alignment of the top eigenvector with the gradients.
        progress_bar: show the ratio to the threshold in the progress bar.

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
        stop_rule: StopRule = "gap",
        max_iter: int = 100,
        hvp_method: HVPMethod = "double_backward",
        measure_at_start: bool = True,
        seed: int = 0,
        alignment: bool = False,
        progress_bar: bool = True,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be at least 1.")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k} must be at least 1.")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples={num_samples} must be positive or None.")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be positive or None.")
        if mode not in ("train", "eval"):
            raise ValueError(f"mode={mode!r}; choose 'train' or 'eval'.")
        if stop_rule not in ("gap", "residual"):
            raise ValueError(f"stop_rule={stop_rule!r}; choose 'gap' or 'residual'.")
        if not (threshold is None or threshold == "auto" or isinstance(threshold, (int, float))):
            raise ValueError(f"threshold={threshold!r}; use 'auto', a number or None.")
        self.every_n_steps, self.top_k = every_n_steps, top_k
        self.num_samples, self.chunk_size = num_samples, chunk_size
        self.loss_fn, self.dataloader, self.threshold = loss_fn, dataloader, threshold
        self.mode, self.tol, self.stop_rule, self.max_iter = mode, tol, stop_rule, max_iter
        self.hvp_method, self.measure_at_start, self.seed = hvp_method, measure_at_start, seed
        self.alignment, self.progress_bar = alignment, progress_bar
        self._k = top_k or 1  # top_k=None: 3 under SAM (paper 003 follows three), else 1
        self._extras: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self._last_step: int | None = None
        self._warm_starts: dict[str, torch.Tensor] = {}  # per operator, for the next Lanczos
        self._chunks: list[Any] | None = None

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
        dtypes = {p.dtype for p in pl_module.parameters() if p.requires_grad}
        if dtypes - {torch.float32, torch.float64}:
            rank_zero_warn(
                f"{type(self).__name__}: the parameters are {sorted(map(str, dtypes))}; "
                "Hessian-vector products are computed in that precision."
            )
        self._k = self.top_k or (3 if self._sam(trainer) is not None else 1)
        self._check_optimizer(trainer)

    @staticmethod
    def _sam(trainer: Trainer) -> Any:
        """The SAM optimizer being trained, or ``None``."""
        optimizers = trainer.optimizers  # the strategy's: torch optimizers, not wrappers
        return optimizers[0] if len(optimizers) == 1 and isinstance(optimizers[0], SAM) else None

    def _check_optimizer(self, trainer: Trainer) -> None:
        """Fail at setup, with a clear error, if ``threshold="auto"`` cannot be met."""
        if self.threshold == "auto":
            if len(trainer.optimizers) != 1:
                raise ValueError(
                    f"threshold='auto' needs exactly one optimizer, found "
                    f"{len(trainer.optimizers)}; pass a number or None."
                )
            if self._sam(trainer) is not None:
                sam_threshold(trainer.optimizers[0], grad_norm=1.0)  # plain SAM over GD only
            else:
                stability_threshold(trainer.optimizers[0])  # raises a clear error if unknown

    # --- schedule ---------------------------------------------------------------------

    @override
    def on_train_start(self, trainer: Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:  # every rank continues rank 0's warm start after a resume
            warm = {k: v.detach().cpu() for k, v in self._warm_starts.items()}
            self._warm_starts, self._last_step = trainer.strategy.broadcast(
                (warm, self._last_step), src=0
            )
        _dashboard.define_eos_metrics(trainer, self._k)  # before the first value is logged
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
        metrics = self.measure(trainer, pl_module)
        if metrics is None:
            return
        self.history.append({"step": step, **metrics})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

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
                    raise RuntimeError("Building the measurement set failed on another rank.")
            if error is not None:
                raise error
            self._chunks = chunks
        return self._chunks

    def _threshold_now(self, trainer: Trainer) -> float | None:
        if self.threshold == "auto":
            if "eos/sam_edge" in self._extras:
                return self._extras["eos/sam_edge"]
            return stability_threshold(trainer.optimizers[0])
        return None if self.threshold is None else float(self.threshold)

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
        self, trainer: Trainer, pl_module: L.LightningModule, reuse_graph: bool | None = None
    ) -> HessianOperator:
        return HessianOperator(
            pl_module,
            self._loss_fn(),
            self._measurement_set(trainer),
            method=self.hvp_method,
            reuse_graph=reuse_graph,
            prepare_chunk=trainer.strategy.batch_to_device,
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
            extras["eos/sam_edge"] = sam_threshold(sam, norm)
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
            return self._hessian(trainer, pl_module, reuse_graph=False).gradient()
        finally:
            with torch.no_grad():
                for p, value in zip(hessian.params, saved, strict=True):
                    p.copy_(value)

    def _operators(self, trainer: Trainer, hessian: HessianOperator) -> dict[str, Any]:
        """The symmetric operators to measure, by name (subclasses add their own)."""
        return {"hessian": hessian}

    def _spectra(
        self, trainer: Trainer, pl_module: L.LightningModule
    ) -> dict[str, LanczosResult] | None:
        """Top eigenpairs of every operator of :meth:`_operators`, on one measurement set."""
        self._measurement_set(trainer)  # built (and any error agreed) before the context
        distributed = trainer.world_size > 1
        results = {}
        try:
            with measurement_context(pl_module, self.mode), training_step_sandbox(pl_module):
                hessian = self._hessian(trainer, pl_module)
                for name, operator in self._operators(trainer, hessian).items():
                    results[name] = lanczos(
                        operator,
                        self._k,
                        init=self._warm_starts.get(name),
                        tol=self.tol,
                        max_iter=self.max_iter,
                        generator=torch.Generator().manual_seed(self.seed),
                        stop_rule=self.stop_rule,
                        agree=_rank_zero_value if distributed else None,
                    )
                self._extras = self._extra_metrics(trainer, pl_module, hessian, results)
        except NonFiniteCurvatureError as err:
            rank_zero_warn(
                f"{type(self).__name__} skipped the measurement at step "
                f"{trainer.global_step}: {err}"
            )
            return None
        for name, result in results.items():
            if not torch.isfinite(result.eigenvalues).all():
                rank_zero_warn(
                    f"Non-finite eigenvalue ({name}) at step {trainer.global_step}; the "
                    "measurement is skipped."
                )
                return None
            if not result.converged:
                rank_zero_warn(
                    f"Lanczos ({name}) did not reach tol={self.tol} in {self.max_iter} products "
                    f"at step {trainer.global_step}; logging the best estimate."
                )
        for name, result in results.items():
            self._warm_starts[name] = result.restart_vectors.detach()
        return results

    def measure(self, trainer: Trainer, pl_module: L.LightningModule) -> dict[str, float] | None:
        """Measure now and return the metrics (``None`` if the measurement was skipped).

        Under DDP this runs collectives: call it on every rank, never from a
        rank-zero-only function.
        """
        results = self._spectra(trainer, pl_module)
        if results is None or (not results and self._needs_spectra):
            return None  # skipped, or nothing to measure yet (no preconditioner at step 0)
        metrics = {**self._metrics(trainer, results), **self._extras}
        if results:
            metrics["eos/lanczos_iters"] = float(sum(r.num_iterations for r in results.values()))
        return metrics

    def _metrics(self, trainer: Trainer, results: dict[str, LanczosResult]) -> dict[str, float]:
        if "hessian" not in results:
            return {}
        eigenvalues = results["hessian"].eigenvalues.tolist()
        metrics = {"eos/sharpness": eigenvalues[0]}
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
        return {"last_step": self._last_step, "warm_starts": warm, "history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step")
        self._warm_starts = dict(state_dict.get("warm_starts", {}))
        if state_dict.get("warm_start") is not None:  # checkpoints before warm starts by operator
            self._warm_starts.setdefault("hessian", state_dict["warm_start"])
        self.history = list(state_dict.get("history", []))
