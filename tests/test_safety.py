"""The monitors never kill, stall or mislead an ordinary training run.

Each test attaches a monitor to a LightningModule written the way users write theirs (a
backbone and a head, dict batches, schedulers, fine-tuning callbacks, other precisions, a
compiled model), trains to the end, and checks every logged number against a float64 dense
Hessian of the measurement set, restricted to the parameters trainable at that step.
"""

from __future__ import annotations

import copy
import csv
import math
import random
import re
import warnings

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DictDataset, dense_hessian, quiet_trainer
from lightning.pytorch.callbacks import BackboneFinetuning, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_eos.callbacks import IASMonitor, PreconditionedSharpnessMonitor, SharpnessMonitor
from lightning_eos.optim import LinearWarmup

pytestmark = pytest.mark.usefixtures("one_thread")

N, BATCH = 48, 16


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 8, generator=g), torch.randint(0, 3, (N,), generator=g)


def _loader(shuffle: bool = True) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(DictDataset(*_data()), batch_size=BATCH, shuffle=shuffle)


class Classifier(L.LightningModule):
    """A backbone and a head, as a fine-tuning user writes them."""

    def __init__(self, optimizer="sgd", schedule=None, lr=0.1, weight_decay=0.0, frozen=False):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)
        self.optimizer, self.schedule, self.lr, self.wd = optimizer, schedule, lr, weight_decay
        if frozen:
            self.backbone.requires_grad_(False)

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch["x"]), batch["y"])
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=0.01)
        if self.optimizer == "frozen-group":  # a group kept still with lr 0
            groups = [{"params": self.backbone.parameters(), "lr": 0.0}]
            return torch.optim.SGD([*groups, {"params": self.head.parameters()}], lr=self.lr)
        if self.optimizer == "trainable":  # what BackboneFinetuning asks for
            return torch.optim.SGD(trainable, lr=self.lr)
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, weight_decay=self.wd)
        if self.schedule is None:
            return opt
        if self.schedule == "warmup":  # our LinearWarmup's docstring example: from lr 0
            scheduler = LinearWarmup(opt, lr_initial=0.0, lr_final=self.lr, steps=6)
        else:  # annealed to 0 at the last step
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Reference(L.Callback):
    """At every measured step: the dense float64 spectrum over the trainable parameters.

    Put it after the monitor. ``cast`` rounds the inputs as the trainer's precision does.
    """

    def __init__(self, every: int, cast=None):
        self.every, self.cast, self.at = every, cast, {}

    def on_train_start(self, trainer, module):
        self.on_train_batch_end(trainer, module)

    def on_train_batch_end(self, trainer, module, *args):
        if trainer.global_step % self.every or trainer.global_step in self.at:
            return
        x, y = _data()
        if self.cast is not None:
            x = x.to(self.cast)
        net = copy.deepcopy(nn.Sequential(module.backbone, module.head)).double()
        trainable = torch.cat([p.requires_grad * torch.ones(p.numel()) for p in net.parameters()])
        net.requires_grad_(True)

        def loss(f, batch):
            return F.cross_entropy(f(batch[0]), batch[1])

        full = dense_hessian(net, loss, (x.double(), y))
        keep = trainable.bool()
        block = full[keep][:, keep]
        finite = bool(torch.isfinite(block).all())
        spectrum = torch.linalg.eigvalsh(block).flip(0) if finite else None
        rates = [g["lr"] for g in trainer.optimizers[0].param_groups]
        self.at[trainer.global_step] = {"spectrum": spectrum, "lrs": rates, "dim": int(keep.sum())}


def _fit(monitor, module=None, max_steps=9, every=3, extra=(), cast=None, **trainer_kwargs):
    L.seed_everything(0, verbose=False)
    module = module or Classifier()
    reference = Reference(every, cast)
    callbacks = [*extra, monitor, reference] if monitor is not None else [*extra]
    trainer = quiet_trainer(callbacks=callbacks, max_steps=max_steps, **trainer_kwargs)
    trainer.fit(module, _loader())
    return module, trainer, reference.at


def _assert_exact(history, reference, rel=1e-4):
    assert history, "nothing was measured"
    for record in history:
        top = reference[record["step"]]["spectrum"][0].item()
        assert record["eos/sharpness"] == pytest.approx(top, rel=rel), record["step"]
        assert record["eos/sharpness_error"] <= 1e-3 * abs(top) * 1.01


def _warnings(record, pattern):
    return [w for w in record if re.search(pattern, str(w.message))]


# --- a learning rate of 0 ----------------------------------------------------------------


