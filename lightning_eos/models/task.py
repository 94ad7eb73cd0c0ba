"""A LightningModule for supervised training: classification, regression, LM and seq2seq."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_eos.optim.sam import OptimizerFactory

LossName = Literal["mse", "half_mse", "cross_entropy", "sequence_cross_entropy"]
IGNORE_INDEX = -100  # torch's cross-entropy default: padded target tokens carry it
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


def token_cross_entropy(output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of every token of ``(n, T, V)`` logits against ``(n, T)`` labels.

    Target tokens equal to ``-100`` (padding) are left out; ``reduction="sum"`` sums over
    the remaining tokens, ``"mean"`` averages over them.
    """
    if target.shape != output.shape[:-1]:
        raise ValueError(
            f"token cross-entropy: logits {tuple(output.shape)} need labels of shape "
            f"{tuple(output.shape[:-1])}, got {tuple(target.shape)}."
        )
    return F.cross_entropy(
        output.flatten(0, -2), target.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction
    )


def sequence_cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy summed over each sequence's tokens, averaged over the sequences.

    .. math:: L = \\frac{1}{n}\\sum_{i=1}^n \\sum_{t:\\,y_{it} \\ne -100}
        -\\log \\operatorname{softmax}(f(x_i)_t)_{y_{it}}

    fairseq's ``--sentence-avg`` normalization. Unlike the token mean, this loss is a mean
    over *samples*, so a measurement split into chunks (weighted by their sample counts)
    and full-batch gradient accumulation give exactly the loss of the whole set even when
    padding makes the chunks' token counts differ.

    >>> import torch
    >>> logits = torch.zeros(2, 3, 4)  # uniform: log 4 per token
    >>> labels = torch.tensor([[1, 2, -100], [0, -100, -100]])
    >>> round(sequence_cross_entropy(logits, labels).item() / torch.log(torch.tensor(4.)).item(), 6)
    1.5
    """
    return token_cross_entropy(output, target, reduction="sum") / output.shape[0]


def classification_loss(name: LossName, output: Tensor, target: Tensor) -> Tensor:
    """The named loss.

    Cross-entropy accepts labels or one-hot targets; with ``(n, T, V)`` sequence logits and
    ``(n, T)`` labels it is the mean over the non-padding tokens
    (:func:`token_cross_entropy`). ``"sequence_cross_entropy"`` is
    :func:`sequence_cross_entropy`.
    """
    if name == "mse":
        return mse_loss(output, target)
    if name == "half_mse":
        return half_mse_loss(output, target)
    if name == "sequence_cross_entropy":
        return sequence_cross_entropy(output, target)
    if name == "cross_entropy":
        if output.dim() > 2 and target.dim() == output.dim() - 1:  # (n, T, V) sequences
            return token_cross_entropy(output, target)
        if target.dim() == output.dim():  # one-hot or soft targets
            target = target.argmax(-1) if target.dtype.is_floating_point else target
        return F.cross_entropy(output, target)
    raise ValueError(
        f"loss={name!r}; choose 'mse', 'half_mse', 'cross_entropy' or 'sequence_cross_entropy'."
    )


def accuracy(output: Tensor, target: Tensor) -> Tensor:
    """The fraction of correct argmax predictions (of non-padding tokens for sequences)."""
    labels = target.argmax(-1) if target.dim() == output.dim() else target
    correct = output.argmax(-1) == labels
    if output.dim() > 2:
        keep = labels != IGNORE_INDEX
        return correct[keep].float().mean()
    return correct.float().mean()


class SupervisedTask(L.LightningModule):
    """Train ``model`` on ``(x, y)`` batches: classification, regression, LM or seq2seq.

    ``x`` is passed to the model as is, or unpacked when it is a tuple: a seq2seq batch
    ``((src, tgt_in), tgt_out)`` calls ``model(src, tgt_in)`` (:class:`WMTDataModule`'s
    batches). A language model's ``(x, y)`` are ``(n, T)`` token ids and its output
    ``(n, T, V)`` logits; target tokens ``-100`` are padding.

    The loss is logged as ``{stage}/loss``; the accuracy ``{stage}/acc`` (per token for
    sequences) only for classification outputs (a last dimension of more than one
    class), not for regression outputs of shape ``(n,)`` or ``(n, 1)``.

    Args:
        model: the network.
        loss: ``"mse"`` (targets shaped like the output), ``"half_mse"`` (paper 001's toys,
            :func:`half_mse_loss`), ``"cross_entropy"`` (labels, one-hot targets, or
            per-token for sequences) or ``"sequence_cross_entropy"`` (summed over each
            sequence's tokens, averaged over sequences; :func:`sequence_cross_entropy`).
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

    def forward(self, x: Tensor | tuple[Tensor, ...]) -> Tensor:
        return self.model(*x) if isinstance(x, (tuple, list)) else self.model(x)

    def _step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch
        out = self(x)
        loss = classification_loss(self.loss_name, out, y)
        if not self._sam_perturbed_pass():  # log the loss at w, not SAM's at w + e
            self.log(f"{stage}/loss", loss, prog_bar=stage == "train")
            if out.dim() > 1 and out.shape[-1] > 1:  # classes; a regression has no accuracy
                self.log(f"{stage}/acc", accuracy(out, y))
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


__all__ = [
    "SupervisedTask",
    "accuracy",
    "classification_loss",
    "half_mse_loss",
    "mse_loss",
    "sequence_cross_entropy",
    "token_cross_entropy",
]
