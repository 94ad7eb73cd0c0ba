"""Batch trees: count samples, slice and concatenate them along the sample axis.

A batch is whatever a ``DataLoader`` yields: a tensor, or tuples, lists and dicts of
them. Leaves that are not tensors (strings, ints) are carried along unchanged when they
cannot be sliced. The sample axis is dimension 0 of every tensor leaf.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


def _tensor_leaves(batch: Any) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in _tensor_leaves(v)]
    if isinstance(batch, (list, tuple)):
        return [t for v in batch for t in _tensor_leaves(v)]
    return []


def batch_size(batch: Any) -> int:
    """Number of samples in ``batch``: the leading dimension of its first tensor.

    >>> batch_size((torch.zeros(5, 3), torch.zeros(5)))
    5
    """
    leaves = _tensor_leaves(batch)
    if not leaves or leaves[0].dim() == 0:
        raise ValueError(
            "Cannot count the samples of a batch without a batched tensor; pass a "
            "`num_samples_fn` that returns the number of samples."
        )
    return int(leaves[0].shape[0])


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of every tensor leaf of ``batch``."""
    if isinstance(batch, Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return type(batch)({k: slice_batch(v, start, stop) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(slice_batch(v, start, stop) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_batch(v, start, stop) for v in batch)
    return batch


def index_batch(batch: Any, indices: Tensor) -> Any:
    """The samples at ``indices`` (a 1-D index tensor, repeats allowed) of every tensor leaf.

    >>> index_batch((torch.arange(5), "tag"), torch.tensor([3, 3, 0]))
    (tensor([3, 3, 0]), 'tag')
    """
    if isinstance(batch, Tensor):
        return batch[indices.to(batch.device)]
    if isinstance(batch, Mapping):
        return type(batch)({k: index_batch(v, indices) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(index_batch(v, indices) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(index_batch(v, indices) for v in batch)
    return batch


def split_leaves(batch: Any) -> tuple[list[Tensor], Any]:
    """The tensor leaves of ``batch`` and a function that rebuilds it from new leaves.

    >>> leaves, rebuild = split_leaves({"x": torch.zeros(2), "tag": "a"})
    >>> rebuild([torch.ones(2)])
    {'x': tensor([1., 1.]), 'tag': 'a'}
    """
    leaves = _tensor_leaves(batch)

    def rebuild(new: list[Tensor]) -> Any:
        it = iter(new)

        def build(node: Any) -> Any:
            if isinstance(node, Tensor):
                return next(it)
            if isinstance(node, Mapping):
                return type(node)({k: build(v) for k, v in node.items()})
            if isinstance(node, tuple) and hasattr(node, "_fields"):
                return type(node)(*(build(v) for v in node))
            if isinstance(node, (list, tuple)):
                return type(node)(build(v) for v in node)
            return node

        return build(batch)

    return leaves, rebuild


def concat_batches(batches: Sequence[Any]) -> Any:
    """Concatenate batches of the same structure along the sample axis."""
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(list(batches))
    if isinstance(first, Mapping):
        return type(first)({k: concat_batches([b[k] for b in batches]) for k in first})
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(concat_batches(list(vs)) for vs in zip(*batches)))
    if isinstance(first, (list, tuple)):
        return type(first)(concat_batches(list(vs)) for vs in zip(*batches))
    return first


def rechunk(batches: Iterable[Any], num_samples: int | None, chunk_size: int | None) -> list[Any]:
    """Take the first ``num_samples`` samples of ``batches`` and regroup them in chunks.

    Every chunk holds ``chunk_size`` samples except possibly the last, which is shorter.
    ``None`` means "all samples" and "one chunk" respectively.

    >>> chunks = rechunk([torch.arange(4), torch.arange(4, 9)], num_samples=7, chunk_size=3)
    >>> [c.tolist() for c in chunks]
    [[0, 1, 2], [3, 4, 5], [6]]
    """
    taken, count = [], 0
    for batch in batches:
        if num_samples is not None and count >= num_samples:
            break
        n = batch_size(batch)
        if num_samples is not None and count + n > num_samples:
            batch, n = slice_batch(batch, 0, num_samples - count), num_samples - count
        taken.append(batch)
        count += n
    if not taken:
        raise ValueError("The measurement data yielded no samples.")
    full = concat_batches(taken) if len(taken) > 1 else taken[0]
    size = chunk_size or count
    return [slice_batch(full, i, min(i + size, count)) for i in range(0, count, size)]
