"""The seeded DataLoader that the in-memory text modules serve."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


def seeded_loader(
    dataset: Dataset,
    batch_size: int | None,
    shuffle: bool,
    seed: int,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """Minibatches of ``batch_size``, or the whole set as one batch when it is ``None``.

    Shuffling (only with minibatches) draws from a generator seeded with ``seed``, never
    the global RNG.
    """
    size = batch_size or max(len(dataset), 1)
    generator = torch.Generator().manual_seed(seed)
    shuffle = shuffle and batch_size is not None
    return DataLoader(dataset, size, shuffle=shuffle, generator=generator, collate_fn=collate_fn)
