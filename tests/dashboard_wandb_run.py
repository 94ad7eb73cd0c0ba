"""A short PHB->GD fit logged to an offline W&B run; writes what W&B kept to OUT/facts.json.

Used by test_dashboard (in a subprocess: W&B pins process-wide state). Usage:
``python dashboard_wandb_run.py OUT [broken]``; ``broken`` makes ``wandb.plot.line_series``
raise, as a W&B client without network or with another API might.

Written to ``OUT/facts.json``: the monitor's history, the optimizer's settings, the run's
summary and config as the ``wandb.Run`` object holds them before ``finish``, and, read
back from the offline ``.wandb`` file after it, every ``define_metric`` record and config
update, with the warnings raised during the fit.
"""

import functools
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import wandb
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from wandb.proto import wandb_internal_pb2 as pb

from lightning_eos.callbacks import OptimizerSwitch, SharpnessMonitor
from lightning_eos.loggers import WandbLogger
from lightning_eos.models import SupervisedTask
from lightning_eos.optim import HeavyBall

LR, MOMENTUM, STEPS = 1.2, 0.9, 16


def records(path: Path):
    """The protobuf records of a ``.wandb`` file (LevelDB log format: 32 KiB blocks)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, pending = 7, b""  # 7-byte file header
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]  # 1 full, 2 first, 3 middle, 4 last fragment
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def finished_records(path: Path, timeout: float = 60.0) -> list:
    """The records once the run's ``exit`` record is on disk (W&B's writer may lag ``finish``)."""
    deadline = time.monotonic() + timeout
    while True:
        found = list(records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in found):
            return found
        assert time.monotonic() < deadline, f"{path} has no exit record"
        time.sleep(0.2)


def metric_definitions(found: list) -> list[dict]:
    out = []
    for record in found:
        if record.WhichOneof("record_type") == "metric":
            m = record.metric
            summary = [f.name for f, value in m.summary.ListFields() if value]
            name = m.name or m.glob_name
            out.append({"name": name, "step_metric": m.step_metric, "summary": summary})
    return out


def config_updates(found: list) -> list[dict]:
    out = []
    for record in found:
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                key = item.key or "/".join(item.nested_key)
                out.append({"key": key, "value": json.loads(item.value_json)})
    return out


def main(out: Path, broken: bool) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randn(32, 3)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = functools.partial(HeavyBall, lr=LR, momentum=MOMENTUM, match_gd=True)
    task = SupervisedTask(model, loss="mse", optimizer=optimizer)
    monitor = SharpnessMonitor(every_n_steps=3, top_k=2, num_samples=None)
    logger = WandbLogger(save_dir=str(out), offline=True)
    trainer = Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        logger=[logger, CSVLogger(str(out), name="csv")],
        callbacks=[monitor, OptimizerSwitch(to="gd", when=STEPS // 2)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    if broken:

        def line_series(*args, **kwargs):
            raise RuntimeError("no charts today")

        wandb.plot.line_series = line_series
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(task, loader)
    run = logger.experiment
    facts = {
        "history": monitor.history,
        "run_id": monitor.run_id,
        "global_step": trainer.global_step,
        "lr": LR,
        "momentum": MOMENTUM,
        "run_summary": run.summary._as_dict(),
        "run_config": {k: v for k, v in run.config.as_dict().items() if k != "_wandb"},
        "warnings": [str(w.message) for w in caught],
    }
    wandb.finish()
    (file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    found = finished_records(file)
    facts["metrics"] = metric_definitions(found)
    facts["config_updates"] = config_updates(found)
    facts["tables"] = sorted(
        str(p.relative_to(file.parent / "files" / "media" / "table"))
        for p in file.parent.glob("files/media/table/**/*.table.json")
    )
    facts["chart_tables"] = {
        p.name.split("_table_")[0]: json.loads(p.read_text())
        for p in file.parent.glob("files/media/table/eos/charts/*.table.json")
    }
    # a file, not stdout: W&B may still print there while the interpreter exits
    (out / "facts.json").write_text(json.dumps(facts, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]), broken=sys.argv[2:] == ["broken"])
