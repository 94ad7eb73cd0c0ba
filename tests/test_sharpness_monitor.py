"""SharpnessMonitor inside real Lightning fits."""

from __future__ import annotations

import copy
import csv
import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_eos.callbacks import SharpnessMonitor
from lightning_eos.callbacks._measurement_set import measurement_chunks
from lightning_eos.curvature import HessianOperator, measurement_context
from lightning_eos.data import DigitsDataModule
from lightning_eos.thresholds import UnsupportedOptimizerError


class BNDropoutNet(L.LightningModule):
    def __init__(self, optimizer: str = "sgd", dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Dropout(dropout), nn.Linear(32, 10)
        )
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return {"loss": loss}

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _trainer(tmp_path: Path | None = None, callbacks=(), max_steps=12, **kwargs) -> L.Trainer:
    options = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def _digits(batch_size=32):
    return DigitsDataModule(
        num_train=200, num_val=50, batch_size=batch_size, target="label", shuffle=True
    )


def _fit(monitor: SharpnessMonitor | None, max_steps: int = 12):
    L.seed_everything(0, verbose=False)
    model = BNDropoutNet()
    trainer = _trainer(callbacks=[monitor] if monitor else [], max_steps=max_steps)
    trainer.fit(model, _digits())
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    return model, trainer.optimizers[0], rng


def test_monitor_does_not_perturb_training_bit_for_bit():
    monitor = SharpnessMonitor(every_n_steps=3, top_k=2, num_samples=64, chunk_size=24)
    with_model, with_opt, with_rng = _fit(monitor)
    assert [h["step"] for h in monitor.history] == [0, 3, 6, 9, 12]
    without_model, without_opt, without_rng = _fit(None)

    for (name, a), b in zip(with_model.state_dict().items(), without_model.state_dict().values()):
        assert torch.equal(a, b), name  # parameters and BatchNorm buffers
    for a, b in zip(with_model.parameters(), without_model.parameters()):
        assert torch.equal(a.grad, b.grad)
    for a, b in zip(with_opt.state.values(), without_opt.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert torch.equal(with_rng[0], without_rng[0])
    assert with_rng[1] == without_rng[1]
    assert np.array_equal(with_rng[2], without_rng[2])


def test_logged_sharpness_matches_scipy_on_the_measurement_set(tmp_path):
    scipy_linalg = pytest.importorskip("scipy.sparse.linalg")
    monitor = SharpnessMonitor(every_n_steps=4, top_k=3, num_samples=100, chunk_size=30, tol=1e-6)
    logger = CSVLogger(tmp_path, name="run")
    L.seed_everything(0, verbose=False)
    model = BNDropoutNet()
    trainer = _trainer(tmp_path, [monitor], max_steps=8, logger=logger)
    dm = _digits()
    trainer.fit(model, dm)

    # every metric at every scheduled step, in the CSV
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eos/sharpness")]
    assert [int(r["step"]) for r in rows] == [0, 4, 8]
    for row, record in zip(rows, monitor.history):
        for key in (
            "eos/sharpness",
            "eos/eig_2",
            "eos/eig_3",
            "eos/threshold",
            "eos/sharpness_ratio",
            "eos/lanczos_iters",
        ):
            assert float(row[key]) == pytest.approx(record[key], rel=1e-6)
    assert float(rows[-1]["eos/threshold"]) == pytest.approx((2 + 2 * 0.9) / 0.05)

    # independent float64 reference on the same chunks, train-mode BN, dropout off
    reference_model = copy.deepcopy(model).double()
    chunks = measurement_chunks(dm.train_dataloader(), 100, 30, seed=0)
    chunks = [(x.double(), y) for x, y in chunks]
    loss_fn = lambda m, b: F.cross_entropy(m.net(b[0]), b[1])  # noqa: E731
    with measurement_context(reference_model):
        op = HessianOperator(reference_model, loss_fn, chunks)
        linear = scipy_linalg.LinearOperator(
            (op.dim, op.dim),
            matvec=lambda v: op.matvec(torch.from_numpy(v)).numpy(),
            dtype=np.float64,
        )
        exact = np.sort(scipy_linalg.eigsh(linear, k=3, which="LA", tol=1e-10)[0])[::-1]
    last = monitor.history[-1]
    measured = [last["eos/sharpness"], last["eos/eig_2"], last["eos/eig_3"]]
    np.testing.assert_allclose(measured, exact, rtol=1e-4)


def test_resume_logs_the_same_sharpness(tmp_path):
    def run(ckpt_path=None, callbacks=()):
        L.seed_everything(0, verbose=False)
        monitor = SharpnessMonitor(every_n_steps=5, top_k=2)
        trainer = _trainer(tmp_path, [monitor, *callbacks], max_steps=30, enable_checkpointing=True)
        dm = DigitsDataModule(num_train=300, num_val=50, target="label")
        model = BNDropoutNet(dropout=0.0)  # Lightning does not checkpoint the global RNG
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return monitor

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=15, save_top_k=-1)
    full = run(callbacks=[saver])
    ckpt = next(p for p in (tmp_path / "ckpt").iterdir() if "step=15" in p.name)
    resumed = run(ckpt_path=str(ckpt))
    assert [h["step"] for h in resumed.history] == [h["step"] for h in full.history]
    for a, b in zip(full.history, resumed.history):
        assert a["eos/lanczos_iters"] == b["eos/lanczos_iters"]  # the warm start came back
        assert a["eos/sharpness"] == pytest.approx(b["eos/sharpness"], rel=1e-6)
        assert a["eos/eig_2"] == pytest.approx(b["eos/eig_2"], rel=1e-6)


