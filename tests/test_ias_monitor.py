"""IASMonitor inside real Lightning fits, against references written without the library."""

from __future__ import annotations

import copy
import random

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from conftest import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from lightning_eos.callbacks import IASMonitor
from lightning_eos.data import DigitsDataModule
from lightning_eos.optim import SAM
from lightning_eos.thresholds import UnsupportedOptimizerError


class Net(L.LightningModule):
    def __init__(self, lr=0.3, momentum=0.0, dropout=0.0, batchnorm=False, optimizer="sgd"):
        super().__init__()
        norm = nn.BatchNorm1d(16) if batchnorm else nn.Identity()
        self.net = nn.Sequential(
            nn.Linear(64, 16), norm, nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 10)
        )
        self.lr, self.momentum, self.optimizer = lr, momentum, optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        if self.optimizer == "sam":
            return SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class BusyNet(Net):
    """A training step with torchmetrics and draws from NumPy and Python RNGs."""

    def __init__(self):
        super().__init__(lr=0.3, momentum=0.0, dropout=0.2)  # loss_change takes plain SGD
        self.accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.accuracy(logits, y)
        self.log("acc", self.accuracy)
        self.log("noise", float(np.random.rand() + random.random()))
        return F.cross_entropy(logits, y)


def _digits(batch_size=32, num_train=200):
    return DigitsDataModule(
        num_train=num_train, num_val=50, batch_size=batch_size, target="label", shuffle=True
    )


