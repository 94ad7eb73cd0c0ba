"""``lightning-eos report``: the papers' figures, drawn from the CSV logs of one or more runs.

A run is a ``metrics.csv`` written by Lightning's ``CSVLogger`` (our monitors log every
``eos/*`` value there, at ``trainer.global_step``). The report draws, per run and in one
colour per run (ordered by learning rate when the runs have different ones, as in the
papers' figures):

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
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

from lightning_eos.plotting import tail_values

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


@dataclass
class Run:
    """The logged values of one run, by metric name: ``{key: [(step, value), ...]}``.

    Attributes:
        path: the ``metrics.csv`` read.
        series: each column's finite-or-not values at the steps where it was logged.
        lr: the run's learning rate, from ``hparams.yaml`` (``eos.initial_lr`` or ``eos.lr``,
            as our monitors log them) or LightningCLI's ``config.yaml``; ``None`` if neither
            has it (see :func:`_learning_rate`).
        label: the run's name in legends.
    """

    path: Path
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    lr: float | None = None
    label: str = ""

    def steps(self, key: str) -> list[int]:
        """Steps at which ``key`` was logged."""
        return [s for s, _ in self.series.get(key, [])]

    def values(self, key: str) -> list[float]:
        """Values of ``key``, in step order."""
        return [v for _, v in self.series.get(key, [])]

    def has(self, key: str) -> bool:
        return bool(self.series.get(key))


def metrics_files(path: str | Path, all_versions: bool = False) -> list[Path]:
    """The ``metrics.csv`` files of ``path``.

    That is the file itself, or under a directory the newest version of each logger folder
    (``.../csv/version_3/metrics.csv`` over ``version_0``: a re-run of the same config), or
    with ``all_versions=True`` every version (e.g. a sweep logged to ``lightning_logs/``).

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no ``metrics.csv``.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a metrics.csv file nor a run folder.")
    found = sorted(path.rglob("metrics.csv"), key=lambda f: (str(f.parent.parent), _version(f)))
    if not found:
        raise FileNotFoundError(f"No metrics.csv under {path} (log with a CSVLogger).")
    if all_versions:
        return found
    newest: dict[Path, Path] = {}
    for file in found:  # in version order: the last one of a group wins
        newest[file.parent.parent if file.parent.name.startswith("version_") else file] = file
    return sorted(newest.values())


def _version(path: Path) -> int:
    name = path.parent.name
    return int(name.removeprefix("version_")) if name.removeprefix("version_").isdigit() else -1


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
    except (OSError, yaml.YAMLError):
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


def read_run(path: str | Path, label: str | None = None) -> Run:
    """Read one ``metrics.csv``.

    The format is Lightning's ``CSVLogger``'s: a ``step`` column, one column per metric, empty
    cells where a metric was not logged. A step logged twice (a run resumed into the same
    file, two monitors logging ``eos/loss``) keeps its last value. Rows without a step are
    skipped; ``nan`` and ``inf`` are read as such.

    Args:
        path: the CSV file.
        label: the legend name; default: the logger folder's parent name (the run's name).
    """
    path = Path(path)
    run = Run(path=path, lr=_learning_rate(path.parent))
    series: dict[str, dict[int, float]] = {}
    with path.open(newline="", encoding="utf-8") as file:
        for row in csv.DictReader(file):
            step = row.get("step")
            if not step:
                continue
            for key, cell in row.items():
                if key in ("step", "epoch") or cell in ("", None):
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    continue
                series.setdefault(key, {})[int(float(step))] = value  # the last one wins
    run.series = {key: sorted(points.items()) for key, points in series.items()}
    run.label = label or _run_name(path)
    return run


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

    Runs with distinct learning rates are labelled ``eta=...`` and ordered by learning rate;
    otherwise they keep their folder names and the given order. Labels are made unique.
    """
    files = [found for path in paths for found in metrics_files(path, all_versions)]
    if labels is not None and len(labels) != len(files):
        raise ValueError(f"{len(labels)} labels for {len(files)} runs ({[str(f) for f in files]}).")
    runs = [read_run(f, labels[i] if labels else None) for i, f in enumerate(files)]
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
    """
    if not runs:
        raise ValueError("No runs to report.")
    panels = [p for p in PANELS if any(run.has(p[2]) for run in runs)]
    has_loss = any(_loss_key(run) for run in runs)
    count = len(panels) + has_loss
    if count == 0:
        raise ValueError(
            "The runs logged no loss and no eos/* sharpness: attach a SharpnessMonitor and "
            "a CSVLogger."
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
    summary["csv"] = str(run.path)
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
    ``.pdf``, ``.svg``). Folders are created.

    Returns:
        The path written.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = draw_report(runs, title, dpi)
    if out.suffix.lower() in (".html", ".htm"):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        page = _html(runs, base64.b64encode(buffer.getvalue()).decode(), title)
        out.write_text(page, encoding="utf-8")
    else:
        fig.savefig(out)
    return out


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
        paths: ``metrics.csv`` files or run folders.
        out: the file to write; default: ``report.png`` in the single folder given, else in
            the current directory.
        labels: one legend name per run found.
        title: the figure title.
        dpi: resolution of the image.
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
    parser.add_argument("paths", nargs="+", help="metrics.csv files or run folders")
    parser.add_argument("--out", help="report.png (or .pdf, .svg) or report.html")
    parser.add_argument("--labels", nargs="+", help="one legend name per run")
    parser.add_argument("--title", help="figure title")
    parser.add_argument("--dpi", type=int, default=100)
    parser.add_argument(
        "--all-versions",
        action="store_true",
        help="every version_N of a logger folder, not only the newest",
    )
    args = parser.parse_args(argv)
    try:
        runs = read_runs(args.paths, args.labels, args.all_versions)
        for run in runs:
            print(", ".join(f"{k}: {_format(v)}" for k, v in summarize(run).items()))
        path = write_report(runs, args.out or _default_out(args.paths), args.title, args.dpi)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(f"Report written to {path}")
    return 0
