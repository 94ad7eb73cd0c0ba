"""Paper 001's synthetic data: sparse regression, rank-2 regression and a single point.

Every module is full batch by default (``batch_size=None``: one batch of the whole
training set, in a fixed order), draws its data from a ``torch.Generator`` seeded with
``seed`` (the global RNG is never touched), generates in float64 and casts to ``dtype``,
so a float32 data set is the float64 one rounded. After :meth:`setup` the tensors are
``x_train``, ``y_train``, ``x_test``, ``y_test``; the validation and test loaders serve
the held-out set.

* :class:`SparseRegressionDataModule` -- App. B (after Nacson et al.), for
  :class:`~lightning_eos.models.DiagonalLinearNetwork`.
* :class:`Rank2DataModule` -- App. E.3.1 (after Zhu et al.), for an FCN with one output.
* :class:`SinglePointDataModule` -- one example, for the scalar toys of §3.1 and App. E.6.
"""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "DType",
    "Rank2DataModule",
    "SinglePointDataModule",
    "SparseRegressionDataModule",
]

DType = Literal["float32", "float64"]
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class _SyntheticDataModule(L.LightningDataModule):
    """Tensors made once in :meth:`setup`; full-batch, unshuffled loaders."""

    def __init__(self, batch_size: int | None, dtype: DType) -> None:
        super().__init__()
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}; choose 'float32' or 'float64'.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; use a positive size or None (full).")
        self.batch_size = batch_size
        self.dtype = dtype
        self.x_train: Tensor | None = None
        self.y_train: Tensor | None = None
        self.x_test: Tensor | None = None
        self.y_test: Tensor | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        """The ``torch.dtype`` of the tensors."""
        return _DTYPES[self.dtype]

    def _generate(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``x_train, y_train, x_test, y_test`` in float64."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.x_train is not None:
            return
        tensors = [t.to(self.torch_dtype) for t in self._generate()]
        self.x_train, self.y_train, self.x_test, self.y_test = tensors

    def _loader(self, x: Tensor, y: Tensor) -> DataLoader:
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size or len(x), shuffle=False)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.x_train, self.y_train)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.x_test, self.y_test)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.x_test, self.y_test)


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name}={value}; it must be at least 1.")


