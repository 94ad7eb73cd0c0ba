"""``lightning-eos report``: the papers' figures, drawn from the CSV logs of one or more runs.

The logs are those of Lightning's ``CSVLogger``: ``<save_dir>/<name>/version_N/`` holds
``metrics.csv`` (a ``step`` column, one column per metric) and ``hparams.yaml``. Our monitors
log every ``eos/*`` value there at ``trainer.global_step``, and also append it to
``eos_history.csv`` (``run_id,step,key,value``, one row per value, never rewritten) and log
their ``eos.run_id`` in ``hparams.yaml``.

**Runs.** A run killed and resumed from a checkpoint keeps its run id. Resumed into a new
``version_N+1`` folder (Lightning's default), it leaves its first part in ``version_N``;
resumed into the same folder, Lightning deletes ``metrics.csv`` and only ``eos_history.csv``
keeps the part before the resume. So a *run* is the set of version folders of one logger
folder that share a run id (the last one in ``eos_history.csv``, else ``eos.run_id`` in
``hparams.yaml``; a folder with neither, as in logs written before run ids, is a run of its
own; history rows of an earlier id in the same folder, from another run logged into a fixed
version, go to that run). Its series are
stitched in version order from each folder's ``metrics.csv`` and then its
``eos_history.csv`` (authoritative for ``eos/*``): for each metric and step the last value
written wins, so a step measured again after a resume appears once, with its new value.
By default the report draws, per logger folder, the run of the newest version;
``--all-versions`` draws every run of each logger folder (e.g. a sweep logged to
``lightning_logs/``). A ``metrics.csv`` or ``eos_history.csv`` named on the command line is
read alone.

The report draws, per run and in one colour per run (ordered by learning rate when the runs
have different ones, as in the papers' figures):

* the training loss (``train/loss``, or the monitor's ``eos/loss`` if logged more often) with
  catapult markers
  (``eos/catapult_peak_loss`` at the peak step, paper 001 Fig. 3);
* the sharpness :math:`\\lambda_1(H)` (solid) with its stability threshold (dashed), e.g.
  :math:`2/\\eta` (Cohen et al., 2021, Fig. 1) or the SAM-edge (paper 003, Prop. 2), with
  optimizer switches as dotted vertical lines (paper 001 §4);
* the preconditioned sharpness :math:`\\lambda_1(P^{-1}H)` with its threshold, e.g.
  :math:`38/\\eta` for Adam (paper 002, Fig. 1);
* the IAS :math:`\\lVert H\\rVert_{S_b}` with its edge :math:`2\\rho_b/\\eta` (paper 004, Fig. 4).

Panels without data in any run are left out. Nothing here imports Lightning: the report reads
files and writes files (PNG, PDF, SVG, or HTML with the PNG inlined), never shows a window.
A file it cannot read or write raises :class:`ReportError`, whose message names the file
(and the line); the command prints it as one line and exits with status 2.

Example: a run measured every 5 steps, killed at step 12 and resumed from its checkpoint at
step 7 into ``version_1``, measured step 10 again; the stitched series has each step once,
with the value measured last.

>>> import shutil, tempfile
>>> root = Path(tempfile.mkdtemp())
>>> parts = ([(0, 1.0), (5, 2.0), (10, 2.4)], [(10, 2.5), (15, 3.0)])
>>> for version, points in enumerate(parts):
...     folder = root / "csv" / f"version_{version}"
...     folder.mkdir(parents=True)
...     rows = "".join(f"ab12,{step},eos/sharpness,{value}\\n" for step, value in points)
...     _ = (folder / "eos_history.csv").write_text("run_id,step,key,value\\n" + rows)
>>> (run,) = read_runs([root])
>>> run.series["eos/sharpness"], run.run_id
([(0, 1.0), (5, 2.0), (10, 2.5), (15, 3.0)], 'ab12')
>>> shutil.rmtree(root)
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from matplotlib import cbook
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure
from matplotlib.mathtext import MathTextParser

from lightning_eos._eos_history import HISTORY_COLUMNS, HISTORY_FILE
from lightning_eos.plotting import tail_values

#: the file Lightning's CSVLogger writes in a log folder (next to the monitors' HISTORY_FILE)
METRICS_FILE = "metrics.csv"
#: the suffixes :func:`write_report` writes: matplotlib's image formats (but ``pgf``, which
#: needs LaTeX) and HTML
FORMATS = tuple(sorted({*FigureCanvasBase.get_supported_filetypes()} - {"pgf"} | {"html", "htm"}))

#: the panels of a report: (title, y label, solid key, dashed threshold key, threshold label)
PANELS = (
    ("sharpness", "$\\lambda_1(H)$", "eos/sharpness", "eos/threshold", "threshold"),
    (
        "preconditioned sharpness",
        "$\\lambda_1(P^{-1}H)$",
        "eos/preconditioned_sharpness",
        "eos/preconditioned_threshold",
        "threshold",
    ),
    ("IAS", "$\\|H\\|_{S_b}$", "eos/ias", "eos/ias_threshold", "$2\\rho_b/\\eta$"),
)
RATIOS = (
    ("eos/sharpness_ratio", "lambda_1/thr"),
    ("eos/preconditioned_sharpness_ratio", "lambda_1(P^-1 H)/thr"),
    ("eos/ias_ratio", "IAS/thr"),
)


class ReportError(ValueError):
    """A log the report cannot read, an output it cannot write, or an argument it cannot draw.

    The message names the file (and for a log, the line).
    """


@dataclass
class Run:
    """The logged values of one run, by metric name: ``{key: [(step, value), ...]}``.

    Attributes:
        path: the newest file read: the ``metrics.csv`` of the run's newest version, or its
            ``eos_history.csv`` where that version has no ``metrics.csv``.
        series: each column's finite-or-not values at the steps where it was logged.
        lr: the run's learning rate, from ``hparams.yaml`` (``eos.initial_lr`` or ``eos.lr``,
            as our monitors log them) or LightningCLI's ``config.yaml`` of its first version
            that has one; ``None`` if none has it (see :func:`_learning_rate`).
        label: the run's name in legends.
        files: every file read, in the order its values were stitched.
        run_id: the monitors' run id, ``None`` for logs without one.
    """

    path: Path
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    lr: float | None = None
    label: str = ""
    files: list[Path] = field(default_factory=list)
    run_id: str | None = None

    def steps(self, key: str) -> list[int]:
        """Steps at which ``key`` was logged."""
        return [s for s, _ in self.series.get(key, [])]

    def values(self, key: str) -> list[float]:
        """Values of ``key``, in step order."""
        return [v for _, v in self.series.get(key, [])]

    def has(self, key: str) -> bool:
        return bool(self.series.get(key))


#: a row of ``eos_history.csv``: (run id or ``None``, step, key, value)
_HistoryRow = tuple[str | None, int, str, float]


@dataclass
class _Version:
    """One log folder (a ``version_N``): its history rows, and the run its other files are of."""

    folder: Path
    history: list[_HistoryRow]
    run_id: str | None  # the last id in eos_history.csv, else hparams.yaml's eos.run_id

    def files(self, run_id: str | None) -> list[Path]:
        """The files that hold values of run ``run_id``: metrics.csv first, then the history."""
        own = self.run_id == run_id
        metrics, history = self.folder / METRICS_FILE, self.folder / HISTORY_FILE
        with_rows = any(row[0] == run_id for row in self.history)
        return [f for f, ok in ((metrics, own), (history, own or with_rows)) if ok and f.is_file()]


@dataclass
class _RunLog:
    """The version folders of one run, in version order."""

    run_id: str | None
    versions: list[_Version]

    def files(self) -> list[Path]:
        return [f for version in self.versions for f in version.files(self.run_id)]

    def path(self) -> Path:
        """:attr:`Run.path`: the newest version's ``metrics.csv``, else its history."""
        return self.versions[-1].files(self.run_id)[0]


