"""FullBatchAccumulation: full-batch GD over a set too big for one forward pass."""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

if TYPE_CHECKING:
    from lightning.pytorch import Trainer


class FullBatchAccumulation(Callback):
    """Make every optimizer step a full-batch step, accumulated over the loader's chunks.

    Full-batch gradient descent on 5k-8k CIFAR images (papers 002 and 004) does not fit
    in one forward pass. Serve the training set in equal chunks (``batch_size=chunk``,
    every chunk the same size) and add this callback: at the start of every epoch it sets
    ``trainer.accumulate_grad_batches`` to the number of chunks, so Lightning accumulates
    the gradients of all of them, each loss divided by that number, and steps once per
    epoch. With chunks of equal size :math:`c` the accumulated gradient is

    .. math:: \\frac1K \\sum_{k=1}^{K} \\nabla \\frac1c \\sum_{i \\in B_k} \\ell_i
        = \\nabla \\frac1n \\sum_{i=1}^n \\ell_i ,

    the full-batch gradient, so a run is full-batch GD (tested against one-chunk steps).
    Under DDP each process accumulates its own shard and DDP averages the shards. The
    monitors see it too: ``IASMonitor`` takes b = n when this callback is attached.

    Raises:
        ValueError: at the first epoch, if the chunks are not all the same size (the mean
            of chunk means would not be the mean loss) or the loader is not sized.

    Example:
        >>> FullBatchAccumulation().state_key
        'FullBatchAccumulation'
    """

    @override
    def on_train_start(self, trainer: Trainer, pl_module: L.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"{type(self).__name__} relies on Lightning's gradient accumulation, which "
                "needs automatic optimization."
            )
        self.on_train_epoch_start(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        try:
            chunks, samples = len(loader), len(loader.sampler)
        except TypeError as err:
            raise ValueError(f"{type(self).__name__} needs a sized training loader.") from err
        size = loader.batch_size
        if size is None or samples != chunks * size:
            raise ValueError(
                f"{type(self).__name__}: the {samples} training samples of this process do not "
                f"split into equal chunks of {size}; choose a chunk size that divides "
                "them, so that the mean of the chunk losses is the mean loss."
            )
        trainer.accumulate_grad_batches = chunks
