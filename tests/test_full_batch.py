"""Full-batch GD as chunked gradient accumulation equals one-chunk full-batch steps."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import quiet_trainer

from lightning_eos.callbacks import FullBatchAccumulation, IASMonitor
from lightning_eos.data import DigitsDataModule
from lightning_eos.models import FCN, SupervisedTask


def _fit(batch_size, callbacks=(), steps=3, num_train=300, momentum=0.9):
    torch.manual_seed(0)
    task = SupervisedTask(
        FCN(64, 10, width=32, depth=2),
        loss="mse",
        optimizer=functools.partial(torch.optim.SGD, lr=0.5, momentum=momentum),
    )
    trainer = quiet_trainer(max_steps=steps, callbacks=list(callbacks))
    trainer.fit(task, DigitsDataModule(num_train=num_train, num_val=10, batch_size=batch_size))
    return task, trainer


@pytest.mark.parametrize("chunk", [25, 100, 150], ids=lambda c: f"chunk={c}")
def test_chunked_steps_equal_one_chunk_full_batch_steps(chunk):
    whole, _ = _fit(None)
    chunked, trainer = _fit(chunk, [FullBatchAccumulation()])
    assert trainer.accumulate_grad_batches == 300 // chunk
    assert trainer.global_step == 3 and trainer.current_epoch == 3  # one step per pass
    for a, b in zip(whole.parameters(), chunked.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_unequal_chunks_are_refused():
    with pytest.raises(ValueError, match="equal chunks of 40"):
        _fit(40, [FullBatchAccumulation()])


def test_ias_monitor_sees_the_full_batch():
    monitor = IASMonitor(every_n_steps=1, samples=None, num_samples=None)
    _fit(100, [FullBatchAccumulation(), monitor], steps=2, momentum=0.0)
    assert monitor._sampling[0] == 300
    assert all(h["eos/rho_b"] == pytest.approx(1.0) for h in monitor.history)
