"""SharpnessMonitor under 2-process DDP (gloo, CPU), against the 1-process run.

Each fit runs tests/ddp_fit.py in a subprocess (Lightning relaunches it once per rank);
a run that does not finish within the timeout is a deadlock.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_fit.py")
TIMEOUT = 300
KEYS = ("eos/sharpness", "eos/eig_2", "eos/threshold", "eos/sharpness_ratio")


def _fit(out: Path, scenario: str, devices: int = 2, *extra: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, str(SCRIPT), "--scenario", scenario, "--devices", str(devices)]
    proc = subprocess.run(
        [*cmd, "--out", str(out), *extra], env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(p, weights_only=False) for p in sorted(out.glob("rank*.pt"))]


PRECONDITIONED = (
    "eos/preconditioned_sharpness",
    "eos/preconditioned_eig_2",
    "eos/preconditioned_threshold",
    "eos/sharpness",
    "eos/eig_2",
)


def _logged(out: Path, keys: tuple[str, ...] = KEYS) -> dict[int, dict[str, float]]:
    (path,) = out.glob("csv/version_*/metrics.csv")
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("eos/sharpness")]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), "a measurement was logged more than once"
    return {int(r["step"]): {k: float(r[k]) for k in keys if r.get(k)} for r in rows}


def _assert_same_logs(a: dict, b: dict, rel: float = 1e-5) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        assert set(a[step]) == set(b[step])
        for key, value in a[step].items():
            assert b[step][key] == pytest.approx(value, rel=rel), (step, key)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    _fit(out, "exact", devices=1)
    return _logged(out)


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn", "ddp_find_unused_parameters_true"])
def test_ddp_logs_the_single_process_values(tmp_path, single_process, strategy):
    ranks = _fit(tmp_path, "exact", 2, "--strategy", strategy)
    logged = _logged(tmp_path)
    assert sorted(logged) == [0, 2, 4]
    _assert_same_logs(single_process, logged)
    for rank in ranks:  # ranks that came back (ddp_spawn returns rank 0 only) agree
        for record in rank["history"]:
            assert record["eos/sharpness"] == pytest.approx(
                logged[record["step"]]["eos/sharpness"], rel=1e-6
            )


def test_preconditioned_monitor_under_ddp_logs_the_single_process_values(tmp_path):
    _fit(tmp_path / "one", "adam", devices=1)
    _fit(tmp_path / "two", "adam", devices=2)
    one, two = _logged(tmp_path / "one", PRECONDITIONED), _logged(tmp_path / "two", PRECONDITIONED)
    assert sorted(two) == [0, 2, 4] and "eos/preconditioned_sharpness" in two[4]
    _assert_same_logs(one, two)


IAS_KEYS = (
    "eos/sharpness",
    "eos/threshold",
    "eos/ias",
    "eos/ias_threshold",
    "eos/ias_instability",
    "eos/ias_stderr",
    "eos/rho_b",
    "eos/trace_S_b",
    "eos/trace_S_1",
    "eos/trace_HS_b",
    "eos/normalized_loss_change",
    "eos/predicted_loss_change",
)


def test_ias_monitor_under_ddp_logs_the_single_process_values(tmp_path):
    # per-sample gradients, the sampled tr(HS_1) and the sampled SGD steps are sharded
    (single,) = _fit(tmp_path / "one", "ias", devices=1)
    ranks = _fit(tmp_path / "two", "ias", devices=2)
    # a second monitor reads b from the loader: per-rank batch x world size = n (GD)
    for rank in (single, *ranks):
        sampling, history = rank["read_b"]
        assert sampling == (100, False, 100) and [h["step"] for h in history] == [3]
        assert history[0]["eos/rho_b"] == 1.0
        assert history[0]["eos/ias"] == pytest.approx(single["read_b"][1][0]["eos/ias"], rel=1e-5)
    one, two = _logged(tmp_path / "one", IAS_KEYS), _logged(tmp_path / "two", IAS_KEYS)
    assert sorted(two) == [0, 2, 4] and set(two[4]) == set(IAS_KEYS)
    assert all(two[s]["eos/ias_stderr"] > 0 for s in two)  # the sampled estimator ran
    for step in two:  # a loss change near 0 is compared absolutely
        for key in ("eos/normalized_loss_change", "eos/predicted_loss_change"):
            assert two[step].pop(key) == pytest.approx(one[step].pop(key), abs=1e-4)
    _assert_same_logs(one, two, rel=1e-4)


SAM_KEYS = (*KEYS, "eos/sam_edge", "eos/grad_norm", "eos/grad_alignment", "eos/sam_grad_alignment")


def test_sam_under_ddp_trains_and_logs_as_one_process(tmp_path):
    one = _fit(tmp_path / "one", "sam", devices=1)
    two = _fit(tmp_path / "two", "sam", devices=2)
    logged_one, logged_two = (
        _logged(tmp_path / "one", SAM_KEYS),
        _logged(tmp_path / "two", SAM_KEYS),
    )
    assert sorted(logged_two) == [0, 2, 4] and "eos/sam_grad_alignment" in logged_two[4]
    for step in logged_two:  # |cos| can be ~0.004, so compare it absolutely
        for key in ("eos/grad_alignment", "eos/sam_grad_alignment"):
            assert logged_two[step].pop(key) == pytest.approx(logged_one[step].pop(key), abs=1e-6)
    _assert_same_logs(logged_one, logged_two)
    for rank in two:  # both passes are synchronized: every rank holds the 1-process weights
        for key, value in one[0]["params"].items():
            torch.testing.assert_close(rank["params"][key], value, rtol=0, atol=1e-6)


def test_per_replica_sam_ascends_along_each_shard_and_averages_the_second_gradient(tmp_path):
    import lightning as L
    import torch.nn.functional as F
    from ddp_fit import Net
    from torch.utils.data import DistributedSampler

    from lightning_eos.data import DigitsDataModule

    ranks = _fit(tmp_path, "sam-replica", 2, "--no-monitor")
    assert torch.equal(ranks[0]["params"]["net.0.weight"], ranks[1]["params"]["net.0.weight"])

    # w <- w - lr * mean_r grad L_r(w + rho g_r / |g_r|), with rank r's shard of this epoch
    L.seed_everything(0, verbose=False)
    net = Net(sam=True).net
    data = DigitsDataModule(num_train=200, num_val=50, target="label", batch_size=100)
    data.setup()
    x, y = data.train_set.tensors
    params = list(net.parameters())

    def grad(index):
        net.zero_grad()
        F.cross_entropy(net(x[index]), y[index]).backward()
        return [p.grad.clone() for p in params]

    for epoch in range(2):  # full batch: one step per epoch
        second = []
        for r in range(2):
            sampler = DistributedSampler(range(200), num_replicas=2, rank=r, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            shard = list(sampler)
            g = grad(shard)
            norm = torch.sqrt(sum((gi**2).sum() for gi in g))
            origin = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, gi in zip(params, g, strict=True):
                    p.add_(0.1 * gi / norm)
            second.append(grad(shard))
            with torch.no_grad():
                for p, o in zip(params, origin, strict=True):
                    p.copy_(o)
        with torch.no_grad():
            for p, a, b in zip(params, *second, strict=True):
                p.sub_(0.5 * (a + b) / 2)
    for value, p in zip(ranks[0]["params"].values(), params, strict=True):
        torch.testing.assert_close(value, p.detach(), rtol=0, atol=1e-6)


def test_optimizer_switch_and_catapult_detector_under_ddp_act_as_one_process(tmp_path):
    """PHB -> GD at the MSS crossing: the same step on every rank and in one process."""
    (single,) = _fit(tmp_path / "one", "switch", devices=1)
    ranks = _fit(tmp_path / "two", "switch", 2)
    assert single["switch_step"] is not None and 1 < single["switch_step"] < 12
    for rank in ranks:
        assert rank["switch_step"] == single["switch_step"]
        step, loss = rank["loss_floor"]  # the detector saw the mean loss over both shards
        assert step == single["loss_floor"][0]
        assert loss == pytest.approx(single["loss_floor"][1], rel=1e-5)
        for name, value in single["params"].items():
            torch.testing.assert_close(rank["params"][name], value, rtol=1e-4, atol=1e-6)


def test_batchnorm_chunks_are_the_same_across_ranks(tmp_path):
    _fit(tmp_path / "one", "bn", devices=1)
    _fit(tmp_path / "two", "bn", devices=2)
    _assert_same_logs(_logged(tmp_path / "one"), _logged(tmp_path / "two"))


def test_ddp_run_is_bit_identical_with_and_without_the_monitor(tmp_path):
    with_monitor = _fit(tmp_path / "with", "perturb")
    without = _fit(tmp_path / "without", "perturb", 2, "--no-monitor")
    assert [h["step"] for h in with_monitor[0]["history"]] == [0, 2, 4, 6]
    for a, b in zip(with_monitor, without, strict=True):  # rank by rank
        for key in a["params"]:
            assert torch.equal(a["params"][key], b["params"][key]), key
        assert all(torch.equal(x, y) for x, y in zip(a["grads"], b["grads"]))
        assert all(torch.equal(x, y) for x, y in zip(a["momentum"], b["momentum"]))
        assert torch.equal(a["rng"][0], b["rng"][0]) and a["rng"][1] == b["rng"][1]
        assert (a["rng"][2] == b["rng"][2]).all()


def test_resume_under_ddp_continues_the_warm_start_on_every_rank(tmp_path):
    full = _fit(tmp_path / "full", "resume-full")
    (ckpt,) = (tmp_path / "full" / "ckpt").glob("*step=4.ckpt")
    resumed = _fit(tmp_path / "resumed", "resume", 2, "--ckpt", str(ckpt))
    for a, b in zip(full, resumed, strict=True):
        assert torch.equal(a["probe"]["step"], b["probe"]["start"])
        tail = [h for h in a["history"] if h["step"] > 4]
        assert [h["step"] for h in tail] == [h["step"] for h in b["history"] if h["step"] > 4]
        for x, y in zip(tail, [h for h in b["history"] if h["step"] > 4]):
            assert x["eos/lanczos_iters"] == y["eos/lanczos_iters"]
            assert x["eos/sharpness"] == pytest.approx(y["eos/sharpness"], rel=1e-6)


def test_a_nan_on_one_rank_skips_the_measurement_on_every_rank(tmp_path):
    ranks = _fit(tmp_path, "nan")
    assert len(ranks) == 2
    for rank in ranks:
        assert [h["step"] for h in rank["history"]] == [0, 4, 6]
    assert sorted(_logged(tmp_path)) == [0, 4, 6]


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_an_error_on_one_rank_is_shown_with_that_ranks_message_and_training_goes_on(
    tmp_path, strategy
):
    cmd = [sys.executable, str(SCRIPT), "--scenario", "error", "--strategy", strategy]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped the measurement at step 2" in proc.stderr
    assert "rank 1: ValueError: a loss that cannot be evaluated on rank 1" in proc.stderr
    (path,) = tmp_path.glob("csv/version_*/metrics.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    measured = sorted(int(r["step"]) for r in rows if r.get("eos/sharpness"))
    skipped = {
        int(r["step"]): float(r["eos/skipped_measurements"])
        for r in rows
        if r.get("eos/skipped_measurements")
    }
    assert measured == [0, 4, 6]
    assert skipped == {0: 0.0, 2: 1.0, 4: 1.0, 6: 1.0}


def test_a_setup_error_on_one_rank_stops_every_rank(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--scenario", "build-error", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)  # no hang
    assert proc.returncode != 0
    assert "dataloader=" in proc.stderr or "failed on another rank" in proc.stderr
