"""Which samples a monitor measures on, and how it calls an unmodified training_step."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_eos.curvature import preserved_rng, rechunk

LossFnType = Callable[[Any, Any], torch.Tensor]


def measurement_chunks(
    loader: Any,
    num_samples: int | None,
    chunk_size: int | None,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> list[Any]:
    """The chunks of the measurement set that belong to ``rank`` (``chunk_size`` samples).

    The set is split into chunks exactly as in one process, and chunk ``j`` belongs to
    rank ``j mod world_size``: the union over ranks is the single-process set, each sample
    once, whatever the world size and however unevenly it divides (no sampler padding is
    involved). BatchNorm statistics are per chunk, so even they match one process.

    For a map-style dataset the samples are chosen by index: all of them, or a
    ``seed``-ed random subset of ``num_samples``, kept in dataset order and collated with
    the loader's ``collate_fn``. The training sampler and iterator are never asked, so
    the data order of the run is untouched. An iterable dataset is read afresh in this
    process (its first ``num_samples`` samples). Any random transform in the dataset
    draws from a forked RNG. ``chunk_size=None`` means the loader's batch size.
    """
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"Cannot take a measurement set from a {type(loader).__name__} (several training "
            "loaders?); pass the monitor a `dataloader=` to measure on."
        )
    dataset = loader.dataset
    chunk_size = chunk_size or loader.batch_size
    with preserved_rng():
        if isinstance(dataset, IterableDataset):
            if num_samples is None:
                raise ValueError("An iterable dataset needs `num_samples` to bound the set.")
            fresh = DataLoader(dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn)
            return rechunk(iter(fresh), num_samples, chunk_size)[rank::world_size]
        n = len(dataset)
        if num_samples is None or num_samples >= n:
            indices = list(range(n))
        else:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            indices = sorted(perm[:num_samples].tolist())
        size = chunk_size or len(indices)
        starts = range(0, len(indices), size)[rank::world_size]
        return [
            loader.collate_fn([dataset[i] for i in indices[start : start + size]])
            for start in starts
        ]


def training_step_loss(module: L.LightningModule, batch: Any) -> torch.Tensor:
    """The loss that ``module.training_step`` returns (a tensor or ``{"loss": ...}``)."""
    out = module.training_step(batch, 0)
    loss = out["loss"] if isinstance(out, Mapping) else out
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            "training_step returned no loss tensor; give the monitor a `loss_fn(module, batch)`."
        )
    return loss


def _metric_states(module: torch.nn.Module) -> list[tuple[Any, dict[str, Any]]]:
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics is a dependency
        return []
    saved = []
    for metric in module.modules():
        if isinstance(metric, Metric):
            keys = [*metric.metric_state, "_update_count", "_computed", "_forward_cache"]
            saved.append((metric, {k: copy.deepcopy(getattr(metric, k, None)) for k in keys}))
    return saved


@contextmanager
def training_step_sandbox(module: L.LightningModule) -> Iterator[None]:
    """Let a measurement call ``training_step`` without leaving traces.

    ``self.log``/``self.log_dict`` are no-ops inside, and the states of torchmetrics
    metrics updated by ``training_step`` are restored on exit. Other side effects of a
    user's ``training_step`` (counters, prints) do happen once per chunk evaluation: pass
    the monitor a ``loss_fn`` to avoid them.
    """

    def _noop(*args: Any, **kwargs: Any) -> None:
        return None

    module.log, module.log_dict = _noop, _noop  # type: ignore[method-assign]
    try:
        with metric_states_restored(module):
            yield
    finally:
        del module.log, module.log_dict


@contextmanager
def metric_states_restored(module: torch.nn.Module) -> Iterator[None]:
    """Put the states of every torchmetrics metric inside ``module`` back on exit."""
    metrics = _metric_states(module)
    try:
        yield
    finally:
        for metric, state in metrics:
            for key, value in state.items():
                setattr(metric, key, value)
