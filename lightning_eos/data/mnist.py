"""MNIST through torchvision's real loader, as seeded class subsets (paper 003's MLP).

The data are :class:`~torchvision.datasets.MNIST`'s raw idx files in ``root/MNIST/raw/``
(``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``); torchvision only checks that they exist.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.datasets import MNIST

from lightning_eos.data._subsets import (
    Normalize,
    TargetKind,
    _ImageSubsetDataModule,
    balanced_subset,
    check_classes,
    check_size,
    remap,
)
from lightning_eos.data.synthetic import DType

__all__ = ["MNISTDataModule"]


class MNISTDataModule(_ImageSubsetDataModule):
    """A seeded, class-balanced subset of MNIST, as tensors.

    The subsets are drawn as in :class:`~lightning_eos.data.CIFARDataModule`: training
    from the training split, validation from the test split, by a generator seeded with
    ``seed`` and never by the rank; ``classes`` are renumbered ``0..k-1``. MNIST's classes
    are not equally frequent, so ``balanced`` with ``num_train=None`` takes the smallest
    class's count (5421 in the real training split) from every class.

    :meth:`setup` builds ``x_train``, ``x_val`` of shape ``(n, 1, 28, 28)``, or
    ``(n, 784)`` with ``flatten`` (for an MLP, as in paper 003), scaled to :math:`[0, 1]`
    and normalized with the training subset's statistics; ``y_train``, ``y_val`` are
    one-hot rows or labels. ``train_indices``, ``val_indices`` are the chosen rows; the
    validation and test loaders both serve the validation subset.

    Args:
        root: the folder holding ``MNIST/raw/``.
        num_train: training examples; ``None``: all of the kept classes (with
            ``balanced``, the largest balanced subset).
        num_val: validation examples, from the test split; ``None`` as above.
        classes: labels to keep (renumbered ``0..k-1``); ``None``: all ten.
        balanced: the same number of examples per class.
        seed: seed of the subsets and of the shuffling.
        normalize: ``"standardize"`` (mean 0, std 1 over the training subset's pixels),
            ``"center"`` (mean 0) or ``"none"`` (pixels in [0, 1]).
        target: ``"onehot"`` (float rows, for MSE) or ``"label"`` (for cross-entropy).
        flatten: inputs of shape ``(n, 784)`` instead of ``(n, 1, 28, 28)``.
        download: download the files in :meth:`prepare_data` if they are missing.
        batch_size: ``None`` for full batch (one unshuffled batch of the whole subset).
        shuffle: shuffle the training minibatches each epoch (seeded); never in full batch.
        dtype: ``"float32"`` or ``"float64"``.
    """

    def __init__(
        self,
        root: str,
        num_train: int | None = 5000,
        num_val: int | None = 1000,
        classes: list[int] | None = None,
        balanced: bool = True,
        seed: int = 0,
        normalize: Normalize = "standardize",
        target: TargetKind = "onehot",
        flatten: bool = False,
        download: bool = False,
        batch_size: int | None = None,
        shuffle: bool = True,
        dtype: DType = "float32",
    ) -> None:
        super().__init__(seed, normalize, target, batch_size, shuffle, dtype)
        check_size(num_train=num_train, num_val=num_val)
        self.root = str(root)
        self.num_train, self.num_val = num_train, num_val
        self.classes = check_classes(classes, 10)
        self.balanced, self.flatten, self.download = balanced, flatten, download
        self.train_indices: Tensor | None = None
        self.val_indices: Tensor | None = None

    @property
    def num_classes(self) -> int:
        """Number of kept classes ``k``."""
        return len(self.classes)

    def prepare_data(self) -> None:
        if self.download:
            MNIST(self.root, train=True, download=True)
            MNIST(self.root, train=False, download=True)

    def _reshape(self, x: Tensor) -> Tensor:
        return x.flatten(1) if self.flatten else x

    def _load(self, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out, indices = [], []
        for train, num, name in (
            (True, self.num_train, "num_train"),
            (False, self.num_val, "num_val"),
        ):
            split = MNIST(self.root, train=train, download=False)
            idx = balanced_subset(split.targets, num, self.classes, self.balanced, generator, name)
            out += [split.data[idx].unsqueeze(1), remap(split.targets[idx], self.classes)]
            indices.append(idx)
        self.train_indices, self.val_indices = indices
        return tuple(out)
