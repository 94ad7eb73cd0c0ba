"""Paper 002, Fig. 1 at CPU scale: configs/adam_aeos.yaml, shortened, and its example."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
from conftest import ROOT, cli_history

from lightning_eos.callbacks import PreconditionedSharpnessMonitor

pytestmark = pytest.mark.usefixtures("offline_cwd")


def test_adam_reaches_the_adaptive_edge_while_the_raw_sharpness_rises():
    config = str(ROOT / "configs" / "adam_aeos.yaml")
    args = ["--config", config, "--trainer.max_steps=300"]
    by_step = cli_history(args, PreconditionedSharpnessMonitor)
    ratio = "eos/preconditioned_sharpness_ratio"
    assert by_step[300]["eos/preconditioned_threshold"] == pytest.approx(38 / 3e-4)
    # well below 38/eta early on (step 0 has no preconditioner, step 1-9 are not measured)
    assert max(by_step[s][ratio] for s in range(10, 51, 10)) < 0.15
    # at the adaptive edge over steps 200-300 (measured 0.966 here; 0.96-0.98 over 3 seeds)
    late = [by_step[s][ratio] for s in range(200, 301, 10)]
    assert 0.85 <= sum(late) / len(late) <= 1.15, late
    assert 0.6 <= min(late) and max(late) <= 1.3, late
    # ... while the raw sharpness keeps rising (paper 002, §6)
    assert by_step[300]["eos/sharpness"] > 2 * by_step[100]["eos/sharpness"]
    assert "eos/threshold" not in by_step[300]


def test_example_freezes_the_preconditioner(tmp_path):
    out = tmp_path / "example"
    script = ROOT / "examples" / "train_digits_adam.py"
    cmd = [sys.executable, str(script), "--max-steps", "20", "--freeze-at", "10", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True)
    assert (out / "sharpness.png").exists() and (out / "report.png").exists()
    with open(next(out.glob("lightning_logs/version_*/metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("eos/sharpness")]
    assert [r["step"] for r in rows] == ["0", "10", "20"]
    assert rows[-1]["eos/preconditioned_threshold"]  # FrozenAdam's own 38/eta
    assert float(rows[-1]["eos/preconditioned_threshold"]) == pytest.approx(38 / 3e-4)
