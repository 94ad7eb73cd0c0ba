"""Every ``eos/*`` value goes to the loggers and to an append-only ``eos_history.csv``.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when a run is resumed into the same
version folder, and buffers rows in memory between flushes, so a run killed with
``kill -9`` and resumed from ``last.ckpt`` loses measurements there. Next to each
``CSVLogger``'s ``metrics.csv`` the monitors therefore append one row per value to
``eos_history.csv``, opened, written and closed at every measurement:

==========  =============================================================
``run_id``  the id of the run, kept in the monitors' checkpoint state, so a
            resumed run continues the same id (in a new version folder or the
            same one)
``step``    ``trainer.global_step``
``key``     the metric name, e.g. ``eos/sharpness``
``value``   the value (``repr`` of a float; ``nan`` and ``inf`` as such)
==========  =============================================================

A resumed run measures again the steps after its checkpoint and appends them again;
``lightning-eos report`` stitches the versions of one run id and keeps the last value
of each step (:mod:`lightning_eos.report`).
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from lightning.pytorch.loggers import CSVLogger

from lightning_eos._eos_history import HISTORY_COLUMNS, HISTORY_FILE
from lightning_eos.callbacks._dashboard import _warn_on_failure, run_id

if TYPE_CHECKING:
    from lightning.pytorch import Trainer


def new_run_id() -> str:
    """A fresh run id (from the OS's entropy: the training RNGs are not touched)."""
    return uuid.uuid4().hex[:12]


def append_history(path: Path, run: str | None, step: int, metrics: Mapping[str, float]) -> None:
    """Append one row per metric to the history file at ``path`` (header if it is new).

    The rows are written with one ``write`` call, after a newline if a killed process left
    the file without one, so a kill at any moment leaves at most one torn line of its own.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    size = path.stat().st_size if path.is_file() else 0
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    if size == 0:
        writer.writerow(HISTORY_COLUMNS)
    writer.writerows((run or "", step, key, repr(float(value))) for key, value in metrics.items())
    lead = ""
    with path.open("ab+") as file:
        if size:
            file.seek(-1, io.SEEK_END)
            lead = "" if file.read(1) == b"\n" else "\n"  # after a row cut short by a kill
        file.write((lead + text.getvalue()).encode("utf-8"))


def log_eos_metrics(trainer: Trainer, step: int, metrics: Mapping[str, float]) -> None:
    """Log ``metrics`` at ``step`` through every logger and into each ``eos_history.csv``.

    Only rank zero logs. A logger that fails gives a warning; training goes on.
    """
    if not trainer.is_global_zero or not metrics:
        return
    run = run_id(trainer)
    for logger in trainer.loggers:
        with _warn_on_failure(f"log eos/* metrics to {type(logger).__name__}"):
            logger.log_metrics(dict(metrics), step=step)
        if isinstance(logger, CSVLogger):
            with _warn_on_failure(f"append to {HISTORY_FILE}"):
                append_history(Path(logger.log_dir) / HISTORY_FILE, run, step, metrics)
