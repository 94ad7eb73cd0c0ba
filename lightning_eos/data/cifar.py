"""CIFAR-10 and CIFAR-100 through torchvision's real loaders, as seeded class subsets.

Paper 001 trains on a 2-class, 2k-example CIFAR-10 subset (``classes=[0, 1],
num_train=2000``); paper 002, after Cohen et al., uses CIFAR-10 subsets with one-hot
targets and MSE, full batch. The data are torchvision's
:class:`~torchvision.datasets.CIFAR10` / :class:`~torchvision.datasets.CIFAR100`: the
python pickle batches under ``root/cifar-10-batches-py/`` or ``root/cifar-100-python/``
(the "python version" from https://www.cs.toronto.edu/~kriz/cifar.html).
"""

from __future__ import annotations

import os
import pickle
from typing import Literal

import torch
from torch import Tensor
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity

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

__all__ = ["CIFARDataModule"]

CIFARName = Literal["cifar10", "cifar100"]

_TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
_CIFAR_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"


class _UnverifiedCIFAR10(CIFAR10):
    """:class:`~torchvision.datasets.CIFAR10` that checks its files exist, not their md5."""

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class _UnverifiedCIFAR100(CIFAR100):
    """:class:`~torchvision.datasets.CIFAR100` that checks its files exist, not their md5."""

    train_list = [[name, None] for name, _ in CIFAR100.train_list]
    test_list = [[name, None] for name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


_DATASETS = {
    ("cifar10", True): CIFAR10,
    ("cifar100", True): CIFAR100,
    ("cifar10", False): _UnverifiedCIFAR10,
    ("cifar100", False): _UnverifiedCIFAR100,
}


def _unpickling_error(path: str, key: str) -> str | None:
    """Why ``path`` does not unpickle (as torchvision reads it) to a dict with ``key``."""
    try:
        with open(path, "rb") as file:
            pickle.load(file, encoding="latin1")[key]
    except Exception as err:  # a damaged pickle can fail in almost any way
        return f"{type(err).__name__}: {err}"
    return None


class CIFARDataModule(_ImageSubsetDataModule):
    """A seeded, class-balanced subset of CIFAR-10 or CIFAR-100, as tensors.

    The training subset is drawn from the training split, the validation subset from the
    test split, both by a ``torch.Generator`` seeded with ``seed`` (the training subset
    first, so it does not depend on ``num_val``), never by the process rank: under DDP
    every rank builds the identical subset and Lightning's ``DistributedSampler`` splits
    it (choose ``num_train`` divisible by the number of processes, or the sampler repeats
    examples). With ``classes``, only those labels are kept and renumbered ``0..k-1`` in
    the order given.

    :meth:`setup` builds the tensors once: ``x_train`` and ``x_val`` of shape
    ``(n, 3, 32, 32)``, the pixels scaled to :math:`[0, 1]` and then normalized per channel
    with the *training subset's* mean and population std (``mean``, ``std``, on the
    :math:`[0, 1]` scale); ``y_train`` and ``y_val`` are one-hot rows in ``dtype`` (for
    MSE, as in paper 002 and Cohen et al.) or integer labels (for cross-entropy).
    ``train_indices`` and ``val_indices`` are the chosen rows of the two splits,
    ``class_names`` the names of the kept classes. The validation and test loaders both
    serve the validation subset.

    ``download=True`` downloads in :meth:`prepare_data` (one process per node, before
    :meth:`setup`); :meth:`setup` never downloads. A missing folder or file makes
    :meth:`setup` raise :class:`FileNotFoundError`, a truncated or corrupt one
    :class:`ValueError`; both name the file and the expected layout.

    Args:
        root: the folder holding ``cifar-10-batches-py/`` or ``cifar-100-python/``.
        dataset: ``"cifar10"`` or ``"cifar100"``.
        num_train: training examples; ``None``: all of the kept classes (with
            ``balanced``, the largest balanced subset).
        num_val: validation examples, from the test split; ``None`` as above.
        classes: labels to keep (renumbered ``0..k-1``); ``None``: all.
        balanced: the same number of examples per class (``num_train`` and ``num_val``
            must be multiples of the number of classes).
        seed: seed of the subsets, and of the shuffling and augmentation.
        normalize: ``"standardize"`` (per-channel mean 0, std 1 on the training
            subset), ``"center"`` (mean 0 only) or ``"none"`` (pixels in [0, 1]).
        target: ``"onehot"`` (float rows, for MSE) or ``"label"`` (for cross-entropy).
        augment: random crop (zero padding 4, filled with normalized black) and horizontal
            flip, per image and per epoch, on the training loader only, drawn from a
            seeded generator.
        download: download the archive in :meth:`prepare_data` if it is missing.
        verify: check torchvision's md5 sums of the batch files. ``False`` skips *only*
            that check (the files must still exist and load): for files you wrote or
            converted yourself, such as the small ones the tests generate.
        batch_size: ``None`` for full batch (one unshuffled batch of the whole subset).
        shuffle: shuffle the training minibatches each epoch (seeded); never in full batch.
        dtype: ``"float32"`` or ``"float64"``.
    """

    def __init__(
        self,
        root: str,
        dataset: CIFARName = "cifar10",
        num_train: int | None = 5000,
        num_val: int | None = 1000,
        classes: list[int] | None = None,
        balanced: bool = True,
        seed: int = 0,
        normalize: Normalize = "standardize",
        target: TargetKind = "onehot",
        augment: bool = False,
        download: bool = False,
        verify: bool = True,
        batch_size: int | None = None,
        shuffle: bool = True,
        dtype: DType = "float32",
    ) -> None:
        super().__init__(seed, normalize, target, batch_size, shuffle, dtype)
        if dataset not in ("cifar10", "cifar100"):
            raise ValueError(f"dataset={dataset!r}; choose 'cifar10' or 'cifar100'.")
        check_size(num_train=num_train, num_val=num_val)
        self.root, self.dataset = str(root), dataset
        self.num_train, self.num_val = num_train, num_val
        self.classes = check_classes(classes, 10 if dataset == "cifar10" else 100)
        self.balanced, self.augment = balanced, augment
        self.download, self.verify = download, verify
        self.train_indices: Tensor | None = None
        self.val_indices: Tensor | None = None
        self.class_names: list[str] | None = None

    @property
    def num_classes(self) -> int:
        """Number of kept classes ``k``."""
        return len(self.classes)

    def _split(self, train: bool, download: bool = False) -> CIFAR10:
        return _DATASETS[self.dataset, self.verify](self.root, train=train, download=download)

    def prepare_data(self) -> None:
        if self.download:
            self._split(True, download=True)
            self._split(False, download=True)

    def _layout_error(self, error: type[Exception], problem: str) -> Exception:
        """``problem``, followed by the expected files and where they come from."""
        cls = _DATASETS[self.dataset, self.verify]
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return error(
            f"{problem} {type(self).__name__} expects the python version of "
            f"{_TITLES[self.dataset]} ({cls.filename} from {_CIFAR_PAGE}) extracted in "
            f"{self.root}, as {os.path.join(self.root, cls.base_folder)}/ holding "
            f"{', '.join(names)}. setup never downloads: download and extract it there, or "
            "pass download=True to fetch it in prepare_data."
        )

    def _damaged_file(self) -> Exception | None:
        """An error naming the first missing, truncated or corrupt file, or ``None``."""
        cls = _DATASETS[self.dataset, self.verify]
        folder = os.path.join(self.root, cls.base_folder)
        files = [(name, md5, "data") for name, md5 in cls.train_list + cls.test_list]
        files.append((cls.meta["filename"], cls.meta["md5"], cls.meta["key"]))
        if not os.path.isdir(folder):
            return self._layout_error(FileNotFoundError, f"{folder} does not exist.")
        missing = [os.path.join(folder, n) for n, _, _ in files]
        missing = [path for path in missing if not os.path.isfile(path)]
        if missing:
            return self._layout_error(FileNotFoundError, f"Not found: {', '.join(missing)}.")
        for name, md5, key in files:
            path = os.path.join(folder, name)
            size = f"{os.path.getsize(path)} bytes"
            if md5 is not None and not check_integrity(path, md5):
                return self._layout_error(
                    ValueError,
                    f"{path} fails torchvision's md5 check (expected {md5}; {size}): it is "
                    "truncated, corrupt or not the original (verify=False skips this check, "
                    "for files you wrote yourself).",
                )
            error = _unpickling_error(path, key)
            if error is not None:
                return self._layout_error(
                    ValueError, f"{path} is truncated or corrupt ({size}; {error})."
                )
        return None

    def _load(self, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out, indices = [], []
        for train, num, name in (
            (True, self.num_train, "num_train"),
            (False, self.num_val, "num_val"),
        ):
            try:
                split = self._split(train)
            except Exception as err:  # torchvision says neither which file nor what is wrong
                damaged = self._damaged_file()
                if damaged is None:
                    raise
                raise damaged from err
            labels = torch.as_tensor(split.targets, dtype=torch.long)
            idx = balanced_subset(labels, num, self.classes, self.balanced, generator, name)
            images = torch.from_numpy(split.data[idx.numpy()]).permute(0, 3, 1, 2).contiguous()
            out += [images, remap(labels[idx], self.classes)]
            indices.append(idx)
        self.train_indices, self.val_indices = indices
        self.class_names = [split.classes[c] for c in self.classes]
        return tuple(out)
