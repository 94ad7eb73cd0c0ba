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
import torchmetrics
from conftest import dense_hessian, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_eos.callbacks import SharpnessMonitor
from lightning_eos.data import DigitsDataModule
from lightning_eos.thresholds import UnsupportedOptimizerError


class BNDropoutNet(L.LightningModule):
    def __init__(self, optimizer: str = "sgd", dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Dropout(dropout), nn.Linear(32, 10)
        )
        self.optimizer = optimizer
        self.accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.accuracy(logits, y)
        self.log("train_loss", loss)
        self.log("train_acc", self.accuracy)
        return {"loss": loss}

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class NoisyNet(BNDropoutNet):
    """Draws from every RNG a training step can touch: torch, NumPy, Python."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = F.dropout(self.net[:3](x), p=0.1, training=self.training)  # functional dropout
        logits = self.net[3:](h)
        loss = F.cross_entropy(logits, y) * (1 + 1e-3 * np.random.rand() + 1e-3 * random.random())
        self.accuracy(logits, y)
        self.log("train_loss", loss)
        return loss


class AugmentedDigits(torch.utils.data.Dataset):
    """Digits with random noise added in __getitem__, drawn from the global torch RNG."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x + 0.1 * torch.randn_like(x), y


def _digits(batch_size=32):
    return DigitsDataModule(
        num_train=200, num_val=50, batch_size=batch_size, target="label", shuffle=True
    )


def _fit(monitor, max_steps=12, model_fn=BNDropoutNet, data_fn=None, **kwargs):
    L.seed_everything(0, verbose=False)
    model = model_fn()
    trainer = quiet_trainer(callbacks=[monitor] if monitor else [], max_steps=max_steps, **kwargs)
    trainer.fit(model, (data_fn or _digits)())
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    return model, trainer.optimizers[0], rng


def _augmented_loader():
    dm = _digits()
    dm.setup()
    return torch.utils.data.DataLoader(AugmentedDigits(dm.train_set), batch_size=32, shuffle=True)


def test_monitor_does_not_perturb_training_bit_for_bit():
    # BatchNorm, module and functional dropout, torchmetrics, NumPy and Python RNG in the
    # step, random augmentation in the dataset, shuffling, gradient accumulation
    def fit(monitor):
        return _fit(
            monitor, model_fn=NoisyNet, data_fn=_augmented_loader, accumulate_grad_batches=2
        )

    monitor = SharpnessMonitor(every_n_steps=3, top_k=2, num_samples=64, chunk_size=24)
    with_model, with_opt, with_rng = fit(monitor)
    assert [h["step"] for h in monitor.history] == [0, 3, 6, 9, 12]
    without_model, without_opt, without_rng = fit(None)

    for (name, a), b in zip(with_model.state_dict().items(), without_model.state_dict().values()):
        assert torch.equal(a, b), name  # parameters and BatchNorm buffers
    for a, b in zip(with_model.parameters(), without_model.parameters()):
        assert torch.equal(a.grad, b.grad)
    for a, b in zip(with_opt.state.values(), without_opt.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert torch.equal(with_rng[0], without_rng[0])
    assert with_rng[1] == without_rng[1]
    assert np.array_equal(with_rng[2], without_rng[2])
    assert torch.equal(with_model.accuracy.compute(), without_model.accuracy.compute())


def _reference_eigenvalues(model, x, y, indices, chunk_size, mode, k=3):
    """Float64 dense Hessian of the chunk-weighted loss, written independently of the library."""
    ref = copy.deepcopy(model).double()
    if mode == "train":
        ref.train()
        ref.net[3].eval()  # dropout off, BatchNorm on batch statistics
    else:
        ref.eval()
    x, y = x[indices].double(), y[indices]
    bounds = [(s, min(s + chunk_size, len(indices))) for s in range(0, len(indices), chunk_size)]

    def loss_fn(net, batch):
        return sum((b - a) / len(indices) * F.cross_entropy(net(x[a:b]), y[a:b]) for a, b in bounds)

    hessian = dense_hessian(ref.net, loss_fn, None)
    return torch.linalg.eigvalsh(hessian).flip(0)[:k].numpy()


def test_logged_sharpness_matches_a_dense_float64_reference(tmp_path):
    monitor = SharpnessMonitor(every_n_steps=4, top_k=3, num_samples=100, chunk_size=30, tol=1e-6)
    logger = CSVLogger(tmp_path, name="run")
    L.seed_everything(0, verbose=False)
    model = BNDropoutNet()
    trainer = quiet_trainer(tmp_path, [monitor], max_steps=8, logger=logger)
    dm = _digits()
    trainer.fit(model, dm)

    # every metric at every scheduled step, in the CSV
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eos/sharpness")]
    assert [int(r["step"]) for r in rows] == [0, 4, 8]
    keys = (
        "eos/sharpness",
        "eos/eig_2",
        "eos/eig_3",
        "eos/threshold",
        "eos/sharpness_ratio",
        "eos/lanczos_iters",
    )
    for row, record in zip(rows, monitor.history):
        for key in keys:
            assert float(row[key]) == pytest.approx(record[key], rel=1e-6)
    assert float(rows[-1]["eos/threshold"]) == pytest.approx((2 + 2 * 0.9) / 0.05)

    # the documented measurement set: a seed-0 subset of 100 in dataset order, chunks of 30
    x, y = dm.train_set.tensors
    indices = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:100].sort().values
    exact = _reference_eigenvalues(model, x, y, indices, 30, "train")
    last = monitor.history[-1]
    measured = [last["eos/sharpness"], last["eos/eig_2"], last["eos/eig_3"]]
    np.testing.assert_allclose(measured, exact, rtol=1e-4)