def metrics_files(path: str | Path, all_versions: bool = False) -> list[Path]:
    """The log file of each run found in ``path``, as :attr:`Run.path` names it.

    That is the file itself, or under a directory the newest file of each run: by default
    the run of the newest version of each logger folder (``.../csv/version_3/metrics.csv``
    over ``version_0``: a re-run of the same config), or with ``all_versions=True`` every run
    (e.g. a sweep logged to ``lightning_logs/``). A run resumed into new versions is one run;
    its file is that of its newest version (see the module's docstring).

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no ``metrics.csv`` or
            ``eos_history.csv``.
        ReportError: an ``eos_history.csv`` cannot be read.
    """
    return [
        found if isinstance(found, Path) else found.path() for found in _find(path, all_versions)
    ]


def _find(path: str | Path, all_versions: bool) -> list[Path | _RunLog]:
    """``path`` itself if it is a file, else the runs under it (see :func:`metrics_files`)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a metrics.csv file nor a run folder.")
    names = (METRICS_FILE, HISTORY_FILE)
    folders = {f.parent for name in names for f in path.rglob(name) if f.is_file()}
    if not folders:
        raise FileNotFoundError(
            f"No metrics.csv or eos_history.csv under {path} (log with a CSVLogger)."
        )
    loggers: dict[Path, list[Path]] = {}
    for folder in sorted(folders, key=lambda f: (_version(f), f.name)):
        logger = folder.parent if folder.name.startswith("version_") else folder
        loggers.setdefault(logger, []).append(folder)
    runs: list[Path | _RunLog] = []
    for logger in sorted(loggers):
        versions = [_read_version(folder) for folder in loggers[logger]]
        found = _group_runs(versions)
        if all_versions:
            runs += found.values()
        else:
            runs.append(found[_run_key(versions[-1].run_id, versions[-1])])
    return runs


def _version(folder: Path) -> int:
    number = folder.name.removeprefix("version_")
    return int(number) if number.isdigit() else -1


def _run_key(run_id: str | None, version: _Version) -> str | Path:
    """Versions of one run id are one run; a version without a run id is a run of its own."""
    return run_id if run_id is not None else version.folder


def _group_runs(versions: list[_Version]) -> dict[str | Path, _RunLog]:
    """The runs of one logger folder's versions (given in version order), oldest first.

    A version belongs to the run of its own id and, where its ``eos_history.csv`` holds rows
    of other ids (a new run logged into the same folder), to theirs.
    """
    runs: dict[str | Path, _RunLog] = {}
    for version in versions:
        for run_id in dict.fromkeys([row[0] for row in version.history] + [version.run_id]):
            key = _run_key(run_id, version)
            runs.setdefault(key, _RunLog(run_id, [])).versions.append(version)
    return runs


def _read_version(folder: Path) -> _Version:
    history = folder / HISTORY_FILE
    rows = _read_history(history) if history.is_file() else []
    ids = [row[0] for row in rows if row[0] is not None]
    if ids:
        return _Version(folder, rows, ids[-1])
    logged = _get(_yaml_file(folder / "hparams.yaml"), "eos", "run_id")  # a str, or int-like
    return _Version(folder, rows, str(logged) if isinstance(logged, str | int) and logged else None)


class _TolerantLoader(yaml.SafeLoader):
    """A safe YAML loader that does not fail on unknown tags.

    Lightning writes tuples as ``!!python/tuple``; they are read as plain lists (mappings,
    strings), never constructed as Python objects.
    """


def _plain_node(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node)
    return loader.construct_scalar(node)


_TolerantLoader.add_multi_constructor("", _plain_node)


def _yaml_file(path: Path) -> dict[str, Any]:
    """The mapping in ``path``, or ``{}`` if it is missing, unreadable or not a mapping."""
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_TolerantLoader)  # noqa: S506
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _get(mapping: Any, *keys: str) -> Any:
    """``mapping[k1][k2]...``, or ``None`` where a level is missing or not a mapping."""
    for key in keys:
        mapping = mapping.get(key) if isinstance(mapping, dict) else None
    return mapping


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _learning_rate(folder: Path) -> float | None:
    """The run's learning rate, as the monitors logged it in ``hparams.yaml``.

    That is ``eos.initial_lr`` (a torch scheduler's base rate) or else ``eos.lr`` (the rate
    at the first step); without them, the optimizer's ``lr`` in LightningCLI's
    ``config.yaml``. Under a warmup from a tiny rate this is the tiny rate: label such runs
    with ``--labels``.
    """
    eos = _get(_yaml_file(folder / "hparams.yaml"), "eos")
    for key in ("initial_lr", "lr"):
        if (lr := _number(_get(eos, key))) is not None:
            return lr
    config = _yaml_file(folder / "config.yaml")
    return _number(_get(config, "model", "init_args", "optimizer", "init_args", "lr"))


#: a CSV file's header, and its rows with their line numbers
_Table = tuple[list[str], list[tuple[int, dict[str, str | None]]]]


def _read_table(path: Path) -> _Table:
    """The header of the CSV file ``path`` and its rows, each with its line number.

    A row with fewer fields than the header is padded with ``None``; one with more, a file
    that is not UTF-8 text, holds a NUL byte, or has no header, raise a :class:`ReportError`
    that names the file and the line.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ReportError(f"Cannot read {path}: {err.strerror or err}.") from err
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ReportError(f"{path}, line {line}: not UTF-8 text (is it a CSV log?).") from err
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise ReportError(f"{path}, line {line}: a NUL byte (a binary or damaged file?).")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        header = reader.fieldnames
        if not header:
            raise ReportError(f"{path}, line 1: empty, no CSV header.")
        for row in reader:
            if None in row:  # DictReader files the fields beyond the header under None
                fields = len(header) + len(row[None])
                raise ReportError(
                    f"{path}, line {reader.line_num}: {fields} fields, but the header has "
                    f"{len(header)} (a torn or hand-edited row?)."
                )
            rows.append((reader.line_num, row))
    except csv.Error as err:
        raise ReportError(f"{path}, line {reader.line_num}: {err}.") from err
    return list(header), rows


