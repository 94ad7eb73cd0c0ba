"""LearningRateWarmup: paper 001's linear warmup as a callback, optionally stopped at the MSS."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_eos.callbacks._events import new_measurement, sharpness_monitor
from lightning_eos.optim import unwrap_optimizer

if TYPE_CHECKING:
    from lightning.pytorch import Trainer


class LearningRateWarmup(Callback):
    """Set every param group's lr to a linear warmup, for modules with their own optimizers.

    Before optimizer step :math:`t` (``trainer.global_step``) the lr is
    :math:`\\eta_i + (\\eta_f - \\eta_i)\\min(t, T)/T` (paper 001, App. B: :math:`\\eta_i =
    10^{-8}`, :math:`T = \\eta_f \\cdot 10^6`), the schedule of
    :class:`lightning_eos.optim.LinearWarmup`, which is the scheduler form. The callback
    form needs no change to ``configure_optimizers``; do not combine it with another lr
    scheduler.

    ``stop_at_threshold=True`` ends the warmup at the first measurement of the trainer's
    :class:`~lightning_eos.callbacks.SharpnessMonitor` with :math:`\\lambda_1` at or above
    the optimizer's threshold, keeping the lr it had (paper 001, App. E.1 and Fig. 5(b):
    stopping there is enough to induce PHB's catapult). :attr:`stop_step` records it.

    Args:
        lr_initial: :math:`\\eta_i`.
        lr_final: :math:`\\eta_f`.
        steps: :math:`T`, the warmup length in optimizer steps.
        stop_at_threshold: stop warming up once the sharpness reaches the threshold.

    Example:
        >>> LearningRateWarmup(1e-8, 0.004, steps=4000).lr_at(2000)
        0.002000005
    """

    def __init__(
        self, lr_initial: float, lr_final: float, steps: int, stop_at_threshold: bool = False
    ) -> None:
        if not (lr_initial >= 0 and lr_final >= 0):
            raise ValueError(f"Learning rates must be nonnegative: {lr_initial}, {lr_final}.")
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps={steps!r} must be an integer of at least 1.")
        self.lr_initial, self.lr_final, self.steps = lr_initial, lr_final, steps
        self.stop_at_threshold = stop_at_threshold
        self.stop_step: int | None = None
        self._frozen_lr: float | None = None
        self._seen: int | None = None
        self._monitor: Any = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            lr_initial=self.lr_initial,
            lr_final=self.lr_final,
            steps=self.steps,
            stop_at_threshold=self.stop_at_threshold,
        )

    def lr_at(self, step: int) -> float:
        """The warmup's lr before optimizer step ``step``."""
        fraction = min(step, self.steps) / self.steps
        return self.lr_initial + (self.lr_final - self.lr_initial) * fraction

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: L.LightningModule) -> None:
        if trainer.lr_scheduler_configs:
            raise ValueError(
                f"{type(self).__name__} sets the lr itself; remove the lr scheduler, or use "
                "lightning_eos.optim.LinearWarmup as the scheduler instead."
            )
        if self.stop_at_threshold:
            self._monitor = sharpness_monitor(trainer, type(self).__name__)
        self._set_lr(trainer, self._lr_now(trainer.global_step))  # before any measurement

    def _lr_now(self, step: int) -> float:
        return self.lr_at(step) if self._frozen_lr is None else self._frozen_lr

    @staticmethod
    def _set_lr(trainer: Trainer, lr: float) -> None:
        for optimizer in trainer.optimizers:
            for group in unwrap_optimizer(optimizer).param_groups:
                group["lr"] = lr

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._frozen_lr is None and self.stop_at_threshold:
            latest = new_measurement(self._monitor, self._seen)
            if latest is not None:
                self._seen = latest["step"]
                threshold = latest.get("eos/threshold")
                if threshold is not None and latest["eos/sharpness"] >= threshold:
                    # keep the lr the measured threshold came from
                    self._frozen_lr = float(
                        unwrap_optimizer(trainer.optimizers[0]).param_groups[0]["lr"]
                    )
                    self.stop_step = trainer.global_step
        self._set_lr(trainer, self._lr_now(trainer.global_step))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"frozen_lr": self._frozen_lr, "stop_step": self.stop_step, "seen": self._seen}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._frozen_lr = state_dict.get("frozen_lr")
        self.stop_step = state_dict.get("stop_step")
        self._seen = state_dict.get("seen")