def test_eval_mode_on_a_given_dataloader_matches_its_reference():
    L.seed_everything(0, verbose=False)
    dm = _digits()
    dm.setup()
    x, y = dm.val_set.tensors  # measure on held-out data instead of the training set
    loader = torch.utils.data.DataLoader(dm.val_set, batch_size=20)
    train_mode = SharpnessMonitor(every_n_steps=5, top_k=2, dataloader=loader, tol=1e-6)
    eval_mode = SharpnessMonitor(every_n_steps=5, top_k=2, dataloader=loader, mode="eval", tol=1e-6)
    assert train_mode.state_key != eval_mode.state_key
    model = BNDropoutNet()
    quiet_trainer(callbacks=[train_mode, eval_mode], max_steps=5).fit(model, dm)
    everything = torch.arange(len(x))
    for monitor, mode in ((train_mode, "train"), (eval_mode, "eval")):
        exact = _reference_eigenvalues(model, x, y, everything, 20, mode, k=2)
        last = monitor.history[-1]
        np.testing.assert_allclose([last["eos/sharpness"], last["eos/eig_2"]], exact, rtol=1e-4)
    # BatchNorm makes the two losses different functions
    assert (
        abs(train_mode.history[-1]["eos/sharpness"] / eval_mode.history[-1]["eos/sharpness"] - 1)
        > 1e-3
    )


def test_gradient_accumulation_measures_after_optimizer_steps_only():
    monitor = SharpnessMonitor(every_n_steps=2, measure_at_start=False)
    _fit(monitor, max_steps=6, accumulate_grad_batches=3)
    assert [h["step"] for h in monitor.history] == [2, 4, 6]


def test_iterable_training_data_is_read_afresh():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            for _ in range(1000):
                yield torch.randn(64, generator=g), int(torch.randint(0, 10, (), generator=g))

    monitor = SharpnessMonitor(every_n_steps=2, num_samples=50, chunk_size=20)
    _fit(monitor, max_steps=4, data_fn=lambda: torch.utils.data.DataLoader(Stream(), batch_size=16))
    assert [h["step"] for h in monitor.history] == [0, 2, 4]
    assert [len(c[1]) for c in monitor._chunks] == [20, 20, 10]


