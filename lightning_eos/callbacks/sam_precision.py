"""SAMMixedPrecision: SAM under ``16-mixed``, where GradScaler cannot call a closure."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.plugins.precision import MixedPrecision
from typing_extensions import override

from lightning_eos.optim.sam import SAM, refuse_accumulation


class SAMMixedPrecision(MixedPrecision):
    """Lightning's mixed precision plugin, with SAM's two passes around one GradScaler step.

    ``torch.amp.GradScaler.step`` calls ``optimizer.step()`` without a closure, so SAM's
    second pass cannot run inside it. With this plugin a SAM step under ``16-mixed`` is:
    the closure at :math:`w` (scaled gradients), unscale and ascend to :math:`w+e` (an
    inf or NaN there skips the step and shrinks the scale), the closure at :math:`w+e`,
    restore :math:`w` bit for bit, unscale, ``on_before_optimizer_step`` and gradient
    clipping (of the second gradient), then ``scaler.step`` of the base optimizer, which
    skips the update if that gradient has an inf: the weights stay at :math:`w`. Other
    optimizers and ``bf16-mixed`` go through :class:`MixedPrecision` unchanged.

    Example:
        >>> plugin = SAMMixedPrecision("16-mixed", device="cpu")
        >>> trainer = L.Trainer(plugins=[plugin], accelerator="cpu", logger=False)
        >>> trainer.precision_plugin is plugin
        True
    """

    @override
    def optimizer_step(  # type: ignore[override]
        self, optimizer: Any, model: L.LightningModule, closure: Any, **kwargs: Any
    ) -> Any:
        if self.scaler is None or not isinstance(optimizer, SAM):
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        refuse_accumulation(model)
        if optimizer.per_replica and model.trainer.world_size > 1:
            raise ValueError(
                "SAMMixedPrecision does not support per_replica=True: each rank's scaler "
                "would see its own overflows and the loss scales would drift apart."
            )
        scaler = self.scaler
        loss = closure()
        if loss is None and model.automatic_optimization:
            return loss  # training_step skipped the backward
        scaler.unscale_(optimizer)  # SAM's own entry in the scaler: the first pass
        if not optimizer.first_step(warn=False):  # inf/NaN: no step, and a smaller scale
            scaler.update()
            return loss
        with optimizer.perturbed_pass(model):
            if closure() is None and model.automatic_optimization:
                raise RuntimeError("training_step returned no loss at SAM's perturbed point.")
        base = optimizer.base_optimizer
        scaler.unscale_(base)  # the base optimizer's entry: the second pass
        self._after_closure(model, optimizer)
        scaler.step(base, **kwargs)  # skipped if the second gradient has an inf
        scaler.update()
        return loss
