"""Events (a catapult, an optimizer switch): scalars to every logger, rows to a W&B table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import WandbLogger

from lightning_eos.callbacks._history_file import log_eos_metrics

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from lightning_eos.callbacks.sharpness import SharpnessMonitor


def sharpness_monitor(trainer: Trainer, owner: str) -> SharpnessMonitor:
    """The trainer's first monitor that logs :math:`\\lambda_1(H)` with its threshold.

    That is a :class:`SharpnessMonitor`, or an :class:`IASMonitor` with ``sharpness=True``,
    with ``threshold="auto"`` or a number. A :class:`PreconditionedSharpnessMonitor` does
    not qualify: its threshold is on :math:`\\lambda_1(P^{-1}H)`.

    Raises:
        ValueError: no such monitor is attached.
    """
    from lightning_eos.callbacks.preconditioned import PreconditionedSharpnessMonitor
    from lightning_eos.callbacks.sharpness import SharpnessMonitor

    for callback in trainer.callbacks:
        if (
            isinstance(callback, SharpnessMonitor)
            and not isinstance(callback, PreconditionedSharpnessMonitor)
            and getattr(callback, "sharpness", True)
            and callback.threshold is not None
        ):
            return callback
    raise ValueError(
        f"{owner} compares the sharpness that a SharpnessMonitor measures with the "
        "optimizer's threshold: add SharpnessMonitor(every_n_steps=..., threshold='auto') "
        "to the trainer's callbacks (every_n_steps=1 to act at the exact step). A "
        "PreconditionedSharpnessMonitor logs no threshold on lambda_1(H)."
    )


def new_measurement(monitor: SharpnessMonitor, seen: int | None) -> dict[str, Any] | None:
    """The monitor's latest measurement if it is newer than step ``seen``, else ``None``."""
    history = monitor.history
    return history[-1] if history and history[-1]["step"] != seen else None


def log_event(
    trainer: Trainer,
    step: int,
    metrics: dict[str, float],
    table: str,
    rows: list[dict[str, Any]],
) -> None:
    """Log ``metrics`` at ``step`` through every logger; W&B also gets ``rows`` as a table.

    The scalars also go to ``eos_history.csv`` (:func:`log_eos_metrics`). The table holds
    every event so far (W&B keeps its latest version). Only rank zero logs.
    """
    if not trainer.is_global_zero:
        return
    log_eos_metrics(trainer, step, metrics)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and rows:
            columns = list(rows[0])
            data = [[row[c] for c in columns] for row in rows]
            logger.log_table(key=table, columns=columns, data=data, step=step)
