"""One Lightning fit for the DDP tests; run as a script (Lightning relaunches it per rank).

python tests/ddp_fit.py --scenario exact --devices 2 --out DIR
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_eos.callbacks import (
    CatapultDetector,
    IASMonitor,
    OptimizerSwitch,
    PreconditionedSharpnessMonitor,
    SharpnessMonitor,
)
from lightning_eos.data import DigitsDataModule
from lightning_eos.optim import SAM, HeavyBall


class Net(L.LightningModule):
    def __init__(
        self,
        batchnorm: bool = False,
        dropout: float = 0.0,
        lr: float = 0.5,
        adam: bool = False,
        sam: bool = False,
        per_replica: bool = False,
        momentum: float = 0.9,
        heavy_ball: bool = False,
    ):
        super().__init__()
        norm = nn.BatchNorm1d(16) if batchnorm else nn.Identity()
        self.net = nn.Sequential(
            nn.Linear(64, 16), norm, nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 10)
        )
        self.lr, self.adam, self.sam, self.per_replica = lr, adam, sam, per_replica
        self.momentum, self.heavy_ball = momentum, heavy_ball

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        if self.sam:
            return SAM(
                self.parameters(),
                torch.optim.SGD,
                rho=0.1,
                lr=self.lr,
                per_replica=self.per_replica,
            )
        if self.adam:
            return torch.optim.Adam(self.parameters(), lr=1e-2)
        if self.heavy_ball:  # MSS 2/lr; lambda_1 starts above it and drops below by step ~9
            return HeavyBall(self.parameters(), lr=self.lr, momentum=0.9, match_gd=True)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class ScrambleOtherRanks(Callback):
    """Gives ranks other than 0 a wrong warm start, which the monitor must overwrite."""

    def __init__(self, monitor: SharpnessMonitor):
        self.monitor = monitor

    def on_train_start(self, trainer, pl_module):
        warm = self.monitor._warm_starts
        if trainer.global_rank != 0 and "hessian" in warm:
            warm["hessian"] = torch.randn_like(warm["hessian"])


class WarmStartProbe(Callback):
    """Records the monitor's warm start when training starts and after step ``at_step``."""

    def __init__(self, monitor: SharpnessMonitor, at_step: int):
        self.monitor, self.at_step, self.seen = monitor, at_step, {}

    def on_train_start(self, trainer, pl_module):
        if "hessian" in self.monitor._warm_starts:
            self.seen["start"] = self.monitor._warm_starts["hessian"].detach().cpu().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            self.seen["step"] = self.monitor._warm_starts["hessian"].detach().cpu().clone()


def nan_on_rank_one_at_step_two(module, batch):
    x, y = batch
    loss = F.cross_entropy(module.net(x), y)
    if module.trainer.global_rank == 1 and module.trainer.global_step == 2:
        return loss * float("nan")
    return loss


def error_on_rank_one_at_step_two(module, batch):
    if module.trainer.global_rank == 1 and module.trainer.global_step == 2:
        raise ValueError("a loss that cannot be evaluated on rank 1")
    x, y = batch
    return F.cross_entropy(module.net(x), y)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-monitor", action="store_true")
    parser.add_argument("--ckpt", default=None)
    args = parser.parse_args()
    out = Path(args.out)

    L.seed_everything(0, verbose=False)
    scenario = args.scenario
    full_batch = scenario in ("exact", "bn", "adam", "sam", "sam-replica", "ias", "switch")
    num_train = 100 if scenario == "ias" else 200  # the IAS population is the training set
    data = DigitsDataModule(
        num_train=num_train,
        num_val=50,
        target="label",
        batch_size=(num_train // args.devices) if full_batch else 32,
        shuffle=not full_batch,
    )
    model = Net(
        batchnorm=scenario in ("bn", "perturb"),
        dropout=0.2 if scenario == "perturb" else 0.0,
        lr={"bn": 1e-12, "switch": 3.0}.get(scenario, 0.5),
        adam=scenario == "adam",
        sam=scenario.startswith("sam"),
        per_replica=scenario == "sam-replica",
        heavy_ball=scenario == "switch",
        momentum=0.0 if scenario == "ias" else 0.9,  # the loss change takes plain SGD steps
    )
    monitor_type = PreconditionedSharpnessMonitor if scenario == "adam" else SharpnessMonitor
    monitor = monitor_type(
        every_n_steps=1 if scenario == "switch" else 2,
        top_k=2,
        num_samples=100,
        chunk_size=30,  # 30, 30, 30, 10: uneven shards of 60 and 40 samples
        tol=1e-8,
        loss_fn={"nan": nan_on_rank_one_at_step_two, "error": error_on_rank_one_at_step_two}.get(
            scenario
        ),
        threshold=None if scenario == "bn" else "auto",
        alignment=scenario == "sam",
    )
    if scenario == "ias":  # b = 32 drawn from the 100 measured samples; sampled tr(HS_1)
        monitor = IASMonitor(
            every_n_steps=2,
            batch_size=32,
            population=100,
            samples=12,
            num_samples=100,
            chunk_size=30,
            per_sample_chunk=7,
            tol=1e-8,
            loss_change=True,
            loss_change_samples=3,
        )
    if scenario == "build-error":  # rank 1 gets a measurement loader it cannot use
        data.setup()
        loader = torch.utils.data.DataLoader(data.train_set, batch_size=30)
        monitor.dataloader = {"a": loader} if os.environ.get("LOCAL_RANK", "0") == "1" else loader
    callbacks = [] if args.no_monitor else [monitor]
    # b, replacement and n read from the (distributed) loader: 50 per rank x 2 = n = 100
    read_b = IASMonitor(every_n_steps=3, measure_at_start=False, sharpness=False)
    if scenario == "ias":
        callbacks.append(read_b)
    switch, detector = OptimizerSwitch(to="gd"), CatapultDetector()
    if scenario == "switch":  # PHB -> GD where lambda_1 crosses the MSS, and the step losses
        callbacks += [switch, detector]
    probe = WarmStartProbe(monitor, at_step=4)
    if scenario.startswith("resume"):
        callbacks = [ScrambleOtherRanks(monitor), *callbacks, probe]
    if scenario == "resume-full":
        callbacks.append(
            ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=4, save_top_k=-1)
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy if args.devices > 1 else "auto",
        max_steps={
            "exact": 4,
            "ias": 4,
            "adam": 4,
            "sam": 4,
            "sam-replica": 2,
            "switch": 12,
            "bn": 1,
            "perturb": 6,
            "nan": 6,
            "error": 6,
        }.get(scenario, 8),
        logger=CSVLogger(out, name="csv"),
        callbacks=callbacks,
        enable_checkpointing=scenario == "resume-full",
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, data, ckpt_path=args.ckpt)

    if not trainer.optimizers:  # ddp_spawn: the workers trained; this process has no state
        return
    optimizer = trainer.optimizers[0]
    torch.save(
        {
            "history": monitor.history,
            "read_b": (read_b._sampling, read_b.history),
            "probe": probe.seen,
            "params": {k: v.clone() for k, v in model.state_dict().items()},
            "grads": [p.grad.clone() for p in model.parameters()],
            "momentum": [
                next(s[k] for k in ("momentum_buffer", "exp_avg", "displacement") if k in s).clone()
                for s in optimizer.state.values()
            ],
            "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()),
            "switch_step": switch.switch_step,
            "loss_floor": detector._floor,  # (step, lowest step loss): the global mean loss
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
