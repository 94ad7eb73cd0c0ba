"""Sweep (batch size, learning rate) on digits and draw the LSSR curve next to the LSR line.

Paper 004, §5 and Fig. 5 (right): SGD keeps the IAS under 2 rho_b / eta, so runs with the
same rho_b / eta are regularized alike. The Linear and Saturation Scaling Rule
eta(b) = eta_ref * rho_b / rho_ref (``thresholds.lssr_learning_rate``) is linear in b for
small batches, like the linear scaling rule (LSR, eta proportional to b), and saturates
once rho_b nears 1. rho = tr(S_n)/tr(S_1) is measured at initialization with
``curvature.interaction_aware_sharpness``; the reference pair is the best learning rate at
``--reference-batch-size``.

python examples/lssr_digits.py --epochs 20 --out outputs/lssr
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from lightning_eos.curvature import HessianOperator, interaction_aware_sharpness
from lightning_eos.data import DigitsDataModule
from lightning_eos.models import FCN
from lightning_eos.thresholds import lssr_learning_rate


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return FCN(width=100, depth=2, activation="tanh")


def _cross_entropy(
    model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def measure_rho(x: torch.Tensor, y: torch.Tensor) -> float:
    """rho = tr(S_n)/tr(S_1) of the cross-entropy at initialization (exact: every sample)."""
    hessian = HessianOperator(_model(), _cross_entropy, [(x, y)])
    return interaction_aware_sharpness(hessian, batch_size=1, samples=2).rho


def train(x, y, x_val, y_val, batch_size: int, lr: float, epochs: int) -> float:
    """Plain SGD (no momentum) for a fixed number of epochs; validation accuracy."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = _cross_entropy(model, (x[batch], y[batch]))
            if not torch.isfinite(loss):
                return 0.0  # diverged
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return float((model(x_val).argmax(1) == y_val).float().mean())


def plot(table, batch_sizes, lrs, curves, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=100)
    grid = [[table[(b, lr)] for b in batch_sizes] for lr in lrs]
    mesh = ax.pcolormesh(
        _edges(batch_sizes), _edges(lrs), grid, cmap="viridis", shading="flat", vmin=0.5
    )
    fig.colorbar(mesh, ax=ax, label="validation accuracy")
    best = [max(lrs, key=lambda lr: table[(b, lr)]) for b in batch_sizes]
    ax.plot(batch_sizes, best, "wo", label="best lr per b")
    for label, (values, style) in curves.items():
        ax.plot(batch_sizes, values, style, lw=2, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(min(lrs) / 1.5, max(lrs) * 1.5)
    ax.set_xlabel("batch size b")
    ax.set_ylabel("learning rate $\\eta$")
    ax.set_title("digits: LSSR ($\\rho_b/\\eta$ = const) and LSR ($b/\\eta$ = const)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _edges(values: list[float]) -> list[float]:
    logs = [math.log(v) for v in values]
    mids = [(a + b) / 2 for a, b in zip(logs, logs[1:])]
    first, last = 2 * logs[0] - mids[0], 2 * logs[-1] - mids[-1]
    return [math.exp(v) for v in (first, *mids, last)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 128, 512, 1500])
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--reference-batch-size", type=int, default=32)
    parser.add_argument("--rho", type=float, default=None, help="default: measured at init")
    parser.add_argument("--out", default="outputs/lssr")
    args = parser.parse_args()

    data = DigitsDataModule(target="label")
    data.setup()
    x, y = data.train_set.tensors
    x_val, y_val = data.val_set.tensors
    n = len(x)
    rho = args.rho or measure_rho(x, y)
    print(f"n = {n}, rho = tr(S_n)/tr(S_1) = {rho:.4g} (1/rho = {1 / rho:.1f})")

    table = {}
    for b in args.batch_sizes:
        for lr in args.lrs:
            table[(b, lr)] = train(x, y, x_val, y_val, b, lr, args.epochs)
        row = "  ".join(f"{table[(b, lr)]:.3f}" for lr in args.lrs)
        print(f"b={b:5d}: val acc at lr {args.lrs}: {row}")

    b_ref = args.reference_batch_size
    if b_ref not in args.batch_sizes:
        raise SystemExit("--reference-batch-size must be one of --batch-sizes")
    lr_ref = max(args.lrs, key=lambda lr: table[(b_ref, lr)])
    lssr = [lssr_learning_rate(b, b_ref, lr_ref, rho=rho, n=n) for b in args.batch_sizes]
    lsr = [lr_ref * b / b_ref for b in args.batch_sizes]
    print(f"reference: b={b_ref}, best lr {lr_ref}")
    print("b, best lr, LSSR lr, LSR lr:")
    for b, s, r in zip(args.batch_sizes, lssr, lsr):
        best = max(args.lrs, key=lambda lr: table[(b, lr)])
        print(f"  {b:5d}  {best:8.3g}  {s:8.3g}  {r:8.3g}")
    path = Path(args.out) / "lssr.png"
    plot(table, args.batch_sizes, args.lrs, {"LSSR": (lssr, "r-"), "LSR": (lsr, "k:")}, path)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
