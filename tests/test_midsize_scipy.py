"""Lanczos on a ~100k-parameter FCN against float64 scipy eigsh."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lightning_eos.curvature import HessianOperator, lanczos
from lightning_eos.data import DigitsDataModule
from lightning_eos.models import FCN, mse_loss

scipy_linalg = pytest.importorskip("scipy.sparse.linalg")


def test_top3_of_95k_parameter_fcn_matches_eigsh():
    torch.manual_seed(0)
    dm = DigitsDataModule(target="onehot")
    dm.setup()
    x, y = dm.train_set.tensors
    model = FCN()  # 95,410 parameters
    assert sum(p.numel() for p in model.parameters()) == 95_410
    loss_fn = lambda m, b: mse_loss(m(b[0]), b[1])  # noqa: E731

    ours = lanczos(HessianOperator(model, loss_fn, [(x, y)]), k=3, tol=1e-6)  # float32

    model64 = copy.deepcopy(model).double()
    op64 = HessianOperator(model64, loss_fn, [(x.double(), y.double())])
    linear = scipy_linalg.LinearOperator(
        (op64.dim, op64.dim),
        matvec=lambda v: op64.matvec(torch.from_numpy(np.ascontiguousarray(v))).numpy(),
        dtype=np.float64,
    )
    exact = np.sort(scipy_linalg.eigsh(linear, k=3, which="LA", tol=1e-10)[0])[::-1]
    np.testing.assert_allclose(ours.eigenvalues.double().numpy(), exact, rtol=1e-4)
