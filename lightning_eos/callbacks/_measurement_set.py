"""Which samples a monitor measures on, built once per fit without touching training RNG."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_eos.curvature import rechunk


def measurement_chunks(
    loader: DataLoader,
    num_samples: int | None,
    chunk_size: int | None,
    seed: int,
) -> list[Any]:
    """The measurement set as chunks of ``chunk_size`` samples (last one possibly shorter).

    For a map-style dataset the samples are chosen by index: all of them, or a
    ``seed``-ed random subset of ``num_samples``, kept in dataset order and collated with
    the loader's ``collate_fn``. The training sampler is never asked, so its RNG and
    order stay untouched. Other loaders are iterated (under a forked RNG) and their
    first ``num_samples`` samples are taken. ``chunk_size=None`` means the loader's
    batch size.
    """
    dataset = loader.dataset
    chunk_size = chunk_size or loader.batch_size
    has_len = hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
    if has_len and not isinstance(dataset, torch.utils.data.IterableDataset):
        n = len(dataset)
        if num_samples is None or num_samples >= n:
            indices = list(range(n))
        else:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            indices = sorted(perm[:num_samples].tolist())
        size = chunk_size or len(indices)
        collate = loader.collate_fn
        return [
            collate([dataset[i] for i in indices[start : start + size]])
            for start in range(0, len(indices), size)
        ]
    with torch.random.fork_rng():
        return rechunk(iter(loader), num_samples, chunk_size)


def training_step_loss(module: L.LightningModule, batch: Any) -> torch.Tensor:
    """The loss that ``module.training_step`` returns (a tensor or ``{"loss": ...}``)."""
    out = module.training_step(batch, 0)
    loss = out["loss"] if isinstance(out, Mapping) else out
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            "training_step returned no loss tensor; give the monitor a `loss_fn(module, batch)`."
        )
    return loss


@contextmanager
def silenced_logging(module: L.LightningModule) -> Any:
    """Make ``self.log``/``self.log_dict`` no-ops while a measurement calls training_step."""

    def _noop(*args: Any, **kwargs: Any) -> None:
        return None

    module.log, module.log_dict = _noop, _noop  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.log, module.log_dict


LossFnType = Callable[[Any, Any], torch.Tensor]
