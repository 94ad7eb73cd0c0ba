"""Paper 001, Fig. 3-4: momentum's large catapult on the scalar ReLU network, through Lightning.

GD, PHB, GD->PHB and PHB->GD start at (u0, v0) = (10, 1e-6) with eta = (2 + eps)/u0^2,
eps = 0.01, beta = 0.9 and PHB's learning rate (1 + beta) eta (``match_gd=True``): the
sharpness u0^2 sits just above the maximum stable sharpness 2/eta. Each run trains
``ScalarReLUNetwork`` with ``HeavyBall`` under Lightning, with a ``SharpnessMonitor`` every
step, ``OptimizerSwitch`` for the switched runs and a ``CatapultDetector``. Theorem 2's
bound across beta (Fig. 4) comes from ``lightning_eos.analysis`` on the same dynamics.

    python examples/momentum_catapults.py [--out DIR] [--steps 1600]

Writes ``momentum_catapults.png`` (Fig. 3: trajectories and sharpness) and
``theorem2.png`` (Fig. 4: C_u, 1/(1 + eta C_v), the sharpness reduction and its bound),
the four runs' CSV logs (``DIR/GD``, ``DIR/PHB_to_GD``, ...) and their ``lightning-eos
report`` (``report.png``: loss with catapult markers, sharpness against the MSS, switches),
and prints the sharpness reduction of each run and every catapult found.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_eos.analysis import scalar_relu_trajectory, theorem2_bound
from lightning_eos.callbacks import CatapultDetector, OptimizerSwitch, SharpnessMonitor
from lightning_eos.data import SinglePointDataModule
from lightning_eos.models import ScalarReLUNetwork, SupervisedTask
from lightning_eos.optim import HeavyBall
from lightning_eos.plotting import _pyplot, _save
from lightning_eos.report import report

BETA, EPS, U0, V0 = 0.9, 0.01, 10.0, 1e-6
ETA = (2 + EPS) / U0**2
SCENARIOS = {  # name: (momentum at the start, switch to)
    "GD": (0.0, None),
    "PHB→GD": (BETA, "gd"),
    "GD→PHB": (0.0, "phb"),
    "PHB": (BETA, None),
}


class Iterates(Callback):
    """Record (u, v) after every step (for the trajectory panel)."""

    def __init__(self) -> None:
        self.uv: list[tuple[float, float]] = []

    def _record(self, module) -> None:
        net = module.model
        self.uv.append((float(net.u.detach()[0]), float(net.v.detach()[0])))

    def on_train_start(self, trainer, module) -> None:
        self._record(module)

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self._record(module)


def run(momentum: float, to: str | None, steps: int, log_dir: Path | None = None) -> dict:
    net = ScalarReLUNetwork(U0, V0, dtype="float64")  # v0 exactly 1e-6
    optimizer = functools.partial(HeavyBall, lr=ETA, momentum=momentum, match_gd=True)
    task = SupervisedTask(net, loss="half_mse", optimizer=optimizer)
    monitor = SharpnessMonitor(every_n_steps=1, num_samples=None, tol=1e-10, stop_rule="residual")
    switch = [OptimizerSwitch(to=to, momentum=BETA, direction="down")] if to else []
    detector, iterates = CatapultDetector(), Iterates()
    trainer = Trainer(
        max_steps=steps,
        precision="64-true",
        accelerator="cpu",
        logger=CSVLogger(log_dir, name="csv") if log_dir else False,
        callbacks=[monitor, *switch, detector, iterates],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, SinglePointDataModule(x=1.0, y=0.0, dtype="float64"))
    return {
        "uv": np.array(iterates.uv),
        "history": monitor.history,
        "switch": switch[0].switch_step if switch else None,
        "events": detector.events,
    }


def theorem2_sweep(betas: np.ndarray, steps: int = 20000) -> list:
    """Paper 001, App. D.4: Theorem 2's quantities for PHB at each beta (GD at beta = 0)."""
    bounds = []
    for beta in betas:
        traj = scalar_relu_trajectory(U0, V0, ETA, float(beta), steps)
        bounds.append(theorem2_bound(traj.u, traj.v, ETA, float(beta), EPS))
    return bounds