def _step(cell: str, path: Path, line: int) -> int:
    """The step in ``cell``: an integer, possibly written as a float (``3.0``)."""
    try:
        step = float(cell)
    except ValueError:
        step = math.nan
    if not step.is_integer():  # also nan and inf
        raise ReportError(f"{path}, line {line}: the step {cell!r} is not an integer.")
    return int(step)


def _add_metrics(path: Path, table: _Table, series: dict[str, dict[int, float]]) -> None:
    """Add the values of a ``metrics.csv`` (Lightning's wide format) to ``series``.

    Each row's ``step`` places the values of its non-empty cells; the last value of a step
    wins. Rows without a step, the ``epoch`` column and cells that are not numbers (none of
    ours) are skipped.
    """
    header, rows = table
    if "step" not in header:
        raise ReportError(
            f"{path}, line 1: no 'step' column in the header, so no loss and no eos/* "
            "sharpness can be placed at a step (is it a CSVLogger metrics.csv?)."
        )
    for line, row in rows:
        if not row["step"]:
            continue
        step = _step(row["step"], path, line)
        for key, cell in row.items():
            if key in ("step", "epoch") or not cell:
                continue
            try:
                value = float(cell)
            except ValueError:
                continue
            series.setdefault(key, {})[step] = value


def _read_history(path: Path, table: _Table | None = None) -> list[_HistoryRow]:
    """The rows of an ``eos_history.csv``, in file order (an empty run id is ``None``).

    A row with fewer than four fields is a write cut short by a killed process (the next
    append starts on a new line); it is skipped with a warning. The resumed run measured
    that step again.
    """
    header, rows = table or _read_table(path)
    missing = [column for column in HISTORY_COLUMNS if column not in header]
    if missing:
        raise ReportError(
            f"{path}, line 1: no {', '.join(missing)} column (an eos_history.csv has the "
            f"columns {','.join(HISTORY_COLUMNS)})."
        )
    history = []
    for line, row in rows:
        run_id, step, key, value = (row[column] for column in HISTORY_COLUMNS)
        if step is None or key is None or value is None:
            warnings.warn(
                f"{path}, line {line}: fewer than {len(header)} fields (a write cut short by "
                "a killed run?); the row is skipped.",
                stacklevel=2,
            )
            continue
        try:
            number = float(value)
        except ValueError as err:
            raise ReportError(f"{path}, line {line}: the value {value!r} is not a number.") from err
        history.append((run_id or None, _step(step, path, line), key, number))
    return history


