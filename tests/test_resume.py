"""A run killed with ``kill -9`` and resumed from ``last.ckpt``: every measured step, once.

Lightning's CSVLogger buffers rows (a killed run may leave no ``metrics.csv``) and deletes
``metrics.csv`` when a run resumes into the same version; the monitors' append-only
``eos_history.csv`` and the report's stitching by run id keep every measurement.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_eos.report import main as report_main
from lightning_eos.report import read_runs

SCRIPT = Path(__file__).with_name("resume_fit.py")


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _history(path: Path) -> list[tuple[str, int, str, float]]:
    with open(path) as f:
        rows = csv.DictReader(f)
        return [(r["run_id"], int(r["step"]), r["key"], float(r["value"])) for r in rows]


@pytest.mark.parametrize("same_version", [False, True], ids=["new-version", "same-version"])
def test_a_killed_and_resumed_run_reports_every_measured_step_once(tmp_path, same_version):
    flags = ["--same-version"] if same_version else []
    killed = _run(tmp_path, "--kill-at", "14", *flags)
    assert killed.returncode == -9  # SIGKILL: no teardown, no logger flush
    first = _history(tmp_path / "csv" / "version_0" / "eos_history.csv")
    assert sorted({s for _, s, k, _ in first if k == "eos/sharpness"}) == list(range(0, 15, 2))

    resumed = _run(tmp_path, "--resume", *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    versions = sorted(p.name for p in (tmp_path / "csv").iterdir())
    assert versions == (["version_0"] if same_version else ["version_0", "version_1"])

    (run,) = read_runs([tmp_path / "csv"])
    steps = run.steps("eos/sharpness")
    assert steps == list(range(0, 21, 2))  # every measured step, each once
    rows = [r for v in versions for r in _history(tmp_path / "csv" / v / "eos_history.csv")]
    assert len({r[0] for r in rows}) == 1  # one run id across the kill
    last = {s: v for _, s, k, v in rows if k == "eos/sharpness"}  # the last value written
    assert dict(run.series["eos/sharpness"]) == last
    # steps 14 (measured before the kill) was measured again after resuming from step 12
    assert sum(1 for _, s, k, _ in rows if k == "eos/sharpness" and s == 14) == 2

    out = tmp_path / "report.png"
    assert report_main([str(tmp_path / "csv"), "--out", str(out)]) == 0
    assert out.stat().st_size > 0
