"""The curvature engine across 2 processes (gloo on the CPU), without Lightning."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import mse, tiny_data, tiny_mlp
from torch import nn

from lightning_eos.curvature import (
    HessianOperator,
    NonFiniteCurvatureError,
    lanczos,
    measurement_context,
    rechunk,
)

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def _bn_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))


def _setup(kind: str):
    torch.manual_seed(0)
    if kind == "mlp":
        model = tiny_mlp().double()
    else:
        model = _bn_model().double()
        if kind == "syncbn":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    batch = tiny_data("mlp", "mse")
    return model, rechunk([batch], None, 3)  # 11 samples: chunks of 3, 3, 3, 2


def _rank_zero_value(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.broadcast(t, src=0)
    return t


def _worker(rank: int, port: int, out: str, kind: str, poison_rank: int, error_rank: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, chunks = _setup(kind)
        mine = chunks[rank::WORLD]  # 3 + 3 samples on rank 0, 3 + 2 on rank 1
        if rank == poison_rank:
            x, y = mine[0]
            mine[0] = (x, y * float("nan"))
        result = {}

        def loss_fn(m, batch):
            if rank == error_rank:
                raise ValueError("a loss that fails on one rank only")
            return mse(m, batch)

        with measurement_context(model):
            try:
                op = HessianOperator(model, loss_fn, mine, reduce=_all_reduce_sum)
                res = lanczos(op, k=3, tol=1e-10, agree=_rank_zero_value)
                v = torch.linspace(-1, 1, op.dim, dtype=torch.float64)
                result.update(
                    eigenvalues=res.eigenvalues,
                    hv=op.matvec(v),
                    gradient=op.gradient(),
                    loss=op.loss(),
                    num_samples=op.num_samples,
                )
            except (NonFiniteCurvatureError, ValueError, RuntimeError) as err:
                result["raised"] = type(err).__name__
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(tmp_path, kind: str, poison_rank: int = -1, error_rank: int = -1, timeout=120.0):
    args = (_free_port(), str(tmp_path), kind, poison_rank, error_rank)
    ctx = mp.spawn(_worker, args=args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process measurement hung (deadlock)")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("kind", ["mlp", "bn"])
def test_two_processes_equal_one_process_with_uneven_shards(tmp_path, kind):
    ranks = _run(tmp_path, kind)
    model, chunks = _setup(kind)
    with measurement_context(model):
        op = HessianOperator(model, mse, chunks)
        single = lanczos(op, k=3, tol=1e-10)
        v = torch.linspace(-1, 1, op.dim, dtype=torch.float64)
        hv, gradient, loss = op.matvec(v), op.gradient(), op.loss()
    for result in ranks:  # every rank holds the same numbers
        assert result["num_samples"] == 11
        torch.testing.assert_close(result["eigenvalues"], single.eigenvalues, rtol=1e-10, atol=0)
        torch.testing.assert_close(result["hv"], hv, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(result["gradient"], gradient, rtol=1e-10, atol=1e-13)
        assert result["loss"] == pytest.approx(loss, rel=1e-12)


def test_a_nan_on_one_rank_makes_every_rank_skip_without_deadlock(tmp_path):
    ranks = _run(tmp_path, "mlp", poison_rank=1)
    assert [r["raised"] for r in ranks] == ["NonFiniteCurvatureError"] * WORLD


def test_any_error_on_one_rank_is_raised_on_every_rank_without_deadlock(tmp_path):
    ranks = _run(tmp_path, "mlp", error_rank=1)
    assert [r["raised"] for r in ranks] == ["FailedOnAnotherProcessError", "ValueError"]


def test_syncbatchnorm_is_measured_with_chunk_statistics(tmp_path):
    # SyncBatchNorm cannot even run forward on CPU tensors across processes; inside a
    # measurement it normalizes each chunk locally, which equals plain BatchNorm.
    ranks = _run(tmp_path, "syncbn")
    model, chunks = _setup("bn")
    with measurement_context(model):
        single = lanczos(HessianOperator(model, mse, chunks), k=3, tol=1e-10)
    for result in ranks:
        torch.testing.assert_close(result["eigenvalues"], single.eigenvalues, rtol=1e-10, atol=0)