def read_run(path: str | Path, label: str | None = None) -> Run:
    """Read one log file, alone: a ``metrics.csv`` or an ``eos_history.csv``.

    A ``metrics.csv`` has Lightning's ``CSVLogger``'s format: a ``step`` column, one column
    per metric, empty cells where a metric was not logged. An ``eos_history.csv`` (told by
    its header ``run_id,step,key,value``) has one row per value; the rows of its last run id
    are read. A step logged twice (a run resumed into the same file, two monitors logging
    ``eos/loss``) keeps its last value. Rows without a step are skipped; ``nan`` and ``inf``
    are read as such. To stitch the versions of a resumed run, give :func:`read_runs` the
    folder.

    Args:
        path: the CSV file.
        label: the legend name; default: the logger folder's parent name (the run's name).

    Raises:
        ReportError: the file cannot be read, or a row is malformed (the message names the
            file and the line).
    """
    path = Path(path)
    series: dict[str, dict[int, float]] = {}
    run_id = None
    table = _read_table(path)
    if path.name == HISTORY_FILE or set(HISTORY_COLUMNS) <= set(table[0]):
        history = _read_history(path, table)
        run_id = next((row[0] for row in reversed(history) if row[0] is not None), None)
        _add_history(history, run_id, series)
    else:
        _add_metrics(path, table, series)
    return _run(series, [path], path, _learning_rate(path.parent), label, run_id)


