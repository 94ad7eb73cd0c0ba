"""CatapultDetector: a loss spike coupled with a drop of the sharpness (paper 001, §1)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_eos.callbacks._dashboard import define_eos_metrics
from lightning_eos.callbacks._events import log_event, sharpness_monitor

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

LossSource = Literal["training_step", "measurement"]


@dataclass
class Catapult:
    """One catapult: where the loss spiked and what the sharpness did.

    Steps are global steps: the loss at step :math:`t` is the loss of the parameters
    after :math:`t` optimizer steps.
    """

    start_step: int  #: the last step at the loss's running minimum before it rose
    peak_step: int
    end_step: int  #: the first step after the peak with the loss back down by the factor
    start_loss: float
    peak_loss: float
    sharpness_before: float  #: the last measurement at or before ``start_step``
    sharpness_after: float  #: the first measurement at or after ``end_step``
    threshold: float  #: the optimizer's threshold (MSS) measured with ``sharpness_before``
    ratio_before: float  #: ``sharpness_before / threshold``
    ratio_after: float  #: ``sharpness_after`` over the threshold measured with it
    before_step: int  #: the step of the ``sharpness_before`` measurement
    after_step: int  #: the step of the ``sharpness_after`` measurement


def _measurements(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The monitor's measurements of :math:`\\lambda_1(H)` with its threshold, by step."""
    return [h for h in history if "eos/sharpness" in h and "eos/threshold" in h]


def _first_at_or_after(measured: list[dict[str, Any]], step: int) -> dict[str, Any] | None:
    i = bisect.bisect_left([h["step"] for h in measured], step)
    return measured[i] if i < len(measured) else None


def _last_at_or_before(measured: list[dict[str, Any]], step: int) -> dict[str, Any] | None:
    i = bisect.bisect_right([h["step"] for h in measured], step)
    return measured[i - 1] if i else None


