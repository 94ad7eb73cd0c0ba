"""IASMonitor: the interaction-aware sharpness of SGD against its edge 2 rho_b / eta."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler
from typing_extensions import override

from lightning_eos.callbacks._arguments import check_int
from lightning_eos.callbacks._faults import OnError
from lightning_eos.callbacks._measurement_set import LossFnType, metric_states_restored
from lightning_eos.callbacks.sharpness import SharpnessMonitor
from lightning_eos.curvature import (
    GradientMoments,
    HessianOperator,
    HVPMethod,
    LanczosResult,
    MeasurementMode,
    StopRule,
    expected_loss_change,
    has_batchnorm,
    interaction_aware_sharpness,
)
from lightning_eos.thresholds import (
    UndefinedThresholdError,
    UnsupportedOptimizerError,
    sgd_ias_threshold,
)

if TYPE_CHECKING:
    from lightning.pytorch import Trainer


def _full_batch(trainer: Trainer) -> bool:
    from lightning_eos.callbacks.full_batch import FullBatchAccumulation

    return any(isinstance(c, FullBatchAccumulation) for c in trainer.callbacks)


def _loader_batch(loader: Any) -> tuple[int | None, bool, int | None, str]:
    """(batch size, with replacement, dataset size, how batches are drawn) of a loader.

    How: ``"random"`` (uniform draws: ``RandomSampler``, shuffling ``DistributedSampler``),
    ``"sequential"`` (a fixed partition) or ``"other"`` (any other sampler).
    """
    if not isinstance(loader, DataLoader):
        return None, False, None, "other"
    size = loader.batch_size
    if size is None and loader.batch_sampler is not None:
        size = getattr(loader.batch_sampler, "batch_size", None)
    sampler = loader.sampler
    replacement = False
    if isinstance(sampler, RandomSampler):
        how, replacement = "random", bool(sampler.replacement)
    elif isinstance(sampler, DistributedSampler):
        how = "random" if sampler.shuffle else "sequential"
    elif isinstance(sampler, SequentialSampler):
        how = "sequential"
    else:
        how = "other"
    try:
        n = len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        n = None
    return size, replacement, n, how


class IASMonitor(SharpnessMonitor):
    """The interaction-aware sharpness (IAS) of minibatch SGD, every N steps (paper 004).

    For SGD with batches of :math:`b` drawn from :math:`n` training samples, the edge
    of stability is not :math:`\\lambda_1(H) = 2/\\eta` but

    .. math::

        \\lVert H\\rVert_{S_b} = \\frac{\\operatorname{tr}(HS_b)}{\\operatorname{tr}(S_b)}
        = \\frac{2\\rho_b}{\\eta}, \\qquad
        \\rho_b = \\frac{\\operatorname{tr}(S_n)}{\\operatorname{tr}(S_b)},

    with :math:`S_b` the second moment of the batch gradient (Definitions 1-2, eq. 16).
    From per-sample gradients on the measurement set (see
    :mod:`lightning_eos.curvature.gradient_moments` for every formula) it logs, at
    ``trainer.global_step``:

    ==============================  ====================================================
    ``eos/ias``                     :math:`\\lVert H\\rVert_{S_b}`
    ``eos/ias_threshold``           :math:`2\\rho_b/\\eta` (times the momentum factor)
    ``eos/ias_ratio``               ``eos/ias`` / ``eos/ias_threshold``
    ``eos/ias_instability``         :math:`\\operatorname{tr}(HS_b)/\\operatorname{tr}(S_n)`,
                                    unstable above :math:`2/\\eta` (Theorem 1)
    ``eos/ias_stderr``              standard error of ``eos/ias`` (sampled
                                    :math:`\\operatorname{tr}(HS_1)`; 0 when exact)
    ``eos/rho_b``, ``eos/rho``      :math:`\\rho_b` and :math:`\\rho = \\rho_1`
    ``eos/trace_S_b``               :math:`\\operatorname{tr}(S_b)`; also
                                    ``eos/trace_S_1``, ``eos/trace_S_n`` (=
                                    :math:`\\lVert\\nabla L\\rVert^2`), ``eos/trace_HS_b``
    ``eos/loss``                    the loss on the measurement set
    ==============================  ====================================================

    The progress bar shows the last ``eos/ias_ratio`` as ``IAS/thr`` (and ``λ1/thr`` with
    ``sharpness=True``); W&B gets the chart ``eos/charts/ias`` (and
    ``eos/charts/sharpness``). See :class:`SharpnessMonitor`.

    ``sharpness=True`` (default) also measures :math:`\\lambda_1(H)` as
    :class:`SharpnessMonitor` does (``eos/sharpness``, ``eos/threshold`` = :math:`2/\\eta`,
    ...), so one plot shows :math:`\\lambda_1` above :math:`2/\\eta` and the IAS at it
    (Fig. 4). ``loss_change=True`` adds ``eos/normalized_loss_change``
    :math:`(\\mathbb{E}_\\xi[L_{t+1}] - L_t)/\\operatorname{tr}(S_n)`, from
    ``loss_change_samples`` SGD steps of batch :math:`b` drawn from the measurement set
    and taken on a restored copy of the parameters (one exact step for full-batch GD),
    next to ``eos/predicted_loss_change`` :math:`\\tfrac{\\eta^2}{2}(\\operatorname{tr}
    (HS_b)/\\operatorname{tr}(S_n) - 2/\\eta)` (eq. 7).

    Full-batch GD is :math:`b = n`: :math:`\\rho_n = 1` and the IAS is
    :math:`g^\\top Hg/\\lVert g\\rVert^2`.

    The measurement honours the contract of :class:`SharpnessMonitor` (the run is
    bit-identical with and without it; float32 without autocast; DDP shards the
    per-sample gradients like the Hessian products and logs the single-process values).
    The measurement set defaults to the *whole* training set (``num_samples=None``): on a
    subset, :math:`\\lVert\\bar g\\rVert^2` of the subset overestimates
    :math:`\\operatorname{tr}(S_n)` by about :math:`\\operatorname{tr}(C_1)/N`.

    Full-batch GD needs only :math:`\\nabla L` and one product (no ``eos/rho`` or
    ``eos/trace_S_1`` then). Minibatch SGD needs per-sample gradients, which are
    undefined with BatchNorm in train mode, so such a model is refused when training
    starts; ``mode="eval"`` measures the eval-mode loss (running statistics) instead.
    A loss that couples samples some other way raises
    :class:`~lightning_eos.curvature.BatchCoupledLossError` at the first measurement.

    Args:
        every_n_steps: measure when ``trainer.global_step`` is a multiple of this.
        batch_size: :math:`b`, the samples per optimizer step over all processes;
            default: the training loader's batch size, times the number of processes
            and ``accumulate_grad_batches`` (capped at :math:`n`).
        replacement: batches drawn with replacement; default: read from the loader's
            ``RandomSampler``. Samplers other than ``RandomSampler``,
            ``DistributedSampler`` and ``SequentialSampler`` need ``replacement`` and
            ``population`` given (a ``SubsetRandomSampler`` draws from its subset); an
            unshuffled loader gets a warning (a fixed partition is not a uniform draw).
        population: :math:`n`; default: the training dataset's length.
        samples: per-sample gradients drawn (afresh every measurement, seeded by ``seed``
            and the step) to estimate :math:`\\operatorname{tr}(HS_1)`; ``None``: all
            (exact, one Hessian-vector product per sample).
        sharpness: also measure :math:`\\lambda_1(H)` (``top_k`` eigenvalues).
        loss_change: also log the measured and predicted one-step loss change (plain SGD
            only: no momentum or weight decay).
        loss_change_samples: SGD steps averaged for ``eos/normalized_loss_change``.
        per_sample_chunk: per-sample gradients held in memory at once.
        threshold: ``"auto"`` reads :math:`\\eta` and momentum from the optimizer (torch
            SGD without weight decay); ``None`` logs no thresholds.
        Others: as for :class:`SharpnessMonitor`.

    Example:
        >>> monitor = IASMonitor(every_n_steps=25, batch_size=128, samples=32)
        >>> monitor.state_key.startswith("IASMonitor{'every_n_steps': 25")
        True
    """

    _threshold_is_sam_edge = False
    _needs_spectra = False  # sharpness=False: the IAS alone

    def __init__(
        self,
        every_n_steps: int = 10,
        batch_size: int | None = None,
        *,
        replacement: bool | None = None,
        population: int | None = None,
        samples: int | None = 64,
        sharpness: bool = True,
        top_k: int | None = 1,
        loss_change: bool = False,
        loss_change_samples: int = 16,
        per_sample_chunk: int = 64,
        num_samples: int | None = None,
        chunk_size: int | None = None,
        loss_fn: LossFnType | None = None,
        dataloader: DataLoader | None = None,
        threshold: Literal["auto"] | None = "auto",
        mode: MeasurementMode = "train",
        tol: float = 1e-3,
        stop_rule: StopRule = "residual",
        max_iter: int = 100,
        hvp_method: HVPMethod = "double_backward",
        measure_at_start: bool = True,
        seed: int = 0,
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
            progress_bar=progress_bar,
            on_error=on_error,
        )
        if threshold not in ("auto", None):
            raise ValueError(f"threshold={threshold!r}; use 'auto' or None.")
        check_int("batch_size", batch_size, optional=True)
        check_int("population", population, optional=True)
        check_int("samples", samples, minimum=2, optional=True)
        check_int("loss_change_samples", loss_change_samples)
        check_int("per_sample_chunk", per_sample_chunk)
        self.batch_size, self.replacement, self.population = batch_size, replacement, population
        self.samples, self.sharpness, self.loss_change = samples, sharpness, loss_change
        self.loss_change_samples, self.per_sample_chunk = loss_change_samples, per_sample_chunk
        self._sampling: tuple[int, bool, int] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps,
            batch_size=self.batch_size,
            num_samples=self.num_samples,
            chunk_size=self.chunk_size,
            mode=self.mode,
        )

    # --- validation -------------------------------------------------------------------

    @override
    def on_train_start(self, trainer: Trainer, pl_module: L.LightningModule) -> None:
        b, replacement, population = self._batch_sampling(trainer)
        full_batch = b == population and not replacement
        if self.mode == "train" and has_batchnorm(pl_module) and not full_batch:
            raise ValueError(
                "IASMonitor needs per-sample gradients for minibatch SGD, which are undefined "
                "for BatchNorm in train mode (each sample is normalized with its batch's "
                "statistics). Use IASMonitor(mode='eval') to measure the eval-mode loss with "
                "running statistics, or a model without BatchNorm. (Full-batch GD needs no "
                "per-sample gradient and is measured in train mode.)"
            )
        super().on_train_start(trainer, pl_module)

    @override
    def _check_optimizer(self, trainer: Trainer) -> None:
        if self.threshold == "auto" or self.loss_change:
            if len(trainer.optimizers) != 1:
                raise ValueError(
                    f"IASMonitor needs exactly one optimizer, found {len(trainer.optimizers)}."
                )
        if self.threshold == "auto":
            try:
                sgd_ias_threshold(trainer.optimizers[0], rho_b=1.0)  # a clear error if unknown
            except UndefinedThresholdError:
                pass  # a learning rate of 0 for now: the IAS is logged without its edge
        if self.loss_change:
            self._lr(trainer)
            optimizer = trainer.optimizers[0]
            plain = type(optimizer) is torch.optim.SGD and not any(
                g.get("momentum", 0) or g.get("weight_decay", 0) for g in optimizer.param_groups
            )
            if not plain:
                raise ValueError(
                    "loss_change=True takes plain SGD steps theta - eta g (eq. 7); the "
                    f"optimizer is {type(optimizer).__name__} with momentum or weight decay."
                )

    @staticmethod
    def _lr(trainer: Trainer) -> float:
        rates = {float(g["lr"]) for g in trainer.optimizers[0].param_groups}
        if len(rates) != 1:
            raise UnsupportedOptimizerError(
                f"IASMonitor needs one learning rate, found {sorted(rates)} across param groups."
            )
        return rates.pop()

    def _batch_sampling(self, trainer: Trainer) -> tuple[int, bool, int]:
        """(b, replacement, n): the global batch of one optimizer step and its population."""
        if self._sampling is None:
            size, replacement, n, how = _loader_batch(trainer.train_dataloader)
            if how == "other" and (self.population is None or self.replacement is None):
                sampler = getattr(trainer.train_dataloader, "sampler", None)
                raise ValueError(
                    f"IASMonitor cannot tell how {type(sampler).__name__} draws batches; the "
                    "IAS assumes uniform draws of b from n samples. Pass `population=` and "
                    "`replacement=` (and `dataloader=` to measure on the samples drawn from)."
                )
            population = self.population or n
            if population is None:
                raise ValueError("IASMonitor cannot tell the training set size; pass `population`.")
            if how != "other" and n is not None and population < n:
                raise ValueError(
                    f"IASMonitor(population={population}) is smaller than the training set "
                    f"({n} samples) that the loader's {how} sampler draws from; the IAS edge "
                    "2 rho_b / eta needs the size of the set batches are drawn from. Leave "
                    "population=None, or draw from a subset with a sampler of that size."
                )
            b = self.batch_size
            if b is None and _full_batch(trainer):
                b = population  # every step accumulates all chunks of the training set
            if b is None:
                if size is None:
                    raise ValueError("IASMonitor cannot read the batch size; pass `batch_size`.")
                b = size * trainer.world_size * trainer.accumulate_grad_batches
            replacement = self.replacement if self.replacement is not None else replacement
            b = b if replacement else min(b, population)
            if how == "sequential" and b < population:  # b = n: a full pass, in any order
                rank_zero_warn(
                    "IASMonitor: the training batches are a fixed partition (no shuffling), "
                    "not uniform draws; the IAS describes uniformly drawn batches of b."
                )
            self._sampling = (b, replacement, population)
        return self._sampling

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._sampling = None

    # --- measurement ------------------------------------------------------------------

    def _offsets(self, trainer: Trainer, hessian: HessianOperator) -> list[int]:
        """Global index of each local chunk's first sample (chunk j is on rank j mod world)."""
        world, rank = trainer.world_size, trainer.global_rank
        loader = self.dataloader or trainer.train_dataloader
        nominal = self.chunk_size or getattr(loader, "batch_size", None) or hessian.num_samples
        return [(rank + q * world) * nominal for q in range(len(hessian.chunks))]

    @override
    def _operators(self, trainer: Trainer, hessian: HessianOperator) -> dict[str, Any]:
        return {"hessian": hessian} if self.sharpness else {}

    @override
    def _thresholds_unmeasured(self, trainer: Trainer) -> dict[str, float]:
        # the IAS edge needs rho_b, which takes a measurement
        return super()._thresholds_unmeasured(trainer) if self.sharpness else {}

    @override
    def _extra_metrics(
        self,
        trainer: Trainer,
        pl_module: L.LightningModule,
        hessian: HessianOperator,
        results: dict[str, LanczosResult],
    ) -> dict[str, float]:
        extras = super()._extra_metrics(trainer, pl_module, hessian, results)
        b, replacement, population = self._batch_sampling(trainer)
        moments = GradientMoments(
            hessian,
            offsets=self._offsets(trainer, hessian),
            per_sample_chunk=self.per_sample_chunk,
            isolate=lambda: metric_states_restored(pl_module),
        )
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + trainer.global_step)
        result = interaction_aware_sharpness(
            hessian,
            b,
            moments=moments,
            population=population,
            replacement=replacement,
            samples=self.samples,
            generator=generator,
        )
        extras.update(
            {
                "eos/ias": result.ias,
                "eos/ias_instability": result.instability,
                "eos/ias_stderr": result.ias_stderr,
                "eos/rho_b": result.rho_b,
                "eos/trace_S_b": result.trace_S_b,
                "eos/trace_S_n": result.trace_S_n,
                "eos/trace_HS_b": result.trace_HS_b,
            }
        )
        if result.hs1_samples:  # full-batch GD does not look at per-sample gradients
            extras.update({"eos/rho": result.rho, "eos/trace_S_1": result.trace_S_1})
        if self.threshold == "auto":
            optimizer = trainer.optimizers[0]
            edge = self._auto_threshold(trainer, sgd_ias_threshold, optimizer, result.rho_b)
            if edge is not None:
                extras["eos/ias_threshold"] = edge
                if edge > 0:
                    extras["eos/ias_ratio"] = result.ias / edge
        if self.loss_change:
            lr = self._lr(trainer)
            on_the_set = replace(result, population=hessian.num_samples)  # batches drawn here
            step_batch = b if replacement else min(b, hessian.num_samples)
            change, _ = expected_loss_change(
                hessian,
                lr,
                step_batch,
                moments=moments,
                replacement=replacement,
                samples=self.loss_change_samples,
                generator=generator,
            )
            extras["eos/normalized_loss_change"] = change / result.trace_S_n
            extras["eos/predicted_loss_change"] = on_the_set.at_batch_size(
                step_batch
            ).predicted_loss_change(lr)
        return extras
