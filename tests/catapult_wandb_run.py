"""A PHB->GD scalar-ReLU run logged to CSV and to an offline W&B run (used by test_catapults)."""

import functools
import sys

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_eos.callbacks import CatapultDetector, OptimizerSwitch, SharpnessMonitor
from lightning_eos.data import SinglePointDataModule
from lightning_eos.loggers import WandbLogger
from lightning_eos.models import ScalarReLUNetwork, SupervisedTask
from lightning_eos.optim import HeavyBall

out = sys.argv[1]
eta = 2.01 / 100
task = SupervisedTask(
    ScalarReLUNetwork(10.0, 1e-6),
    loss="half_mse",
    optimizer=functools.partial(HeavyBall, lr=eta, momentum=0.9, match_gd=True),
)
trainer = Trainer(
    max_steps=250,
    precision="64-true",
    accelerator="cpu",
    logger=[CSVLogger(out, name="csv"), WandbLogger(save_dir=out, offline=True)],
    callbacks=[
        SharpnessMonitor(every_n_steps=1, num_samples=None),
        OptimizerSwitch(to="gd", direction="down"),
        CatapultDetector(),
    ],
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    log_every_n_steps=50,
)
trainer.fit(task, SinglePointDataModule(x=1.0, y=0.0, dtype="float64"))
import wandb  # noqa: E402

wandb.finish()
