"""What the monitors show besides their scalars: W&B dashboards, the run config, the progress bar.

The scalars ``eos/*`` reach every logger through ``logger.log_metrics`` in the monitors. This
module adds what makes them readable at a glance:

* W&B metric definitions (:func:`define_eos_metrics`): every ``eos/*`` key is plotted against
  ``trainer/global_step`` (the step Lightning's ``WandbLogger`` adds to every logged dict) and
  summarized by what matters about it -- the peak sharpness, the final ratio, the lowest loss;
* W&B line charts of each quantity against its threshold at the end of training
  (:func:`log_charts`);
* the optimizer's hyperparameters and the thresholds at the start in the run config of
  every logger (:func:`log_run_config`), under one key ``eos``;
* the latest ratio to the threshold in the progress bar (:func:`show_in_progress_bar`).

None of it may stop training: a failing W&B call (no network, an old client) becomes a
warning (:func:`_warn_on_failure`). Only rank zero talks to loggers; the progress-bar value is
the same on every rank and needs no collective.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

if TYPE_CHECKING:
    import lightning as L
    from lightning.pytorch import Trainer

    from lightning_eos.callbacks.sharpness import SharpnessMonitor

#: progress-bar label of each ratio to its threshold (read from the monitor's last measurement)
PROGRESS_BAR_FIELDS: dict[str, str] = {
    "eos/sharpness_ratio": "λ1/thr",
    "eos/preconditioned_sharpness_ratio": "λ1(P⁻¹H)/thr",
    "eos/ias_ratio": "IAS/thr",
}

#: the W&B summary of each metric: the peak of a sharpness, the final ratio and threshold
SUMMARIES: dict[str, str] = {
    "eos/sharpness": "max",
    "eos/preconditioned_sharpness": "max",
    "eos/ias": "max",
    "eos/sharpness_ratio": "last",
    "eos/preconditioned_sharpness_ratio": "last",
    "eos/ias_ratio": "last",
    "eos/threshold": "last",
    "eos/preconditioned_threshold": "last",
    "eos/ias_threshold": "last",
    "eos/sam_edge": "last",
    "eos/loss": "min",
}

#: run-config name of each threshold a measurement logs
CONFIG_THRESHOLDS: dict[str, str] = {
    "eos/threshold": "threshold",
    "eos/sam_edge": "sam_edge",
    "eos/preconditioned_threshold": "preconditioned_threshold",
    "eos/ias_threshold": "ias_threshold",
}

# param-group entries that choose a kernel, not the dynamics
_IMPLEMENTATION_FLAGS = frozenset({"params", "foreach", "fused", "capturable", "differentiable"})


@contextmanager
def _warn_on_failure(what: str) -> Iterator[None]:
    """Turn an exception into a warning: a dashboard extra must never stop training."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - any logger or network failure
        rank_zero_warn(
            f"lightning-eos could not {what} ({type(err).__name__}: {err}); training goes on."
        )


def _wandb_loggers(trainer: Trainer) -> list[WandbLogger]:
    """The trainer's W&B loggers, on rank zero only (other ranks hold no run)."""
    if not trainer.is_global_zero:
        return []
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def _step_metric(logger: WandbLogger) -> str:
    """The step key Lightning's ``WandbLogger`` logs with (``global_step`` when it syncs TB)."""
    synced = getattr(logger, "_wandb_init", {}).get("sync_tensorboard")
    return "global_step" if synced else "trainer/global_step"


def eos_summaries(top_k: int = 1) -> dict[str, str]:
    """:data:`SUMMARIES` with the eigenvalues 2..``top_k`` of both spectra (peaks, ``max``).

    Named one by one: W&B 0.31 did not apply the summary of a glob such as ``eos/eig_*``
    (next to the glob ``eos/*``) when we tried.

    Example:
        >>> eos_summaries(top_k=2)["eos/eig_2"], eos_summaries()["eos/loss"]
        ('max', 'min')
    """
    summaries = dict(SUMMARIES)
    for i in range(2, top_k + 1):
        summaries[f"eos/eig_{i}"] = summaries[f"eos/preconditioned_eig_{i}"] = "max"
    return summaries


