"""Paper 001, Fig. 1 at CPU scale: momentum's catapults change the implicit bias of an LDN.

The depth-2 linear diagonal network f(x) = <u*u - v*v, x>, initialized at u0 = v0 = alpha*1,
learns the sparse regression of App. B (N = 50, d = 100, x ~ N(5*1, 5 I), w* = 1[i<=5]/sqrt(5))
with the half-MSE loss, a linear warmup of the learning rate from 1e-8 to eta_f over
eta_f * 1e6 steps (App. B), then as many steps at eta_f. GD and PHB (beta = 0.9) are
compared at a matched maximum stable sharpness (PHB's step (1 + beta) eta, ``match_gd``).

* The sweep (Fig. 1a-b) trains one network per alpha in a plain PyTorch loop with the
  library's ``DiagonalLinearNetwork``, ``HeavyBall`` and ``LinearWarmup``: GD's final test
  loss grows with alpha and saturates, PHB's drops sharply once alpha passes a threshold.
  The l1 / l2 baselines are the minimum-norm interpolators of the training set.
* Two Lightning runs at one alpha past the threshold (Fig. 1c-f) follow the sharpness with
  a ``SharpnessMonitor`` against the falling MSS 2/eta(t) and mark the catapults that a
  ``CatapultDetector`` finds.

    python examples/ldn_catapults.py [--out DIR] [--eta-f 0.004] [--alphas 30]

Writes ``ldn_test_loss.png``, ``ldn_sharpness.png``, the two Lightning runs' CSV logs
(``DIR/GD``, ``DIR/PHB``) and their ``lightning-eos report`` (``report.png``), and prints
the sweep (about 3 min for the sweep and 2 min for the two Lightning runs on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_eos.analysis import min_l1_solution, min_l2_solution, regression_test_loss
from lightning_eos.callbacks import CatapultDetector, SharpnessMonitor
from lightning_eos.data import SparseRegressionDataModule
from lightning_eos.models import DiagonalLinearNetwork, SupervisedTask, half_mse_loss
from lightning_eos.optim import HeavyBall, LinearWarmup
from lightning_eos.plotting import _pyplot, _save
from lightning_eos.report import report

BETA, ETA_INITIAL = 0.9, 1e-8


def warmup_steps(eta_f: float) -> int:
    """App. B: the warmup lasts eta_f * 10^6 steps."""
    return max(1, round(eta_f * 1e6))


def final_test_loss(alpha: float, eta_f: float, momentum: float, seed: int = 0) -> float:
    """Train one LDN from alpha * 1 (warmup, then as many steps at eta_f); its test loss."""
    data = SparseRegressionDataModule(seed=seed, dtype="float64")
    data.setup()
    net = DiagonalLinearNetwork(data.dim, alpha, dtype="float64")
    optimizer = HeavyBall(net.parameters(), lr=ETA_INITIAL, momentum=momentum, match_gd=True)
    steps = warmup_steps(eta_f)
    schedule = LinearWarmup(optimizer, ETA_INITIAL, eta_f, steps)
    for _ in range(2 * steps):
        optimizer.zero_grad(set_to_none=True)
        half_mse_loss(net(data.x_train), data.y_train).backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        loss = half_mse_loss(net(data.x_test), data.y_test)
    return float(loss) if torch.isfinite(loss) else float("nan")


def sweep(alphas, eta_f: float, seed: int = 0) -> dict[str, list[float]]:
    return {
        name: [final_test_loss(float(a), eta_f, m, seed) for a in alphas]
        for name, m in (("GD", 0.0), ("PHB", BETA))
    }


def baselines(seed: int = 0) -> dict[str, float]:
    data = SparseRegressionDataModule(seed=seed, dtype="float64")
    data.setup()
    return {
        name: regression_test_loss(solve(data.x_train, data.y_train), data.x_test, data.y_test)
        for name, solve in (("ℓ1 baseline", min_l1_solution), ("ℓ2 baseline", min_l2_solution))
    }


class StepLosses(Callback):
    """Record the training loss of every step (for the loss panels)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, *args) -> None:
        self.losses.append(float(outputs["loss"]))


