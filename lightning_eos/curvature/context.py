"""Run a measurement on a live model without disturbing the training run.

:func:`measurement_context` is the module-level half of the measurement contract
(``DESIGN.md``): everything a forward pass may change is put back afterwards.

* **Buffers** (BatchNorm running statistics and ``num_batches_tracked``) are snapshotted
  and copied back, which also covers ``momentum=None`` cumulative averages.
* **Mode.** ``mode="train"`` measures the *training* loss: BatchNorm normalizes with the
  statistics of each chunk, as in a training step. Dropout is switched off, because a
  fresh random mask on every product would make each Hessian-vector product belong to a
  different matrix. ``mode="eval"`` measures the loss of the model in eval mode (running
  statistics), which for BatchNorm networks is a different function.
* **Random streams** of the CPU and of the model's accelerator are forked, so anything
  drawn inside leaves the training run's generators where they were.
* **Gradients**: nothing inside should call ``backward()``; the products use
  ``torch.autograd.grad``, which leaves ``.grad`` untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

MeasurementMode = Literal["train", "eval"]


@contextmanager
def measurement_context(model: nn.Module, mode: MeasurementMode = "train") -> Iterator[None]:
    """Put ``model`` in measurement mode and restore buffers, modes and RNG on exit.

    Example:
        >>> bn = nn.BatchNorm1d(3)
        >>> with measurement_context(bn):
        ...     _ = bn(torch.randn(8, 3))
        >>> bn.running_mean.tolist(), int(bn.num_batches_tracked)
        ([0.0, 0.0, 0.0], 0)
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode={mode!r}; choose 'train' or 'eval'.")
    modes = {m: m.training for m in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({b.device.index or 0 for b in model.parameters() if b.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices, enabled=True):
        try:
            model.train(mode == "train")
            for module in model.modules():
                if isinstance(module, _DropoutNd):
                    module.eval()
            yield
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            for module, training in modes.items():
                module.training = training