def _add_history(
    history: list[_HistoryRow], run_id: str | None, series: dict[str, dict[int, float]]
) -> None:
    """Add the values of run ``run_id`` in ``history`` to ``series``, the last one winning."""
    for row_id, step, key, value in history:
        if row_id == run_id:
            series.setdefault(key, {})[step] = value


def _read_log(log: _RunLog, label: str | None) -> Run:
    """Stitch the versions of one run (see the module's docstring)."""
    series: dict[str, dict[int, float]] = {}
    lr = None
    for version in log.versions:
        for file in version.files(log.run_id):
            if file.name == METRICS_FILE:
                _add_metrics(file, _read_table(file), series)
            else:  # eos_history.csv: after metrics.csv, so that it wins for eos/*
                _add_history(version.history, log.run_id, series)
        if lr is None and version.run_id == log.run_id:
            lr = _learning_rate(version.folder)
    return _run(series, log.files(), log.path(), lr, label, log.run_id)


def _run(
    series: dict[str, dict[int, float]],
    files: list[Path],
    path: Path,
    lr: float | None,
    label: str | None,
    run_id: str | None,
) -> Run:
    return Run(
        path=path,
        series={key: sorted(points.items()) for key, points in series.items()},
        lr=lr,
        label=label or _run_name(path),
        files=files,
        run_id=run_id,
    )


def _run_name(path: Path) -> str:
    """``outputs/quickstart/csv/version_0/metrics.csv`` -> ``quickstart``."""
    folder = path.parent
    if folder.name.startswith("version_"):
        folder = folder.parent
    if folder.name in ("csv", "lightning_logs", "logs") and folder.parent.name:
        folder = folder.parent
    return folder.name or str(path)


def read_runs(
    paths: Sequence[str | Path],
    labels: Sequence[str] | None = None,
    all_versions: bool = False,
) -> list[Run]:
    """Read every run of ``paths`` (files or folders, see :func:`metrics_files`).

    Under a folder, the versions of a run resumed from a checkpoint are stitched into one
    run (see the module's docstring); by default only the run of the newest version of each
    logger folder is read, with ``all_versions=True`` every run. Runs with distinct learning
    rates are labelled ``eta=...`` and ordered by learning rate; otherwise they keep their
    folder names and the given order. Labels are made unique.

    Raises:
        FileNotFoundError: a path does not exist or holds no log.
        ReportError: a log cannot be read, or ``labels`` does not have one name per run.
    """
    found = [run for path in paths for run in _find(path, all_versions)]
    if labels is not None and len(labels) != len(found):
        files = [str(run if isinstance(run, Path) else run.path()) for run in found]
        raise ReportError(f"{len(labels)} labels for {len(found)} runs ({files}).")
    runs = [
        read_run(run, name) if isinstance(run, Path) else _read_log(run, name)
        for run, name in zip(found, labels or [None] * len(found), strict=True)
    ]
    lrs = [run.lr for run in runs]
    if labels is None and len(runs) > 1 and None not in lrs and len(set(lrs)) == len(lrs):
        for run in runs:
            run.label = f"$\\eta$={run.lr:g}"
        runs.sort(key=lambda run: run.lr)
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label} ({seen[run.label]})"
    return runs


def _colors(n: int) -> list[Any]:
    """One colour per run: matplotlib's cycle for up to 10 runs, viridis beyond."""
    if n <= 10:
        return [f"C{i}" for i in range(n)]
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(i / (n - 1)) for i in range(n)]


def _loss_key(run: Run) -> str | None:
    """The loss to draw: ``train/loss`` (the trainer's, per batch) or ``eos/loss``.

    ``eos/loss`` (the loss on the measurement set) is drawn when it was logged at more steps,
    e.g. with ``log_every_n_steps=50`` and a monitor every step.
    """
    keys = [k for k in ("train/loss", "eos/loss") if run.has(k)]
    return max(keys, key=lambda k: len(run.series[k])) if keys else None


