"""What the monitors show besides their scalars: W&B dashboards, run config, progress bar.

W&B runs go through tests/dashboard_wandb_run.py in a subprocess (W&B pins process-wide
state); everything else runs here, without W&B.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, quiet_trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_eos.callbacks import (
    IASMonitor,
    PreconditionedSharpnessMonitor,
    SharpnessMonitor,
)
from lightning_eos.callbacks._dashboard import chart_data
from lightning_eos.models import SupervisedTask
from lightning_eos.optim import SAM

pytestmark = pytest.mark.usefixtures("one_thread")

EOS_CONFIG_KEYS = {"optimizer", "lr", "threshold"}


def _loader(n: int = 24, seed: int = 0) -> DataLoader:
    """Full-batch regression data: every step is a gradient-descent step."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=n)


def _task(optimizer) -> SupervisedTask:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    return SupervisedTask(model, loss="mse", optimizer=optimizer)


def _fit(callbacks, optimizer, max_steps=7, **kwargs):
    task = _task(optimizer)
    trainer = quiet_trainer(callbacks=callbacks, max_steps=max_steps, **kwargs)
    trainer.fit(task, _loader())
    return trainer


# --- W&B, offline, in a subprocess --------------------------------------------------------


def _wandb_run(tmp_path, *args):
    script = ROOT / "tests" / "dashboard_wandb_run.py"
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",  # a shared 2-core runner
    }
    env.pop("WANDB_API_KEY", None)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / "facts.json").read_text())


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    return _wandb_run(tmp_path_factory.mktemp("wandb"))


def _definitions(run: dict) -> dict[str, dict]:
    """The last ``define_metric`` record of each name (W&B merges repeated ones)."""
    return {m["name"]: m for m in run["metrics"]}


def test_wandb_defines_eos_metrics_against_the_global_step(wandb_run):
    defined = _definitions(wandb_run)
    assert defined["eos/*"]["step_metric"] == "trainer/global_step"
    expected = {
        "eos/sharpness": ["max"],
        "eos/eig_2": ["max"],  # top_k=2
        "eos/preconditioned_sharpness": ["max"],
        "eos/ias": ["max"],
        "eos/sharpness_ratio": ["last"],
        "eos/ias_ratio": ["last"],
        "eos/threshold": ["last"],
        "eos/sam_edge": ["last"],
        "eos/loss": ["min"],
    }
    for name, summary in expected.items():
        assert defined[name]["step_metric"] == "trainer/global_step", name
        assert defined[name]["summary"] == summary, name


def test_wandb_summary_is_the_peak_sharpness_and_the_last_ratio(wandb_run):
    history, summary = wandb_run["history"], wandb_run["run_summary"]
    assert [h["step"] for h in history] == [0, 3, 6, 9, 12, 15]
    sharpness = [h["eos/sharpness"] for h in history]
    losses = [h["eos/loss"] for h in history]
    assert max(sharpness) != sharpness[-1] and min(losses) != losses[-1]  # a telling run
    assert summary["eos/sharpness"] == {"max": pytest.approx(max(sharpness), rel=1e-12)}
    assert summary["eos/eig_2"] == {"max": pytest.approx(max(h["eos/eig_2"] for h in history))}
    assert summary["eos/loss"] == {"min": pytest.approx(min(losses), rel=1e-12)}
    ratio = history[-1]["eos/sharpness"] / (2 / wandb_run["lr"])  # HeavyBall(match_gd): 2/eta
    assert summary["eos/sharpness_ratio"] == {"last": pytest.approx(ratio, rel=1e-9)}
    assert summary["eos/threshold"] == {"last": pytest.approx(2 / wandb_run["lr"])}


def test_wandb_config_holds_the_optimizer_and_its_threshold(wandb_run):
    eos = wandb_run["run_config"]["eos"]
    assert eos == {
        "run_id": wandb_run["run_id"],  # the id eos_history.csv rows carry
        "optimizer": "HeavyBall",
        "lr": wandb_run["lr"],
        "momentum": wandb_run["momentum"],  # at the start; the switch to GD comes later
        "weight_decay": 0.0,
        "match_gd": True,
        "threshold": pytest.approx(2 / wandb_run["lr"]),
    }
    assert wandb_run["run_config"]["loss"] == "mse"  # Lightning's module hparams stay
    assert not [w for w in wandb_run["warnings"] if "lightning-eos" in w]


