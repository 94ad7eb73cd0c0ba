"""PreconditionedSharpnessMonitor and FreezePreconditioner inside real Lightning fits."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_eos.callbacks import FreezePreconditioner, PreconditionedSharpnessMonitor
from lightning_eos.data import DigitsDataModule
from lightning_eos.optim import Adam, FrozenAdam, read_preconditioner
from lightning_eos.thresholds import UnsupportedOptimizerError

OPTIMIZERS = {
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3),
    "AdamW-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True),
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5),
    "Adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
    "ours-Adam-no-bc": lambda ps: Adam(ps, lr=1e-3, bias_correction=False),
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.1),
}


class Net(L.LightningModule):
    def __init__(self, optimizer: str = "Adam", scheduler: str | bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10))
        self.optimizer, self.scheduler = optimizer, scheduler

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        optimizer = OPTIMIZERS[self.optimizer](self.parameters())
        if not self.scheduler:
            return optimizer
        steplr = torch.optim.lr_scheduler.StepLR
        if self.scheduler == "to_zero":  # lr 0 from step 4 on
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: float(s < 4))
        elif self.scheduler == "sequential":
            first, then = steplr(optimizer, 1, gamma=0.9), steplr(optimizer, 1, gamma=0.5)
            scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [first, then], [2])
        else:
            scheduler = steplr(optimizer, step_size=1, gamma=0.9)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def _digits(batch_size=32, shuffle=True):
    return DigitsDataModule(
        num_train=120, num_val=30, batch_size=batch_size, target="label", shuffle=shuffle
    )


def _fit(callbacks, optimizer="Adam", max_steps=6, data=None, **kwargs):
    L.seed_everything(0, verbose=False)
    model = Net(optimizer, **kwargs.pop("model_kwargs", {}))
    trainer = quiet_trainer(callbacks=callbacks, max_steps=max_steps, **kwargs)
    trainer.fit(model, data or _digits())
    return model, trainer


def _reference(model, x, y, reading, k=2):
    """Top eigenvalues of P^-1 (H + L2) and of H, from a float64 dense Hessian by torch.func.

    (torch.linalg.eigvals of the non-symmetric P^-1 (H + L2) agrees, 10x slower.)"""
    net = model.net.double()
    names = [n for n, _ in net.named_parameters()]
    params = [p.detach() for p in net.parameters()]
    sizes = [p.numel() for p in params]

    def loss(flat):
        values = {n: v.view_as(p) for n, v, p in zip(names, flat.split(sizes), params, strict=True)}
        return F.cross_entropy(torch.func.functional_call(net, values, (x.double(),)), y)

    hessian = torch.func.hessian(loss)(torch.cat([p.reshape(-1) for p in params]))
    diagonal = torch.cat([d.reshape(-1) for d in reading.diagonal]).double()
    l2 = torch.cat([torch.full((n,), w) for n, w in zip(sizes, reading.l2, strict=True)]).double()
    scale = diagonal.rsqrt()  # P^-1 (H + L2) is similar to P^-1/2 (H + L2) P^-1/2
    symmetric = scale[:, None] * (hessian + torch.diag(l2)) * scale[None, :]
    eigenvalues = torch.linalg.eigvalsh(symmetric).flip(0)[:k]
    raw = torch.linalg.eigvalsh(hessian).flip(0)[:k]
    return eigenvalues.numpy(), raw.numpy()


@pytest.mark.parametrize(
    "name", ["Adam", "AdamW-amsgrad", "RMSprop", "Adafactor", "ours-Adam-no-bc"]
)
def test_logged_preconditioned_sharpness_matches_dense_float64(tmp_path, name):
    monitor = PreconditionedSharpnessMonitor(every_n_steps=3, top_k=2, num_samples=None, tol=1e-7)
    logger = CSVLogger(tmp_path, name="run")
    model, trainer = _fit([monitor], name, logger=logger, data=_digits(batch_size=50))
    assert [h["step"] for h in monitor.history] == [0, 3, 6]
    assert "eos/preconditioned_sharpness" not in monitor.history[0]  # no P before a step
    last = monitor.history[-1]

    reading = read_preconditioner(trainer.optimizers[0])  # the state the step-6 measurement saw
    x, y = trainer.datamodule.train_set.tensors
    exact, raw = _reference(model, x, y, reading)
    measured = [last["eos/preconditioned_sharpness"], last["eos/preconditioned_eig_2"]]
    np.testing.assert_allclose(measured, exact, rtol=1e-4)
    np.testing.assert_allclose([last["eos/sharpness"], last["eos/eig_2"]], raw, rtol=1e-4)
    assert last["eos/preconditioned_threshold"] == pytest.approx(reading.threshold)
    assert last["eos/preconditioned_sharpness_ratio"] == pytest.approx(exact[0] / reading.threshold)
    assert "eos/threshold" not in last  # no raw threshold is claimed for adaptive optimizers
    if name == "Adam":  # 38/eta with eta = lr / (1 - beta1^t)
        assert reading.threshold == pytest.approx(38 * (1 - 0.9**6) / 1e-2)

    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eos/sharpness")]
    assert [int(r["step"]) for r in rows] == [0, 3, 6]
    assert float(rows[-1]["eos/preconditioned_sharpness"]) == pytest.approx(measured[0], rel=1e-6)


def test_monitor_does_not_perturb_adaptive_training_bit_for_bit():
    def fit(callbacks):
        model, trainer = _fit(callbacks, "Adafactor", max_steps=8)  # step hooks installed
        return model, trainer.optimizers[0]

    monitor = PreconditionedSharpnessMonitor(every_n_steps=2, top_k=2, num_samples=64)
    with_model, with_opt = fit([monitor])
    assert [h["step"] for h in monitor.history] == [0, 2, 4, 6, 8]
    without_model, without_opt = fit([])
    for a, b in zip(with_model.parameters(), without_model.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(a.grad, b.grad)
    for a, b in zip(with_opt.state.values(), without_opt.state.values(), strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_unsupported_optimizer_fails_at_setup():
    with pytest.raises(UnsupportedOptimizerError, match="No preconditioner is known for SGD"):
        _fit([PreconditionedSharpnessMonitor()], "SGD", max_steps=1)


def test_without_raw_sharpness_only_the_preconditioned_operator_is_measured():
    monitor = PreconditionedSharpnessMonitor(every_n_steps=2, raw_sharpness=False, num_samples=64)
    _fit([monitor], "Adam", max_steps=4)
    assert [h["step"] for h in monitor.history] == [2, 4]  # step 0 has nothing to measure
    assert all("eos/sharpness" not in h for h in monitor.history)


def test_freeze_keeps_P_and_the_ratio_and_follows_the_scheduler():
    monitor = PreconditionedSharpnessMonitor(every_n_steps=2, num_samples=64, tol=1e-7)
    freeze = FreezePreconditioner(at_step=4)
    model, trainer = _fit([freeze, monitor], "Adam", max_steps=8, model_kwargs={"scheduler": True})
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, FrozenAdam) and freeze.frozen
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is optimizer
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.9**8)  # still scheduled

    # the swap at step 4 leaves lambda_1(P^-1 H) / threshold unchanged
    before = PreconditionedSharpnessMonitor(every_n_steps=2, num_samples=64, tol=1e-7)
    _fit([before, FreezePreconditioner(at_step=4)], max_steps=4, model_kwargs={"scheduler": True})
    ratio = "eos/preconditioned_sharpness_ratio"
    at4 = {h["step"]: h for h in monitor.history}[4]
    assert at4[ratio] == pytest.approx(before.history[-1][ratio], rel=1e-5)
    # frozen Adam's threshold is its own 38/eta; P no longer changes
    p = next(model.parameters())
    frozen_p = optimizer.state[p]["preconditioner"].clone()
    assert at4["eos/preconditioned_threshold"] == pytest.approx(
        38 / optimizer.param_groups[0]["lr"] * 0.9**4, rel=1e-6
    )
    x, y = trainer.datamodule.train_set.tensors
    loss = F.cross_entropy(model.net(x), y)
    loss.backward()
    optimizer.step()
    assert torch.equal(optimizer.state[p]["preconditioner"], frozen_p)


def test_a_learning_rate_annealed_to_zero_skips_the_preconditioned_part_only():
    monitor = PreconditionedSharpnessMonitor(every_n_steps=2, num_samples=64)
    with pytest.warns(UserWarning, match="No preconditioned sharpness at step 4"):
        _fit([monitor], "Adam", max_steps=6, model_kwargs={"scheduler": "to_zero"})
    by_step = {h["step"]: h for h in monitor.history}
    assert sorted(by_step) == [0, 2, 4, 6]  # training and raw measurements go on
    assert "eos/preconditioned_sharpness" in by_step[2]
    assert "eos/preconditioned_sharpness" not in by_step[4] and "eos/sharpness" in by_step[4]


def test_freeze_repoints_nested_schedulers_and_a_reused_callback_freezes_again():
    freeze = FreezePreconditioner(at_step=3)
    for _ in range(2):  # the second fit trains a new Adam, which is frozen at step 3 again
        model, trainer = _fit(
            [freeze], "Adam", max_steps=5, model_kwargs={"scheduler": "sequential"}
        )
        optimizer = trainer.optimizers[0]
        assert isinstance(optimizer, FrozenAdam)
        sequential = trainer.lr_scheduler_configs[0].scheduler
        assert all(s.optimizer is optimizer for s in [sequential, *sequential._schedulers])
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)  # SequentialLR


def test_freeze_then_resume_matches_the_uninterrupted_run(tmp_path):
    def run(ckpt_path=None, extra=()):
        freeze = FreezePreconditioner(at_step=3)
        trainer = quiet_trainer(tmp_path, [freeze, *extra], 8, enable_checkpointing=bool(extra))
        L.seed_everything(0, verbose=False)
        model = Net("Adam")
        trainer.fit(model, _digits(batch_size=120, shuffle=False), ckpt_path=ckpt_path)
        return model, trainer.optimizers[0]

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    full_model, full_opt = run(extra=[saver])
    (ckpt,) = (tmp_path / "ckpt").glob("*step=5.ckpt")
    resumed_model, resumed_opt = run(ckpt_path=str(ckpt))
    assert isinstance(resumed_opt, FrozenAdam)
    for a, b in zip(full_model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(full_opt.state.values(), resumed_opt.state.values(), strict=True):
        assert torch.equal(a["preconditioner"], b["preconditioner"])


def test_freeze_refuses_optimizers_without_ema_heavy_ball_momentum():
    with pytest.raises(ValueError, match="EMA heavy-ball"):
        _fit([FreezePreconditioner(at_step=1)], "RMSprop", max_steps=2)
