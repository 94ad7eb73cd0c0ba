"""The quickstart config: CLI parsing, offline W&B, and the edge of stability itself."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from lightning_eos.callbacks import SharpnessMonitor, SharpnessPlot
from lightning_eos.cli import build_cli
from lightning_eos.loggers import WandbLogger, wandb_api_key_available
from lightning_eos.plotting import edge_summary

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_parses(config):
    cli = build_cli(["--config", str(config)], run=False)
    assert cli.trainer is not None and cli.model is not None


def test_wandb_goes_offline_without_an_api_key(monkeypatch):
    assert not wandb_api_key_available()
    assert WandbLogger(save_dir=".").offline_mode
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_api_key_available()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert WandbLogger(save_dir=".").offline_mode


def test_quickstart_reaches_the_edge_of_stability(tmp_path):
    cli = build_cli(
        ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.max_steps=300"]
    )
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, SharpnessMonitor))
    plot = next(c for c in cli.trainer.callbacks if isinstance(c, SharpnessPlot))

    # lambda_1 starts well below 2/eta and, late in training, hovers at it
    assert monitor.history[0]["eos/sharpness_ratio"] < 0.6
    late = edge_summary(monitor.history, tail=0.5)
    assert late["count"] >= 10
    assert 0.9 <= late["min"] and late["max"] <= 1.3, late

    # the outputs a user reads: CSV metrics, an offline W&B run, the PNG
    out = tmp_path / "outputs" / "quickstart"
    with open(next(out.glob("csv/version_*/metrics.csv"))) as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("eos/sharpness")]
    assert steps == list(range(0, 301, 10))
    assert list(out.glob("wandb/offline-run-*"))
    assert plot.paths and plot.paths[0].stat().st_size > 10_000


def test_example_script_runs(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "example"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "train_digits.py"),
            "--max-steps",
            "20",
            "--out",
            str(out),
        ],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    assert (out / "sharpness.png").exists() and (out / "report.png").exists()
    with open(next(out.glob("lightning_logs/version_*/metrics.csv"))) as f:
        assert [r["step"] for r in csv.DictReader(f) if r.get("eos/sharpness")] == ["0", "10", "20"]