def test_non_finite_measurement_is_skipped_with_a_warning():
    def loss_fn(module, batch):
        x, y = batch
        loss = F.cross_entropy(module.net(x), y)
        return loss * float("nan") if module.trainer.global_step == 4 else loss

    monitor = SharpnessMonitor(every_n_steps=2, loss_fn=loss_fn)
    with pytest.warns(UserWarning, match="skipped the measurement at step 4"):
        _fit(monitor, max_steps=8)
    assert [h["step"] for h in monitor.history] == [0, 2, 6, 8]


def test_unknown_optimizer_fails_at_setup_unless_threshold_is_off():
    with pytest.raises(UnsupportedOptimizerError, match="threshold=None"):
        _trainer(callbacks=[SharpnessMonitor()]).fit(BNDropoutNet("adam"), _digits())
    monitor = SharpnessMonitor(every_n_steps=2, threshold=None)
    _trainer(callbacks=[monitor], max_steps=2).fit(BNDropoutNet("adam"), _digits())
    assert "eos/threshold" not in monitor.history[-1] and monitor.history[-1]["eos/sharpness"] > 0


def test_manual_optimization_needs_a_loss_fn():
    class Manual(BNDropoutNet):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="loss_fn"):
        _trainer(callbacks=[SharpnessMonitor()]).fit(Manual(), _digits())


def test_state_dict_round_trip():
    monitor = SharpnessMonitor(every_n_steps=3)
    _fit(monitor, max_steps=3)
    state = monitor.state_dict()
    assert state["last_step"] == 3 and state["warm_start"].shape[1] == sum(
        p.numel() for p in BNDropoutNet().parameters()
    )
    fresh = SharpnessMonitor(every_n_steps=3)
    fresh.load_state_dict(state)
    assert fresh._last_step == 3 and torch.equal(fresh._warm_start, state["warm_start"])
    assert fresh.history == monitor.history


@pytest.mark.parametrize(
    "kwargs",
    [
        {"every_n_steps": 0},
        {"top_k": 0},
        {"mode": "test"},
        {"threshold": "2/eta"},
        {"chunk_size": 0},
    ],
)
def test_bad_arguments_fail_at_construction(kwargs):
    with pytest.raises(ValueError):
        SharpnessMonitor(**kwargs)
