"""scikit-learn's bundled 8x8 digits: real images, no download."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

TargetKind = Literal["onehot", "label"]


class DigitsDataModule(L.LightningDataModule):
    """The 1797 8x8 digits of ``sklearn.datasets.load_digits``, standardized.

    Each of the 64 pixel features is centered and scaled to unit variance with the
    training split's statistics (constant pixels are only centered). Targets are
    one-hot vectors for MSE (``target="onehot"``) or integer labels for
    cross-entropy (``target="label"``).

    ``image_size`` serves the standardized digits as images of shape
    ``(channels, image_size, image_size)`` instead of 64 features: the 8x8 grid is
    resized bilinearly (``image_size=8`` keeps it) and repeated over ``channels``, so the
    CIFAR networks (``channels=3, image_size=32``) train on real data on a CPU; the
    ``*_cpu.yaml`` configs use this.

    Args:
        num_train: training samples (the rest, up to ``num_val``, is validation).
        num_val: validation samples.
        batch_size: ``None`` for full-batch training (one batch per epoch).
        target: ``"onehot"`` or ``"label"``.
        shuffle: shuffle the training batches (irrelevant in full batch).
        seed: seed of the split.
        image_size: ``None`` for 64 features, else the side of the served images.
        channels: image channels (the gray value repeated); only with ``image_size``.

    Example:
        >>> data = DigitsDataModule(num_train=10, num_val=5, image_size=32, channels=3)
        >>> data.setup()
        >>> data.train_set.tensors[0].shape
        torch.Size([10, 3, 32, 32])
    """

    def __init__(
        self,
        num_train: int = 1500,
        num_val: int = 297,
        batch_size: int | None = None,
        target: TargetKind = "onehot",
        shuffle: bool = False,
        seed: int = 0,
        image_size: int | None = None,
        channels: int = 1,
    ) -> None:
        super().__init__()
        if (image_size is not None and image_size < 1) or channels < 1:
            raise ValueError(f"image_size={image_size}, channels={channels} must be positive.")
        self.image_size, self.channels = image_size, channels
        if num_train + num_val > 1797:
            raise ValueError(f"num_train + num_val = {num_train + num_val} exceeds 1797 digits.")
        if target not in ("onehot", "label"):
            raise ValueError(f"target={target!r}; choose 'onehot' or 'label'.")
        self.num_train, self.num_val = num_train, num_val
        self.batch_size, self.target, self.shuffle, self.seed = batch_size, target, shuffle, seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        x_all, y_all = load_digits(return_X_y=True)
        x_all = torch.as_tensor(x_all, dtype=torch.float32)
        y_all = torch.as_tensor(y_all, dtype=torch.long)
        order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(self.seed))
        train, val = order[: self.num_train], order[self.num_train : self.num_train + self.num_val]
        mean, std = x_all[train].mean(0), x_all[train].std(0)
        x_all = (x_all - mean) / torch.where(std > 0, std, torch.ones_like(std))
        if self.image_size is not None:
            x_all = x_all.view(-1, 1, 8, 8)
            if self.image_size != 8:
                size = (self.image_size, self.image_size)
                x_all = torch.nn.functional.interpolate(x_all, size, mode="bilinear")
            x_all = x_all.expand(-1, self.channels, -1, -1).contiguous()
        y = torch.nn.functional.one_hot(y_all, 10).float() if self.target == "onehot" else y_all
        self.train_set = TensorDataset(x_all[train], y[train])
        self.val_set = TensorDataset(x_all[val], y[val])

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader:
        size = self.batch_size or len(dataset)
        return DataLoader(dataset, batch_size=size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, self.shuffle)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, False)