def plot_runs(runs: dict, path: Path) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in runs.items():
        (line,) = left.plot(r["uv"][:, 0], r["uv"][:, 1], lw=0.8, label=name)
        steps = [h["step"] for h in r["history"]]
        right.plot(
            steps,
            [h["eos/sharpness"] for h in r["history"]],
            lw=1.2,
            label=name,
            color=line.get_color(),
        )
        for event in r["events"]:
            right.plot(event.peak_step, event.sharpness_before, "v", color=line.get_color(), ms=7)
    left.set(xlabel="u", ylabel="v", title="trajectories (u, v)")
    left.axvline(np.sqrt(2 / ETA), color="red", ls=":", lw=1)
    right.axhline(2 / ETA, color="red", ls=":", lw=1.2, label="MSS 2/η")
    right.set(xlabel="step", ylabel="λ1(H)", title="sharpness (▼ catapult peak)")
    right.set_ylim(95, 101)
    right.set_xlim(0, max(h["step"] for h in runs["GD"]["history"]))
    left.legend(fontsize=8)
    right.legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Scalar ReLU network: β={BETA}, η=(2+ε)/u0², ε={EPS}, (u0, v0)=({U0:g}, {V0:g})")
    _save(fig, path)


def plot_theorem2(betas: np.ndarray, bounds: list, path: Path) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(betas, [b.c_u for b in bounds], "o-", ms=3, label="C_u")
    twin = left.twinx()
    twin.plot(
        betas, [1 / (1 + ETA * b.c_v) for b in bounds], "s-", ms=3, color="C1", label="1/(1+ηC_v)"
    )
    left.set(xlabel="β", ylabel="C_u", title="Theorem 2's factors")
    twin.set_ylabel("1/(1+ηC_v)")
    left.legend(loc="upper center", fontsize=8)
    twin.legend(loc="lower left", fontsize=8)
    right.plot(betas, [b.delta_sharpness for b in bounds], "o-", ms=3, label="ΔS = u0² − u_T²")
    right.plot(betas, [b.bound_reduction for b in bounds], "--", label="u0² − ū∞² (Thm. 2)")
    right.set(xlabel="β", ylabel="sharpness reduction", title="Theorem 2 is a tight lower bound")
    right.legend(fontsize=8)
    _save(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("momentum_catapults_out"))
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--betas", type=int, default=20, help="points of the Fig. 4 sweep")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logs = {name: args.out / name.replace("→", "_to_") for name in SCENARIOS}
    runs = {name: run(m, to, args.steps, logs[name]) for name, (m, to) in SCENARIOS.items()}
    print(f"MSS 2/eta = {2 / ETA:.4f}; u0^2 = {U0**2:g}")
    print(f"{'run':8s} {'switch step':>11s} {'u_T^2':>9s} {'ΔS = u0²−u_T²':>15s}  catapults")
    for name, r in runs.items():
        u_final = r["uv"][-1, 0]
        events = "; ".join(
            f"peak {e.peak_step} (loss {e.peak_loss:.3g}), λ1/MSS {e.ratio_before:.4f}"
            f" -> {e.ratio_after:.4f}"
            for e in r["events"]
        )
        print(
            f"{name:8s} {r['switch']!s:>11s} {u_final**2:9.4f} {U0**2 - u_final**2:15.4f}  {events}"
        )
    betas = np.linspace(0.0, 0.95, args.betas)
    bounds = theorem2_sweep(betas)
    print(f"{'beta':>5s} {'C_u':>8s} {'1/(1+ηC_v)':>11s} {'ΔS':>8s} {'bound':>8s}")
    for beta, b in zip(betas, bounds):
        print(
            f"{beta:5.2f} {b.c_u:8.4f} {1 / (1 + ETA * b.c_v):11.5f} "
            f"{b.delta_sharpness:8.4f} {b.bound_reduction:8.4f}"
        )
    plot_runs(runs, args.out / "momentum_catapults.png")
    plot_theorem2(betas, bounds, args.out / "theorem2.png")
    # = lightning-eos report OUT/GD OUT/PHB_to_GD ... --labels ... --out OUT/report.png
    print(f"report: {report(list(logs.values()), args.out / 'report.png', list(logs))}")
    return {"runs": runs, "betas": betas, "bounds": bounds}


if __name__ == "__main__":
    main()