@pytest.mark.parametrize("case", ["warmup-from-0", "cosine-to-0", "frozen-group-lr-0"])
def test_a_learning_rate_of_zero_logs_the_sharpness_without_a_threshold(case):
    module = {
        "warmup-from-0": Classifier(schedule="warmup", lr=0.3),
        "cosine-to-0": Classifier(schedule="cosine", lr=0.3),
        "frozen-group-lr-0": Classifier(optimizer="frozen-group", lr=0.3),
    }[case]
    monitor = SharpnessMonitor(every_n_steps=3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, _, reference = _fit(monitor, module)
    assert [h["step"] for h in monitor.history] == [0, 3, 6, 9]
    _assert_exact(monitor.history, reference)
    zero_somewhere = False
    for record_ in monitor.history:
        rates = reference[record_["step"]]["lrs"]
        if min(rates) == 0:
            zero_somewhere = True
            assert "eos/threshold" not in record_ and "eos/sharpness_ratio" not in record_
        else:
            assert record_["eos/threshold"] == pytest.approx(2 / rates[0])
            assert record_["eos/sharpness_ratio"] == pytest.approx(
                record_["eos/sharpness"] * rates[0] / 2
            )
    assert zero_somewhere
    assert len(_warnings(record, "no threshold at step")) == 1
    assert monitor.skipped_measurements == 0


def test_sgd_weight_decay_above_two_over_lr_warns_once_and_logs_no_ratio():
    # the decayed step theta (1 - lr wd) flips and grows: unstable at any sharpness
    monitor = SharpnessMonitor(every_n_steps=2)
    with pytest.warns(UserWarning, match="unstable at any sharpness") as record:
        _, _, reference = _fit(monitor, Classifier(lr=0.1, weight_decay=25.0), max_steps=4, every=2)
    assert len(_warnings(record, "unstable at any sharpness")) == 1
    _assert_exact(monitor.history, reference)
    for record_ in monitor.history:
        assert record_["eos/threshold"] == pytest.approx(2 / 0.1 - 25.0)
        assert "eos/sharpness_ratio" not in record_


# --- the trainable parameters change -----------------------------------------------------


def test_unfreezing_the_backbone_mid_run_starts_cold_and_stays_exact():
    # Lightning's BackboneFinetuning: the head alone for two epochs (3 steps each), then the
    # backbone joins in a param group of its own at a tenth of the lr
    monitor = SharpnessMonitor(every_n_steps=2)
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, _, reference = _fit(
            monitor, Classifier(optimizer="trainable"), max_steps=12, every=2, extra=[finetuning]
        )
    assert [h["step"] for h in monitor.history] == [0, 2, 4, 6, 8, 10, 12]
    dims = {step: r["dim"] for step, r in reference.items()}
    assert dims[6] == 51 and dims[8] == 195  # head only, then head and backbone
    _assert_exact(monitor.history, reference)
    assert len(_warnings(record, "trainable parameters changed")) == 1
    assert monitor._warm_starts["hessian"].shape[-1] == 195
    by_step = {h["step"]: h for h in monitor.history}
    assert by_step[6]["eos/threshold"] == pytest.approx(2 / 0.1)  # one group
    assert "eos/threshold" not in by_step[8]  # two groups, lrs 0.1 and 0.01: no single one


class FreezeHeadBias(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == 5:
            module.head.bias.requires_grad_(False)


def test_freezing_a_layer_mid_run_starts_cold_and_stays_exact():
    monitor = SharpnessMonitor(every_n_steps=2, top_k=2)
    _, _, reference = _fit(monitor, max_steps=10, every=2, extra=[FreezeHeadBias()])
    assert reference[4]["dim"] == 195 and reference[6]["dim"] == 192
    _assert_exact(monitor.history, reference)
    for record in monitor.history:
        second = reference[record["step"]]["spectrum"][1].item()
        assert record["eos/eig_2"] == pytest.approx(second, rel=1e-3)


def test_resuming_into_a_model_with_another_trainable_set_starts_cold(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1)
    first = SharpnessMonitor(every_n_steps=3)
    _fit(first, max_steps=6, extra=[checkpoint], enable_checkpointing=True)
    assert first._warm_starts["hessian"].shape[-1] == 195
    (path,) = tmp_path.glob("*.ckpt")

    monitor = SharpnessMonitor(every_n_steps=3)
    L.seed_everything(0, verbose=False)
    module = Classifier(frozen=True)  # the same optimizer, the backbone frozen this time
    reference = Reference(every=3)
    trainer = quiet_trainer(callbacks=[monitor, reference], max_steps=12)
    trainer.fit(module, _loader(), ckpt_path=path)
    assert [h["step"] for h in monitor.history] == [0, 3, 6, 9, 12]  # checkpoint tail, new
    _assert_exact(monitor.history[3:], reference.at)
    assert monitor._warm_starts["hessian"].shape[-1] == 51


# --- non-finite optimizer state ----------------------------------------------------------


class NaNInAdamState(L.Callback):
    """A NaN gradient entry reaches Adam's second moment after step 3."""

    def on_train_batch_end(self, trainer, module, *args):
        if trainer.global_step == 3:
            state = trainer.optimizers[0].state[module.head.weight]
            state["exp_avg_sq"][0, 0] = float("nan")


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_nan_in_adams_state_skips_the_measurement_and_the_run_is_untouched(tmp_path):
    monitor = PreconditionedSharpnessMonitor(every_n_steps=1)
    logger = CSVLogger(tmp_path, name="csv")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        module, trainer, _ = _fit(
            monitor, Classifier(optimizer="adam"), max_steps=8, extra=[NaNInAdamState()],
            logger=logger,
        )  # fmt: skip
    assert trainer.global_step == 8  # trained to the end
    assert [h["step"] for h in monitor.history] == [0, 1, 2]
    assert monitor.skipped_measurements == 6  # steps 3..8: NaN state, then NaN weights
    assert len(_warnings(record, "skipped the measurement at step 3")) == 1
    assert len(_warnings(record, "skipped the measurement")) == 1  # same kind: counted only
    logged = {}
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("eos/skipped_measurements"):
                logged[int(row["step"])] = float(row["eos/skipped_measurements"])
    assert logged == {0: 0, 1: 0, 2: 0, 3: 1, 4: 2, 5: 3, 6: 4, 7: 5, 8: 6}

    adam = Classifier(optimizer="adam")
    untouched, _, _ = _fit(None, adam, max_steps=8, extra=[NaNInAdamState()])
    for (name, a), b in zip(_params(module).items(), _params(untouched).values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)


# --- a failing measurement never stops training, and leaves no trace -------------------


def _failing_loss(calls: list[int]):
    def loss_fn(module, batch):
        calls.append(module.trainer.global_step)
        if module.trainer.global_step == 3:
            raise RuntimeError("this loss cannot be evaluated here")
        return F.cross_entropy(module(batch["x"]), batch["y"])

    return loss_fn


def test_a_failing_measurement_is_skipped_and_the_run_is_bit_identical():
    calls: list[int] = []
    monitor = SharpnessMonitor(every_n_steps=3, loss_fn=_failing_loss(calls))
    with pytest.warns(UserWarning, match="step 3 .RuntimeError: this loss cannot be evaluated"):
        module, trainer, reference = _fit(monitor, max_steps=9)
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    assert 3 in calls and [h["step"] for h in monitor.history] == [0, 6, 9]
    assert monitor.skipped_measurements == 1
    _assert_exact(monitor.history, reference)

    untouched, other, _ = _fit(None, max_steps=9)
    for (name, a), b in zip(_params(module).items(), _params(untouched).values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(module.parameters(), untouched.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    rng_without = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    assert torch.equal(rng[0], rng_without[0]) and rng[1] == rng_without[1]
    assert np.array_equal(rng[2], rng_without[2])


def test_on_error_raise_stops_at_the_error():
    monitor = SharpnessMonitor(every_n_steps=3, loss_fn=_failing_loss([]), on_error="raise")
    with pytest.raises(RuntimeError, match="this loss cannot be evaluated"):
        _fit(monitor, max_steps=9)


# --- precisions and compilation ----------------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [("64-true", torch.float64), ("bf16-true", torch.bfloat16), ("16-true", torch.float16)],
)
def test_true_precisions_are_measured_exactly_and_left_untouched(precision, dtype):
    # the float32 data goes through Lightning's precision plugin as training batches do;
    # half precisions are measured in float32 on the same (exactly representable) weights
    monitor = SharpnessMonitor(every_n_steps=3)
    module, _, reference = _fit(monitor, max_steps=6, precision=precision, cast=dtype)
    assert [h["step"] for h in monitor.history] == [0, 3, 6]
    assert {p.dtype for p in module.parameters()} == {dtype}
    _assert_exact(monitor.history, reference, rel=1e-4)
    untouched, _, _ = _fit(None, max_steps=6, precision=precision)
    for (name, a), b in zip(_params(module).items(), _params(untouched).values(), strict=True):
        assert torch.equal(a, b), name


def test_a_compiled_model_is_measured_eagerly_without_recompiling_training():
    # aot_eager compiles through AOT autograd, which has no double backward, like inductor
    counters = torch._dynamo.utils.counters

    def fit(monitor):
        torch._dynamo.reset()
        counters.clear()
        L.seed_everything(0, verbose=False)
        module = Classifier()
        compiled = torch.compile(module, backend="aot_eager")
        reference = Reference(every=3)
        callbacks = [monitor, reference] if monitor else []
        quiet_trainer(callbacks=callbacks, max_steps=6).fit(compiled, _loader())
        return module, reference.at, dict(counters["stats"])

    monitor = SharpnessMonitor(every_n_steps=3)
    module, reference, stats = fit(monitor)
    assert [h["step"] for h in monitor.history] == [0, 3, 6]
    assert monitor.skipped_measurements == 0
    _assert_exact(monitor.history, reference)
    untouched, _, stats_without = fit(None)
    assert stats["unique_graphs"] == stats_without["unique_graphs"]
    for (name, a), b in zip(_params(module).items(), _params(untouched).values(), strict=True):
        assert torch.equal(a, b), name


# --- arguments are checked when the monitor is built -------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 1.5}, "every_n_steps=1.5 must be an integer"),
        ({"every_n_steps": 0}, "every_n_steps=0 must be an integer >= 1"),
        ({"every_n_steps": True}, "every_n_steps=True must be an integer"),
        ({"max_iter": 0}, "max_iter=0 must be an integer >= 1"),
        ({"tol": 0.0}, "tol=0.0 must be a finite number > 0"),
        ({"tol": float("nan")}, "tol=nan must be a finite number > 0"),
        ({"tol": -1e-3}, "tol=-0.001 must be"),
        ({"threshold": 0}, "threshold=0; use 'auto', a finite number > 0 or None"),
        ({"threshold": float("nan")}, "threshold=nan"),
        ({"threshold": -2.0}, "threshold=-2.0"),
        ({"threshold": "2/lr"}, "threshold='2/lr'"),
        ({"top_k": 0}, "top_k=0 must be an integer >= 1"),
        ({"num_samples": 10.5}, "num_samples=10.5 must be an integer"),
        ({"on_error": "ignore"}, "on_error='ignore'; choose one of 'skip', 'raise'"),
        ({"stop_rule": "change"}, "stop_rule='change'"),
    ],
)
def test_bad_arguments_fail_when_the_monitor_is_built(kwargs, match):
    for monitor_type in (SharpnessMonitor, PreconditionedSharpnessMonitor):
        with pytest.raises(ValueError, match=re.escape(match)):
            monitor_type(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"samples": 1}, "samples=1 must be an integer >= 2"),
        ({"population": 0}, "population=0"),
        ({"batch_size": 2.5}, "batch_size=2.5"),
        ({"per_sample_chunk": 0}, "per_sample_chunk=0"),
    ],
)
def test_bad_ias_arguments_fail_when_the_monitor_is_built(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        IASMonitor(**kwargs)


def test_an_ias_population_smaller_than_the_training_set_fails_at_setup():
    with pytest.raises(ValueError, match=r"population=20\) is smaller than the training set"):
        _fit(IASMonitor(every_n_steps=3, population=20), max_steps=3)


def test_top_k_above_the_trainable_parameters_fails_at_setup():
    module = Classifier(frozen=True)
    module.head.weight.requires_grad_(False)  # 3 trainable parameters are left: the bias
    with pytest.raises(ValueError, match="top_k=4 exceeds the 3 trainable parameters"):
        _fit(SharpnessMonitor(top_k=4), module)


def test_a_model_with_every_parameter_frozen_fails_at_setup():
    module = Classifier(frozen=True)
    module.head.requires_grad_(False)
    with pytest.raises(ValueError, match="every parameter of Classifier is frozen"):
        _fit(SharpnessMonitor(), module)


# --- checkpoints -------------------------------------------------------------------------


def test_the_checkpoint_keeps_a_bounded_tail_of_the_history(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=60, save_top_k=-1)
    monitor = SharpnessMonitor(every_n_steps=1)
    _fit(monitor, max_steps=60, every=60, extra=[checkpoint], enable_checkpointing=True)
    assert len(monitor.history) == 61
    (path,) = tmp_path.glob("*.ckpt")
    state = torch.load(path, weights_only=False)["callbacks"][monitor.state_key]
    assert [h["step"] for h in state["history"]] == list(range(29, 61))
    assert state["run_id"] == monitor.run_id and state["skipped_measurements"] == 0
    assert math.isfinite(state["history"][-1]["eos/sharpness"])