def define_eos_metrics(trainer: Trainer, top_k: int = 1) -> None:
    """Plot every ``eos/*`` metric against the global step in W&B, with :func:`eos_summaries`.

    Call it before the first measurement is logged. Calling it again (several monitors)
    defines the same metrics again, which W&B merges.
    """
    for logger in _wandb_loggers(trainer):
        with _warn_on_failure("define the eos/* metrics in W&B"):
            run, step = logger.experiment, _step_metric(logger)
            run.define_metric("eos/*", step_metric=step)
            for name, summary in eos_summaries(top_k).items():
                run.define_metric(name, step_metric=step, summary=summary)


def _plain(value: Any) -> Any:
    """``value`` as a YAML- and JSON-safe scalar or list, or ``None`` if it is not one."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else None  # a tensor learning rate
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        number = int(value) if isinstance(value, int) else float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, tuple | list):
        items = [_plain(v) for v in value]
        return items if items and None not in items else None
    return None


def optimizer_config(optimizer: Any) -> dict[str, Any]:
    """The optimizer's class and the hyperparameters of its first param group.

    Plain values only (numbers, booleans, strings, lists: ``betas`` becomes a list), so
    that ``hparams.yaml``, TensorBoard and W&B all store them; ``params`` and the flags
    that pick a kernel (``foreach``, ``fused``, ...) are left out. A wrapper such as SAM
    also names its ``base_optimizer``.

    Example:
        >>> p = [torch.nn.Parameter(torch.zeros(1))]
        >>> config = optimizer_config(torch.optim.Adam(p, lr=0.01))
        >>> config["optimizer"], config["lr"], config["betas"], "foreach" in config
        ('Adam', 0.01, [0.9, 0.999], False)
    """
    while getattr(optimizer, "_optimizer", None) is not None:  # LightningOptimizer
        optimizer = optimizer._optimizer
    config: dict[str, Any] = {"optimizer": type(optimizer).__name__}
    base = getattr(optimizer, "base_optimizer", None)
    if base is not None:
        config["base_optimizer"] = type(base).__name__
    for key, value in optimizer.param_groups[0].items():
        plain = _plain(value)
        if key not in _IMPLEMENTATION_FLAGS and plain is not None:
            config[key] = plain
    return config


def _monitors(trainer: Trainer) -> list[SharpnessMonitor]:
    from lightning_eos.callbacks.sharpness import SharpnessMonitor

    return [c for c in trainer.callbacks if isinstance(c, SharpnessMonitor)]


def run_id(trainer: Trainer) -> str | None:
    """The trainer's run id: that of its first monitor (``None`` without monitors).

    Each monitor keeps its id in its checkpoint state, so a resumed run keeps it.
    """
    monitors = _monitors(trainer)
    return monitors[0].run_id if monitors else None


def _is_last_monitor(trainer: Trainer, monitor: SharpnessMonitor) -> bool:
    """Whether ``monitor`` is the trainer's last monitor: it speaks for all of them, once."""
    monitors = _monitors(trainer)
    return bool(monitors) and monitors[-1] is monitor


def run_config(trainer: Trainer) -> dict[str, Any]:
    """``{"eos": {optimizer, lr, ...hyperparameters, threshold, ...}}`` of the trainer now.

    The optimizer part is :func:`optimizer_config` (absent unless there is exactly one
    optimizer); the thresholds are those of every attached monitor
    (``SharpnessMonitor._config_thresholds``), the first monitor's value winning,
    and a threshold nobody knows yet is left out.
    """
    eos: dict[str, Any] = {}
    if run := run_id(trainer):  # the id eos_history.csv rows carry
        eos["run_id"] = run
    if len(trainer.optimizers) == 1:
        eos.update(optimizer_config(trainer.optimizers[0]))
    for monitor in _monitors(trainer):
        for name, value in monitor._config_thresholds(trainer).items():
            eos.setdefault(name, value)
    return {"eos": eos}


def log_run_config(trainer: Trainer, monitor: SharpnessMonitor) -> None:
    """Log :func:`run_config` through every logger, once per trainer (by its last monitor).

    Call it in ``on_train_start``, after Lightning logged the module's hyperparameters,
    so that both land in CSV's and TensorBoard's ``hparams.yaml`` and in the W&B config.
    TensorBoard's HParams tab keeps the first hparams record only (the module's), so ``eos``
    is in its ``hparams.yaml`` and event file but not shown in that tab.
    """
    if not trainer.is_global_zero or not _is_last_monitor(trainer, monitor):
        return
    with _warn_on_failure("read the optimizer's hyperparameters"):
        config = run_config(trainer)
        for logger in trainer.loggers:
            with _warn_on_failure(f"log the run config to {type(logger).__name__}"):
                logger.log_hyperparams(config)
                if isinstance(logger, TensorBoardLogger):
                    _rewrite_hparams_file(logger)


