"""A fit that kills itself with SIGKILL at a given step, then resumes (tests/test_resume.py).

Run: ``python tests/resume_fit.py --out DIR [--kill-at STEP] [--resume] [--same-version]``.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_eos.callbacks import SharpnessMonitor


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class KillAt(Callback):
    """``kill -9`` of this process right after step ``step`` was measured and logged."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--same-version", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    callbacks = [
        SharpnessMonitor(every_n_steps=2),
        KillAt(args.kill_at),
        ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=4, save_last=True),
    ]
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=20,
        logger=CSVLogger(out, name="csv", version=0 if args.same_version else None),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(Net(), loader, ckpt_path=out / "ckpt" / "last.ckpt" if args.resume else None)


if __name__ == "__main__":
    main()
