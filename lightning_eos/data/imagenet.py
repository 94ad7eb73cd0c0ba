"""Seeded ImageNet subsets (a few classes, a few images each) at a low resolution.

The images come through torchvision's real loaders: :class:`~torchvision.datasets.ImageFolder`
on ``root/train/<class>/*`` and ``root/val/<class>/*`` (``source="folder"``: an extracted
ImageNet, or any data set laid out that way), or :class:`~torchvision.datasets.ImageNet`
(``source="imagenet"``: the official archives and devkit in ``root``, which torchvision
extracts on first use; class names are then WordNet ids such as ``"n01440764"``).
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import Tensor
from torchvision import transforms
from torchvision.datasets import ImageFolder, ImageNet
from torchvision.datasets.folder import find_classes

from lightning_eos.data._subsets import (
    Normalize,
    TargetKind,
    _ImageSubsetDataModule,
    balanced_subset,
    remap,
)
from lightning_eos.data.synthetic import DType

__all__ = ["ImageNetSubsetDataModule"]

Source = Literal["folder", "imagenet"]


class _ClassesFolder(ImageFolder):
    """:class:`~torchvision.datasets.ImageFolder` over the named class folders only.

    Only those folders are scanned (not all 1000 of ImageNet), and their labels are their
    positions in ``names``.
    """

    def __init__(self, root: str, names: list[str], **kwargs) -> None:
        self._names = list(names)
        super().__init__(root, **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        missing = [n for n in self._names if not os.path.isdir(os.path.join(directory, n))]
        if missing:
            raise FileNotFoundError(
                f"class folders {missing} not found in {directory}; choose classes that "
                "exist in both root/train and root/val."
            )
        return list(self._names), {n: i for i, n in enumerate(self._names)}


class ImageNetSubsetDataModule(_ImageSubsetDataModule):
    """``images_per_class`` images of each of a few ImageNet classes, as tensors.

    The classes are the first ``classes`` names in sorted order (WordNet ids sort as
    ImageNet's class indices do), or the names given, labelled ``0..k-1`` in that order.
    The images of each class are drawn by a ``torch.Generator`` seeded with ``seed``
    (training first, then validation from the validation split), never by the rank, so
    every DDP rank builds the identical subset and Lightning's ``DistributedSampler``
    splits it. Each image is resized (shorter side to ``resolution``) and center-cropped
    to ``resolution`` x ``resolution`` as uint8, then scaled to :math:`[0, 1]` and
    normalized per channel with the training subset's statistics.

    :meth:`setup` reads the chosen images once and builds ``x_train``, ``x_val`` of shape
    ``(n, 3, resolution, resolution)`` and ``y_train``, ``y_val`` (one-hot rows or
    labels); ``train_files``, ``val_files`` are the chosen images' paths and
    ``class_names`` the kept classes (the validation and test loaders both serve the
    validation subset). ``source="imagenet"`` is passed to torchvision as is
    (it needs the devkit, and scans the whole split once).

    Args:
        root: the folder holding ``train/`` and ``val/`` (``"folder"``), or ImageNet's
            archives and devkit (``"imagenet"``).
        source: ``"folder"`` or ``"imagenet"``.
        classes: the number of classes (the first in sorted order) or their names.
        images_per_class: training images per class.
        val_per_class: validation images per class, from the validation split.
        resolution: side of the square images.
        seed: seed of the subsets and of the shuffling.
        normalize: ``"standardize"`` (per-channel mean 0, std 1 on the training
            subset), ``"center"`` (mean 0 only) or ``"none"`` (pixels in [0, 1]).
        target: ``"onehot"`` (float rows, for MSE) or ``"label"`` (for cross-entropy).
        batch_size: ``None`` for full batch (one unshuffled batch of the whole subset).
        shuffle: shuffle the training minibatches each epoch (seeded); never in full batch.
        dtype: ``"float32"`` or ``"float64"``.
    """

    def __init__(
        self,
        root: str,
        source: Source = "folder",
        classes: int | list[str] = 10,
        images_per_class: int = 100,
        val_per_class: int = 20,
        resolution: int = 64,
        seed: int = 0,
        normalize: Normalize = "standardize",
        target: TargetKind = "onehot",
        batch_size: int | None = None,
        shuffle: bool = True,
        dtype: DType = "float32",
    ) -> None:
        super().__init__(seed, normalize, target, batch_size, shuffle, dtype)
        if source not in ("folder", "imagenet"):
            raise ValueError(f"source={source!r}; choose 'folder' or 'imagenet'.")
        if isinstance(classes, int):
            if classes < 1:
                raise ValueError(f"classes={classes}; use a positive count or a list of names.")
        else:
            classes = [str(c) for c in classes]
            if not classes or len(set(classes)) != len(classes):
                raise ValueError(f"classes={classes}; give distinct names, at least one.")
        for name, value in dict(
            images_per_class=images_per_class, val_per_class=val_per_class, resolution=resolution
        ).items():
            if value < 1:
                raise ValueError(f"{name}={value}; it must be at least 1.")
        self.root, self.source, self.classes = str(root), source, classes
        self.images_per_class, self.val_per_class = images_per_class, val_per_class
        self.resolution = resolution
        self.class_names: list[str] | None = None
        self.train_files: list[str] | None = None
        self.val_files: list[str] | None = None

    @property
    def num_classes(self) -> int:
        """Number of kept classes ``k``."""
        return self.classes if isinstance(self.classes, int) else len(self.classes)

    def prepare_data(self) -> None:
        if self.source == "imagenet":  # extract the archives once, before every rank reads
            ImageNet(self.root, split="train")
            ImageNet(self.root, split="val")

    def _transform(self) -> transforms.Compose:
        return transforms.Compose(
            [
                transforms.Resize(self.resolution),
                transforms.CenterCrop(self.resolution),
                transforms.PILToTensor(),
            ]
        )

    def _split(self, split: str) -> tuple[ImageFolder, list[int]]:
        """The split's dataset and the dataset labels of the kept classes, in order."""
        if self.source == "folder":
            dataset = _ClassesFolder(
                os.path.join(self.root, split), self.class_names, transform=self._transform()
            )
            return dataset, list(range(len(self.class_names)))
        dataset = ImageNet(self.root, split=split, transform=self._transform())
        missing = [n for n in self.class_names if n not in dataset.wnid_to_idx]
        if missing:
            raise ValueError(f"classes {missing} are not ImageNet WordNet ids; e.g. 'n01440764'.")
        return dataset, [dataset.wnid_to_idx[n] for n in self.class_names]

    def _choose_classes(self) -> list[str]:
        if not isinstance(self.classes, int):
            return list(self.classes)
        if self.source == "folder":
            names = find_classes(os.path.join(self.root, "train"))[0]
        else:
            names = sorted(ImageNet(self.root, split="train").wnids)
        if self.classes > len(names):
            raise ValueError(
                f"classes={self.classes}, but {self.root} has {len(names)}; choose classes "
                f"<= {len(names)}."
            )
        return names[: self.classes]

    def _load(self, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        self.class_names = self._choose_classes()
        out, files = [], []
        for split, per_class, name in (
            ("train", self.images_per_class, "images_per_class"),
            ("val", self.val_per_class, "val_per_class"),
        ):
            dataset, labels_of = self._split(split)
            labels = torch.as_tensor(dataset.targets, dtype=torch.long)
            for class_name, label in zip(self.class_names, labels_of):
                count = int((labels == label).sum())
                if count < per_class:
                    raise ValueError(
                        f"class {class_name!r} has {count} images in {split}; choose "
                        f"{name} <= {count}."
                    )
            k = len(self.class_names)
            idx = balanced_subset(labels, per_class * k, labels_of, True, generator, name)
            images = torch.stack([dataset[i][0] for i in idx.tolist()])
            out += [images, remap(labels[idx], labels_of)]
            files.append([dataset.samples[i][0] for i in idx.tolist()])
        self.train_files, self.val_files = files
        return tuple(out)