def lightning_run(
    alpha: float, eta_f: float, momentum: float, every: int, log_dir: Path | None = None
) -> dict:
    """One run under Lightning: sharpness against the MSS and the catapults found."""
    net = DiagonalLinearNetwork(100, alpha, dtype="float64")
    steps = warmup_steps(eta_f)
    task = SupervisedTask(
        net,
        loss="half_mse",
        optimizer=functools.partial(HeavyBall, lr=ETA_INITIAL, momentum=momentum, match_gd=True),
        lr_scheduler=functools.partial(
            LinearWarmup, lr_initial=ETA_INITIAL, lr_final=eta_f, steps=steps
        ),
    )
    monitor = SharpnessMonitor(every_n_steps=every, num_samples=None)
    detector, losses = CatapultDetector(), StepLosses()
    trainer = Trainer(
        max_steps=2 * steps,
        precision="64-true",
        accelerator="cpu",
        logger=CSVLogger(log_dir, name="csv") if log_dir else False,
        callbacks=[monitor, detector, losses],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(task, SparseRegressionDataModule(dtype="float64"))
    return {"history": monitor.history, "events": detector.events, "losses": losses.losses}


def plot_sweep(alphas, losses, lines, eta_f: float, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, name in zip(axes, ("GD", "PHB")):
        ax.plot(alphas, losses[name], "o-", ms=3, label=name)
        for (label, value), style in zip(lines.items(), (":", "--")):
            ax.axhline(value, color="gray", ls=style, lw=1, label=f"{label} ({value:.2g})")
        ax.set(xlabel="α (initialization scale)", title=f"{name}, η_f = {eta_f:g}")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("final test loss")
    _save(fig, path)


def plot_sharpness(runs: dict, alpha: float, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    for (top, bottom), (name, run) in zip(axes.T, runs.items()):
        steps = [h["step"] for h in run["history"]]
        top.plot(steps, [h["eos/sharpness"] for h in run["history"]], lw=1.2, label="λ1(H)")
        top.plot(steps, [h["eos/threshold"] for h in run["history"]], "r:", lw=1.2, label="MSS")
        bottom.semilogy(run["losses"], lw=0.8, label="training loss")
        for i, event in enumerate(run["events"]):
            label = "catapult" if i == 0 else None
            top.plot(event.peak_step, event.sharpness_before, "kv", ms=6, label=label)
            bottom.plot(event.peak_step, event.peak_loss, "kv", ms=6, label=label)
        highest = max(h["eos/sharpness"] for h in run["history"])
        top.set(ylabel="sharpness", title=f"{name}, α = {alpha:g}", ylim=(0, 1.5 * highest))
        bottom.set(xlabel="step", ylabel="loss")
        top.legend(fontsize=8)
        bottom.legend(fontsize=8)
    _save(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("ldn_catapults_out"))
    parser.add_argument("--eta-f", type=float, default=0.004)
    parser.add_argument("--alphas", type=int, default=30, help="alphas in [0.01, 0.3]")
    parser.add_argument("--alpha-run", type=float, default=0.16, help="alpha of the Lightning runs")
    parser.add_argument("--every", type=int, default=20, help="sharpness every N steps")
    parser.add_argument("--no-lightning", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    alphas = np.linspace(0.01, 0.3, args.alphas)
    losses, lines = sweep(alphas, args.eta_f), baselines()
    print(f"eta_f = {args.eta_f}; " + ", ".join(f"{k}: {v:.3g}" for k, v in lines.items()))
    print(f"{'alpha':>6s} {'GD':>9s} {'PHB':>9s}")
    for a, gd, phb in zip(alphas, losses["GD"], losses["PHB"]):
        print(f"{a:6.3f} {gd:9.4g} {phb:9.4g}")
    plot_sweep(alphas, losses, lines, args.eta_f, args.out / "ldn_test_loss.png")
    runs = {}
    if not args.no_lightning:
        for name, m in (("GD", 0.0), ("PHB", BETA)):
            runs[name] = lightning_run(args.alpha_run, args.eta_f, m, args.every, args.out / name)
            for e in runs[name]["events"]:
                print(
                    f"{name} catapult: steps {e.start_step}-{e.end_step}, peak {e.peak_step} "
                    f"(loss {e.peak_loss:.3g}), λ1 {e.sharpness_before:.4g} -> "
                    f"{e.sharpness_after:.4g} (λ1/MSS {e.ratio_before:.3f} -> {e.ratio_after:.3f})"
                )
        plot_sharpness(runs, args.alpha_run, args.out / "ldn_sharpness.png")
        # = lightning-eos report OUT/GD OUT/PHB --out OUT/report.png
        print(f"report: {report([args.out / 'GD', args.out / 'PHB'], args.out / 'report.png')}")
    return {"alphas": alphas, "losses": losses, "baselines": lines, "runs": runs}


if __name__ == "__main__":
    main()
