"""OptimizerSwitch: GD -> PHB or PHB -> GD where the sharpness crosses the MSS (paper 001, §3.1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_eos.callbacks._dashboard import define_eos_metrics
from lightning_eos.callbacks._events import log_event, new_measurement, sharpness_monitor
from lightning_eos.optim import HeavyBall, unwrap_optimizer

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

Target = Literal["gd", "phb"]
Direction = Literal["any", "down", "up"]


class OptimizerSwitch(Callback):
    """Switch a :class:`~lightning_eos.optim.HeavyBall` between GD and PHB mid-run.

    Paper 001, §3.1: "A → B means that we first run A, then switch to B once the
    sharpness crosses the MSS" (the maximum stable sharpness, the optimizer's threshold).
    GD is heavy ball with :math:`\\beta = 0`, so the switch sets the param groups'
    ``momentum``: to ``momentum`` for ``to="phb"``, to 0 for ``to="gd"``. The optimizer's
    displacement :math:`w_t - w_{t-1}` is kept, so after GD → PHB eq. (1) continues from
    the last GD step, and PHB → GD simply stops using it. Build the optimizer with
    ``match_gd=True`` to compare at a matched MSS, as the paper does
    (:math:`\\eta_{PHB} = (1+\\beta)\\eta_{GD}`, MSS :math:`2/\\eta` before and after).

    ``when="sharpness_crosses_threshold"`` reads the measurements of the trainer's
    :class:`~lightning_eos.callbacks.SharpnessMonitor` (``eos/sharpness`` against
    ``eos/threshold``) and switches before the first optimizer step that follows a
    measurement on the other side of the threshold than the one before it
    (``direction="any"``), or only when it drops below (``"down"``, e.g. after a
    catapult started above the MSS, the setting of Fig. 3) or rises to it (``"up"``, e.g.
    during warmup). The decision is only as fine as the monitor's ``every_n_steps``. An
    integer ``when`` switches before the optimizer step taken at that global step.

    The switch is logged through every logger as ``eos/momentum`` (the new
    :math:`\\beta`) and ``eos/switch_sharpness``/``eos/switch_threshold`` at its step,
    and as a row of the W&B table ``eos/switches``; :attr:`switch_step` keeps it.

    Args:
        to: ``"phb"`` (GD → PHB) or ``"gd"`` (PHB → GD).
        momentum: the :math:`\\beta` of PHB after a switch to ``"phb"``.
        when: ``"sharpness_crosses_threshold"`` or the global step of the switch.
        direction: which crossing counts (see above).

    Example:
        >>> OptimizerSwitch(to="gd", when=500).state_key.startswith("OptimizerSwitch{'to': 'gd'")
        True
    """

    def __init__(
        self,
        to: Target = "phb",
        momentum: float = 0.9,
        when: Literal["sharpness_crosses_threshold"] | int = "sharpness_crosses_threshold",
        direction: Direction = "any",
    ) -> None:
        if to not in ("gd", "phb"):
            raise ValueError(f"to={to!r}; choose 'gd' or 'phb'.")
        if not 0 < momentum < 1:
            raise ValueError(f"momentum={momentum} must be in (0, 1) for PHB.")
        if when != "sharpness_crosses_threshold" and not (isinstance(when, int) and when >= 0):
            raise ValueError(f"when={when!r}; use 'sharpness_crosses_threshold' or a step >= 0.")
        if direction not in ("any", "down", "up"):
            raise ValueError(f"direction={direction!r}; choose 'any', 'down' or 'up'.")
        self.to, self.momentum, self.when, self.direction = to, momentum, when, direction
        self.switch_step: int | None = None
        self._side: bool | None = None  # last measurement above (True) or below the threshold
        self._seen: int | None = None  # step of the last measurement read
        self._monitor: Any = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            to=self.to, momentum=self.momentum, when=self.when, direction=self.direction
        )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: L.LightningModule) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1 or not isinstance(unwrap_optimizer(optimizers[0]), HeavyBall):
            raise ValueError(
                f"{type(self).__name__} switches lightning_eos.optim.HeavyBall between GD "
                "(momentum=0) and PHB; train with HeavyBall(params, lr, momentum=..., "
                "match_gd=True) as the only optimizer."
            )
        if self.switch_step is None:  # a resumed run may have switched already
            momentum = float(unwrap_optimizer(optimizers[0]).param_groups[0]["momentum"])
            if (momentum > 0) == (self.to == "phb"):
                start = "GD (momentum=0)" if self.to == "phb" else "PHB (momentum > 0)"
                raise ValueError(
                    f"{type(self).__name__}(to={self.to!r}) switches from {start}, but the "
                    f"HeavyBall starts with momentum={momentum}."
                )
        if self.when == "sharpness_crosses_threshold":
            self._monitor = sharpness_monitor(trainer, type(self).__name__)
        define_eos_metrics(trainer)  # eos/momentum, eos/switch_* against the global step in W&B

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.switch_step is not None:
            return
        step = trainer.global_step
        if isinstance(self.when, int):
            if step >= self.when:
                self._switch(trainer, step, {})
            return
        latest = new_measurement(self._monitor, self._seen)
        if latest is None:
            return
        self._seen = latest["step"]
        if "eos/threshold" not in latest:
            return
        above = latest["eos/sharpness"] >= latest["eos/threshold"]
        crossed = self._side is not None and above != self._side
        self._side = above
        if crossed and (self.direction == "any" or above == (self.direction == "up")):
            self._switch(
                trainer,
                step,
                {
                    "eos/switch_sharpness": latest["eos/sharpness"],
                    "eos/switch_threshold": latest["eos/threshold"],
                },
            )

    def _switch(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        optimizer = unwrap_optimizer(trainer.optimizers[0])
        before = float(optimizer.param_groups[0]["momentum"])
        after = self.momentum if self.to == "phb" else 0.0
        for group in optimizer.param_groups:
            group["momentum"] = after
        self.switch_step = step
        row = {"step": step, "momentum_before": before, "momentum_after": after, **metrics}
        log_event(trainer, step, {"eos/momentum": after, **metrics}, "eos/switches", [row])

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"switch_step": self.switch_step, "side": self._side, "seen": self._seen}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.switch_step = state_dict.get("switch_step")
        self._side = state_dict.get("side")
        self._seen = state_dict.get("seen")