class CatapultDetector(Callback):
    """Detect catapults: a single loss spike with a drastic sharpness reduction.

    Paper 001, §1 defines a catapult as "a drastic sharpness reduction coupled with a
    single spike in the training loss" (Lewkowycz et al.): with the sharpness above the
    maximum stable sharpness (MSS), the iterates blow up along the top eigenvector, the
    loss spikes, and they land in a flatter region.

    The detector follows the loss of every optimizer step. A spike starts when the loss
    exceeds ``spike_factor`` times its running minimum (the minimum since the last spike
    ended); its start is the step of that minimum. It ends where the loss has stayed
    below ``peak / spike_factor`` for ``window`` consecutive steps (the first of them is
    the end step), so a loss that oscillates on its way down, as it does under momentum,
    makes one spike; so do two spikes with no sharpness measurement between them. The
    spike is a catapult if, by the trainer's
    :class:`~lightning_eos.callbacks.SharpnessMonitor`, the sharpness was near or above the
    MSS (at least ``min_ratio`` times it) at the last measurement at or before the start,
    and fell by at least ``min_sharpness_drop`` (relative) by the first measurement at or
    after the end. Each catapult is logged, at its peak step, through every logger:

    ===================================  ==========================================
    ``eos/catapult_peak_loss``           the loss at the peak
    ``eos/catapult_start_step``          where the loss started to rise
    ``eos/catapult_end_step``            where it was back down
    ``eos/catapult_sharpness_before``    :math:`\\lambda_1` before the spike
    ``eos/catapult_sharpness_after``     :math:`\\lambda_1` after it
    ``eos/catapult_ratio_before``        :math:`\\lambda_1` / MSS before
    ``eos/catapult_ratio_after``         :math:`\\lambda_1` / MSS after
    ===================================  ==========================================

    and, when W&B is attached, as a row of the table ``eos/catapults``. :attr:`events`
    holds them as :class:`Catapult` records.

    The loss is the one ``training_step`` returns (averaged over the micro-batches of a
    step and over processes), or, with ``loss="measurement"``, the monitor's ``eos/loss``
    on its fixed measurement set (only at its measurement steps, but free of minibatch
    noise: use it for small-batch SGD or raise ``spike_factor``).

    Args:
        spike_factor: the loss must rise this many times above its running minimum.
        min_sharpness_drop: the relative drop of :math:`\\lambda_1` that makes a spike a
            catapult.
        min_ratio: :math:`\\lambda_1` / MSS before the spike must be at least this.
        window: observations (steps, or measurements with ``loss="measurement"``) the
            loss must stay down for the spike to end.
        loss: ``"training_step"`` or ``"measurement"``.

    Example:
        >>> key = CatapultDetector(spike_factor=5.0).state_key
        >>> key.startswith("CatapultDetector{'spike_factor': 5.0, 'min_sharpness_drop': 0.005")
        True
    """

    def __init__(
        self,
        spike_factor: float = 2.0,
        min_sharpness_drop: float = 0.005,
        min_ratio: float = 0.9,
        window: int = 10,
        loss: LossSource = "training_step",
    ) -> None:
        if not spike_factor > 1:
            raise ValueError(f"spike_factor={spike_factor} must exceed 1.")
        if not 0 <= min_sharpness_drop < 1:
            raise ValueError(f"min_sharpness_drop={min_sharpness_drop} must be in [0, 1).")
        if not min_ratio >= 0:
            raise ValueError(f"min_ratio={min_ratio} must be nonnegative.")
        if window < 1:
            raise ValueError(f"window={window} must be at least 1.")
        if loss not in ("training_step", "measurement"):
            raise ValueError(f"loss={loss!r}; choose 'training_step' or 'measurement'.")
        self.spike_factor, self.min_sharpness_drop, self.loss = (
            spike_factor,
            min_sharpness_drop,
            loss,
        )
        self.min_ratio, self.window = min_ratio, window
        self.events: list[Catapult] = []
        self._floor: tuple[int, float] | None = None  # running minimum (step, loss)
        self._peak: tuple[int, float] | None = None  # inside a spike: its maximum
        self._start: tuple[int, float] | None = None  # inside a spike: where it began
        self._calm: list[Any] | None = None  # inside a spike: [step, loss, count] back down
        self._pending: list[dict[str, Any]] = []  # ended spikes waiting for a measurement
        self._step_loss: list[float] = []  # [step, sum, count] of the step being accumulated
        self._read_step: int | None = None  # last monitor step consumed (loss="measurement")
        self._last_after: int | None = None  # the measurement after the last finalized spike
        self._batch_step = 0
        self._monitor: Any = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            spike_factor=self.spike_factor,
            min_sharpness_drop=self.min_sharpness_drop,
            min_ratio=self.min_ratio,
            window=self.window,
            loss=self.loss,
        )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: L.LightningModule) -> None:
        self._monitor = sharpness_monitor(trainer, type(self).__name__)
        define_eos_metrics(trainer)  # eos/catapult_* against the global step in W&B

    # --- the loss of every step -------------------------------------------------------

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_step = trainer.global_step  # the forward pass sees the weights of this step

    @override
    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.loss == "measurement":
            self._read_measured_losses()
        else:
            loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
            if isinstance(loss, torch.Tensor):  # a step that returned None is not a loss
                value = float(trainer.strategy.reduce(loss.detach(), reduce_op="mean"))
                if pl_module.automatic_optimization:  # Lightning hands over loss / K
                    value *= trainer.accumulate_grad_batches
                self._add_batch_loss(self._batch_step, value)
        self._emit(trainer, final=False)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: L.LightningModule) -> None:
        if self._step_loss:
            step, total, count = self._step_loss
            self._step_loss = []
            self._observe(int(step), total / count)
        if self._calm is not None:  # the loss was back down when training stopped
            self._end_spike()
        self._emit(trainer, final=True)

    def _emit(self, trainer: Trainer, final: bool) -> None:
        for event in self._finalize(self._monitor.history, final):
            self.events.append(event)
            self._log(trainer, event)

    def _add_batch_loss(self, step: int, value: float) -> None:
        """Average the micro-batch losses of one step; hand over a step once it is complete."""
        if self._step_loss and self._step_loss[0] != step:
            done, total, count = self._step_loss
            self._observe(int(done), total / count)
            self._step_loss = []
        if not self._step_loss:
            self._step_loss = [step, 0.0, 0]
        self._step_loss[1] += value
        self._step_loss[2] += 1

    def _read_measured_losses(self) -> None:
        for entry in self._monitor.history:
            step = int(entry["step"])
            if self._read_step is not None and step <= self._read_step:
                continue  # by step, not by index: a resumed monitor keeps only its tail
            if "eos/loss" in entry:
                self._observe(step, float(entry["eos/loss"]))
            self._read_step = step

    # --- the spike state machine (pure: losses and the monitor's history in, events out) --

    def _observe(self, step: int, loss: float) -> None:
        if not math.isfinite(loss):
            return
        if self._peak is None:
            if self._floor is None or loss <= self._floor[1]:
                self._floor = (step, loss)
            elif loss > self.spike_factor * self._floor[1]:
                self._start, self._peak = self._floor, (step, loss)
            return
        if loss > self._peak[1]:
            self._peak, self._calm = (step, loss), None
        elif loss >= self._peak[1] / self.spike_factor:
            self._calm = None  # still up: an oscillating loss is one spike, not several
        else:
            if self._calm is None:
                self._calm = [step, loss, 0]
            self._calm[2] += 1
            if self._calm[2] >= self.window:
                self._end_spike()
                self._floor = (step, loss)

    def _end_spike(self) -> None:
        end = (int(self._calm[0]), float(self._calm[1]))
        spike = {"start": self._start, "peak": self._peak, "end": end}
        self._start = self._peak = self._calm = None
        if self._pending:
            previous = self._pending[-1]
            after = _first_at_or_after(_measurements(self._monitor.history), previous["end"][0])
            if after is None or spike["start"][0] < after["step"]:
                # no measurement between the two: the sharpness cannot tell them apart
                previous["end"] = spike["end"]
                previous["peak"] = max(previous["peak"], spike["peak"], key=lambda p: p[1])
                return
        self._pending.append(spike)

    def _finalize(self, history: list[dict[str, Any]], final: bool) -> list[Catapult]:
        """The ended spikes that are catapults, once the sharpness after them is measured."""
        if not self._pending:
            return []
        measured = _measurements(history)
        waiting, events = [], []
        for spike in self._pending:
            (start, start_loss), (peak, peak_loss), (end, _) = (
                spike["start"],
                spike["peak"],
                spike["end"],
            )
            last = _first_at_or_after(measured, end)
            rising = self._start is not None and (last is None or self._start[0] < last["step"])
            if (last is None or (rising and spike is self._pending[-1])) and not final:
                waiting.append(spike)  # wait for the sharpness after it, and for a spike
                continue  # that began before that measurement (it is merged into this one)
            if self._last_after is not None and start < self._last_after:
                continue  # began before the last spike's measurement: part of that spike
            first = _last_at_or_before(measured, start)
            if first is None or last is None:
                continue  # no measurement brackets this spike
            self._last_after = last["step"]
            before, after = first["eos/sharpness"], last["eos/sharpness"]
            if before <= 0 or before < self.min_ratio * first["eos/threshold"]:
                continue  # far below the MSS: not the instability that throws a catapult
            if 1.0 - after / before < self.min_sharpness_drop:
                continue  # a loss spike without a sharpness reduction is not a catapult
            events.append(
                Catapult(
                    start_step=start,
                    peak_step=peak,
                    end_step=end,
                    start_loss=start_loss,
                    peak_loss=peak_loss,
                    sharpness_before=before,
                    sharpness_after=after,
                    threshold=first["eos/threshold"],
                    ratio_before=before / first["eos/threshold"],
                    ratio_after=after / last["eos/threshold"],
                    before_step=first["step"],
                    after_step=last["step"],
                )
            )
        self._pending = waiting
        return events

    def _log(self, trainer: Trainer, event: Catapult) -> None:
        metrics = {
            "eos/catapult_peak_loss": event.peak_loss,
            "eos/catapult_start_step": float(event.start_step),
            "eos/catapult_end_step": float(event.end_step),
            "eos/catapult_sharpness_before": event.sharpness_before,
            "eos/catapult_sharpness_after": event.sharpness_after,
            "eos/catapult_ratio_before": event.ratio_before,
            "eos/catapult_ratio_after": event.ratio_after,
        }
        rows = [asdict(e) for e in self.events]
        log_event(trainer, event.peak_step, metrics, "eos/catapults", rows)

    # --- persistence ------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "events": [asdict(e) for e in self.events],
            "floor": self._floor,
            "peak": self._peak,
            "start": self._start,
            "calm": self._calm,
            "pending": list(self._pending),
            "step_loss": list(self._step_loss),
            "read_step": self._read_step,
            "last_after": self._last_after,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.events = [Catapult(**e) for e in state_dict.get("events", [])]
        self._floor, self._peak = state_dict.get("floor"), state_dict.get("peak")
        self._start, self._pending = state_dict.get("start"), list(state_dict.get("pending", []))
        self._calm = state_dict.get("calm")
        self._step_loss = list(state_dict.get("step_loss", []))
        self._read_step = state_dict.get("read_step")
        self._last_after = state_dict.get("last_after")