def test_resume_logs_the_same_sharpness(tmp_path):
    def run(ckpt_path=None, callbacks=()):
        L.seed_everything(0, verbose=False)
        monitor = SharpnessMonitor(every_n_steps=5, top_k=2)
        trainer = quiet_trainer(
            tmp_path, [monitor, *callbacks], max_steps=30, enable_checkpointing=True
        )
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
        quiet_trainer(callbacks=[SharpnessMonitor()]).fit(BNDropoutNet("adam"), _digits())
    monitor = SharpnessMonitor(every_n_steps=2, threshold=None)
    quiet_trainer(callbacks=[monitor], max_steps=2).fit(BNDropoutNet("adam"), _digits())
    assert "eos/threshold" not in monitor.history[-1] and monitor.history[-1]["eos/sharpness"] > 0


def test_manual_optimization_needs_a_loss_fn():
    class Manual(BNDropoutNet):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="loss_fn"):
        quiet_trainer(callbacks=[SharpnessMonitor()]).fit(Manual(), _digits())


def test_state_dict_round_trip():
    monitor = SharpnessMonitor(every_n_steps=3)
    _fit(monitor, max_steps=3)
    state = monitor.state_dict()
    warm = state["warm_starts"]["hessian"]
    assert state["last_step"] == 3 and warm.shape[1] == sum(
        p.numel() for p in BNDropoutNet().parameters()
    )
    fresh = SharpnessMonitor(every_n_steps=3)
    fresh.load_state_dict(state)
    assert fresh._last_step == 3 and torch.equal(fresh._warm_starts["hessian"], warm)
    legacy = SharpnessMonitor(every_n_steps=3)  # a checkpoint from before warm_starts
    legacy.load_state_dict({"last_step": 3, "warm_start": warm, "history": []})
    assert torch.equal(legacy._warm_starts["hessian"], warm)
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


def test_several_training_loaders_need_an_explicit_dataloader():
    from lightning_eos.callbacks._measurement_set import measurement_chunks

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 2)))
    with pytest.raises(TypeError, match="dataloader="):
        measurement_chunks({"a": loader, "b": loader}, None, None, seed=0)


@pytest.mark.parametrize("name", ["FSDPStrategy", "DeepSpeedStrategy", "XLAStrategy"])
def test_sharded_strategies_are_refused_at_setup(name):
    from types import SimpleNamespace

    import lightning.pytorch.strategies as strategies

    cls = getattr(strategies, name)
    trainer = SimpleNamespace(strategy=object.__new__(cls))  # no launch, no optional deps
    with pytest.raises(ValueError, match=name):
        SharpnessMonitor().setup(trainer, BNDropoutNet(), "fit")


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize(("n", "num_samples", "chunk_size"), [(101, None, 10), (57, 40, 7)])
def test_rank_shards_partition_the_single_process_set(world_size, n, num_samples, chunk_size):
    from lightning_eos.callbacks._measurement_set import measurement_chunks

    dataset = torch.utils.data.TensorDataset(torch.arange(n))
    loader = torch.utils.data.DataLoader(dataset, batch_size=8)
    single = measurement_chunks(loader, num_samples, chunk_size, seed=0)
    shards = [
        measurement_chunks(loader, num_samples, chunk_size, 0, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    # chunk j of the single-process set is chunk j // world_size on rank j % world_size
    for j, chunk in enumerate(single):
        assert torch.equal(shards[j % world_size][j // world_size][0], chunk[0])
    assert sum(len(s) for s in shards) == len(single)
    samples = torch.cat([c[0] for shard in shards for c in shard]).sort().values
    assert torch.equal(samples, torch.cat([c[0] for c in single]).sort().values)
    assert len(samples) == len(set(samples.tolist())) == (num_samples or n)