def test_wandb_charts_the_sharpness_against_its_threshold_and_keeps_the_event_table(wandb_run):
    history = wandb_run["history"]
    rows = wandb_run["chart_tables"]["sharpness"]["data"]
    expected = [[h["step"], "sharpness", h["eos/sharpness"]] for h in history]
    expected += [[h["step"], "threshold", h["eos/threshold"]] for h in history]
    assert [r[:2] for r in rows] == [e[:2] for e in expected]
    assert [r[2] for r in rows] == pytest.approx([e[2] for e in expected], rel=1e-12)
    (panel,) = [
        u["value"] for u in wandb_run["config_updates"] if u["key"].endswith("charts/sharpness")
    ]
    assert panel["panel_config"]["stringSettings"]["title"] == "Sharpness λ1(H) and its threshold"
    assert set(wandb_run["chart_tables"]) == {"sharpness"}  # no IAS or P^-1 H measured
    assert any(t.startswith("eos/switches_") for t in wandb_run["tables"])


def test_failing_wandb_charts_warn_and_training_goes_on(tmp_path):
    run = _wandb_run(tmp_path, "broken")
    assert run["global_step"] == 16 and [h["step"] for h in run["history"]][-1] == 15
    assert any("could not log the eos/charts/* line charts" in w for w in run["warnings"])
    assert not run["chart_tables"]
    sharpness = [h["eos/sharpness"] for h in run["history"]]
    assert run["run_summary"]["eos/sharpness"] == {"max": pytest.approx(max(sharpness))}
    assert run["run_config"]["eos"]["lr"] == run["lr"]


def test_chart_under_sam_is_titled_and_drawn_with_the_sam_edge():
    history = [
        {"step": 0, "eos/sharpness": 3.0, "eos/threshold": 4.0, "eos/sam_edge": 4.0},
        {"step": 5, "eos/sharpness": 3.5, "eos/threshold": 3.8, "eos/sam_edge": 3.8},
    ]
    charts = chart_data(history)
    assert set(charts) == {"eos/charts/sharpness"}
    chart = charts["eos/charts/sharpness"]
    assert "SAM-edge" in chart["title"] and chart["keys"] == ["sharpness", "SAM-edge"]
    assert chart["xs"] == [[0, 5], [0, 5]] and chart["ys"] == [[3.0, 3.5], [4.0, 3.8]]
    ias = chart_data([{"step": 2, "eos/ias": 1.0, "eos/ias_threshold": 2.0, "eos/sharpness": 5}])
    assert set(ias) == {"eos/charts/ias"}  # a sharpness without its threshold is not charted


# --- CSV and TensorBoard --------------------------------------------------------------------


def _csv_columns(path) -> dict[str, list[tuple[int, float]]]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    columns: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("eos/") and value != "":
                columns.setdefault(key, []).append((int(row["step"]), float(value)))
    return columns


