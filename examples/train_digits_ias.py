"""The interaction-aware sharpness at the edge of stability (paper 004, Fig. 4), on digits.

Full-batch GD: lambda_1 hovers *above* 2/eta while the IAS g^T H g / |g|^2 oscillates
*around* 2/eta. Minibatch SGD at four batch sizes: the IAS tr(HS_b)/tr(S_b) rises to its
own edge 2 rho_b / eta, far below 2/eta for small batches, and is held there: at it in the
mean for the smaller batches, below it for the larger ones.

python examples/train_digits_ias.py --out outputs/ias_example
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import lightning as L
import torch
import wandb
from lightning.pytorch.loggers import CSVLogger

from lightning_eos.callbacks import IASMonitor
from lightning_eos.data import DigitsDataModule
from lightning_eos.loggers import WandbLogger  # offline by itself without an API key
from lightning_eos.models import FCN, SupervisedTask
from lightning_eos.plotting import plot_ias, plot_sharpness
from lightning_eos.report import report


def train(
    lr: float,
    batch_size: int | None,
    max_steps: int,
    every: int,
    out: str | None,
    samples: int = 32,
) -> list[dict]:
    """GD (``batch_size=None``) or SGD on the quickstart's tanh FCN with MSE; the IAS history."""
    L.seed_everything(0, verbose=False)
    model = SupervisedTask(
        FCN(width=200, depth=3, activation="tanh"), "mse", partial(torch.optim.SGD, lr=lr)
    )
    monitor = IASMonitor(every_n_steps=every, samples=samples)
    loggers = [CSVLogger(out), WandbLogger(save_dir=out)] if out else False
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=loggers,
        callbacks=[monitor],
        log_every_n_steps=1 if batch_size is None else 10,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    data = DigitsDataModule(batch_size=batch_size, shuffle=batch_size is not None)
    trainer.fit(model, data)
    wandb.finish()  # the next run gets its own W&B run
    return monitor.history


def summarize(history: list[dict], lr: float, tail: float = 1 / 3) -> dict[str, float]:
    """Means over the last ``tail`` of the measurements, in units of the edges."""
    late = history[int(len(history) * (1 - tail)) :]

    def mean(key: str) -> float:
        return sum(h[key] for h in late) / len(late)

    # Theorem 1: the loss rises in expectation while tr(HS_b) > (2/eta) tr(S_n); over a run
    # whose loss goes down, the time averages must keep tr(HS_b) below (2/eta) tr(S_n)
    instability = sum(h["eos/trace_HS_b"] for h in late) / sum(
        2 / lr * h["eos/trace_S_n"] for h in late
    )
    return {
        "lambda_1 / (2/eta)": mean("eos/sharpness") / (2 / lr),
        "IAS / (2/eta)": mean("eos/ias") / (2 / lr),
        "mean IAS / mean edge 2 rho_b/eta": mean("eos/ias") / mean("eos/ias_threshold"),
        "mean tr(HS_b) / mean (2/eta) tr(S_n)": instability,
        "IAS / edge per measurement, mean": mean("eos/ias_ratio"),
        "IAS / edge per measurement, standard error": _stderr([h["eos/ias_ratio"] for h in late]),
        "fraction of IAS below its edge": sum(h["eos/ias_ratio"] < 1 for h in late) / len(late),
        "rho_b": mean("eos/rho_b"),
        "measurements": len(late),
    }


def _stderr(values: list[float]) -> float:
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
    return (variance / len(values)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gd-lr", type=float, default=2.0)
    parser.add_argument("--gd-steps", type=int, default=400)
    parser.add_argument("--sgd-lr", type=float, default=0.5)
    parser.add_argument("--sgd-steps", type=int, default=600)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--out", default="outputs/ias_example")
    args = parser.parse_args()
    out = Path(args.out)

    gd = train(args.gd_lr, None, args.gd_steps, args.every, str(out / "gd"))
    plot_sharpness(gd, out / "ias_gd.png", title=f"full-batch GD, lr {args.gd_lr}")
    print(f"full-batch GD, lr {args.gd_lr}:")
    for key, value in summarize(gd, args.gd_lr).items():
        print(f"  {key}: {value:.4g}")

    runs = {}
    for b in args.batch_sizes:
        runs[f"b={b}"] = train(args.sgd_lr, b, args.sgd_steps, args.every, str(out / f"sgd_{b}"))
        print(f"SGD, b {b}, lr {args.sgd_lr}:")
        for key, value in summarize(runs[f"b={b}"], args.sgd_lr).items():
            print(f"  {key}: {value:.4g}")
    plot_ias(runs, out / "ias_sgd.png", lr=args.sgd_lr)
    folders = [out / "gd", *(out / f"sgd_{b}" for b in args.batch_sizes)]
    path = report(folders, out / "report.png")  # = lightning-eos report FOLDERS --out ...
    print(f"figures: {out / 'ias_gd.png'}, {out / 'ias_sgd.png'}, {path}")


if __name__ == "__main__":
    main()
