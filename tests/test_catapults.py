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
    return ScalarReLUNetwork(U0, V0, dtype="float64")  # v0 = 1e-6 exactly


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
    """configs/001_fig3_phb_scalar_relu.yaml: PHB from (10, 1e-6), the float32-rounded v0."""
    from lightning_eos.cli import build_cli

    cli = build_cli(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "001_fig3_phb_scalar_relu.yaml"),
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


# --- the detector's state machine on made-up losses and measurements -------------------


def _feed(detector, losses, measured, upto=None, start=0):
    """Steps start..: the measurement of step t (if any), then the loss of step t."""
    from types import SimpleNamespace

    if detector._monitor is None:
        detector._monitor = SimpleNamespace(history=[])
    history = detector._monitor.history
    events = []
    stop = len(losses) if upto is None else upto
    for t in range(start, stop):
        if t in measured:
            history.append({"step": t, "eos/loss": losses[t], **measured[t]})
        if detector.loss == "measurement":
            detector._read_measured_losses()
        else:
            detector._observe(t, losses[t])
        events += detector._finalize(history, final=False)
    if upto is None:
        if detector._calm is not None:
            detector._end_spike()
        events += detector._finalize(history, final=True)
    return events


def _every(n, steps, sharpness, threshold):
    return {t: {"eos/sharpness": sharpness(t), "eos/threshold": threshold} for t in steps[::n]}


OSCILLATING = [1.0] * 5 + [10.0, 1.0, 10.0, 1.0, 8.0] + [0.5] * 15  # one spike, steps 5-9


@pytest.mark.parametrize("window", [1, 10], ids=lambda w: f"window={w}")
def test_an_oscillating_spike_is_one_catapult(window):
    """window=10 keeps it open; window=1 ends it thrice, and merging joins the pieces."""
    measured = _every(5, list(range(25)), lambda t: 10.0 if t < 10 else 6.0, 9.5)
    [event] = _feed(CatapultDetector(window=window), OSCILLATING, measured)
    assert (event.start_step, event.peak_step, event.end_step) == (4, 5, 10)
    assert (event.before_step, event.after_step) == (0, 10)
    assert event.peak_loss == 10.0 and event.sharpness_after == 6.0


def test_two_spikes_with_a_measurement_between_are_two_catapults():
    losses = [1.0] * 5 + [10.0] + [0.5] * 12 + [5.0] + [0.2] * 12
    measured = _every(5, list(range(31)), lambda t: 10.0 if t < 10 else 8.0 if t < 20 else 6.0, 8.5)
    first, second = _feed(CatapultDetector(), losses, measured)
    assert (first.peak_step, first.sharpness_before, first.sharpness_after) == (5, 10.0, 8.0)
    assert (second.start_step, second.peak_step, second.end_step) == (17, 18, 19)
    assert (second.sharpness_before, second.sharpness_after) == (8.0, 6.0)


def test_a_spike_rising_before_the_last_ones_measurement_is_not_counted_again():
    """B starts at step 19, before A's after-measurement at 20: its drop would be A's."""
    losses = [1.0] * 5 + [10.0] + [0.5] * 14 + [0.6, 2.0] + [0.3] * 20
    measured = _every(20, list(range(42)), lambda t: 10.0 if t < 20 else 6.0, 9.5)
    [event] = _feed(CatapultDetector(), losses, measured)
    assert event.peak_step == 5 and event.after_step == 20


def test_spikes_far_below_the_mss_or_without_a_drop_are_not_catapults():
    measured = _every(5, list(range(25)), lambda t: 10.0 if t < 10 else 6.0, 20.0)  # 0.5 MSS
    assert _feed(CatapultDetector(), OSCILLATING, measured) == []
    flat = _every(5, list(range(25)), lambda t: 10.0, 9.5)
    assert _feed(CatapultDetector(), OSCILLATING, flat) == []
    dead = _every(5, list(range(25)), lambda t: 0.0, 9.5)  # a dead ReLU: no division by 0
    assert _feed(CatapultDetector(min_ratio=0.0), OSCILLATING, dead) == []