def _tensorboard(log_dir) -> tuple[dict[str, list[tuple[int, float]]], list[dict[str, object]]]:
    """Scalars by tag and every hparams session, read back with TensorBoard's own readers.

    The sessions come from the raw events: ``EventAccumulator`` keeps the plugin data of a
    tag's first event only (Lightning's module hyperparameters).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag.startswith("eos/")
    }
    sessions = []
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag != "_hparams_/session_start_info":
                    continue
                data = plugin_data_pb2.HParamsPluginData.FromString(
                    value.metadata.plugin_data.content
                )
                hparams = data.session_start_info.hparams
                sessions.append({k: getattr(v, v.WhichOneof("kind")) for k, v in hparams.items()})
    return scalars, sessions


def test_csv_and_tensorboard_get_the_eos_scalars_and_the_run_config(tmp_path):
    lr, beta = 0.5, 0.5
    threshold = (2 + 2 * beta) / lr  # heavy ball, dampening 0 (paper 002, App. A)
    monitors = [
        SharpnessMonitor(every_n_steps=3, num_samples=None),
        IASMonitor(every_n_steps=3, sharpness=False),  # full batch: rho_b = 1
    ]
    csv_logger = CSVLogger(tmp_path, name="csv")
    tb_logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = _fit(
        monitors,
        functools.partial(torch.optim.SGD, lr=lr, momentum=beta),
        logger=[csv_logger, tb_logger],
        log_every_n_steps=1,
    )
    steps = [0, 3, 6]
    for monitor in monitors:
        assert [h["step"] for h in monitor.history] == steps
    expected: dict[str, list[tuple[int, float]]] = {}  # both monitors log eos/loss
    for step in steps:
        for monitor in monitors:
            (entry,) = [h for h in monitor.history if h["step"] == step]
            for key, value in entry.items():
                if key != "step":
                    expected.setdefault(key, []).append((step, value))
    assert expected["eos/threshold"] == [(s, pytest.approx(threshold)) for s in steps]

    columns = _csv_columns(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert set(columns) == set(expected)
    for key, points in expected.items():
        assert columns[key] == [(s, pytest.approx(v, rel=1e-12)) for s, v in points], key

    scalars, sessions = _tensorboard(tb_logger.log_dir)
    assert set(scalars) == set(expected)
    for key, points in expected.items():
        assert scalars[key] == [(s, pytest.approx(v, rel=1e-6)) for s, v in points], key

    eos = {
        "run_id": monitors[0].run_id,  # the first monitor's, the trainer's
        "optimizer": "SGD",
        "lr": lr,
        "momentum": beta,
        "dampening": 0,
        "weight_decay": 0,
        "nesterov": False,
        "maximize": False,
        "threshold": pytest.approx(threshold),
        "ias_threshold": pytest.approx(threshold),  # 2 rho_b / eta times (1 + beta), rho_b = 1
    }
    for folder in (tmp_path / "csv" / "version_0", Path(tb_logger.log_dir)):
        hparams_file = yaml.safe_load((folder / "hparams.yaml").read_text())  # as `report` reads it
        assert hparams_file["eos"] == eos and hparams_file["loss"] == "mse", folder
    assert sessions[0] == {"loss": "mse"}  # Lightning's, before on_train_start
    assert sessions[1]["eos/lr"] == lr and sessions[1]["eos/optimizer"] == "SGD"
    assert sessions[1]["eos/threshold"] == pytest.approx(threshold)
    assert trainer.global_step == 7


def test_run_config_leaves_out_thresholds_unknown_at_the_start(tmp_path):
    """Adam has no preconditioner before its first step; SAM's edge needs a gradient."""
    adam = functools.partial(torch.optim.Adam, lr=0.01, betas=(0.8, 0.95))
    monitor = PreconditionedSharpnessMonitor(every_n_steps=3, num_samples=None)
    _fit([monitor], adam, max_steps=4, logger=CSVLogger(tmp_path, name="adam"))
    eos = yaml.safe_load((tmp_path / "adam" / "version_0" / "hparams.yaml").read_text())["eos"]
    assert eos["optimizer"] == "Adam" and eos["lr"] == 0.01 and eos["betas"] == [0.8, 0.95]
    assert "threshold" not in eos and "preconditioned_threshold" not in eos
    assert not {"params", "foreach", "fused", "capturable", "differentiable"} & set(eos)
    assert "eos/preconditioned_threshold" in monitor.history[-1]  # known after steps

    sam = functools.partial(SAM, base_optimizer=torch.optim.SGD, lr=0.1, rho=0.05)
    for measure_at_start in (False, True):
        name = f"sam{int(measure_at_start)}"
        monitor = SharpnessMonitor(every_n_steps=3, measure_at_start=measure_at_start)
        _fit([monitor], sam, max_steps=4, logger=CSVLogger(tmp_path, name=name))
        path = tmp_path / name / "version_0" / "hparams.yaml"
        eos = yaml.safe_load(path.read_text())["eos"]
        assert eos["optimizer"] == "SAM" and eos["base_optimizer"] == "SGD"
        assert eos["rho"] == 0.05 and eos["lr"] == 0.1
        if measure_at_start:  # the SAM-edge of the gradient at step 0
            start = monitor.history[0]
            assert start["step"] == 0
            assert eos["threshold"] == eos["sam_edge"] == pytest.approx(start["eos/sam_edge"])
        else:
            assert "threshold" not in eos and "sam_edge" not in eos