def _rewrite_hparams_file(logger: TensorBoardLogger) -> None:
    """TensorBoardLogger writes ``hparams.yaml`` once, before ``on_train_start``: renew it."""
    path = Path(logger.log_dir) / logger.NAME_HPARAMS_FILE
    if path.is_file():
        save_hparams_to_yaml(path, logger.hparams)


def _chart_specs(history: list[dict[str, Any]]) -> dict[str, tuple[str, str, str, str]]:
    """Chart key -> (value key, threshold key, title, threshold label), for pairs present."""
    sam = any("eos/sam_edge" in h for h in history)
    threshold = ("SAM-edge", "eos/sam_edge") if sam else ("threshold", "eos/threshold")
    specs = {
        "eos/charts/sharpness": (
            "eos/sharpness",
            threshold[1],
            f"Sharpness λ1(H) and its {threshold[0]}",
            threshold[0],
        ),
        "eos/charts/preconditioned_sharpness": (
            "eos/preconditioned_sharpness",
            "eos/preconditioned_threshold",
            "Preconditioned sharpness λ1(P⁻¹H) and its threshold",
            "threshold",
        ),
        "eos/charts/ias": ("eos/ias", "eos/ias_threshold", "IAS and its edge 2ρ_b/η", "2ρ_b/η"),
    }
    return {
        chart: spec
        for chart, spec in specs.items()
        if any(spec[0] in h for h in history) and any(spec[1] in h for h in history)
    }


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(int(h["step"]), float(h[key])) for h in history if key in h]
    return [s for s, _ in points], [v for _, v in points]


def chart_data(history: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The line-series charts of one history: chart key -> ``wandb.plot.line_series`` args.

    One chart per quantity whose threshold is in the history: ``eos/charts/sharpness``
    (against ``eos/threshold``, or ``eos/sam_edge`` under SAM, where they are equal),
    ``eos/charts/preconditioned_sharpness``, ``eos/charts/ias``.

    Example:
        >>> history = [{"step": 0, "eos/sharpness": 1.0, "eos/threshold": 4.0}]
        >>> chart_data(history)["eos/charts/sharpness"]["ys"]
        [[1.0], [4.0]]
    """
    charts = {}
    for chart, (key, threshold, title, label) in _chart_specs(history).items():
        value_steps, values = _series(history, key)
        threshold_steps, thresholds = _series(history, threshold)
        charts[chart] = {
            "xs": [value_steps, threshold_steps],
            "ys": [values, thresholds],
            "keys": [key.removeprefix("eos/"), label],
            "title": title,
            "xname": "trainer/global_step",
        }
    return charts


def log_charts(trainer: Trainer, monitor: SharpnessMonitor) -> None:
    """Log each monitor's :func:`chart_data` to W&B as line-series charts, once per trainer.

    Called by every monitor at the end of training; the last one logs for all, and a
    chart two monitors could draw comes from the first.
    """
    loggers = _wandb_loggers(trainer)
    if not loggers or not _is_last_monitor(trainer, monitor):
        return
    charts: dict[str, dict[str, Any]] = {}
    for other in _monitors(trainer):
        for key, data in chart_data(other.history).items():
            charts.setdefault(key, data)
    if not charts:
        return
    with _warn_on_failure("log the eos/charts/* line charts to W&B"):
        import wandb

        plots = {key: wandb.plot.line_series(**data) for key, data in charts.items()}
        for logger in loggers:
            logger.log_metrics(plots, step=trainer.global_step)


def show_in_progress_bar(pl_module: L.LightningModule, history: list[Mapping[str, Any]]) -> None:
    """Show the last measurement's ratios to their thresholds in the progress bar.

    Through Lightning's progress-bar metrics (:data:`PROGRESS_BAR_FIELDS`): no logger, no
    collective (every rank holds the same history), nothing computed. Call it from
    ``on_train_batch_end``.
    """
    if not history:
        return
    latest = history[-1]
    for key, label in PROGRESS_BAR_FIELDS.items():
        if key in latest:
            pl_module.log(
                label,
                float(latest[key]),
                prog_bar=True,
                logger=False,
                on_step=True,
                on_epoch=False,
                batch_size=1,
            )
