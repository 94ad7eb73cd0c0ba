"""Adam at the adaptive edge of stability (paper 002, Fig. 1), and frozen Adam (App. D).

python examples/train_digits_adam.py --max-steps 1000 --out outputs/adam_example
python examples/train_digits_adam.py --freeze-at 400 --out outputs/adam_frozen
"""

from __future__ import annotations

import argparse
from functools import partial

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from lightning_eos.callbacks import (
    FreezePreconditioner,
    PreconditionedSharpnessMonitor,
    SharpnessPlot,
)
from lightning_eos.data import DigitsDataModule
from lightning_eos.loggers import WandbLogger  # offline by itself without an API key
from lightning_eos.models import FCN, SupervisedTask
from lightning_eos.optim import Adam
from lightning_eos.report import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--beta2", type=float, default=0.99)
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--freeze-at", type=int, default=None, help="freeze P after this step")
    parser.add_argument("--out", default="outputs/adam_example")
    args = parser.parse_args()

    L.seed_everything(0)
    model = SupervisedTask(
        FCN(width=200, depth=3, activation="tanh"),
        loss="mse",
        optimizer=partial(Adam, lr=args.lr, betas=(0.9, args.beta2), bias_correction=False),
    )
    callbacks = [
        PreconditionedSharpnessMonitor(every_n_steps=10, raw_sharpness=True),
        SharpnessPlot(dirpath=args.out, tail=0.33),
    ]
    if args.freeze_at is not None:
        callbacks.insert(0, FreezePreconditioner(at_step=args.freeze_at))
    trainer = L.Trainer(
        max_steps=args.max_steps,
        accelerator="cpu",
        logger=[CSVLogger(args.out), WandbLogger(save_dir=args.out)],
        callbacks=callbacks,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, DigitsDataModule())
    # = lightning-eos report OUT --out OUT/report.png
    print(f"report: {report([args.out], f'{args.out}/report.png')}")


if __name__ == "__main__":
    main()