class _FailingConfigLogger(CSVLogger):
    def log_hyperparams(self, params, *args, **kwargs):
        if "eos" in params:
            raise OSError("disk full")
        super().log_hyperparams(params, *args, **kwargs)


def test_a_logger_refusing_the_run_config_warns_and_training_goes_on(tmp_path):
    monitor = SharpnessMonitor(every_n_steps=3, num_samples=None)
    sgd = functools.partial(torch.optim.SGD, lr=0.5)
    with pytest.warns(UserWarning, match="could not log the run config to _FailingConfigLogger"):
        trainer = _fit([monitor], sgd, logger=_FailingConfigLogger(tmp_path))
    assert trainer.global_step == 7 and [h["step"] for h in monitor.history] == [0, 3, 6]


# --- progress bar -------------------------------------------------------------------------


class _RecordingBar(TQDMProgressBar):
    """Records what the bar shows after each batch: its metrics and tqdm's postfix text."""

    def __init__(self):
        super().__init__(refresh_rate=1)
        self.shown: list[tuple[int, dict, str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        metrics = self.get_metrics(trainer, pl_module)
        self.shown.append((trainer.global_step, metrics, self.train_progress_bar.postfix))


def _latest(history, step, key):
    """The value of ``key`` at the last measurement at or before ``step``, if any."""
    values = [h[key] for h in history if h["step"] <= step and key in h]
    return values[-1] if values else None


CASES = {
    "sharpness": (
        lambda **kw: SharpnessMonitor(every_n_steps=3, num_samples=None, **kw),
        functools.partial(torch.optim.SGD, lr=0.5),
        {"λ1/thr": "eos/sharpness_ratio"},
    ),
    "preconditioned": (
        lambda **kw: PreconditionedSharpnessMonitor(every_n_steps=3, num_samples=None, **kw),
        functools.partial(torch.optim.Adam, lr=0.01),
        {"λ1(P⁻¹H)/thr": "eos/preconditioned_sharpness_ratio"},
    ),
    "ias": (
        lambda **kw: IASMonitor(every_n_steps=3, **kw),
        functools.partial(torch.optim.SGD, lr=0.5),
        {"IAS/thr": "eos/ias_ratio", "λ1/thr": "eos/sharpness_ratio"},
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=[f"monitor={c}" for c in CASES])
def test_progress_bar_shows_the_latest_ratio(case):
    make, optimizer, fields = CASES[case]
    monitor, bar = make(), _RecordingBar()
    _fit([monitor, bar], optimizer, enable_progress_bar=True)
    assert [g for g, _, _ in bar.shown] == list(range(1, 8))
    for label, key in fields.items():
        for step, metrics, postfix in bar.shown:
            expected = _latest(monitor.history, step, key)
            if expected is None:  # P^-1 H has no preconditioner before the first step
                assert label not in metrics
                continue
            assert metrics[label] == pytest.approx(expected, rel=1e-6), (label, step)
            assert f"{label}={metrics[label]:.3g}" in postfix
        assert label in bar.shown[-1][1]
    assert set(bar.shown[-1][1]) - {"train/loss", "v_num"} == set(fields)


def test_progress_bar_false_shows_nothing():
    make, optimizer, _ = CASES["ias"]
    monitor, bar = make(progress_bar=False), _RecordingBar()
    _fit([monitor, bar], optimizer, enable_progress_bar=True)
    assert monitor.history and bar.shown
    assert all(not {"λ1/thr", "IAS/thr"} & set(metrics) for _, metrics, _ in bar.shown)
