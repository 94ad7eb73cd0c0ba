"""Shared cases: tiny models, their float64 dense Hessians, and a quiet CPU trainer."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # scipy BLAS threads fight torch on 2 cores

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from lightning_eos.cli import build_cli  # noqa: E402
from lightning_eos.curvature import flatten, unflatten  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def mse(model: Callable[[Tensor], Tensor], batch: Any) -> Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def cross_entropy(model: Callable[[Tensor], Tensor], batch: Any) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


class DictDataset(torch.utils.data.Dataset):
    """Samples as dicts ``{x_key: x[i], y_key: y[i]}``, the way many users' datasets yield them."""

    def __init__(self, x: Tensor, y: Tensor, x_key: str = "x", y_key: str = "y") -> None:
        self.x, self.y, self.keys = x, y, (x_key, y_key)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return dict(zip(self.keys, (self.x[i], self.y[i]), strict=True))


def tiny_data(kind: str, loss: str, n: int = 11, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g) if kind == "mlp" else torch.randn(n, 1, 6, 6, generator=g)
    if loss == "mse":
        y = torch.randn(n, 3, generator=g)
    else:
        y = torch.randint(0, 3, (n,), generator=g)
    return x.double(), (y.double() if loss == "mse" else y)


def dense_hessian(model: nn.Module, loss_fn: Callable, batch: Any) -> Tensor:
    """The float64 Hessian of ``loss_fn(model, batch)`` by torch.autograd.functional."""
    names = [n for n, p in model.named_parameters()]
    params = [p for p in model.parameters()]
    flat0 = flatten(params).detach().double()

    def loss_of(flat: Tensor) -> Tensor:
        values = dict(zip(names, unflatten(flat, params), strict=True))
        return loss_fn(lambda x: torch.func.functional_call(model, values, (x,)), batch)

    return torch.autograd.functional.hessian(loss_of, flat0)


def quiet_trainer(tmp_path: Path | None = None, callbacks=(), max_steps=12, **kwargs) -> L.Trainer:
    """A CPU trainer with no logger, checkpoints, progress bar or validation."""
    options = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return L.Trainer(**options)


@pytest.fixture
def offline_cwd(monkeypatch, tmp_path):
    """No W&B API key, W&B offline with its files in ``tmp_path``, which is the cwd."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)


def cli_history(args: list[str], monitor_type: type) -> dict[int, dict]:
    """``lightning-eos fit ARGS`` without loggers; its ``monitor_type`` history by step."""
    # no loggers: a W&B run here would pin wandb's process-wide settings for later tests
    cli = build_cli(["fit", *args, "--trainer.logger=false"])
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, monitor_type)]
    return {h["step"]: h for h in monitor.history}


def config_with(name: str, callback: str, **init_args: Any) -> Path:
    """``configs/NAME`` with ``init_args`` changed on the callback whose class is ``callback``.

    Written to the current directory (LightningCLI cannot override one callback of a list).
    """
    config = yaml.safe_load((ROOT / "configs" / name).read_text())
    callbacks = config["trainer"]["callbacks"]
    (entry,) = [c for c in callbacks if c["class_path"].rsplit(".", 1)[-1] == callback]
    entry["init_args"].update(init_args)
    path = Path(name).resolve()
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core runner, two spin-waiting threads run ~50x slower.

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")`` in a module.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())
