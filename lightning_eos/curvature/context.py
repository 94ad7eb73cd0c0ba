"""Run a measurement on a live model without disturbing the training run.

:func:`measurement_context` is the module-level half of the measurement contract
(``DESIGN.md``): everything a forward pass may change is put back afterwards.

* **Buffers** (BatchNorm running statistics and ``num_batches_tracked``) are snapshotted
  and copied back, which also covers ``momentum=None`` cumulative averages.
* **Mode.** ``mode="train"`` measures the *training* loss: every module keeps the mode it
  trains in (BatchNorm normalizes with the statistics of each chunk, a submodule the
  user froze in eval mode stays frozen), except that dropout modules are switched off,
  because a fresh random mask on every product would make each Hessian-vector product
  belong to a different matrix. Randomness drawn inside ``forward`` by other means
  (``F.dropout``, attention dropout) is frozen instead: :class:`HessianOperator` replays
  the same random stream for every product. ``mode="eval"`` measures the loss of the
  whole model in eval mode (running statistics), which for BatchNorm networks is a
  different function.
* **SyncBatchNorm** layers normalize each chunk with the chunk's own statistics during a
  measurement, like plain BatchNorm: their cross-process statistics have no double
  backward and would need every process to run its chunks in lockstep. Chunks of the
  per-process batch size therefore measure the loss that plain BatchNorm trains on.
* **Random streams** of torch (CPU and the model's accelerator), Python's ``random`` and
  NumPy are saved and restored (:func:`preserved_rng`), so anything drawn inside leaves
  the training run's generators where they were.
* **Gradients**: nothing inside should call ``backward()``; the products use
  ``torch.autograd.grad``, which leaves ``.grad`` untouched.
"""

from __future__ import annotations

import random
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

MeasurementMode = Literal["train", "eval"]


def _cuda_devices(model: nn.Module | None) -> list[int]:
    if model is None:
        return []
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def seed_all(seed: int) -> None:
    """Seed torch (all devices), Python's ``random`` and NumPy; use inside :func:`preserved_rng`."""
    # the generators themselves: torch.manual_seed's wrappers cost milliseconds per call
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return
    np.random.seed(seed % 2**32)


@contextmanager
def preserved_rng(model: nn.Module | None = None) -> Iterator[None]:
    """Restore torch's (CPU and ``model``'s CUDA devices), Python's and NumPy's RNG on exit.

    Example:
        >>> state = torch.get_rng_state()
        >>> with preserved_rng():
        ...     _ = torch.rand(3), random.random()
        >>> torch.equal(state, torch.get_rng_state())
        True
    """
    python_state = random.getstate()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is optional for torch
        np = None
    numpy_state = np.random.get_state() if np is not None else None
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model)):
            yield
    finally:
        random.setstate(python_state)
        if np is not None:
            np.random.set_state(numpy_state)


def _local_batch_norm(self: nn.SyncBatchNorm, x: Tensor) -> Tensor:
    # BatchNorm's math on this process's chunk; buffers are restored by the context
    use_batch_stats = self.training or self.running_mean is None
    return F.batch_norm(
        x,
        self.running_mean if not self.training or self.track_running_stats else None,
        self.running_var if not self.training or self.track_running_stats else None,
        self.weight,
        self.bias,
        use_batch_stats,
        0.0 if self.momentum is None else self.momentum,
        self.eps,
    )


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
    with preserved_rng(model):
        try:
            if mode == "eval":
                model.eval()
            for module in model.modules():
                if isinstance(module, _DropoutNd):
                    module.eval()
                if isinstance(module, nn.SyncBatchNorm):
                    module.forward = types.MethodType(_local_batch_norm, module)
            yield
        finally:
            for module in model.modules():
                if isinstance(module, nn.SyncBatchNorm):
                    del module.forward
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            for module, training in modes.items():
                module.training = training
