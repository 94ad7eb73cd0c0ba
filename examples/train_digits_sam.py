"""SAM at its edge of stability against GD at the same learning rate (paper 003).

python examples/train_digits_sam.py --lr 0.5 --rho 0.1 --max-steps 12000 --out outputs/sam_example

12000 full-batch steps of SAM and of GD: the SAM run alone takes ~8 min on 2 CPU cores
(the paper trains for 8 GPU hours); --max-steps 1500 --every 25 shows the tracking in ~3 min. Writes
sam_vs_gd.png next to each run's sharpness.png.
"""

from __future__ import annotations

import argparse
from functools import partial

import lightning as L
import torch
import wandb
from lightning.pytorch.loggers import CSVLogger

from lightning_eos.callbacks import SharpnessMonitor, SharpnessPlot
from lightning_eos.data import DigitsDataModule
from lightning_eos.loggers import WandbLogger  # offline by itself without an API key
from lightning_eos.models import FCN, SupervisedTask
from lightning_eos.optim import SAM
from lightning_eos.plotting import edge_summary
from lightning_eos.report import report


def train(lr: float, rho: float, max_steps: int, every: int, out: str) -> list[dict]:
    """Full-batch SAM (GD when rho == 0); returns the monitor's history."""
    L.seed_everything(0)
    optimizer = (
        partial(SAM, base_optimizer=torch.optim.SGD, rho=rho, lr=lr)
        if rho > 0
        else partial(torch.optim.SGD, lr=lr)
    )
    model = SupervisedTask(FCN(width=200, depth=3, activation="tanh"), "mse", optimizer)
    monitor = SharpnessMonitor(every_n_steps=every, top_k=3, alignment=rho > 0)
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=[CSVLogger(out), WandbLogger(save_dir=out)],
        callbacks=[monitor, SharpnessPlot(dirpath=out, tail=0.33)],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, DigitsDataModule())
    wandb.finish()  # the next run gets its own W&B run
    return monitor.history


def compare(sam: list[dict], gd: list[dict], lr: float) -> dict[str, float]:
    """SAM's lambda_1 / SAM-edge, and how much flatter it ends than GD (same step, same loss)."""
    tracking = edge_summary(sam, tail=0.33)
    last = sam[-1]
    same_loss = next((h for h in gd if h["eos/loss"] <= last["eos/loss"]), gd[-1])
    return {
        "sam_edge_ratio_mean": tracking["mean"],
        "sam_edge_ratio_min": tracking["min"],
        "sam_edge_ratio_max": tracking["max"],
        "sam_edge_over_2_over_lr": last["eos/sam_edge"] / (2 / lr),
        "sam_lambda_1": last["eos/sharpness"],
        "sam_loss": last["eos/loss"],
        "gd_lambda_1": gd[-1]["eos/sharpness"],
        "gd_loss": gd[-1]["eos/loss"],
        "flatter_same_step": gd[-1]["eos/sharpness"] / last["eos/sharpness"],
        "gd_step_same_loss": same_loss["step"],
        "flatter_same_loss": same_loss["eos/sharpness"] / last["eos/sharpness"],
    }


def plot_comparison(sam: list[dict], gd: list[dict], lr: float, path: str) -> None:
    """lambda_1 of SAM and of GD on one log axis, with 2/eta and the SAM-edge (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(
        [h["step"] for h in gd], [h["eos/sharpness"] for h in gd], "C1", label="GD $\\lambda_1$"
    )
    ax.axhline(2 / lr, color="C1", ls="--", label="$2/\\eta$")
    steps = [h["step"] for h in sam]
    ax.plot(steps, [h["eos/sharpness"] for h in sam], "C0", label="SAM $\\lambda_1$")
    ax.plot(steps, [h["eos/sam_edge"] for h in sam], "C0--", label="SAM-edge")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("sharpness")
    ax.set_title(f"digits, lr {lr}: SAM (rho 0.1) against GD")
    ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--max-steps", type=int, default=12000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--out", default="outputs/sam_example")
    args = parser.parse_args()
    sam = train(args.lr, args.rho, args.max_steps, args.every, f"{args.out}/sam")
    gd = train(args.lr, 0.0, args.max_steps, args.every, f"{args.out}/gd")
    for key, value in compare(sam, gd, args.lr).items():
        print(f"{key}: {value:.4g}")
    plot_comparison(sam, gd, args.lr, f"{args.out}/sam_vs_gd.png")
    # = lightning-eos report OUT/sam OUT/gd --out OUT/report.png
    print(f"report: {report([f'{args.out}/sam', f'{args.out}/gd'], f'{args.out}/report.png')}")


if __name__ == "__main__":
    main()
