"""Paper 001's toys: closed-form losses and Hessians, the synthetic data, half-MSE training."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import dense_hessian, quiet_trainer

from lightning_eos.curvature import HessianOperator
from lightning_eos.data import Rank2DataModule, SinglePointDataModule, SparseRegressionDataModule
from lightning_eos.models import (
    FCN,
    DiagonalLinearNetwork,
    ScalarReLUNetwork,
    SupervisedTask,
    classification_loss,
    half_mse_loss,
)

F64 = torch.float64


def half_mse(model, batch):
    x, y = batch
    return half_mse_loss(model(x), y)


def point(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    data = SinglePointDataModule(x=x, y=y, dtype="float64")
    return next(iter(data.train_dataloader()))


# --- scalar ReLU network, paper 001 §3.1 ------------------------------------------------


@pytest.mark.parametrize(
    ("u", "v"),
    [(10.0, 1e-6), (3.0, 0.5), (0.7, -1.3), (-2.0, 0.5), (-0.3, -4.0)],
    ids=["fig3-init", "u=3", "u=0.7,v<0", "dead,u=-2", "dead,u=-0.3"],
)
def test_scalar_relu_loss_and_hessian_are_the_closed_forms(u, v):
    net = ScalarReLUNetwork(u0=u, v0=v).double()
    u, v = net.u.item(), net.v.item()  # the float32-rounded initial values
    batch = point(1.0, 0.0)
    loss = half_mse(net, batch).item()
    hessian = dense_hessian(net, half_mse, batch)
    if u > 0:
        expected_loss = 0.5 * u**2 * v**2
        expected = torch.tensor([[v**2, 2 * u * v], [2 * u * v, u**2]], dtype=F64)
    else:  # the dead ReLU: flat
        expected_loss, expected = 0.0, torch.zeros(2, 2, dtype=F64)
    assert loss == pytest.approx(expected_loss, rel=1e-14, abs=0.0)
    torch.testing.assert_close(hessian, expected, rtol=1e-13, atol=0.0)


def test_library_hessian_gives_sharpness_u_squared_at_a_minimum():
    # at (u, 0) the Hessian is diag(0, u^2): the monitors' sharpness is u^2 (§3.1)
    net = ScalarReLUNetwork(u0=9.5, v0=0.0).double()
    operator = HessianOperator(net, half_mse, [point(1.0, 0.0)])
    dense = torch.stack([operator.matvec(e) for e in torch.eye(2, dtype=F64)])
    torch.testing.assert_close(dense, torch.diag(torch.tensor([0.0, 9.5**2], dtype=F64)))


def test_scalar_relu_takes_scalar_inputs_of_either_shape():
    net = ScalarReLUNetwork(u0=2.0, v0=3.0)
    x = torch.tensor([1.0, -1.0, 0.5])
    expected = torch.tensor([6.0, 0.0, 3.0])
    torch.testing.assert_close(net(x), expected)
    torch.testing.assert_close(net(x[:, None]), expected)
    assert net.u.shape == net.v.shape == (1,)
    with pytest.raises(ValueError, match="takes 1"):
        net(torch.ones(3, 2))


# --- linear diagonal network, eq. (2) and App. E.6 ---------------------------------------


@pytest.mark.parametrize(("u", "v"), [(1.5, 0.5), (1.0, 0.0), (0.3, -0.8), (-1.2, 2.0)], ids=str)
def test_ldn_single_point_is_eq17(u, v):
    # L = (u^2 - v^2 - 1)^2 / 2 and its Hessian, App. E.6 eq. (17)
    net = DiagonalLinearNetwork(dim=1, u0=u, v0=v).double()
    u, v = net.u.item(), net.v.item()  # the float32-rounded initial values
    batch = point([1.0], 1.0)
    eq17 = torch.tensor(
        [[6 * u**2 - 2 * v**2 - 2, -4 * u * v], [-4 * u * v, 6 * v**2 - 2 * u**2 + 2]], dtype=F64
    )
    assert half_mse(net, batch).item() == pytest.approx(0.5 * (u**2 - v**2 - 1) ** 2, rel=1e-14)
    torch.testing.assert_close(dense_hessian(net, half_mse, batch), eq17, rtol=1e-13, atol=1e-13)


def test_ldn_hessian_on_random_data_is_gauss_newton_plus_residual_term():
    # hand-derived: H = J G J^T + diag(2g, -2g), J = [2 diag(u); -2 diag(v)],
    # G = X^T X / n, g = X^T r / n with residuals r = Xw - y
    g = torch.Generator().manual_seed(0)
    n, d = 7, 3
    x, y = torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)
    net = DiagonalLinearNetwork(dim=d).double()
    with torch.no_grad():
        net.u.copy_(torch.randn(d, generator=g, dtype=F64))
        net.v.copy_(torch.randn(d, generator=g, dtype=F64))
    u, v = net.u.detach(), net.v.detach()
    r = x @ (u * u - v * v) - y
    gram, grad_w = x.T @ x / n, x.T @ r / n
    jac = torch.cat([2 * torch.diag(u), -2 * torch.diag(v)])
    expected = jac @ gram @ jac.T + torch.diag(torch.cat([2 * grad_w, -2 * grad_w]))
    torch.testing.assert_close(dense_hessian(net, half_mse, (x, y)), expected)


def test_ldn_init_weights_and_shapes():
    net = DiagonalLinearNetwork(dim=4, alpha=0.3)
    assert net.u.shape == net.v.shape == (4,)
    torch.testing.assert_close(net.u.detach(), torch.full((4,), 0.3))
    assert torch.equal(net.weights(), torch.zeros(4))  # u0 = v0 = alpha 1 gives w0 = 0
    assert net(torch.randn(5, 4)).shape == (5,)
    net = DiagonalLinearNetwork(dim=2, alpha=0.3, u0=2.0)
    torch.testing.assert_close(net.weights(), torch.full((2,), 4.0 - 0.09))
    assert not net.weights().requires_grad
    with pytest.raises(ValueError, match="dim=2"):
        net(torch.ones(3, 5))


# --- synthetic data, App. B and E.3.1 -----------------------------------------------------


def test_sparse_regression_matches_app_b():
    data = SparseRegressionDataModule(dtype="float64")
    data.setup()
    w = data.w_star
    assert data.x_train.shape == (50, 100) and data.y_train.shape == (50,)
    assert data.x_test.shape == (1000, 100) and data.y_test.shape == (1000,)
    assert int((w != 0).sum()) == 5 and torch.equal(w[:5], torch.full((5,), 5**-0.5, dtype=F64))
    assert w.norm().item() == pytest.approx(1.0, rel=1e-15)
    torch.testing.assert_close(data.x_train @ w, data.y_train, rtol=0, atol=1e-12)
    torch.testing.assert_close(data.x_test @ w, data.y_test, rtol=0, atol=1e-12)
    (x, y), *rest = list(data.train_dataloader())  # one full, unshuffled batch
    assert not rest and torch.equal(x, data.x_train) and torch.equal(y, data.y_train)
    for loader in (data.val_dataloader(), data.test_dataloader()):
        (x, y), *rest = list(loader)
        assert not rest and torch.equal(x, data.x_test) and torch.equal(y, data.y_test)


def test_sparse_regression_moments_within_sampling_error():
    n, d, mean, var = 20_000, 20, 5.0, 5.0
    data = SparseRegressionDataModule(num_train=n, num_test=1, dim=d, dtype="float64", seed=3)
    data.setup()
    x = data.x_train
    # every coordinate: mean and variance within 5 standard errors; coordinates uncorrelated
    assert (x.mean(0) - mean).abs().max() < 5 * (var / n) ** 0.5
    assert (x.var(0) - var).abs().max() < 5 * var * (2 / (n - 1)) ** 0.5
    cov = torch.cov(x.T)
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 5 * var / n**0.5


def test_synthetic_data_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = (SparseRegressionDataModule(seed=s, num_test=10) for s in (0, 0, 1))
    r, s = Rank2DataModule(dim=5, num_train=8, seed=0), Rank2DataModule(dim=5, num_train=8)
    for data in (a, b, c, r, s):
        data.setup()
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.x_train, c.x_train)
    assert torch.equal(r.x_train, s.x_train)
    # the training set does not depend on the size of the test set
    big = SparseRegressionDataModule(seed=0, num_test=500)
    big.setup()
    assert torch.equal(big.x_train, a.x_train)


def test_float32_data_is_the_float64_data_rounded():
    for cls in (partial(SparseRegressionDataModule, num_test=20), partial(Rank2DataModule, dim=6)):
        lo, hi = cls(dtype="float32"), cls(dtype="float64")
        lo.setup()
        hi.setup()
        assert lo.x_train.dtype == torch.float32 and hi.x_train.dtype == F64
        assert torch.equal(lo.x_train, hi.x_train.float())
        assert torch.equal(lo.y_test, hi.y_test.float())


def test_rank2_targets_are_x1_x2():
    data = Rank2DataModule(dtype="float64")
    data.setup()
    assert data.x_train.shape == (200, 400) and data.y_train.shape == (200, 1)
    assert data.x_test.shape == (1000, 400) and data.y_test.shape == (1000, 1)
    for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        assert torch.equal(y[:, 0], x[:, 0] * x[:, 1])
    (x, y), *rest = list(data.train_dataloader())
    assert not rest and torch.equal(y, data.y_train)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (partial(SparseRegressionDataModule, sparsity=101), "sparsity"),
        (partial(SparseRegressionDataModule, num_train=0), "num_train"),
        (partial(SparseRegressionDataModule, variance=-1.0), "variance"),
        (partial(Rank2DataModule, dim=1), "dim"),
        (partial(Rank2DataModule, dtype="float16"), "dtype"),
        (partial(Rank2DataModule, batch_size=0), "batch_size"),
        (partial(SinglePointDataModule, x=[]), "x is empty"),
        (partial(DiagonalLinearNetwork, dim=0), "dim"),
    ],
    ids=["sparsity>dim", "num_train=0", "variance<0", "rank2-dim=1", "fp16", "bs=0", "x=[]", "ldn"],
)
def test_constructors_fail_with_a_fix(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


# --- the paper's losses through SupervisedTask(loss="half_mse") ----------------------------


@pytest.mark.parametrize(
    ("model", "x", "y", "expected"),
    [
        (ScalarReLUNetwork(u0=3.0, v0=0.5), 1.0, 0.0, 0.5 * 9 * 0.25),
        (ScalarReLUNetwork(u0=-3.0, v0=0.5), 1.0, 0.0, 0.0),
        (DiagonalLinearNetwork(dim=1, u0=1.5, v0=0.5), [1.0], 1.0, 0.5 * (2.25 - 0.25 - 1) ** 2),
    ],
    ids=["relu", "relu-dead", "ldn"],
)
def test_single_point_gives_the_paper_losses(model, x, y, expected):
    task = SupervisedTask(model.double(), loss="half_mse")
    x, y = point(x, y)
    assert x.shape == (1, 1) and y.shape == (1,)
    loss = classification_loss(task.loss_name, task(x), y)
    assert loss.item() == pytest.approx(expected, rel=1e-15)


def test_half_mse_sums_outputs_and_rejects_broadcasting():
    out, target = torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.zeros(2, 2)
    assert half_mse_loss(out, target).item() == pytest.approx(0.5 * (5 + 9) / 2)
    with pytest.raises(ValueError, match="reshape the targets"):
        half_mse_loss(torch.zeros(4), torch.zeros(4, 1))


def test_half_mse_task_trains_one_gd_step_and_logs_no_accuracy(tmp_path):
    u, v, lr = 1.5, 0.5, 0.1
    net = DiagonalLinearNetwork(dim=1, u0=u, v0=v).double()
    task = SupervisedTask(net, loss="half_mse", optimizer=partial(torch.optim.SGD, lr=lr))
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.fit(task, datamodule=SinglePointDataModule(x=1.0, y=1.0, dtype="float64"))
    residual = u**2 - v**2 - 1  # gradient of eq. (17): (2 r u, -2 r v)
    assert net.u.item() == pytest.approx(u - lr * 2 * residual * u, rel=1e-15)
    assert net.v.item() == pytest.approx(v + lr * 2 * residual * v, rel=1e-15)
    assert "train/loss" in trainer.callback_metrics
    assert "train/acc" not in trainer.callback_metrics
    # regression through an FCN with one output: (n, 1) is not a classification either
    data = Rank2DataModule(dim=3, num_train=16, num_test=8)
    fcn = FCN(in_features=3, out_features=1, width=8, depth=1, activation="relu")
    task = SupervisedTask(fcn, loss="mse", optimizer=partial(torch.optim.SGD, lr=0.01))
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=1)
    trainer.fit(task, datamodule=data)
    assert {"train/loss", "val/loss"} <= set(trainer.callback_metrics)
    assert not {"train/acc", "val/acc"} & set(trainer.callback_metrics)


def test_classification_still_logs_accuracy(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    loader = torch.utils.data.DataLoader(list(zip(x, labels, strict=True)), batch_size=12)
    fcn = FCN(in_features=4, out_features=3, width=8, depth=1)
    task = SupervisedTask(fcn, loss="cross_entropy", optimizer=partial(torch.optim.SGD, lr=0.1))
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.fit(task, train_dataloaders=loader)
    assert {"train/loss", "train/acc"} <= set(trainer.callback_metrics)


def test_cli_builds_the_toys_from_yaml(tmp_path):
    from lightning_eos.cli import build_cli

    config = tmp_path / "ldn.yaml"
    config.write_text(
        """
model:
  class_path: lightning_eos.models.SupervisedTask
  init_args:
    loss: half_mse
    model: {class_path: lightning_eos.models.DiagonalLinearNetwork, init_args: {alpha: 0.2}}
    optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.001, momentum: 0.9}}
data:
  class_path: lightning_eos.data.SinglePointDataModule
  init_args: {x: [1.0, 2.0], y: 1.0, dtype: float64}
"""
    )
    cli = build_cli(["--config", str(config), "--trainer.logger=false"], run=False)
    assert isinstance(cli.model.model, DiagonalLinearNetwork) and cli.model.loss_name == "half_mse"
    assert cli.datamodule.x == [1.0, 2.0] and cli.datamodule.dtype == "float64"
