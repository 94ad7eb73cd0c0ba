"""Time per measurement under 2-process DDP (gloo, CPU) against 1 process, same total data.

The 1,500 digits are cut into 4 chunks of 375; one process measures all of them, each of
2 processes measures 2 chunks and all-reduces every product. Each measurement is a cold
Lanczos run of exactly 20 Hessian-vector products on the 95k-parameter FCN. Every process
uses one thread, as one process per device would; the 1-process run is also timed with
all threads for the same hardware.

Run: ``.venv/bin/python benchmarks/ddp.py``
"""

import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_eos.curvature import HessianOperator, lanczos, rechunk
from lightning_eos.data import DigitsDataModule
from lightning_eos.models import FCN, mse_loss

CHUNK, STEPS, REPEATS = 375, 20, 3


def loss_fn(model, batch):
    return mse_loss(model(batch[0]), batch[1])


def setup():
    torch.manual_seed(0)
    dm = DigitsDataModule()
    dm.setup()
    return FCN(), rechunk([dm.train_set.tensors], None, CHUNK)


def time_measurement(model, chunks, reduce=None, barrier=lambda: None) -> float:
    times = []
    for _ in range(REPEATS):
        barrier()
        start = time.perf_counter()
        op = HessianOperator(model, loss_fn, chunks, reduce=reduce)
        lanczos(op, k=1, tol=0.0, max_iter=STEPS)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def all_reduce_sum(t):
    t = t.clone()
    dist.all_reduce(t)
    return t


def worker(rank, world, port, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, chunks = setup()
    seconds = time_measurement(model, chunks[rank::world], all_reduce_sum, dist.barrier)
    if rank == 0:
        Path(out).write_text(str(seconds))
    dist.destroy_process_group()


def main() -> None:
    threads = torch.get_num_threads()
    model, chunks = setup()
    torch.set_num_threads(1)
    one_thread = time_measurement(model, chunks)
    torch.set_num_threads(threads)
    all_threads = time_measurement(model, chunks)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "seconds")
        mp.spawn(worker, args=(2, port, out), nprocs=2)
        two = float(Path(out).read_text())
    n = sum(p.numel() for p in model.parameters())
    print(f"FCN ({n:,} params), 1500 digits in {len(chunks)} chunks, {STEPS} HVPs per measurement")
    rows = [
        ("1 process, 1 thread", one_thread),
        (f"1 process, {threads} threads", all_threads),
        ("2 processes (DDP, gloo), 1 thread each", two),
    ]
    print("| run | time per measurement | ratio to 1 process, 1 thread |")
    print("|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds * 1e3:.0f} ms | {seconds / one_thread:.2f}x |")


if __name__ == "__main__":
    main()
