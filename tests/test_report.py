"""CSV logs of short fits, read back, and ``lightning-eos report`` drawn from them.

The claims checked: every ``eos/*`` value a monitor measured is in the CSV at the step it
was measured and nowhere else; the report's dashed threshold lines carry exactly the
CSV's thresholds (read from the figure's line data, not from pixels), in one colour per
learning rate; catapult markers and switch lines sit at the logged events. On logs written
by hand: the versions of a run resumed from a checkpoint are stitched into one series per
metric with each step once (the value written last), unrelated runs stay apart; and every
malformed input ends the command with one error line that names the file (and the line).
"""

from __future__ import annotations

import csv
import functools
import math
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from lightning_eos.callbacks import (
    CatapultDetector,
    IASMonitor,
    OptimizerSwitch,
    PreconditionedSharpnessMonitor,
    SharpnessMonitor,
)
from lightning_eos.cli import main as cli_main
from lightning_eos.data import DigitsDataModule, SinglePointDataModule
from lightning_eos.models import FCN, ScalarReLUNetwork, SupervisedTask
from lightning_eos.optim import Adam, HeavyBall
from lightning_eos.report import (
    FORMATS,
    draw_report,
    main,
    metrics_files,
    read_run,
    read_runs,
    summarize,
    write_report,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(path: Path) -> list[dict[str, str]]:
    (found,) = path.rglob("metrics.csv")
    with found.open(newline="") as file:
        return list(csv.DictReader(file))


def _logged(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    """``{step: value}`` of the rows where ``key`` has a value."""
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def _fit(out: Path, optimizer, monitor, max_steps: int, batch_size=None, **trainer) -> None:
    L.seed_everything(0, verbose=False)
    task = SupervisedTask(
        FCN(in_features=64, out_features=10, width=24, depth=2, activation="tanh"),
        loss="mse",
        optimizer=optimizer,
    )
    trainer = quiet_trainer(
        out,
        callbacks=[monitor],
        max_steps=max_steps,
        logger=CSVLogger(out, name="csv"),
        log_every_n_steps=1,
        **trainer,
    )
    trainer.fit(task, DigitsDataModule(num_train=128, num_val=16, batch_size=batch_size))


def _assert_history_in_csv(history: list[dict[str, float]], rows: list[dict[str, str]]) -> None:
    """Each measured ``eos/*`` value is in the CSV at its step, and only at measured steps."""
    measured = {int(h["step"]) for h in history}
    keys = {k for h in history for k in h if k.startswith("eos/")}
    assert keys, "the monitor measured nothing"
    for key in keys:
        logged = _logged(rows, key)
        expected = {int(h["step"]): h[key] for h in history if key in h}
        assert set(logged) == set(expected), key
        for step, value in expected.items():
            assert logged[step] == pytest.approx(value, rel=1e-12, nan_ok=True), (key, step)
    eos_columns = {k for r in rows for k in r if k.startswith("eos/")}
    for row in rows:
        if any(row[k] for k in eos_columns):
            assert int(row["step"]) in measured, row


def test_sharpness_metrics_are_in_the_csv_at_the_measured_steps(tmp_path):
    monitor = SharpnessMonitor(every_n_steps=3, top_k=2, num_samples=None)
    _fit(tmp_path, functools.partial(torch.optim.SGD, lr=0.5), monitor, max_steps=10)
    assert [h["step"] for h in monitor.history] == [0, 3, 6, 9]
    rows = _rows(tmp_path)
    _assert_history_in_csv(monitor.history, rows)
    for key in ("eos/sharpness", "eos/eig_2", "eos/threshold", "eos/sharpness_ratio", "eos/loss"):
        assert set(_logged(rows, key)) == {0, 3, 6, 9}, key
    assert set(_logged(rows, "eos/threshold").values()) == {2 / 0.5}
    assert set(_logged(rows, "train/loss")) == set(range(10))  # log_every_n_steps=1


def test_preconditioned_and_ias_metrics_are_in_the_csv_at_the_measured_steps(tmp_path):
    adam = functools.partial(Adam, lr=1e-3, betas=(0.9, 0.99), bias_correction=False)
    monitor = PreconditionedSharpnessMonitor(every_n_steps=4, num_samples=None)
    _fit(tmp_path / "adam", adam, monitor, max_steps=9)
    rows = _rows(tmp_path / "adam")
    _assert_history_in_csv(monitor.history, rows)
    assert set(_logged(rows, "eos/preconditioned_threshold")) == {4, 8}  # no P before a step
    for value in _logged(rows, "eos/preconditioned_threshold").values():
        assert value == pytest.approx(38 / 1e-3, rel=1e-12)  # (2 + 2 beta_1)/((1 - beta_1) eta)

    ias = IASMonitor(every_n_steps=2, samples=None, chunk_size=64)
    _fit(tmp_path / "sgd", functools.partial(torch.optim.SGD, lr=0.3), ias, 5, batch_size=32)
    rows = _rows(tmp_path / "sgd")
    _assert_history_in_csv(ias.history, rows)
    for key in ("eos/ias", "eos/ias_threshold", "eos/rho_b", "eos/sharpness", "eos/threshold"):
        assert set(_logged(rows, key)) == {0, 2, 4}, key


@pytest.fixture(scope="module")
def lr_sweep(tmp_path_factory) -> Path:
    """Three full-batch GD runs on digits at lr 2, 0.5 and 1 (CSV logs only)."""
    root = tmp_path_factory.mktemp("sweep")
    for lr in (2.0, 0.5, 1.0):
        monitor = SharpnessMonitor(every_n_steps=5, num_samples=None)
        _fit(root / f"lr{lr:g}", functools.partial(torch.optim.SGD, lr=lr), monitor, 21)
    return root


def test_report_of_three_runs_draws_each_threshold_at_the_csv_values(lr_sweep, tmp_path):
    runs = read_runs([lr_sweep / "lr2", lr_sweep / "lr0.5", lr_sweep / "lr1"])
    assert [run.lr for run in runs] == [0.5, 1.0, 2.0]  # from hparams.yaml, ordered by lr
    assert [run.label for run in runs] == ["$\\eta$=0.5", "$\\eta$=1", "$\\eta$=2"]
    fig = draw_report(runs)
    loss_ax, sharpness_ax = fig.axes[:2]
    assert sharpness_ax.get_title().startswith("sharpness")
    lines = {line.get_gid(): line for line in sharpness_ax.get_lines()}
    colors = set()
    for run in runs:
        rows = _rows(run.path.parent)
        logged = _logged(rows, "eos/threshold")
        threshold = lines[f"threshold:{run.label}"]
        assert list(threshold.get_xdata()) == sorted(logged)
        assert list(threshold.get_ydata()) == [logged[s] for s in sorted(logged)]
        assert set(threshold.get_ydata()) == {2 / run.lr}
        assert threshold.get_linestyle() == "--"
        (solid,) = [ln for ln in sharpness_ax.get_lines() if ln.get_label() == run.label]
        assert solid.get_color() == threshold.get_color()
        assert list(solid.get_ydata()) == [
            _logged(rows, "eos/sharpness")[s] for s in sorted(logged)
        ]
        colors.add(threshold.get_color())
        (loss,) = [ln for ln in loss_ax.get_lines() if ln.get_label() == run.label]
        assert list(loss.get_xdata()) == sorted(_logged(rows, "train/loss"))
    assert len(colors) == 3

    path = write_report(runs, tmp_path / "three.png", dpi=50)
    assert Image.open(path).size == (12 * 50, 4 * 50)  # two panels of 6 x 4 inches


def test_report_of_one_run_png_and_html_through_the_cli(lr_sweep, tmp_path, capsys):
    run_dir = lr_sweep / "lr1"
    with pytest.raises(SystemExit) as exit_:
        cli_main(["report", str(run_dir), "--out", str(tmp_path / "one.png"), "--dpi", "40"])
    assert exit_.value.code == 0
    assert Image.open(tmp_path / "one.png").size == (12 * 40, 4 * 40)
    (run,) = read_runs([run_dir])
    ratios = _logged(_rows(run_dir), "eos/sharpness_ratio")
    printed = capsys.readouterr().out
    assert f"last lambda_1/thr: {ratios[max(ratios)]:.4g}" in printed
    assert "Report written to" in printed

    fig = draw_report([run])
    lines = fig.axes[1].get_lines()
    (threshold,) = [ln for ln in lines if ln.get_gid() == f"threshold:{run.label}"]
    assert threshold.get_label() == "2/$\\eta$ = 2"  # lr 1: the GD threshold 2/eta, named

    page = write_report([run], tmp_path / "one.html")
    text = page.read_text()
    assert "data:image/png;base64," in text and f"{ratios[max(ratios)]:.4g}" in text


def test_catapults_and_switches_are_drawn_at_the_logged_events(tmp_path):
    # paper 001, Fig. 3: PHB -> GD on the scalar ReLU network; the catapult peaks at step 97
    eta = 2.01 / 100
    task = SupervisedTask(
        ScalarReLUNetwork(10.0, 1e-6),
        loss="half_mse",
        optimizer=functools.partial(HeavyBall, lr=eta, momentum=0.9, match_gd=True),
    )
    detector = CatapultDetector()
    trainer = quiet_trainer(
        tmp_path,
        callbacks=[
            SharpnessMonitor(every_n_steps=1, num_samples=None),
            OptimizerSwitch(to="gd", direction="down"),
            detector,
        ],
        max_steps=150,
        precision="64-true",
        logger=CSVLogger(tmp_path, name="csv"),
        log_every_n_steps=50,
    )
    trainer.fit(task, SinglePointDataModule(x=1.0, y=0.0, dtype="float64"))
    (event,) = detector.events
    rows = _rows(tmp_path)
    assert _logged(rows, "eos/catapult_peak_loss") == {event.peak_step: event.peak_loss}
    (switch_step,) = _logged(rows, "eos/switch_sharpness")

    (run,) = read_runs([tmp_path])
    assert summarize(run)["catapults"] == 1 and summarize(run)["switches"] == 1
    fig = draw_report([run])
    loss_ax, sharpness_ax = fig.axes[:2]
    (markers,) = [ln for ln in loss_ax.get_lines() if ln.get_gid() == f"catapults:{run.label}"]
    assert list(markers.get_xdata()) == [event.peak_step]
    assert list(markers.get_ydata()) == [event.peak_loss]
    (vline,) = [ln for ln in sharpness_ax.get_lines() if ln.get_gid() == f"switch:{run.label}"]
    assert list(vline.get_xdata()) == [switch_step, switch_step]
    assert loss_ax.get_yscale() == "log"
    assert "catapults" in loss_ax.get_title()
    assert not math.isnan(summarize(run)["max lambda_1"])


def test_a_folder_reports_the_newest_version_of_each_logger(tmp_path):
    for version, value in ((0, 1.0), (2, 3.0), (10, 5.0)):
        folder = tmp_path / "run" / "csv" / f"version_{version}"
        folder.mkdir(parents=True)
        (folder / "metrics.csv").write_text(f"eos/sharpness,step\n{value},0\n")
    other = tmp_path / "run" / "other" / "version_0"
    other.mkdir(parents=True)
    (other / "metrics.csv").write_text("eos/sharpness,step\n7.0,0\n")
    found = metrics_files(tmp_path / "run")
    assert [p.parent.name for p in found] == ["version_10", "version_0"]
    runs = read_runs([tmp_path / "run"])
    assert [run.values("eos/sharpness") for run in runs] == [[5.0], [7.0]]
    assert [run.label for run in runs] == ["run", "other"]  # the name above csv/version_N
    twice = read_runs([tmp_path / "run", tmp_path / "run"])
    assert [run.label for run in twice] == ["run", "other", "run (2)", "other (2)"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No metrics.csv"):
        metrics_files(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither"):
        metrics_files(tmp_path / "missing")


def test_a_threshold_far_above_the_curves_is_clipped_not_drawn_whole(tmp_path):
    # a linear warmup from lr 1e-8 to 1 over 4 steps: 2/lr starts at 2e8 and settles at 2
    rows = ["eos/sharpness,eos/threshold,step"]
    lrs = [1e-8 + (1 - 1e-8) * min(1, s / 4) for s in range(10)]
    rows += [f"{1.9 * min(1, s / 5)},{2 / lr!r},{s}" for s, lr in enumerate(lrs)]
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    (run,) = read_runs([tmp_path / "metrics.csv"])
    fig = draw_report([run])
    sharpness_ax = fig.axes[0]
    assert sharpness_ax.get_ylim() == pytest.approx((0.0, 1.3 * 2.0))
    (threshold,) = [ln for ln in sharpness_ax.get_lines() if (ln.get_gid() or "").startswith("thr")]
    assert max(threshold.get_ydata()) == 2 / 1e-8  # the data stays whole; the view is clipped


def test_repeated_steps_non_finite_values_and_python_tuples_are_read_safely(tmp_path, capsys):
    folder = tmp_path / "run" / "csv" / "version_0"
    folder.mkdir(parents=True)
    # step 1 twice (a run resumed into the same file): the last value wins
    rows = "eos/sharpness,eos/sharpness_ratio,eos/threshold,eos/sam_edge,epoch,step\n"
    rows += "1.0,0.5,2.0,2.0,0,0\n9.0,9.0,2.0,2.0,0,1\n2.0,1.0,2.0,2.0,0,1\n"
    rows += "3.0,inf,2.0,2.0,0,2\n4.0,1.2,2.0,2.0,0,3\nnan,nan,2.0,2.0,0,4\n"
    (folder / "metrics.csv").write_text(rows)
    # Lightning writes tuples with a python tag that yaml.safe_load refuses
    hparams = "betas: !!python/tuple\n- 0.9\n- 0.99\neos:\n  lr: 0.001\n  initial_lr: 0.002\n"
    (folder / "hparams.yaml").write_text(hparams)
    (run,) = read_runs([tmp_path / "run"])
    assert run.lr == 0.002  # a scheduler's base rate over the rate at the first step
    assert run.steps("eos/sharpness") == [0, 1, 2, 3, 4]
    assert run.values("eos/sharpness")[:4] == [1.0, 2.0, 3.0, 4.0]
    summary = summarize(run)
    assert summary["max lambda_1"] == 4.0  # nan is not a maximum
    assert math.isnan(summary["last lambda_1/thr"])
    assert summary["lambda_1/thr range (last 50%)"] == (1.2, 1.2)  # inf and nan left out
    fig = draw_report([run])
    (threshold,) = [ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "threshold:run"]
    assert threshold.get_label() == "SAM-edge = 2"  # under SAM, eos/threshold is the SAM-edge

    (folder / "hparams.yaml").write_text("- not a mapping\n")
    (tmp_path / "run" / "csv" / "version_0" / "config.yaml").write_text("model: a string\n")
    assert read_runs([tmp_path / "run"])[0].lr is None

    (bare := tmp_path / "bare").mkdir()
    (bare / "metrics.csv").write_text("eos/sharpness\n1.0\n")  # no step column
    with pytest.raises(SystemExit):
        cli_main(["report", str(bare / "metrics.csv"), "--out", str(tmp_path / "x.png")])
    assert "no loss and no eos/* sharpness" in capsys.readouterr().err


def test_a_panel_without_threshold_says_so_and_every_version_can_be_read(tmp_path):
    for version in (0, 1):
        folder = tmp_path / "lightning_logs" / f"version_{version}"
        folder.mkdir(parents=True)
        rows = "eos/sharpness,eos/preconditioned_sharpness,eos/preconditioned_threshold,step\n"
        (folder / "metrics.csv").write_text(rows + f"{version + 1.0},3.0,4.0,0\n")
    assert len(metrics_files(tmp_path)) == 1
    runs = read_runs([tmp_path], all_versions=True)
    assert [run.values("eos/sharpness") for run in runs] == [[1.0], [2.0]]
    assert [run.label for run in runs] == [tmp_path.name, f"{tmp_path.name} (2)"]
    sharpness_ax, preconditioned_ax = draw_report(runs).axes[:2]
    assert sharpness_ax.get_title() == "sharpness"  # Adam: no threshold on lambda_1(H)
    assert preconditioned_ax.get_title().endswith("and its threshold (dashed)")
    page = write_report(runs, tmp_path / "r.html").read_text(encoding="utf-8")
    assert page.count("<tr>") == 3 and f"{tmp_path.name} (2)" in page


# --- logs written by hand: resumed runs (eos_history.csv + run ids) ---------------------------


def _log_folder(root: Path, version: int, metrics=None, history=None, hparams=None) -> Path:
    """``root/csv/version_N`` with the files of a CSVLogger and our monitors.

    ``metrics``: rows of Lightning's wide ``metrics.csv`` (dicts with a ``step``);
    ``history``: ``(run_id, step, key, value)`` rows of ``eos_history.csv``, values written
    as the monitors write them (``repr`` of a float); ``hparams``: the ``eos`` mapping.
    """
    folder = root / "csv" / f"version_{version}"
    folder.mkdir(parents=True)
    if metrics is not None:
        columns = sorted({key for row in metrics for key in row})
        with (folder / "metrics.csv").open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=columns)
            writer.writeheader()
            writer.writerows(metrics)
    if history is not None:
        with (folder / "eos_history.csv").open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(("run_id", "step", "key", "value"))
            writer.writerows((r, s, k, repr(float(v))) for r, s, k, v in history)
    if hparams is not None:
        lines = "".join(f"  {key}: {value!r}\n" for key, value in hparams.items())
        (folder / "hparams.yaml").write_text("eos:\n" + lines)
    return folder


def _eos(run_id: str, points: dict[int, float], threshold: float = 4.0) -> list[tuple]:
    """History rows of the sharpness, its threshold and their ratio at ``points``."""
    return [
        (run_id, step, key, value)
        for step, sharpness in points.items()
        for key, value in (
            ("eos/sharpness", sharpness),
            ("eos/threshold", threshold),
            ("eos/sharpness_ratio", sharpness / threshold),
        )
    ]


def _wide(history: list[tuple], losses: dict[int, float]) -> list[dict]:
    """Lightning's metrics.csv rows: one per ``train/loss`` step, one per measured step."""
    measured: dict[int, dict] = {}
    for _, step, key, value in history:
        measured.setdefault(step, {"step": step, "epoch": 0})[key] = value
    rows = [{"train/loss": loss, "epoch": 0, "step": step} for step, loss in losses.items()]
    return sorted(rows + list(measured.values()), key=lambda row: row["step"])


def test_a_run_resumed_into_the_same_version_is_stitched_from_its_history(tmp_path, capsys):
    # killed at step 7 after measuring steps 0, 3, 6; resumed from its checkpoint at step 5
    # into version_0 again: Lightning deleted metrics.csv, which now holds steps 5-9 only;
    # eos_history.csv holds step 6 twice, the second time as measured after the resume
    before = _eos("ab12cd34", {0: 1.0, 3: 2.0, 6: 3.0})
    after = _eos("ab12cd34", {6: 3.5, 9: 4.0})
    losses = {step: 1.0 / (step + 1) for step in range(5, 10)}
    folder = _log_folder(
        tmp_path / "sgd",
        0,
        metrics=_wide(after, losses),
        history=before + after,
        hparams={"run_id": "ab12cd34", "lr": 0.5},
    )
    (run,) = read_runs([tmp_path / "sgd"])
    assert run.steps("eos/sharpness") == [0, 3, 6, 9]
    assert run.values("eos/sharpness") == [1.0, 2.0, 3.5, 4.0]  # step 6: the later value
    assert run.values("eos/sharpness_ratio") == [0.25, 0.5, 0.875, 1.0]
    assert run.series["train/loss"] == sorted(losses.items())  # the lost part stays lost
    assert "epoch" not in run.series
    assert (run.run_id, run.lr, run.label) == ("ab12cd34", 0.5, "sgd")
    assert run.files == [folder / "metrics.csv", folder / "eos_history.csv"]
    assert run.path == folder / "metrics.csv"
    assert metrics_files(tmp_path / "sgd") == [folder / "metrics.csv"]
    summary = summarize(run)
    assert summary["max lambda_1"] == 4.0 and summary["last lambda_1/thr"] == 1.0
    assert summary["lambda_1/thr range (last 50%)"] == (0.875, 1.0)
    assert summary["run_id"] == "ab12cd34"
    assert summary["csv"] == f"{folder / 'metrics.csv'} + {folder / 'eos_history.csv'}"

    assert main([str(tmp_path / "sgd"), "--out", str(tmp_path / "r.png"), "--dpi", "30"]) == 0
    out = capsys.readouterr().out
    assert f"csv: {folder / 'metrics.csv'} + {folder / 'eos_history.csv'}" in out
    assert f"Report written to {tmp_path / 'r.png'}" in out
    sharpness_ax = draw_report([run]).axes[1]
    (solid,) = [line for line in sharpness_ax.get_lines() if line.get_label() == "sgd"]
    assert list(solid.get_xdata()) == [0, 3, 6, 9]

    # the file alone is what the logger kept: the steps after the resume
    assert read_run(folder / "metrics.csv").steps("eos/sharpness") == [6, 9]
    alone = read_run(folder / "eos_history.csv")
    assert alone.series["eos/sharpness"] == run.series["eos/sharpness"]
    assert alone.run_id == "ab12cd34" and alone.lr == 0.5


def test_a_run_resumed_into_a_new_version_is_one_run(tmp_path):
    # version_0 measured steps 0, 2, 4, 6 and was killed; the checkpoint at step 3 resumed
    # into version_1 (Lightning's default), which measured 4, 6 and 8 again and was killed
    # before its logger flushed step 8: eos_history.csv has it, metrics.csv does not
    first = _eos("ab12cd34", {0: 1.0, 2: 2.0, 4: 3.0, 6: 4.0})
    second = _eos("ab12cd34", {4: 3.5, 6: 4.5, 8: 5.0})
    v0 = _log_folder(
        tmp_path,
        0,
        metrics=_wide(first, {s: 10.0 + s for s in range(7)}),
        history=first,
        hparams={"run_id": "ab12cd34", "lr": 0.1},
    )
    v1 = _log_folder(
        tmp_path,
        1,
        metrics=_wide(second[:6], {s: 20.0 + s for s in range(3, 8)}),
        history=second,
        hparams={"run_id": "ab12cd34", "lr": 0.2},  # e.g. the scheduled rate at the resume
    )
    for all_versions in (False, True):
        (run,) = read_runs([tmp_path], all_versions=all_versions)
        assert run.steps("eos/sharpness") == [0, 2, 4, 6, 8]
        assert run.values("eos/sharpness") == [1.0, 2.0, 3.5, 4.5, 5.0]
        assert run.values("eos/threshold") == [4.0] * 5
        assert run.steps("train/loss") == list(range(8))
        assert run.values("train/loss") == [10.0, 11.0, 12.0, 23.0, 24.0, 25.0, 26.0, 27.0]
        assert run.lr == 0.1  # from the first version that has one
        assert run.files == [
            v0 / "metrics.csv",
            v0 / "eos_history.csv",
            v1 / "metrics.csv",
            v1 / "eos_history.csv",
        ]
        assert run.path == v1 / "metrics.csv"
    assert metrics_files(tmp_path, all_versions=True) == [v1 / "metrics.csv"]
    assert summarize(run)["switches"] == 0 and summarize(run)["max lambda_1"] == 5.0

    # resumed once more, into version_2, and killed before Lightning wrote anything there
    v2 = _log_folder(tmp_path, 2, history=_eos("ab12cd34", {8: 5.5, 10: float("nan")}))
    (run,) = read_runs([tmp_path])
    assert run.steps("eos/sharpness") == [0, 2, 4, 6, 8, 10]
    assert run.values("eos/sharpness")[:5] == [1.0, 2.0, 3.5, 4.5, 5.5]
    assert math.isnan(run.values("eos/sharpness")[5])
    assert run.path == v2 / "eos_history.csv" and run.files[-1] == v2 / "eos_history.csv"
    assert summarize(run)["max lambda_1"] == 5.5  # nan is not a maximum


def test_unrelated_runs_in_two_versions_stay_apart(tmp_path):
    # two runs of one config, the second not resumed: another run id, overlapping steps
    _log_folder(
        tmp_path,
        0,
        metrics=_wide(_eos("aaaa1111", {0: 1.0, 5: 2.0}), {}),
        history=_eos("aaaa1111", {0: 1.0, 5: 2.0}),
        hparams={"run_id": "aaaa1111", "lr": 0.5},
    )
    # its id only in hparams.yaml (killed before its first measurement was appended)
    v1 = _log_folder(
        tmp_path,
        1,
        metrics=[{"train/loss": 0.5, "step": 0}, {"train/loss": 0.4, "step": 1}],
        hparams={"run_id": "bbbb2222", "lr": 0.5},
    )
    (newest,) = read_runs([tmp_path])
    assert newest.run_id == "bbbb2222" and newest.files == [v1 / "metrics.csv"]
    assert newest.series == {"train/loss": [(0, 0.5), (1, 0.4)]}
    runs = read_runs([tmp_path], all_versions=True)
    assert [run.run_id for run in runs] == ["aaaa1111", "bbbb2222"]
    assert runs[0].series["eos/sharpness"] == [(0, 1.0), (5, 2.0)]
    assert [run.label for run in runs] == [tmp_path.name, f"{tmp_path.name} (2)"]
    assert [summarize(run)["run_id"] for run in runs] == ["aaaa1111", "bbbb2222"]

    # a third run logged into version_1 (a fixed version): Lightning deleted its metrics.csv,
    # the history keeps the rows of both ids; the newest id owns the folder's other files
    history = _eos("cccc3333", {0: 7.0}) + _eos("dddd4444", {0: 8.0, 5: 9.0})
    (v1 / "eos_history.csv").write_text(
        "run_id,step,key,value\n" + "".join(f"{r},{s},{k},{v!r}\n" for r, s, k, v in history)
    )
    (v1 / "metrics.csv").unlink()
    (newest,) = read_runs([tmp_path])
    assert newest.run_id == "dddd4444" and newest.values("eos/sharpness") == [8.0, 9.0]
    runs = read_runs([tmp_path], all_versions=True)
    assert [run.run_id for run in runs] == ["aaaa1111", "cccc3333", "dddd4444"]
    assert runs[1].series["eos/sharpness"] == [(0, 7.0)]
    assert runs[1].lr is None  # version_1's hparams.yaml is the newest run's


def test_logs_without_a_run_id_are_read_as_before(tmp_path):
    # written before run ids: each version is a run of its own, never stitched
    for version, values in ((0, (1.0, 2.0)), (1, (5.0, 6.0))):
        rows = [{"eos/sharpness": v, "step": s} for s, v in zip((0, 5), values, strict=True)]
        _log_folder(tmp_path, version, metrics=rows, hparams={"lr": 0.5 + version})
    (run,) = read_runs([tmp_path])
    assert run.series["eos/sharpness"] == [(0, 5.0), (5, 6.0)]
    assert run.run_id is None and run.files == [tmp_path / "csv" / "version_1" / "metrics.csv"]
    assert "run_id" not in summarize(run)
    runs = read_runs([tmp_path], all_versions=True)
    assert [run.values("eos/sharpness") for run in runs] == [[1.0, 2.0], [5.0, 6.0]]
    assert [run.lr for run in runs] == [0.5, 1.5]
    assert [run.label for run in runs] == ["$\\eta$=0.5", "$\\eta$=1.5"]


# --- bad input: one error line that names the file -----------------------------------------


def _error(capsys, argv: list[str]) -> str:
    """The one error line of ``lightning-eos report ARGV`` (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "Report written" not in captured.out
    *usage, line = captured.err.strip().splitlines()
    assert usage and usage[0].startswith("usage: lightning-eos report")
    assert line.startswith("lightning-eos report: error: ")
    return line.removeprefix("lightning-eos report: error: ")


#: (id, content of metrics.csv or eos_history.csv, the error after "<path>, ")
BAD_LOGS = [
    (
        "more-fields",
        "eos/sharpness,step\n1.0,0\n2.0,1,7\n",
        "line 3: 3 fields, but the header has 2",
    ),
    ("binary", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "line 1: not UTF-8 text"),
    ("latin-1", b"eos/sharpness,step\n1.0,0\ncaf\xe9,1\n", "line 3: not UTF-8 text"),
    ("nul-byte", "eos/sharpness,step\n1.0,0\n\x00\x00\x00\n", "line 3: a NUL byte"),
    ("empty", "", "line 1: empty, no CSV header"),
    ("no-step", "eos/sharpness\n1.0\n", "line 1: no 'step' column in the header"),
    ("step-not-int", "eos/sharpness,step\n1.0,0\n2.0,1.5\n", "line 3: the step '1.5' is not"),
    (
        "history-value",
        "run_id,step,key,value\nab,0,eos/sharpness,high\n",
        "line 2: the value 'high'",
    ),
    ("history-header", "run_id,step,value\nab,0,1.0\n", "line 1: no key column"),
]


@pytest.mark.parametrize(
    ("content", "message"), [c[1:] for c in BAD_LOGS], ids=[c[0] for c in BAD_LOGS]
)
def test_a_malformed_log_is_one_error_naming_file_and_line(tmp_path, capsys, content, message):
    name = "eos_history.csv" if content[:6] in ("run_id", b"run_id") else "metrics.csv"
    folder = tmp_path / "run" / "csv" / "version_0"
    folder.mkdir(parents=True)
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = str(tmp_path / "r.png")
    for argument in (path, tmp_path / "run"):  # the file alone, and under its run folder
        assert _error(capsys, [str(argument), "--out", out]).startswith(f"{path}, {message}")
    assert not (tmp_path / "r.png").exists()


def test_a_row_with_fewer_fields_than_the_header_has_empty_cells(tmp_path):
    # a column added later (Lightning rewrites the header) or a trailing empty cell cut off
    rows = "eos/sharpness,eos/threshold,step,train/loss\n1.0,2.0,0,0.5\n,,1\n3.0,2.0,2\n"
    (tmp_path / "metrics.csv").write_text(rows)
    (run,) = read_runs([tmp_path])
    assert run.series == {
        "eos/sharpness": [(0, 1.0), (2, 3.0)],
        "eos/threshold": [(0, 2.0), (2, 2.0)],
        "train/loss": [(0, 0.5)],
    }


def test_a_history_row_cut_short_by_a_kill_is_skipped_with_a_warning(tmp_path):
    # killed inside a write; the resumed run appended on a new line and measured step 5 again
    (tmp_path / "eos_history.csv").write_text(
        "run_id,step,key,value\nab,0,eos/sharpness,1.0\nab,5,eos/sh\nab,5,eos/sharpness,2.0\n"
    )
    with pytest.warns(UserWarning, match="line 3: fewer than 4 fields"):
        (run,) = read_runs([tmp_path])
    assert run.series == {"eos/sharpness": [(0, 1.0), (5, 2.0)]}


@pytest.fixture
def one_run(tmp_path) -> Path:
    (tmp_path / "metrics.csv").write_text("eos/sharpness,eos/threshold,step\n1.0,2.0,0\n")
    return tmp_path / "metrics.csv"


def test_an_output_that_cannot_be_written_is_one_error(one_run, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    for out in (tmp_path / "a_file" / "r.png", tmp_path / "a_file" / "sub" / "r.png"):
        message = _error(capsys, [str(one_run), "--out", str(out)])
        assert message == f"Cannot write {out}: {tmp_path / 'a_file'} is a file, not a folder."
    message = _error(capsys, [str(one_run), "--out", str(tmp_path)])
    assert message.startswith(f"Cannot write {tmp_path}: it is a folder")

    message = _error(capsys, [str(one_run), "--out", str(tmp_path / "r.xyz")])
    assert message.startswith(f"Cannot write {tmp_path / 'r.xyz'}: unknown format .xyz")
    assert {"png", "pdf", "svg", "html"} <= set(message.split("supported: ")[1][:-2].split(", "))
    assert "pgf" not in FORMATS  # it needs LaTeX

    assert "neither a metrics.csv file nor a run folder" in _error(
        capsys, [str(tmp_path / "missing"), "--out", str(tmp_path / "r.png")]
    )
    assert _error(capsys, [str(one_run), "--title", "$\\etta$"]).startswith(
        "The title '$\\\\etta$' is not valid mathtext (ParseFatalException: Unknown symbol"
    )
    assert "resolution must be a positive" in _error(capsys, [str(one_run), "--dpi", "0"])
    assert "2 labels for 1 runs" in _error(capsys, [str(one_run), "--labels", "a", "b"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_an_output_folder_without_write_permission_is_one_error(one_run, tmp_path, capsys):
    (locked := tmp_path / "locked").mkdir(mode=0o500)
    try:
        message = _error(capsys, [str(one_run), "--out", str(locked / "r.png")])
    finally:
        locked.chmod(0o700)
    assert message == f"Cannot write {locked / 'r.png'}: Permission denied."


def test_an_output_without_suffix_is_written_as_png_under_the_name_printed(
    one_run, tmp_path, capsys
):
    assert main([str(one_run), "--out", str(tmp_path / "report"), "--dpi", "20"]) == 0
    assert capsys.readouterr().out.endswith(f"Report written to {tmp_path / 'report.png'}\n")
    assert Image.open(tmp_path / "report.png").format == "PNG"
    assert not (tmp_path / "report").exists()
    runs = read_runs([one_run])
    assert write_report(runs, tmp_path / "r.", dpi=20) == tmp_path / "r.png"
    assert write_report(runs, tmp_path / "r.PDF", dpi=20).read_bytes().startswith(b"%PDF")
