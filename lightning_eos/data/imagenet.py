"""Seeded ImageNet subsets (a few classes, a few images each) at a low resolution.

The images come through torchvision's real loaders: :class:`~torchvision.datasets.ImageFolder`
on ``root/train/<class>/*`` and ``root/val/<class>/*`` (``source="folder"``: an extracted
ImageNet, or any data set laid out that way), or :class:`~torchvision.datasets.ImageNet`
(``source="imagenet"``: the official archives and devkit in ``root``, which torchvision
extracts on first use; class names are then WordNet ids such as ``"n01440764"``).
Nothing is downloaded: the ILSVRC-2012 images (https://image-net.org) must be on disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor
from torchvision import transforms
from torchvision.datasets import ImageFolder, ImageNet
from torchvision.datasets.folder import IMG_EXTENSIONS

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

_FOLDER_LAYOUT = (
    "ImageNetSubsetDataModule(source='folder') reads an ImageFolder tree that you provide "
    "locally: {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG, one folder per class "
    "(WordNet ids such as n01440764, or any names), the validation images sorted into class "
    "folders too. Nothing is downloaded: get ILSVRC-2012 (ImageNet-1k) from "
    "https://image-net.org and extract it in that layout, or put its archives and devkit in "
    "{root} and pass source='imagenet' (torchvision then extracts them into it)."
)


def _layout_error(problem: str, root: str) -> FileNotFoundError:
    """``problem``, followed by the folder layout that ``source="folder"`` expects."""
    return FileNotFoundError(f"{problem} {_FOLDER_LAYOUT.format(root=root)}")


def _class_folders(root: str, split: str) -> list[str]:
    """The sorted class folders of ``root/split``, as torchvision's ``find_classes`` lists them.

    Raises:
        FileNotFoundError: if ``root/split`` does not exist or holds no folder.
    """
    directory = os.path.join(root, split)
    if not os.path.isdir(directory):
        if os.path.isdir(root):
            empty = "" if os.listdir(root) else f" ({root} is empty)"
            raise _layout_error(f"{directory} does not exist{empty}.", root)
        problem = "is not a folder" if os.path.exists(root) else "does not exist"
        raise _layout_error(f"{root} {problem}.", root)
    names = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
    if not names:
        raise _layout_error(f"{directory} holds no class folders.", root)
    return names


class _ClassesFolder(ImageFolder):
    """:class:`~torchvision.datasets.ImageFolder` over the named class folders of ``root/split``.

    Only those folders are scanned (not all 1000 of ImageNet), and their labels are their
    positions in ``names``.
    """

    def __init__(self, root: str, split: str, names: list[str], **kwargs) -> None:
        self._data_root, self._split, self._names = root, split, list(names)
        super().__init__(os.path.join(root, split), **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        missing = [n for n in self._names if not os.path.isdir(os.path.join(directory, n))]
        if missing:
            _class_folders(self._data_root, self._split)  # a missing or empty split says so
            raise _layout_error(
                f"class folders {missing} not found in {directory}; choose classes that "
                "exist in both root/train and root/val.",
                self._data_root,
            )
        return list(self._names), {n: i for i, n in enumerate(self._names)}

    def make_dataset(
        self,
        directory: str,
        class_to_idx: dict[str, int],
        extensions: tuple[str, ...] | None = None,
        is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        # torchvision's own error names the empty classes but not their folder
        samples = super().make_dataset(
            directory, class_to_idx, extensions, is_valid_file, allow_empty=True
        )
        found = {label for _, label in samples}
        empty = [os.path.join(directory, n) for n, i in class_to_idx.items() if i not in found]
        if empty and not allow_empty:
            raise _layout_error(
                f"No images in {', '.join(empty)} (torchvision reads "
                f"{', '.join(extensions or IMG_EXTENSIONS)}).",
                self._data_root,
            )
        return samples


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
    (it needs the devkit, and scans the whole split once). With ``source="folder"``, a
    missing or empty ``root``, split, class folder or a class folder without images makes
    :meth:`setup` raise :class:`FileNotFoundError` naming the folder and the layout.

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
                self.root, split, self.class_names, transform=self._transform()
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
            names = _class_folders(self.root, "train")
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