def draw_report(runs: Sequence[Run], title: str | None = None, dpi: int = 100):
    """The report's figure: the loss, then every panel of :data:`PANELS` that has data.

    Each run has one colour; a value is a solid line, its threshold a dashed line of the same
    colour (``gid="threshold:<label>"``, so tests can read the drawn values back).

    The figure is a plain ``matplotlib.figure.Figure``: pyplot and its backend are left
    alone (a notebook keeps its own), and nothing is shown.

    Returns:
        The figure (``fig.savefig(path)`` writes it).

    Raises:
        ReportError: no run has data to draw, ``dpi`` is not positive, or the title or a
            label is not valid mathtext.
    """
    if not runs:
        raise ReportError("No runs to report.")
    if dpi <= 0:
        raise ReportError(f"The resolution must be a positive number of dots per inch, not {dpi}.")
    for what, text in [("title", title), *(("label", run.label) for run in runs)]:
        _check_mathtext(what, text)
    panels = [p for p in PANELS if any(run.has(p[2]) for run in runs)]
    has_loss = any(_loss_key(run) for run in runs)
    count = len(panels) + has_loss
    if count == 0:
        files = [str(f) for run in runs for f in run.files or [run.path]]
        raise ReportError(
            f"The runs logged no loss and no eos/* sharpness ({', '.join(files)}): attach a "
            "SharpnessMonitor and a CSVLogger."
        )
    ncols = 1 if count == 1 else 2
    nrows = math.ceil(count / ncols)
    fig = Figure(figsize=(6 * ncols, 4 * nrows), dpi=dpi)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in axes[count:]:
        ax.set_visible(False)
    colors = _colors(len(runs))
    axes = axes[:count]
    if has_loss:
        _draw_loss(axes.pop(0), runs, colors)
    for ax, (name, ylabel, key, threshold, threshold_label) in zip(axes, panels, strict=True):
        for run, color in zip(runs, colors, strict=True):
            if key == "eos/sharpness" and run.has("eos/sam_edge"):
                threshold_label = "SAM-edge"  # eos/threshold is the SAM-edge under SAM
            if run.has(key):
                ax.plot(run.steps(key), run.values(key), color=color, lw=1.2, label=run.label)
            if run.has(threshold):
                (line,) = ax.plot(
                    run.steps(threshold),
                    run.values(threshold),
                    "--",
                    color=color,
                    lw=1.0,
                    label=_threshold_label(threshold_label, run, threshold, len(runs)),
                )
                line.set_gid(f"threshold:{run.label}")
            if key == "eos/sharpness":
                for step in run.steps("eos/switch_sharpness"):
                    ax.axvline(step, color=color, ls=":", lw=1.0, gid=f"switch:{run.label}")
        _clip_threshold_outliers(ax, runs, key, threshold)
        with_threshold = any(run.has(threshold) for run in runs)
        ax.set_title(f"{name} (solid) and its threshold (dashed)" if with_threshold else name)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("step")
        ax.legend(loc="best", fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _check_mathtext(what: str, text: str | None) -> None:
    """Fail on a text that matplotlib would fail to draw, e.g. ``$\\etta$``, with its name."""
    if not text or not cbook.is_math_text(text):
        return
    try:
        MathTextParser("path").parse(text)
    except ValueError as err:
        reason = str(err).strip().splitlines()[-1]
        raise ReportError(
            f"The {what} {text!r} is not valid mathtext ({reason}); write a literal $ as \\$."
        ) from err


def _clip_threshold_outliers(ax, runs: Sequence[Run], key: str, threshold: str) -> None:
    """Keep the measured curves readable when a threshold starts far above them.

    A warmup from a tiny learning rate starts the threshold at e.g. :math:`2/10^{-8}`; drawn
    whole, it flattens everything else. When a threshold exceeds three times the level the
    curves settle at (the largest measured value, the largest threshold over the second
    half of each run), the axis stops 30% above that level and the threshold line enters
    from above.
    """
    measured = [v for run in runs for v in run.values(key) if math.isfinite(v)]
    levels = [v for run in runs for v in run.values(threshold) if math.isfinite(v)]
    if not measured or not levels:
        return
    late = [v for run in runs for v in tail_values(run.values(threshold), 0.5) if math.isfinite(v)]
    level = max(measured + late)
    if max(levels) > 3 * level > 0:
        bottom = min(0.0, min(measured), min(levels))
        ax.set_ylim(bottom, 1.3 * level)


def _threshold_label(name: str, run: Run, key: str, num_runs: int) -> str | None:
    """The legend entry of a threshold line.

    None for several runs (the colour says which run). A constant threshold shows its value,
    as a multiple of :math:`1/\\eta` when the run's learning rate is known: ``2/η = 1`` for GD
    at :math:`\\eta = 2`, ``38/η = ...`` for Adam with :math:`\\beta_1 = 0.9` (paper 002).
    """
    values = run.values(key)
    if num_runs > 1:
        return None
    if len(set(values)) > 1 or not values:
        return name
    if name == "threshold" and run.lr:  # not the SAM-edge, not 2 rho_b / eta
        return f"{values[0] * run.lr:.4g}/$\\eta$ = {values[0]:.4g}"
    return f"{name} = {values[0]:.4g}"


def _draw_loss(ax, runs: Sequence[Run], colors: list[Any]) -> None:
    """The training loss of each run, log scale when positive, catapults marked at their peak."""
    positive = True
    for run, color in zip(runs, colors, strict=True):
        key = _loss_key(run)
        if key is None:
            continue
        values = run.values(key)
        positive &= all(v > 0 for v in values if math.isfinite(v))
        ax.plot(run.steps(key), values, color=color, lw=1.0, label=run.label)
        if run.has("eos/catapult_peak_loss"):
            ax.plot(
                run.steps("eos/catapult_peak_loss"),
                run.values("eos/catapult_peak_loss"),
                "v",
                color=color,
                markeredgecolor="k",
                ms=7,
                gid=f"catapults:{run.label}",
                label="catapult" if len(runs) == 1 else None,
            )
    if positive:
        ax.set_yscale("log")
    ax.set_title(
        "training loss"
        + (" and catapults" if any(run.has("eos/catapult_peak_loss") for run in runs) else "")
    )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="best", fontsize="small")


