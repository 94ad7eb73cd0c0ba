"""Paper 001, Fig. 1 shortened: the LDN's final test loss against alpha, GD and PHB.

`examples/ldn_catapults.py` sweeps 30 alphas; here three of them, and one Lightning run.
Measured (eta_f = 0.004, seed 0): GD's test loss 0.139, 0.185, 0.191 at alpha = 0.10,
0.14, 0.16 (saturated), PHB's 0.110, 0.0009, 0.0018 (the drop at alpha-bar between 0.12
and 0.13); the l1 baseline 3e-28, the l2 baseline 1.06. Past alpha-bar PHB's value is
sensitive to alpha's last bits (0.13 gives 0.012, 0.13 + 3e-17 gives 0.0027: the catapult
is chaotic), but every alpha in [0.13, 0.165] ends below 0.07 x GD's.
"""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "examples"))
import ldn_catapults as example  # noqa: E402

ETA_F = 0.004


@pytest.fixture(scope="module")
def sweep():
    return example.sweep([0.10, 0.14, 0.16], ETA_F)


def test_gd_saturates_while_phb_drops_past_a_threshold_alpha(sweep):
    gd, phb = sweep["GD"], sweep["PHB"]
    assert gd[0] < gd[1] and gd[2] == pytest.approx(gd[1], rel=0.05)  # GD saturates
    assert phb[0] > 0.5 * gd[0]  # below alpha-bar PHB ends near GD
    assert phb[1] < 0.1 * gd[1] and phb[2] < 0.1 * gd[2]  # past it, far below


def test_baselines_bracket_the_runs(sweep):
    lines = example.baselines()
    assert lines["ℓ1 baseline"] < 1e-12  # basis pursuit recovers w*
    assert lines["ℓ2 baseline"] > max(sweep["GD"])  # the kernel-regime limit is worse


def test_lightning_phb_run_has_one_large_catapult_below_the_mss():
    run = example.lightning_run(0.16, ETA_F, example.BETA, every=20)
    [event] = run["events"]
    assert event.ratio_before > 1 and event.ratio_after < 0.5
    assert example.warmup_steps(ETA_F) * 0.5 < event.peak_step < example.warmup_steps(ETA_F)
    last = run["history"][-1]
    assert last["eos/sharpness"] < 0.6 * last["eos/threshold"]  # stays far below the MSS