def _reference(model, x, y, b, n, lr, replacement=False):
    """Float64 per-sample gradients (one autograd call each) and the dense Hessian."""
    net = copy.deepcopy(model.net).double().eval()  # no dropout; Identity instead of BN
    x = x.double()
    params = list(net.parameters())
    rows = []
    for i in range(len(x)):
        grads = torch.autograd.grad(F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    G = torch.stack(rows)
    names = [k for k, _ in net.named_parameters()]

    def loss_of(flat):
        chunks = flat.split([p.numel() for p in params])
        values = {k: c.view_as(p) for k, c, p in zip(names, chunks, params)}
        return F.cross_entropy(torch.func.functional_call(net, values, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    H = torch.autograd.functional.hessian(loss_of, flat)
    g = G.mean(0)
    w = (1.0 if replacement else (n - b) / (n - 1)) / b
    trace_S_b = w * float((G * G).sum(1).mean()) + (1 - w) * float(g @ g)
    trace_HS_b = w * float(torch.einsum("ij,jk,ik->i", G, H, G).mean()) + (1 - w) * float(g @ H @ g)
    sizes = [p.numel() for p in params]
    stepped = {k: c.view_as(p) for k, c, p in zip(names, (flat - lr * g).split(sizes), params)}
    after = F.cross_entropy(torch.func.functional_call(net, stepped, (x,)), y)
    return {
        "eos/ias": trace_HS_b / trace_S_b,
        "eos/rho_b": float(g @ g) / trace_S_b,
        "eos/trace_S_b": trace_S_b,
        "eos/ias_instability": trace_HS_b / float(g @ g),
        "eos/sharpness": float(torch.linalg.eigvalsh(H)[-1]),
        "gd_step_change": float(after - loss_of(flat)) / float(g @ g),
    }


def test_logged_ias_matches_a_float64_reference(tmp_path):
    L.seed_everything(0, verbose=False)
    model = Net(lr=0.3)
    monitor = IASMonitor(every_n_steps=5, samples=None, chunk_size=64, tol=1e-8)
    trainer = quiet_trainer(tmp_path, callbacks=[monitor], max_steps=10)
    data = _digits()
    trainer.fit(model, data)
    assert [h["step"] for h in monitor.history] == [0, 5, 10]
    assert monitor._batch_sampling(trainer) == (32, False, 200)  # read from the loader
    last = monitor.history[-1]  # measured at the final parameters
    x, y = data.train_set.tensors
    ref = _reference(model, x, y, b=32, n=200, lr=0.3)
    for key in ("eos/ias", "eos/rho_b", "eos/trace_S_b", "eos/ias_instability", "eos/sharpness"):
        assert last[key] == pytest.approx(ref[key], rel=1e-4), key
    assert last["eos/ias_threshold"] == pytest.approx(2 * ref["eos/rho_b"] / 0.3, rel=1e-4)
    assert last["eos/threshold"] == pytest.approx(2 / 0.3)
    assert last["eos/ias_stderr"] == 0.0  # exact: every per-sample gradient


def test_full_batch_gd_ias_and_loss_change(tmp_path):
    # b = n: rho_b = 1, the IAS is g^T H g / |g|^2, and the loss change is one exact GD step
    L.seed_everything(0, verbose=False)
    model = Net(lr=0.5)
    monitor = IASMonitor(every_n_steps=3, loss_change=True, sharpness=False, tol=1e-8)
    trainer = quiet_trainer(tmp_path, callbacks=[monitor], max_steps=3)
    data = _digits(batch_size=100, num_train=100)
    trainer.fit(model, data)
    last = monitor.history[-1]
    assert "eos/sharpness" not in last and "eos/lanczos_iters" not in last
    x, y = data.train_set.tensors
    ref = _reference(model, x, y, b=100, n=100, lr=0.5)
    assert last["eos/rho_b"] == pytest.approx(1.0, abs=1e-6)
    assert last["eos/ias"] == pytest.approx(ref["eos/ias"], rel=1e-4)
    assert last["eos/normalized_loss_change"] == pytest.approx(ref["gd_step_change"], rel=1e-3)
    assert last["eos/predicted_loss_change"] == pytest.approx(
        0.5**2 / 2 * (ref["eos/ias_instability"] - 2 / 0.5), rel=1e-4
    )


def test_monitor_does_not_perturb_training_bit_for_bit():
    def fit(with_monitor):
        L.seed_everything(0, verbose=False)
        model = BusyNet()
        monitors = [IASMonitor(every_n_steps=3, samples=8, loss_change=True, loss_change_samples=2)]
        trainer = quiet_trainer(
            callbacks=monitors if with_monitor else [], max_steps=7, accumulate_grad_batches=2
        )
        trainer.fit(model, _digits())
        rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
        return model, trainer.optimizers[0], rng, (monitors[0] if with_monitor else None)

    a_model, a_opt, a_rng, monitor = fit(True)
    assert [h["step"] for h in monitor.history] == [0, 3, 6]
    assert monitor._batch_sampling(None) == (64, False, 200)  # accumulation doubles b
    b_model, b_opt, b_rng, _ = fit(False)
    for (name, a), b in zip(a_model.state_dict().items(), b_model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(a_model.parameters(), b_model.parameters()):
        assert torch.equal(a.grad, b.grad)
    assert a_opt.state_dict()["param_groups"] == b_opt.state_dict()["param_groups"]
    assert torch.equal(a_rng[0], b_rng[0]) and a_rng[1] == b_rng[1]
    assert np.array_equal(a_rng[2], b_rng[2])
    assert torch.equal(a_model.accuracy.compute(), b_model.accuracy.compute())


def test_momentum_multiplies_the_edge_and_replacement_is_read_from_the_sampler(tmp_path):
    L.seed_everything(0, verbose=False)
    data = _digits()
    data.setup()
    loader = DataLoader(
        data.train_set, batch_size=16, sampler=RandomSampler(data.train_set, replacement=True)
    )
    model = Net(lr=0.2, momentum=0.5)
    monitor = IASMonitor(every_n_steps=2, samples=None, tol=1e-8)
    trainer = quiet_trainer(tmp_path, callbacks=[monitor], max_steps=2)
    trainer.fit(model, loader)
    assert monitor._batch_sampling(trainer) == (16, True, 200)
    last = monitor.history[-1]
    x, y = data.train_set.tensors
    ref = _reference(model, x, y, b=16, n=200, lr=0.2, replacement=True)
    for key in ("eos/ias", "eos/rho_b", "eos/trace_S_b"):
        assert last[key] == pytest.approx(ref[key], rel=1e-4), key
    assert last["eos/ias_threshold"] == pytest.approx(ref["eos/rho_b"] * 2 * 1.5 / 0.2, rel=1e-4)


def test_other_samplers_need_explicit_sampling_and_loss_change_needs_plain_sgd(tmp_path):
    data = _digits()
    data.setup()
    subset = torch.utils.data.SubsetRandomSampler(range(100))
    loader = DataLoader(data.train_set, batch_size=16, sampler=subset)
    trainer = quiet_trainer(tmp_path, callbacks=[IASMonitor()], max_steps=1)
    with pytest.raises(ValueError, match="SubsetRandomSampler"):
        trainer.fit(Net(), loader)
    monitor = IASMonitor(every_n_steps=1, population=100, replacement=False, samples=4)
    quiet_trainer(tmp_path, callbacks=[monitor], max_steps=1).fit(Net(), loader)
    assert monitor._batch_sampling(None) == (16, False, 100)
    trainer = quiet_trainer(tmp_path, callbacks=[IASMonitor(loss_change=True)], max_steps=1)
    with pytest.raises(ValueError, match="plain SGD"):
        trainer.fit(Net(momentum=0.9), _digits())


def test_batchnorm_in_train_mode_is_refused_for_sgd_and_eval_mode_measures(tmp_path):
    trainer = quiet_trainer(tmp_path, callbacks=[IASMonitor()], max_steps=1)
    with pytest.raises(ValueError, match="mode='eval'"):
        trainer.fit(Net(batchnorm=True), _digits())
    gd = IASMonitor(every_n_steps=1)  # full batch: train-mode BatchNorm is fine
    quiet_trainer(tmp_path, callbacks=[gd], max_steps=1).fit(Net(batchnorm=True), _digits(200))
    assert gd.history[-1]["eos/rho_b"] == 1.0 and "eos/rho" not in gd.history[-1]
    monitor = IASMonitor(every_n_steps=1, mode="eval", samples=4)
    quiet_trainer(tmp_path, callbacks=[monitor], max_steps=1).fit(Net(batchnorm=True), _digits())
    assert len(monitor.history) == 2 and monitor.history[-1]["eos/ias"] > 0


@pytest.mark.parametrize("optimizer", ["adam", "sam"])
def test_optimizers_without_an_ias_edge_fail_at_setup(tmp_path, optimizer):
    trainer = quiet_trainer(tmp_path, callbacks=[IASMonitor()], max_steps=1)
    with pytest.raises(UnsupportedOptimizerError):
        trainer.fit(Net(optimizer=optimizer), _digits())
    monitor = IASMonitor(every_n_steps=1, threshold=None, samples=4, sharpness=False)
    if optimizer == "adam":  # the traces need no threshold
        quiet_trainer(tmp_path, callbacks=[monitor], max_steps=1).fit(
            Net(optimizer="adam"), _digits()
        )
        assert "eos/ias_threshold" not in monitor.history[-1] and monitor.history[-1]["eos/ias"] > 0


@pytest.mark.parametrize(
    "kwargs", [{"samples": 1}, {"batch_size": 0}, {"threshold": 2.0}, {"per_sample_chunk": 0}]
)
def test_bad_arguments_fail_at_construction(kwargs):
    with pytest.raises(ValueError):
        IASMonitor(**kwargs)