def summarize(run: Run, tail: float = 0.5) -> dict[str, Any]:
    """Numbers a reader checks first.

    The last value and the tail range of every ratio to a threshold, the largest sharpness,
    and the numbers of catapults and optimizer switches (non-finite values are left out of
    the largest value and the range, not of the last).

    ``tail`` is the fraction of the last measurements of each ratio that the range covers.
    """
    summary: dict[str, Any] = {"run": _plain_label(run.label), "lr": run.lr}
    sharpness = [v for v in run.values("eos/sharpness") if math.isfinite(v)]
    if sharpness:
        summary["max lambda_1"] = max(sharpness)
    for key, name in RATIOS:
        ratios = run.values(key)
        if ratios:
            late = tail_values(ratios, tail)
            finite = [v for v in late if math.isfinite(v)]
            summary[f"last {name}"] = ratios[-1]
            summary[f"{name} range (last {tail:.0%})"] = (
                (min(finite), max(finite)) if finite else None
            )
    summary["catapults"] = len(run.values("eos/catapult_peak_loss"))
    summary["switches"] = len(run.values("eos/switch_sharpness"))
    if run.run_id is not None:
        summary["run_id"] = run.run_id
    summary["csv"] = " + ".join(str(f) for f in run.files or [run.path])
    return summary


def _plain_label(label: str) -> str:
    """A legend label without mathtext, for text and HTML: ``$\\eta$=0.5`` -> ``η=0.5``."""
    return label.replace("$\\eta$", "η").replace("$", "")


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple):
        return "[" + ", ".join(_format(v) for v in value) + "]"
    return "-" if value is None else str(value)


def write_report(
    runs: Sequence[Run], out: str | Path, title: str | None = None, dpi: int = 100
) -> Path:
    """Draw :func:`draw_report` and write it to ``out``.

    ``.html`` writes one page with the figure inlined as PNG and a table of
    :func:`summarize`; any other suffix is an image format matplotlib knows (``.png``,
    ``.pdf``, ``.svg``, see :data:`FORMATS`). A name without a suffix gets ``.png``.
    Folders are created.

    Returns:
        The path written (with the ``.png`` added).

    Raises:
        ReportError: the suffix is not in :data:`FORMATS`, or ``out`` cannot be written
            (a folder of that name, a file where a folder is needed, no permission).
    """
    out = _output_path(out)
    fmt = out.suffix.lower().removeprefix(".")
    fig = draw_report(runs, title, dpi)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt in ("html", "htm"):
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png")
            page = _html(runs, base64.b64encode(buffer.getvalue()).decode(), title)
            out.write_text(page, encoding="utf-8")
        else:
            fig.savefig(out, format=fmt)
    except OSError as err:
        raise ReportError(_cannot_write(out, err)) from err
    return out


