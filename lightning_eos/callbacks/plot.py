"""SharpnessPlot: write a PNG of the sharpness against its threshold at the end of fit."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_eos.callbacks.sharpness import SharpnessMonitor
from lightning_eos.plotting import edge_summary, plot_sharpness

if TYPE_CHECKING:
    from lightning.pytorch import Trainer


class SharpnessPlot(Callback):
    """At the end of fit, plot every sharpness monitor's history and summarize it.

    Works for :class:`SharpnessMonitor` and its subclasses
    :class:`~lightning_eos.callbacks.PreconditionedSharpnessMonitor` (two panels) and
    :class:`~lightning_eos.callbacks.IASMonitor` (the IAS and its edge in red).

    Args:
        filename: image name, written into ``dirpath``.
        dirpath: folder; default: the trainer's ``log_dir`` (or its ``default_root_dir``).
        tail: fraction of the last measurements summarized as ``lambda_1 / threshold``.
    """

    def __init__(
        self, filename: str = "sharpness.png", dirpath: str | None = None, tail: float = 0.5
    ) -> None:
        self.filename, self.dirpath, self.tail = filename, dirpath, tail
        self.paths: list[Path] = []

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        monitors = [c for c in trainer.callbacks if isinstance(c, SharpnessMonitor)]
        folder = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)
        for i, monitor in enumerate(m for m in monitors if m.history):
            name = self.filename if i == 0 else f"{Path(self.filename).stem}_{i}.png"
            path = plot_sharpness(monitor.history, folder / name)
            self.paths.append(path)
            rank_zero_info(f"Sharpness plot written to {path}")
            for key, label in (
                ("eos/sharpness_ratio", "lambda_1"),
                ("eos/preconditioned_sharpness_ratio", "lambda_1(P^-1 H)"),
                ("eos/ias_ratio", "IAS"),
            ):
                if any(key in h for h in monitor.history):
                    s = edge_summary(monitor.history, self.tail, key)
                    rank_zero_info(
                        f"{label} / threshold over the last {s['count']} measurements: "
                        f"mean {s['mean']:.3f}, range [{s['min']:.3f}, {s['max']:.3f}]"
                    )