class SparseRegressionDataModule(_SyntheticDataModule):
    """Sparse linear regression of paper 001, App. B (the setting of Nacson et al.).

    .. math::

        \\mathbf{x}_n \\sim \\mathcal{N}(\\mu \\mathbf{1}, \\sigma^2 I_d), \\qquad
        y_n = \\langle \\mathbf{w}_*, \\mathbf{x}_n \\rangle, \\qquad
        \\mathbf{w}_* = \\big(\\mathbb{1}[i \\le k] / \\sqrt{k}\\big)_{i=1}^d,

    with :math:`N = 50`, :math:`d = 100`, :math:`\\mu = 5`, :math:`\\sigma^2 = 5`,
    :math:`k = 5` in the paper. With :math:`N < d` the training set has a whole affine
    space of interpolators; the held-out set (same distribution) measures how close the
    one a run picks is to :math:`\\mathbf{w}_*` (the "final test loss" of Fig. 1).
    Inputs are ``(n, dim)`` and targets ``(n,)``, for
    :class:`~lightning_eos.models.DiagonalLinearNetwork` with ``loss="half_mse"``.
    The training points are drawn first, so they do not depend on ``num_test``.

    Args:
        num_train: training points :math:`N`.
        num_test: held-out points (validation and test loaders).
        dim: input dimension :math:`d`.
        mean: every coordinate's mean :math:`\\mu`.
        variance: every coordinate's variance :math:`\\sigma^2`.
        sparsity: nonzeros :math:`k` of :math:`\\mathbf{w}_*`.
        seed: seed of the data's own ``torch.Generator``.
        batch_size: ``None`` for full batch.
        dtype: ``"float32"`` or ``"float64"``.

    Example:
        >>> import torch
        >>> data = SparseRegressionDataModule(dtype="float64")
        >>> data.setup()
        >>> data.x_train.shape, data.y_train.shape, data.x_test.shape
        (torch.Size([50, 100]), torch.Size([50]), torch.Size([1000, 100]))
        >>> torch.allclose(data.x_train @ data.w_star, data.y_train)
        True
        >>> int((data.w_star != 0).sum()), round(float(data.w_star.norm()), 12)
        (5, 1.0)
    """

    def __init__(
        self,
        num_train: int = 50,
        num_test: int = 1000,
        dim: int = 100,
        mean: float = 5.0,
        variance: float = 5.0,
        sparsity: int = 5,
        seed: int = 0,
        batch_size: int | None = None,
        dtype: DType = "float32",
    ) -> None:
        super().__init__(batch_size, dtype)
        _check_positive(num_train=num_train, num_test=num_test, dim=dim, sparsity=sparsity)
        if sparsity > dim:
            raise ValueError(f"sparsity={sparsity} exceeds dim={dim}; choose sparsity <= dim.")
        if variance < 0:
            raise ValueError(f"variance={variance}; it must be nonnegative.")
        self.num_train, self.num_test, self.dim = num_train, num_test, dim
        self.mean, self.variance, self.sparsity, self.seed = mean, variance, sparsity, seed

    @property
    def w_star(self) -> Tensor:
        """The sparse teacher :math:`\\mathbf{w}_*`, unit norm, in the data's dtype."""
        return self._w_star64().to(self.torch_dtype)

    def _w_star64(self) -> Tensor:
        w = torch.zeros(self.dim, dtype=torch.float64)
        w[: self.sparsity] = 1.0 / math.sqrt(self.sparsity)
        return w

    def _generate(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        w = self._w_star64()
        std = math.sqrt(self.variance)
        out = []
        for n in (self.num_train, self.num_test):
            x = self.mean + std * torch.randn(n, self.dim, generator=g, dtype=torch.float64)
            out += [x, x @ w]
        return tuple(out)


class Rank2DataModule(_SyntheticDataModule):
    """The rank-2 regression of paper 001, App. E.3.1 (after Zhu et al.).

    .. math:: \\mathbf{x}_i \\sim \\mathcal{N}(0, I_d), \\qquad y_i = x_{i,1}\\, x_{i,2},

    "rank2-400-200" (:math:`d = 400`, 200 training points) in the paper, trained with a
    3-layer ReLU FCN of width 64 (Fig. 9); Fig. 8 uses :math:`d = 3`, 100 points.
    Targets have shape ``(n, 1)``, for an FCN with ``out_features=1`` and MSE.
    The training points are drawn first, so they do not depend on ``num_test``.

    Args:
        dim: input dimension :math:`d` (at least 2).
        num_train: training points.
        num_test: held-out points (validation and test loaders).
        seed: seed of the data's own ``torch.Generator``.
        batch_size: ``None`` for full batch.
        dtype: ``"float32"`` or ``"float64"``.

    Example:
        >>> data = Rank2DataModule(dim=3, num_train=100)
        >>> data.setup()
        >>> data.x_train.shape, data.y_train.shape
        (torch.Size([100, 3]), torch.Size([100, 1]))
        >>> import torch
        >>> torch.allclose(data.y_train[:, 0], data.x_train[:, 0] * data.x_train[:, 1])
        True
    """

    def __init__(
        self,
        dim: int = 400,
        num_train: int = 200,
        num_test: int = 1000,
        seed: int = 0,
        batch_size: int | None = None,
        dtype: DType = "float32",
    ) -> None:
        super().__init__(batch_size, dtype)
        _check_positive(num_train=num_train, num_test=num_test)
        if dim < 2:
            raise ValueError(f"dim={dim}; y = x_1 x_2 needs dim >= 2.")
        self.dim, self.num_train, self.num_test, self.seed = dim, num_train, num_test, seed

    def _generate(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        out = []
        for n in (self.num_train, self.num_test):
            x = torch.randn(n, self.dim, generator=g, dtype=torch.float64)
            out += [x, x[:, :2].prod(1, keepdim=True)]
        return tuple(out)


class SinglePointDataModule(_SyntheticDataModule):
    """One example :math:`(\\mathbf{x}, y)`, for paper 001's two-parameter losses.

    With ``loss="half_mse"``:

    * :math:`(x, y) = (1, 0)` and :class:`~lightning_eos.models.ScalarReLUNetwork`:
      :math:`\\tfrac12 u^2 v^2 \\mathbb{1}[u \\ge 0]` (§3.1);
    * :math:`(\\mathbf{x}, y) = ([1], 1)` and
      :class:`~lightning_eos.models.DiagonalLinearNetwork` with ``dim=1``:
      :math:`\\tfrac12 (u^2 - v^2 - 1)^2` (App. E.2, E.6).

    The input has shape ``(1, dim)`` (``dim = 1`` for a float ``x``), the target
    ``(1,)``. Training, validation and test loaders all serve the same point.

    Args:
        x: the input, a float or a list of floats.
        y: the target.
        dtype: ``"float32"`` or ``"float64"``.

    Example:
        >>> data = SinglePointDataModule(x=[1.0], y=1.0)
        >>> x, y = next(iter(data.train_dataloader()))
        >>> x, y
        (tensor([[1.]]), tensor([1.]))
    """

    def __init__(
        self, x: float | list[float] = 1.0, y: float = 0.0, dtype: DType = "float32"
    ) -> None:
        super().__init__(None, dtype)
        self.x = [float(x)] if isinstance(x, (int, float)) else [float(xi) for xi in x]
        if not self.x:
            raise ValueError("x is empty; pass a float or a nonempty list of floats.")
        self.y = float(y)

    def _generate(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = torch.tensor([self.x], dtype=torch.float64)
        y = torch.tensor([self.y], dtype=torch.float64)
        return x, y, x, y
