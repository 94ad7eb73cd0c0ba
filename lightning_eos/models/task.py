"""A LightningModule for supervised training with MSE or cross-entropy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_eos.optim.sam import OptimizerFactory

LossName = Literal["mse", "cross_entropy"]
SchedulerFactory = Callable[[Optimizer], Any]


def mse_loss(output: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over samples and outputs (``torch.nn.MSELoss``'s default).

    .. math:: L = \\frac{1}{nC}\\sum_{i=1}^n \\lVert f(x_i) - y_i \\rVert^2

    with :math:`C` outputs; the papers' MSE experiments use one-hot targets.
    """
    return F.mse_loss(output, target)


def classification_loss(name: LossName, output: Tensor, target: Tensor) -> Tensor:
    """The named loss; cross-entropy accepts labels or one-hot targets."""
    if name == "mse":
        return mse_loss(output, target)
    if name == "cross_entropy":
        if target.dim() == output.dim():  # one-hot or soft targets
            target = target.argmax(-1) if target.dtype.is_floating_point else target
        return F.cross_entropy(output, target)
    raise ValueError(f"loss={name!r}; choose 'mse' or 'cross_entropy'.")


class SupervisedTask(L.LightningModule):
    """Train ``model`` on ``(x, y)`` batches with MSE or cross-entropy.

    Args:
        model: the network.
        loss: ``"mse"`` (targets shaped like the output) or ``"cross_entropy"``.
        optimizer: a factory ``params -> Optimizer``, e.g. ``functools.partial(SGD, lr=2.0)``
            or, from YAML, ``class_path: torch.optim.SGD`` with ``init_args``.
        lr_scheduler: an optional factory ``optimizer -> LRScheduler``, stepped per step.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossName = "mse",
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_name = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.save_hyperparameters(ignore=["model", "optimizer", "lr_scheduler"])

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch
        out = self(x)
        loss = classification_loss(self.loss_name, out, y)
        labels = y.argmax(-1) if y.dim() == out.dim() else y
        acc = (out.argmax(-1) == labels).float().mean()
        if not self._sam_perturbed_pass():  # log the loss at w, not SAM's at w + e
            self.log(f"{stage}/loss", loss, prog_bar=stage == "train")
            self.log(f"{stage}/acc", acc)
        return loss

    def _sam_perturbed_pass(self) -> bool:
        trainer = self._trainer
        return trainer is not None and any(
            getattr(o, "perturbed", False) for o in trainer.optimizers
        )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError(
                "SupervisedTask needs an optimizer: pass `optimizer=partial(torch.optim.SGD, "
                "lr=...)` or set `model.init_args.optimizer` in the config."
            )
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


__all__ = ["SupervisedTask", "classification_loss", "mse_loss"]
