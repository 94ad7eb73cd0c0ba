"""The quickstart in Python: attach SharpnessMonitor to an ordinary Lightning Trainer.

python examples/train_digits.py --lr 2.0 --max-steps 600 --out outputs/example

The progress bar shows ``λ1/thr``; at the end, ``OUT/report.png`` is the report that
``lightning-eos report OUT`` draws from the CSV log.
"""

from __future__ import annotations

import argparse
from functools import partial

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_eos.callbacks import SharpnessMonitor, SharpnessPlot
from lightning_eos.data import DigitsDataModule
from lightning_eos.loggers import WandbLogger  # offline by itself without an API key
from lightning_eos.models import FCN, SupervisedTask
from lightning_eos.report import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--out", default="outputs/example")
    args = parser.parse_args()

    L.seed_everything(0)
    model = SupervisedTask(
        FCN(width=200, depth=3, activation="tanh"),
        loss="mse",
        optimizer=partial(torch.optim.SGD, lr=args.lr),
    )
    trainer = L.Trainer(
        max_steps=args.max_steps,
        accelerator="cpu",
        logger=[CSVLogger(args.out), WandbLogger(save_dir=args.out)],
        callbacks=[SharpnessMonitor(every_n_steps=10, top_k=2), SharpnessPlot(dirpath=args.out)],
        enable_checkpointing=False,
    )
    trainer.fit(model, DigitsDataModule())
    print(f"report: {report([args.out], f'{args.out}/report.png')}")


if __name__ == "__main__":
    main()
