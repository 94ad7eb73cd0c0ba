"""Shared machinery of the image data modules: seeded class subsets, statistics, loaders.

Every image module loads its split through the real torchvision class, picks a subset
that depends only on ``seed`` (never on the process rank, so under DDP every rank builds
the identical subset and Lightning's ``DistributedSampler`` splits it), and turns it once,
in :meth:`~_ImageSubsetDataModule.setup`, into float tensors. Randomness comes from
``torch.Generator`` objects seeded with ``seed``; the global RNG is never touched, not
even by iterating the loaders (each loader carries its own generator).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset, default_collate, get_worker_info

from lightning_eos.data.synthetic import _DTYPES, DType

__all__ = [
    "Normalize",
    "TargetKind",
    "balanced_subset",
    "channel_statistics",
]

Normalize = Literal["center", "standardize", "none"]
TargetKind = Literal["onehot", "label"]


def balanced_subset(
    labels: Tensor,
    num: int | None,
    classes: Sequence[int],
    balanced: bool,
    generator: torch.Generator,
    name: str = "num",
) -> Tensor:
    """Sorted indices of a seeded subset of the examples whose label is in ``classes``.

    With ``balanced``, every class gets ``num / len(classes)`` examples, drawn by a
    permutation of that class's examples (classes in the order given); ``num=None`` takes
    the largest balanced subset (the smallest class's count per class). Without it, the
    eligible examples are permuted together and ``num`` of them taken (``None``: all).

    Args:
        labels: ``(n,)`` integer labels of the whole split.
        num: subset size, or ``None``.
        classes: the labels to keep.
        balanced: equal count per class.
        generator: the source of randomness (advanced by the draw).
        name: the argument's name in error messages.

    Raises:
        ValueError: if the subset is impossible; the message names the fix.

    Example:
        >>> import torch
        >>> labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
        >>> g = torch.Generator().manual_seed(0)
        >>> idx = balanced_subset(labels, 4, [0, 2], True, g)
        >>> labels[idx].tolist().count(0), labels[idx].tolist().count(2), len(idx)
        (2, 2, 4)
        >>> bool((idx.diff() > 0).all())
        True
    """
    labels = torch.as_tensor(labels)
    if balanced:
        members = [(labels == c).nonzero().flatten() for c in classes]
        smallest = min(len(m) for m in members)
        if num is None:
            per_class = smallest
        else:
            if num % len(classes):
                raise ValueError(
                    f"{name}={num} is not a multiple of the {len(classes)} classes; choose a "
                    f"multiple of {len(classes)} or balanced=False."
                )
            per_class = num // len(classes)
        if per_class > smallest or per_class == 0:
            raise ValueError(
                f"{name}={num} needs {per_class} examples per class, but the smallest chosen "
                f"class has {smallest}; choose {name} <= {smallest * len(classes)} "
                "(and at least one per class)."
            )
        chosen = [m[torch.randperm(len(m), generator=generator)[:per_class]] for m in members]
        return torch.cat(chosen).sort().values
    eligible = torch.isin(labels, torch.as_tensor(list(classes))).nonzero().flatten()
    if num is None:
        num = len(eligible)
    if not 0 < num <= len(eligible):
        raise ValueError(
            f"{name}={num}, but the chosen classes have {len(eligible)} examples; "
            f"choose 1 <= {name} <= {len(eligible)} or None (all)."
        )
    return eligible[torch.randperm(len(eligible), generator=generator)[:num]].sort().values


def remap(labels: Tensor, classes: Sequence[int]) -> Tensor:
    """``labels`` in ``classes`` renumbered ``0..k-1`` in the order of ``classes``."""
    table = torch.full((int(max(classes)) + 1,), -1, dtype=torch.long)
    table[torch.as_tensor(list(classes))] = torch.arange(len(classes))
    return table[torch.as_tensor(labels, dtype=torch.long)]


def channel_statistics(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and population std of uint8 ``(n, c, h, w)`` images scaled to [0, 1].

    Computed exactly, in float64, from each channel's histogram of the 256 byte values,
    so the whole data set is never held in float64.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8, generator=g)
        >>> mean, std = channel_statistics(images)
        >>> x = images.double() / 255
        >>> torch.allclose(mean, x.mean((0, 2, 3)))
        True
        >>> torch.allclose(std, x.std((0, 2, 3), correction=0))
        True
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 (n, c, h, w) images, got {images.dtype} {images.shape}.")
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].flatten().long(), minlength=256).double()
        mean = (counts * values).sum() / counts.sum()
        means.append(mean)
        stds.append(((counts * (values - mean) ** 2).sum() / counts.sum()).sqrt())
    return torch.stack(means), torch.stack(stds)


class _RandomCropFlip:
    """Collate, then random crop (zero-padded by ``padding``) and horizontal flip per image.

    The padding value is the normalized black pixel ``fill`` (per channel), as in the usual
    ``RandomCrop(32, padding=4)`` before ``Normalize``. The generator is seeded from
    ``seed`` and the process rank (so DDP ranks do not crop in lockstep) and, inside a
    ``DataLoader`` worker, reseeded from the worker's seed.
    """

    def __init__(self, seed: int, fill: Tensor, padding: int = 4) -> None:
        self.seed, self.fill, self.padding = seed, fill, padding
        self._generator: torch.Generator | None = None
        self._worker_seed: int | None = None

    def _rng(self) -> torch.Generator:
        info = get_worker_info()
        if info is not None and info.seed != self._worker_seed:
            self._worker_seed = info.seed
            self._generator = torch.Generator().manual_seed(info.seed)
        if self._generator is None:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            self._generator = torch.Generator().manual_seed(self.seed * 1_000_003 + rank)
        return self._generator

    def __call__(self, samples: list) -> list[Tensor]:
        x, y = default_collate(samples)
        return [self.augment(x), y]

    def augment(self, x: Tensor) -> Tensor:
        """Crop and flip a ``(b, c, h, w)`` batch."""
        g, p = self._rng(), self.padding
        b, c, h, w = x.shape
        padded = self.fill.to(x).view(1, c, 1, 1).expand(b, c, h + 2 * p, w + 2 * p).clone()
        padded[:, :, p : p + h, p : p + w] = x
        dy = torch.randint(0, 2 * p + 1, (b,), generator=g)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=g)
        flip = torch.rand(b, generator=g) < 0.5
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
        out = padded[
            torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols
        ]
        return torch.where(flip.view(b, 1, 1, 1), out.flip(-1), out)


class _ImageSubsetDataModule(L.LightningDataModule):
    """Subsets built once in :meth:`setup`; full-batch, unshuffled loaders by default.

    Subclasses implement :meth:`_load`, returning the uint8 ``(n, c, h, w)`` images and the
    remapped labels of the training and validation subsets.
    """

    def __init__(
        self,
        seed: int,
        normalize: Normalize,
        target: TargetKind,
        batch_size: int | None,
        shuffle: bool,
        dtype: DType,
    ) -> None:
        super().__init__()
        if normalize not in ("center", "standardize", "none"):
            raise ValueError(f"normalize={normalize!r}; choose 'center', 'standardize' or 'none'.")
        if target not in ("onehot", "label"):
            raise ValueError(f"target={target!r}; choose 'onehot' or 'label'.")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}; choose 'float32' or 'float64'.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; use a positive size or None (full).")
        self.seed, self.normalize, self.target = seed, normalize, target
        self.batch_size, self.shuffle, self.dtype = batch_size, shuffle, dtype
        self.augment = False
        self.x_train: Tensor | None = None
        self.y_train: Tensor | None = None
        self.x_val: Tensor | None = None
        self.y_val: Tensor | None = None
        self.mean: Tensor | None = None
        self.std: Tensor | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        """The ``torch.dtype`` of the inputs (and of one-hot targets)."""
        return _DTYPES[self.dtype]

    @property
    def num_classes(self) -> int:
        """Number of classes ``k`` (labels ``0..k-1``, one-hot width)."""
        raise NotImplementedError

    def _load(self, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Training images, labels, validation images, labels (uint8 NCHW, long)."""
        raise NotImplementedError

    def _reshape(self, x: Tensor) -> Tensor:
        return x

    def setup(self, stage: str | None = None) -> None:
        if self.x_train is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        train_images, train_labels, val_images, val_labels = self._load(generator)
        mean, std = channel_statistics(train_images)
        if self.normalize == "none":
            mean, std = torch.zeros_like(mean), torch.ones_like(std)
        elif self.normalize == "center":
            std = torch.ones_like(std)
        std = torch.where(std > 0, std, torch.ones_like(std))  # a constant channel is centered
        self.mean, self.std = mean, std
        self.x_train, self.y_train = self._tensors(train_images, train_labels)
        self.x_val, self.y_val = self._tensors(val_images, val_labels)

    def _tensors(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        x = images.to(self.torch_dtype) / 255
        if self.normalize != "none":
            shape = (1, -1, 1, 1)
            x = (x - self.mean.to(x).view(shape)) / self.std.to(x).view(shape)
        y = labels.long()
        if self.target == "onehot":
            y = torch.nn.functional.one_hot(y, self.num_classes).to(self.torch_dtype)
        return self._reshape(x), y

    def _loader(self, x: Tensor, y: Tensor, train: bool) -> DataLoader:
        collate = None
        if train and self.augment:
            collate = _RandomCropFlip(self.seed, -self.mean / self.std)
        return DataLoader(
            TensorDataset(x, y),
            batch_size=self.batch_size or len(x),
            shuffle=train and self.shuffle and self.batch_size is not None,
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.x_train, self.y_train, train=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.x_val, self.y_val, train=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.x_val, self.y_val, train=False)


def check_classes(classes: list[int] | None, total: int) -> list[int]:
    """``classes`` checked against ``0..total-1`` (``None``: all of them)."""
    if classes is None:
        return list(range(total))
    classes = [int(c) for c in classes]
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes={classes}; give distinct labels, at least one, or None (all).")
    if not all(0 <= c < total for c in classes):
        raise ValueError(f"classes={classes}; the labels must lie in 0..{total - 1}.")
    return classes


def check_size(**sizes: int | None) -> None:
    """Each size is ``None`` or positive."""
    for name, value in sizes.items():
        if value is not None and value < 1:
            raise ValueError(f"{name}={value}; use a positive count or None (all).")