def test_the_measurement_loss_source_and_a_resume_mid_spike():
    import copy

    measured = {
        t: {"eos/sharpness": 10.0 if t < 10 else 6.0, "eos/threshold": 9.5} for t in range(25)
    }
    [event] = _feed(CatapultDetector(loss="measurement"), OSCILLATING, measured)
    assert (event.start_step, event.peak_step, event.end_step) == (4, 5, 10)

    every = _every(5, list(range(25)), lambda t: 10.0 if t < 10 else 6.0, 9.5)
    straight = _feed(CatapultDetector(), OSCILLATING, every)
    first = CatapultDetector()
    assert _feed(first, OSCILLATING, every, upto=8) == []  # inside the spike
    resumed = CatapultDetector()
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    resumed._monitor = copy.deepcopy(first._monitor)
    assert _feed(resumed, OSCILLATING, every, start=8) == straight


class _LossLog(CatapultDetector):
    def __init__(self):
        super().__init__()
        self.seen = []

    def _observe(self, step, loss):
        self.seen.append((step, loss))
        super()._observe(step, loss)


def test_the_detector_sees_the_step_loss_under_gradient_accumulation():
    """Two micro-batches of 25 per step: their mean is the full loss the monitor measures."""
    from lightning_eos.data import SparseRegressionDataModule
    from lightning_eos.models import DiagonalLinearNetwork

    task = SupervisedTask(
        DiagonalLinearNetwork(100, 0.1),
        loss="half_mse",
        optimizer=functools.partial(HeavyBall, lr=1e-4, momentum=0.9),
    )
    monitor, detector = SharpnessMonitor(every_n_steps=1, num_samples=None), _LossLog()
    trainer = quiet_trainer(
        max_steps=6, precision="64-true", callbacks=[monitor, detector], accumulate_grad_batches=2
    )
    trainer.fit(task, SparseRegressionDataModule(batch_size=25, dtype="float64"))
    measured = {h["step"]: h["eos/loss"] for h in monitor.history}
    assert [s for s, _ in detector.seen] == list(range(6))
    for step, loss in detector.seen:
        assert loss == pytest.approx(measured[step], rel=1e-10)


def test_monitor_must_log_a_threshold_on_lambda_1_and_the_switch_a_start_to_leave():
    from lightning_eos.callbacks import PreconditionedSharpnessMonitor

    task = SupervisedTask(
        ScalarReLUNetwork(U0, V0),
        loss="half_mse",
        optimizer=functools.partial(HeavyBall, lr=ETA, momentum=BETA),
    )
    adam = SupervisedTask(
        ScalarReLUNetwork(U0, V0),
        loss="half_mse",
        optimizer=functools.partial(torch.optim.Adam, lr=ETA),
    )
    data = SinglePointDataModule(x=1.0, y=0.0)
    with pytest.raises(ValueError, match="PreconditionedSharpnessMonitor logs no threshold"):
        callbacks = [PreconditionedSharpnessMonitor(), CatapultDetector()]
        quiet_trainer(max_steps=2, callbacks=callbacks).fit(adam, data)
    with pytest.raises(ValueError, match="switches from GD"):
        callbacks = [SharpnessMonitor(), OptimizerSwitch(to="phb")]
        quiet_trainer(max_steps=2, callbacks=callbacks).fit(task, data)


def test_the_detector_does_not_change_the_run():
    """Digits, SGD with momentum, 20 steps: bit-identical parameters with and without it."""
    from lightning_eos.data import DigitsDataModule
    from lightning_eos.models import FCN

    def run(extra):
        torch.manual_seed(0)
        task = SupervisedTask(
            FCN(64, 10, width=32, depth=2, activation="tanh"),
            loss="mse",
            optimizer=functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9),
        )
        monitor = SharpnessMonitor(every_n_steps=3, num_samples=200)
        trainer = quiet_trainer(max_steps=20, callbacks=[monitor, *extra])
        trainer.fit(task, DigitsDataModule(num_train=300, num_val=50, batch_size=64, shuffle=True))
        return [p.detach().clone() for p in task.parameters()], torch.get_rng_state()

    (plain, rng), (watched, rng_watched) = run([]), run([CatapultDetector()])
    assert all(torch.equal(a, b) for a, b in zip(plain, watched)) and torch.equal(rng, rng_watched)
