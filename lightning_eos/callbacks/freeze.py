"""FreezePreconditioner: continue training with Adam's preconditioner frozen (paper 002, App. D)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_eos.optim import FrozenAdam, unwrap_optimizer

if TYPE_CHECKING:
    from lightning.pytorch import Trainer


class FreezePreconditioner(Callback):
    """After step ``at_step``, replace the optimizer by :class:`~lightning_eos.optim.FrozenAdam`.

    Paper 002, Fig. 16: freezing Adam's preconditioner mid-training makes the
    preconditioned sharpness rise to :math:`38/\\eta` (frozen Adam trains at the
    non-adaptive edge, §4). :meth:`FrozenAdam.from_optimizer` keeps the parameters, the
    param groups (so learning-rate schedulers keep driving them), the first moment and
    :math:`P_t`, scaled so that :math:`\\lambda_1(P^{-1}H)` over its threshold is
    continuous. Schedulers, nested ones included, are re-pointed at the new optimizer.
    The source must be an EMA-heavy-ball optimizer: Adam, AdamW (also AMSGrad), or ours
    (Adam, Padam), not wrapped (e.g. by SAM). With bias correction the frozen :math:`P`
    is paper 002's eq. (2), :math:`(1-\\beta_1^t)` times the reader's, so the logged
    ``eos/preconditioned_sharpness`` and threshold both change by that factor at the swap
    while their ratio does not.

    Checkpoints hold the frozen optimizer's state; on resume past ``at_step`` the
    callback swaps in an empty FrozenAdam before Lightning loads that state.

    Example:
        >>> FreezePreconditioner(at_step=500).state_key
        "FreezePreconditioner{'at_step': 500}"
    """

    def __init__(self, at_step: int) -> None:
        if at_step < 1:
            raise ValueError(f"at_step={at_step} must be at least 1 (the optimizer must step).")
        self.at_step = at_step
        self.frozen = False
        self._restored = False  # frozen state came from a checkpoint of this fit

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(at_step=self.at_step)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: L.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"{type(self).__name__} needs exactly one optimizer.")
        if trainer.strategy.restore_checkpoint_after_setup:
            raise ValueError(
                f"{type(self).__name__} does not support {type(trainer.strategy).__name__}: "
                "it restores checkpoints after the optimizer would have to be swapped."
            )
        if unwrap_optimizer(trainer.optimizers[0]) is not trainer.optimizers[0]:
            raise ValueError(
                f"{type(self).__name__} would drop the wrapper around the base optimizer "
                f"({type(trainer.optimizers[0]).__name__}); freeze the base optimizer directly."
            )
        if self.frozen and self._restored:  # resumed after the swap: Lightning loads it next
            self._swap(trainer, FrozenAdam.like(trainer.optimizers[0]))
        else:  # a new fit with this callback object trains a new optimizer
            self.frozen = False
        self._restored = False

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if not self.frozen and trainer.global_step >= self.at_step:
            self._swap(trainer, FrozenAdam.from_optimizer(trainer.optimizers[0]))
            self.frozen = True

    @staticmethod
    def _swap(trainer: Trainer, frozen: FrozenAdam) -> None:
        old = trainer.optimizers[0]
        trainer.strategy.optimizers = [frozen]

        def repoint(scheduler: Any) -> None:  # also SequentialLR's and ChainedScheduler's
            if getattr(scheduler, "optimizer", None) is old:
                scheduler.optimizer = frozen
            for child in getattr(scheduler, "_schedulers", []):
                repoint(child)

        for config in trainer.lr_scheduler_configs:
            repoint(config.scheduler)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"frozen": self.frozen}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.frozen = bool(state_dict.get("frozen", False))
        self._restored = True
