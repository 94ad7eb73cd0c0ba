"""A LightningModule for supervised training with MSE, half-MSE or cross-entropy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_eos.optim.sam import OptimizerFactory

LossName = Literal["mse", "half_mse", "cross_entropy"]
SchedulerFactory = Callable[[Optimizer], LRScheduler]


def mse_loss(output: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over samples and outputs (``torch.nn.MSELoss``'s default).

    .. math:: L = \\frac{1}{nC}\\sum_{i=1}^n \\lVert f(x_i) - y_i \\rVert^2

    with :math:`C` outputs; the papers' MSE experiments use one-hot targets.
    """
    return F.mse_loss(output, target)


def half_mse_loss(output: Tensor, target: Tensor) -> Tensor:
    """Half the squared error, summed over outputs and averaged over samples.

    .. math:: L = \\frac{1}{2n}\\sum_{i=1}^n \\lVert f(x_i) - y_i \\rVert^2,

    the convention of paper 001's toy models (eq. 2, §3.1, App. E.6): for scalar outputs
    :math:`\\tfrac12 \\operatorname{mean}_i (f(x_i) - y_i)^2`, so the scalar ReLU network
    on :math:`(x, y) = (1, 0)` has exactly the paper's loss :math:`\\tfrac12 u^2 v^2` (and
    Hessian). Unlike :func:`mse_loss` it does not divide by the number of outputs, and
    ``output`` and ``target`` must have the same shape (no silent broadcasting).

    >>> import torch
    >>> half_mse_loss(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.zeros(2, 2))
    tensor(1.2500)
    """
    if output.shape != target.shape:
        raise ValueError(
            f"half_mse: output shape {tuple(output.shape)} != target shape "
            f"{tuple(target.shape)}; reshape the targets (e.g. (n,) for a scalar output)."
        )
    return 0.5 * (output - target).pow(2).reshape(output.shape[0], -1).sum(1).mean()


def classification_loss(name: LossName, output: Tensor, target: Tensor) -> Tensor:
    """The named loss; cross-entropy accepts labels or one-hot targets."""
    if name == "mse":
        return mse_loss(output, target)
    if name == "half_mse":
        return half_mse_loss(output, target)
    if name == "cross_entropy":
        if target.dim() == output.dim():  # one-hot or soft targets
            target = target.argmax(-1) if target.dtype.is_floating_point else target
        return F.cross_entropy(output, target)
    raise ValueError(f"loss={name!r}; choose 'mse', 'half_mse' or 'cross_entropy'.")


class SupervisedTask(L.LightningModule):
    """Train ``model`` on ``(x, y)`` batches with MSE, half-MSE or cross-entropy.

    The loss is logged as ``{stage}/loss``; the accuracy ``{stage}/acc`` only for
    classification outputs (a last dimension of more than one class), not for regression
    outputs of shape ``(n,)`` or ``(n, 1)``.

    Args:
        model: the network.
        loss: ``"mse"`` (targets shaped like the output), ``"half_mse"`` (paper 001's toys,
            :func:`half_mse_loss`) or ``"cross_entropy"``.
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
        if not self._sam_perturbed_pass():  # log the loss at w, not SAM's at w + e
            self.log(f"{stage}/loss", loss, prog_bar=stage == "train")
            if out.dim() > 1 and out.shape[-1] > 1:  # classes; a regression has no accuracy
                labels = y.argmax(-1) if y.dim() == out.dim() else y
                self.log(f"{stage}/acc", (out.argmax(-1) == labels).float().mean())
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


__all__ = ["SupervisedTask", "classification_loss", "half_mse_loss", "mse_loss"]