def _output_path(out: str | Path) -> Path:
    """``out``, with ``.png`` added where it has no suffix, if it names a file we can write."""
    out = Path(out)
    if os.path.isdir(out):
        raise ReportError(
            f"Cannot write {out}: it is a folder (name a file in it, e.g. report.png)."
        )
    if not out.suffix:
        out = out.with_name(out.name.rstrip(".") + ".png")  # what matplotlib would write
    fmt = out.suffix.lower().removeprefix(".")
    if fmt not in FORMATS:
        raise ReportError(
            f"Cannot write {out}: unknown format .{fmt} (supported: {', '.join(FORMATS)})."
        )
    return out


def _cannot_write(out: Path, err: OSError) -> str:
    """Why ``out`` cannot be written: a file where a folder is needed, or the OS's reason."""
    blocking = next((p for p in out.parents if os.path.isfile(p)), None)
    if blocking is not None:
        return f"Cannot write {out}: {blocking} is a file, not a folder."
    return f"Cannot write {out}: {err.strerror or err}."


def _html(runs: Sequence[Run], png: str, title: str | None) -> str:
    summaries = [summarize(run) for run in runs]
    columns = list(dict.fromkeys(key for s in summaries for key in s))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_format(s.get(c)))}</td>" for c in columns) + "</tr>"
        for s in summaries
    )
    name = html.escape(title or "lightning-eos report")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{name}</title></head>"
        f"<body><h1>{name}</h1><img alt='report' src='data:image/png;base64,{png}'>"
        f"<table border='1' cellpadding='4'><tr>{head}</tr>{rows}</table></body></html>\n"
    )


def report(
    paths: Sequence[str | Path],
    out: str | Path | None = None,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Read the runs of ``paths`` and write their report (the examples call this).

    Args:
        paths: log files (``metrics.csv``, ``eos_history.csv``) or run folders.
        out: the file to write; default: ``report.png`` in the single folder given, else in
            the current directory.
        labels: one legend name per run found.
        title: the figure title.
        dpi: resolution of the image.

    Raises:
        FileNotFoundError: a path does not exist or holds no log.
        ReportError: a log cannot be read or the report cannot be written.
    """
    return write_report(read_runs(paths, labels), out or _default_out(paths), title, dpi)


def _default_out(paths: Sequence[str | Path]) -> Path:
    """``report.png`` in the one run folder given, else in the current directory."""
    single = len(paths) == 1 and Path(paths[0]).is_dir()
    return Path(paths[0]) / "report.png" if single else Path("report.png")


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-eos report RUN_DIR_OR_CSV [...] [--out report.png|report.html]``."""
    parser = argparse.ArgumentParser(
        prog="lightning-eos report",
        description="Draw the loss, the sharpness against its threshold, the preconditioned "
        "sharpness, the IAS and catapults from the CSV logs of one or more runs.",
    )
    parser.add_argument(
        "paths", nargs="+", help="run folders, or metrics.csv or eos_history.csv files (read alone)"
    )
    parser.add_argument("--out", help="report.png (or .pdf, .svg; no suffix: .png) or report.html")
    parser.add_argument("--labels", nargs="+", help="one legend name per run")
    parser.add_argument("--title", help="figure title")
    parser.add_argument("--dpi", type=int, default=100)
    parser.add_argument(
        "--all-versions",
        action="store_true",
        help="every run of a logger folder, not only the newest version's (the versions of "
        "a run resumed from a checkpoint, which share a run id, are stitched into one run "
        "either way)",
    )
    args = parser.parse_args(argv)
    try:
        out = _output_path(args.out or _default_out(args.paths))  # before any reading
        runs = read_runs(args.paths, args.labels, args.all_versions)
        for run in runs:
            print(", ".join(f"{k}: {_format(v)}" for k, v in summarize(run).items()))
        path = write_report(runs, out, args.title, args.dpi)
    except (FileNotFoundError, ReportError) as err:
        parser.error(str(err))
    print(f"Report written to {path}")
    return 0
