"""What a monitor does when a measurement fails: skip it, say why once, count it.

A monitor must never stop the run it observes. An exception inside a measurement (a
non-finite loss or optimizer state, an out-of-memory error, a model the measurement cannot
differentiate) is caught, the measurement is skipped, the count
``eos/skipped_measurements`` goes up, and one warning per kind of failure says what
happened and what to do; training goes on. ``on_error="raise"`` re-raises instead, for
debugging.

Under DDP every rank runs the same measurement and a failure on one rank makes every rank
fail at the same collective (:class:`~lightning_eos.curvature.HessianOperator` shares the
failure); afterwards :func:`gather_errors` collects every rank's own error, so the warning
on rank zero shows the error of the rank where it happened, not only "failed on another
process".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

from lightning_eos.curvature import FailedOnAnotherProcessError, NonFiniteCurvatureError

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

OnError = Literal["skip", "raise"]

_HINTS: dict[type[BaseException], str] = {
    NonFiniteCurvatureError: (
        "The loss, a gradient, a Hessian-vector product or the optimizer state is not "
        "finite at these weights: training has probably diverged or produced NaNs (lower "
        "the learning rate, check the data)."
    ),
    torch.OutOfMemoryError: "Lower the monitor's num_samples or chunk_size.",
}


def describe(error: BaseException) -> str:
    """``Type: message`` of an error, one line."""
    return f"{type(error).__name__}: {error}".replace("\n", " ").strip()


def gather_errors(trainer: Trainer, error: BaseException | None) -> dict[int, str]:
    """Every rank's error of the measurement just attempted, by rank (``{}``: none failed).

    Under DDP this is a collective (``all_gather_object``): call it on every rank after
    every measurement, failed or not. A rank's "failed on another process" is left out
    when another rank reports its own error.
    """
    local = None if error is None else describe(error)
    if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return {} if local is None else {trainer.global_rank: local}
    gathered: list[str | None] = [None] * trainer.world_size
    dist.all_gather_object(gathered, local)
    errors = {rank: message for rank, message in enumerate(gathered) if message is not None}
    relayed = FailedOnAnotherProcessError.__name__
    own = {r: m for r, m in errors.items() if not m.startswith(relayed)}
    return own or errors


class SkipLog:
    """Counts skipped measurements and warns once per kind of failure."""

    def __init__(self) -> None:
        self.count = 0
        self._warned: set[str] = set()

    def warn_once(self, key: str, message: str) -> None:
        """Warn with ``message`` unless a warning with ``key`` was already given."""
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def skip(
        self, owner: str, step: int, errors: dict[int, str], error: BaseException | None
    ) -> None:
        """Count a skipped measurement at ``step`` and warn (once per kind of error)."""
        self.count += 1
        kinds = sorted({message.split(":", 1)[0] for message in errors.values()})
        where = (
            "; ".join(f"rank {rank}: {message}" for rank, message in sorted(errors.items()))
            if len(errors) > 1 or 0 not in errors
            else errors[0]
        )
        hint = next((h for kind, h in _HINTS.items() if isinstance(error, kind)), None)
        parts = [
            f"{owner} skipped the measurement at step {step} ({where}).",
            hint,
            "Training goes on; skipped measurements are counted in eos/skipped_measurements, "
            "and later ones for the same reason without a warning. Pass on_error='raise' to "
            "stop at the error with its traceback.",
        ]
        self.warn_once("skip:" + ",".join(kinds), " ".join(p for p in parts if p))
