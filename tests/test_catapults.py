"""Paper 001 §3.1 through Lightning: GD/PHB switching and catapult detection on the scalar ReLU net.

The reference is a float64 loop of App. D, eq. (5), written here by hand; the switch in it
happens at the first step whose closed-form top Hessian eigenvalue is below the MSS 2/eta.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, quiet_trainer

from lightning_eos.callbacks import (
    CatapultDetector,
    LearningRateWarmup,
    OptimizerSwitch,
    SharpnessMonitor,
)
from lightning_eos.data import SinglePointDataModule
from lightning_eos.models import ScalarReLUNetwork, SupervisedTask
from lightning_eos.optim import HeavyBall

BETA, EPS, U0, V0 = 0.9, 0.01, 10.0, 1e-6
ETA = (2 + EPS) / U0**2  # the GD learning rate; PHB steps with (1 + beta) eta (match_gd)
MSS = 2 / ETA
STEPS = 1600  # GD settles by step ~1550 (u moves < 1e-6 relative afterwards)


def top_eigenvalue(u: float, v: float) -> float:
    """lambda_1 of the Hessian [[v^2, 2uv], [2uv, u^2]] of 1/2 u^2 v^2 (u >= 0), else 0."""
    if u < 0:
        return 0.0
    mean, half_gap = (u * u + v * v) / 2, (u * u - v * v) / 2
    return mean + math.sqrt(half_gap**2 + 4 * u * u * v * v)


def reference(before: float, after: float | None, steps: int, eta: float = ETA) -> dict:
    """Eq. (5): x_{t+1} - x_t = beta (x_t - x_{t-1}) - (1 + beta) eta grad, switch by lambda_1."""
    u, v, du, dv, beta = U0, V0, 0.0, 0.0, before
    us, vs, losses, switch, above = [u], [v], [], None, None
    for t in range(steps):
        losses.append(0.5 * u * u * v * v if u >= 0 else 0.0)
        now_above = top_eigenvalue(u, v) >= 2 / eta
        if after is not None and switch is None and above and not now_above:
            beta, switch = after, t
        above = now_above
        relu = 1.0 if u >= 0 else 0.0
        gu, gv = u * v * v * relu, u * u * v * relu
        du, dv = beta * du - (1 + beta) * eta * gu, beta * dv - (1 + beta) * eta * gv
        u, v = u + du, v + dv
        us.append(u)
        vs.append(v)
    return {"u": np.array(us), "v": np.array(vs), "loss": np.array(losses), "switch": switch}


def scalar_net() -> ScalarReLUNetwork:
    model = ScalarReLUNetwork(U0, V0).double()
    with torch.no_grad():
        model.v.fill_(V0)  # v0 = 1e-6 exactly, not its float32 rounding
    return model


def fit(before: float, to: str | None, steps: int, eta: float = ETA, extra=(), logger=False):
    model = scalar_net()
    optimizer = functools.partial(HeavyBall, lr=eta, momentum=before, match_gd=True)
    task = SupervisedTask(model, loss="half_mse", optimizer=optimizer)
    monitor = SharpnessMonitor(every_n_steps=1, num_samples=None, tol=1e-10, stop_rule="residual")
    switch = [OptimizerSwitch(to=to, momentum=BETA, direction="down")] if to else []
    detector = CatapultDetector()
    trainer = quiet_trainer(
        max_steps=steps,
        precision="64-true",
        callbacks=[monitor, *switch, detector, *extra],
        logger=logger,
    )
    trainer.fit(task, SinglePointDataModule(x=1.0, y=0.0, dtype="float64"))
    u, v = float(model.u.detach().reshape(-1)[0]), float(model.v.detach().reshape(-1)[0])
    return {
        "u": u,
        "v": v,
        "history": monitor.history,
        "switch": switch[0].switch_step if switch else None,
        "events": detector.events,
    }


SCENARIOS = {  # name: (momentum before, switch to, momentum after)
    "GD": (0.0, None, None),
    "PHB->GD": (BETA, "gd", 0.0),
    "GD->PHB": (0.0, "phb", BETA),
    "PHB": (BETA, None, None),
}


@pytest.fixture(scope="module")
def runs():
    out = {}
    for name, (before, to, after) in SCENARIOS.items():
        out[name] = (fit(before, to, STEPS), reference(before, after, STEPS))
    return out


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_lightning_runs_follow_the_hand_reference_and_switch_at_its_step(runs, name):
    run, ref = runs[name]
    assert run["switch"] == ref["switch"]
    assert run["u"] == pytest.approx(ref["u"][-1], rel=1e-9)
    assert run["v"] == pytest.approx(ref["v"][-1], rel=1e-7, abs=1e-12)
    assert abs(run["v"]) < 1e-3  # at (or, GD: slowly decaying onto) the minimum v = 0
    measured = [h["eos/sharpness"] for h in run["history"]]
    expected = [top_eigenvalue(u, v) for u, v in zip(ref["u"], ref["v"])]
    np.testing.assert_allclose(measured, expected, rtol=1e-8, atol=1e-9)
    thresholds = [h["eos/threshold"] for h in run["history"]]
    np.testing.assert_allclose(thresholds, MSS, rtol=1e-12)  # match_gd: 2/eta, GD or PHB


def test_sharpness_reduction_orders_gd_phb_to_gd_gd_to_phb_phb(runs):
    """Paper 001, Fig. 3: GD < PHB->GD < GD->PHB < PHB (measured 1.00, 1.27, 1.81, 3.87)."""
    reduction = {name: U0**2 - run["u"] ** 2 for name, (run, _) in runs.items()}
    assert reduction["GD"] < reduction["PHB->GD"] < reduction["GD->PHB"] < reduction["PHB"]
    assert reduction["PHB"] > 3 * reduction["GD"]
    # GD's u mirrors around sqrt(2/eta) (the "ellipse" of App. D.3): it ends just below the MSS
    assert reduction["GD"] == pytest.approx(2 * (U0**2 - MSS), rel=0.01)


@pytest.mark.parametrize("name", ["PHB", "GD"])
def test_catapult_detector_finds_the_catapult_at_its_step(runs, name):
    """PHB's large catapult (lambda_1 100 -> 96) and GD's small one (100 -> 99, App. D)."""
    run, ref = runs[name]
    [event] = run["events"]
    assert event.start_step == 0  # the loss rises from the first step on
    assert event.peak_step == int(np.argmax(ref["loss"]))
    assert event.peak_loss == pytest.approx(ref["loss"].max(), rel=1e-9)
    assert event.sharpness_before == pytest.approx(top_eigenvalue(U0, V0), rel=1e-9)
    assert event.ratio_before > 1 > event.ratio_after
    after = top_eigenvalue(ref["u"][event.after_step], ref["v"][event.after_step])
    assert event.sharpness_after == pytest.approx(after, rel=1e-8)
    assert event.after_step == event.end_step > event.peak_step
    assert ref["loss"][event.end_step] < event.peak_loss / 2 <= ref["loss"][event.end_step - 1]


def test_no_catapult_in_a_stable_gd_run_below_the_threshold():
    eta = (2 - EPS) / U0**2  # sharpness 100 < MSS 2/eta = 100.5: v decays, the loss falls
    run = fit(0.0, None, 300, eta=eta)
    ref = reference(0.0, None, 300, eta=eta)
    assert np.all(np.diff(ref["loss"]) < 0)
    assert run["events"] == []


def test_fixed_step_switch_and_its_log(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="run", version=0)
    model = scalar_net()
    optimizer = functools.partial(HeavyBall, lr=ETA, momentum=BETA, match_gd=True)
    task = SupervisedTask(model, loss="half_mse", optimizer=optimizer)
    switch = OptimizerSwitch(to="gd", when=40)
    trainer = quiet_trainer(max_steps=60, precision="64-true", callbacks=[switch], logger=logger)
    trainer.fit(task, SinglePointDataModule(x=1.0, y=0.0, dtype="float64"))
    assert switch.switch_step == 40
    assert trainer.optimizers[0].param_groups[0]["momentum"] == 0.0
    ref = reference(BETA, None, 40)
    u, v = ref["u"][40], ref["v"][40]
    for _ in range(20):  # GD from step 40 on; the displacement is no longer used
        u, v = u - ETA * u * v * v, v - ETA * u * u * v
    assert float(model.u.detach().reshape(-1)[0]) == pytest.approx(u, rel=1e-10)
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eos/momentum")]
    assert [(int(r["step"]), float(r["eos/momentum"])) for r in rows] == [(40, 0.0)]


def test_switch_and_detector_need_a_heavy_ball_and_a_monitor():
    task = SupervisedTask(
        ScalarReLUNetwork(U0, V0),
        loss="half_mse",
        optimizer=functools.partial(torch.optim.SGD, lr=ETA),
    )
    data = SinglePointDataModule(x=1.0, y=0.0)
    with pytest.raises(ValueError, match="HeavyBall"):
        quiet_trainer(max_steps=2, callbacks=[SharpnessMonitor(), OptimizerSwitch()]).fit(
            task, data
        )
    with pytest.raises(ValueError, match="SharpnessMonitor"):
        quiet_trainer(max_steps=2, callbacks=[CatapultDetector()]).fit(task, data)


def test_events_reach_csv_and_a_wandb_table(tmp_path):
    """A PHB->GD run logged offline to W&B (in a subprocess: W&B pins process-wide state)."""
    script = ROOT / "tests" / "catapult_wandb_run.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    files = tmp_path.glob("wandb/offline-run-*/files/media/table/eos/*.table.json")
    tables = {p.name.split("_")[0] for p in files}
    assert tables == {"catapults", "switches"}, list(tmp_path.rglob("*.table.json"))
    with open(next(tmp_path.glob("csv/**/metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    peaks = [r for r in rows if r.get("eos/catapult_peak_loss")]
    assert len(peaks) == 1 and float(peaks[0]["eos/catapult_ratio_before"]) > 1


@pytest.mark.usefixtures("offline_cwd")
def test_config_finds_phbs_catapult():
    """configs/momentum_scalar_relu.yaml: PHB from (10, 1e-6), the float32-rounded v0."""
    from lightning_eos.cli import build_cli

    cli = build_cli(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "momentum_scalar_relu.yaml"),
            "--trainer.logger=false",
        ]
    )
    (detector,) = [c for c in cli.trainer.callbacks if isinstance(c, CatapultDetector)]
    [event] = detector.events
    assert event.peak_step == 97 and event.ratio_before > 1 > event.ratio_after
    u = float(cli.model.model.u.detach()[0])
    assert U0**2 - u**2 == pytest.approx(3.87, abs=0.01)  # PHB's reduction of Fig. 3


def _warmup_fit(callbacks, scheduler=None, steps=80):
    model = scalar_net()
    optimizer = functools.partial(HeavyBall, lr=0.5, momentum=0.0, match_gd=True)
    task = SupervisedTask(model, loss="half_mse", optimizer=optimizer, lr_scheduler=scheduler)
    trainer = quiet_trainer(max_steps=steps, precision="64-true", callbacks=callbacks)
    trainer.fit(task, SinglePointDataModule(x=1.0, y=0.0, dtype="float64"))
    return model, trainer


def test_warmup_callback_is_the_warmup_scheduler():
    from lightning_eos.optim import LinearWarmup

    schedule = functools.partial(LinearWarmup, lr_initial=0.001, lr_final=0.03, steps=100)
    by_scheduler, _ = _warmup_fit([], scheduler=schedule)
    by_callback, trainer = _warmup_fit([LearningRateWarmup(0.001, 0.03, 100)])
    assert torch.equal(by_scheduler.u, by_callback.u) and torch.equal(by_scheduler.v, by_callback.v)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.001 + 0.029 * 0.79)


def test_warmup_stops_where_the_sharpness_reaches_the_threshold():
    """lambda_1 stays ~100 (v is tiny); 2/lr_t falls through 100 between lr(65) and lr(66)."""
    warmup = LearningRateWarmup(0.001, 0.03, 100, stop_at_threshold=True)
    monitor = SharpnessMonitor(every_n_steps=1, num_samples=None)
    _, trainer = _warmup_fit([monitor, warmup], steps=90)
    # the measurement after step 67 is the first whose threshold 2/lr(66) is below lambda_1
    assert warmup.stop_step == 67
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(warmup.lr_at(66))
    ratios = {h["step"]: h["eos/sharpness_ratio"] for h in monitor.history}
    assert ratios[66] < 1 <= ratios[67]
