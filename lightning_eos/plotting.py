"""Figures of the sharpness against its threshold, written to files (never shown)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def _pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (files only, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (folders created) and close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def _draw(ax, history, prefix: str, symbol: str, threshold_key: str | None) -> None:
    steps = [h["step"] for h in history]
    k = 2
    while any(f"{prefix}eig_{k}" in h for h in history):
        ax.plot(
            steps,
            [h.get(f"{prefix}eig_{k}") for h in history],
            lw=0.8,
            alpha=0.5,
            label=f"$\\lambda_{k}{symbol}$",
        )
        k += 1
    key = f"{prefix}sharpness"
    ax.plot(steps, [h.get(key) for h in history], color="C0", label=f"$\\lambda_1{symbol}$")
    if threshold_key and any(threshold_key in h for h in history):
        ax.plot(steps, [h.get(threshold_key) for h in history], "k--", label="threshold")
    ax.set_xlabel("step")
    ax.legend(loc="lower right")


def plot_sharpness(
    history: Sequence[dict[str, float]], path: str | Path, title: str | None = None
) -> Path:
    """Draw :math:`\\lambda_1` (and :math:`\\lambda_{2..k}`) with the threshold, dashed.

    A history with ``eos/preconditioned_sharpness`` gets two panels: :math:`\\lambda_i(P^{-1}H)`
    with its threshold, and the raw :math:`\\lambda_i(H)` (no threshold: paper 002, §6).

    Args:
        history: the monitor's records: ``{"step": ..., "eos/sharpness": ..., ...}``.
        path: the image file to write (format from its suffix).
        title: the figure title.

    Returns:
        The path written.
    """
    plt = _pyplot()
    preconditioned = [h for h in history if "eos/preconditioned_sharpness" in h]
    raw = [h for h in history if "eos/sharpness" in h]
    if preconditioned:
        fig, axes = plt.subplots(1, 2 if raw else 1, figsize=(10 if raw else 6, 4), dpi=100)
        axes = list(axes) if raw else [axes]
        _draw(
            axes[0],
            preconditioned,
            "eos/preconditioned_",
            "(P^{-1}H)",
            "eos/preconditioned_threshold",
        )
        axes[0].set_ylabel("preconditioned sharpness")
        axes[0].set_title("$\\lambda(P^{-1}H)$ and its stability threshold")
        if raw:
            _draw(axes[1], raw, "eos/", "(H)", None)
            axes[1].set_ylabel("sharpness")
            axes[1].set_title("raw $\\lambda(H)$")
        if title:
            fig.suptitle(title)
    else:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ias = [h for h in history if "eos/ias" in h]
        if ias:  # paper 004, Fig. 4 (a)-(b): the IAS at its edge, lambda_1 above 2/eta
            steps = [h["step"] for h in ias]
            ax.plot(steps, [h["eos/ias"] for h in ias], color="C3", label="IAS $\\|H\\|_{S_b}$")
            if any("eos/ias_threshold" in h for h in ias):
                ax.plot(
                    steps,
                    [h.get("eos/ias_threshold") for h in ias],
                    "--",
                    color="C3",
                    label="$2\\rho_b/\\eta$",
                )
        if raw:
            _draw(ax, raw, "eos/", "", "eos/threshold")
        ax.legend(loc="lower right")
        ax.set_xlabel("step")
        ax.set_ylabel("sharpness")
        ax.set_title(title or "sharpness and its stability threshold")
    return _save(fig, path)


def plot_ias(
    runs: dict[str, Sequence[dict[str, float]]], path: str | Path, lr: float | None = None
) -> Path:
    """Paper 004, Fig. 4 (c)-(d): the IAS of several runs, raw and divided by :math:`\\rho_b`.

    Left: :math:`\\lVert H\\rVert_{S_b}` of each run (solid) with its edge
    :math:`2\\rho_b/\\eta` (dashed, same colour). Right: :math:`\\lVert H\\rVert_{S_b}/\\rho_b`,
    which meets the common line :math:`2/\\eta` (``lr``) at the edge of stability.

    Args:
        runs: the IAS monitors' histories, by label (e.g. ``"b=64"``).
        path: the image file to write.
        lr: the learning rate shared by the runs, for the :math:`2/\\eta` line.
    """
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for i, (label, history) in enumerate(runs.items()):
        rows = [h for h in history if "eos/ias" in h]
        steps = [h["step"] for h in rows]
        color = f"C{i}"
        left.plot(steps, [h["eos/ias"] for h in rows], color=color, lw=1, label=label)
        if any("eos/ias_threshold" in h for h in rows):
            left.plot(steps, [h.get("eos/ias_threshold") for h in rows], "--", color=color, lw=1)
        right.plot(
            steps, [h["eos/ias"] / h["eos/rho_b"] for h in rows], color=color, lw=1, label=label
        )
    if lr is not None:
        right.axhline(2 / lr, color="k", ls="--", label="$2/\\eta$")
    left.set_title("IAS $\\|H\\|_{S_b}$ and $2\\rho_b/\\eta$ (dashed)")
    right.set_title("$\\|H\\|_{S_b}/\\rho_b$ against $2/\\eta$")
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.legend(loc="lower right")
    return _save(fig, path)


def tail_values(values: Sequence[float], tail: float) -> list[float]:
    """The last ``tail`` fraction of ``values`` (at least the last one, if any).

    >>> tail_values([1, 2, 3, 4, 5], 0.5), tail_values([1, 2], 0.1)
    ([3, 4, 5], [2])
    """
    values = list(values)
    return values[int(len(values) * (1 - tail)) :] or values[-1:]


def edge_summary(
    history: Sequence[dict[str, float]], tail: float = 0.5, key: str = "eos/sharpness_ratio"
) -> dict[str, float]:
    """Mean, min and max of ``key`` (a ratio to the threshold) over the last ``tail`` of records.

    >>> edge_summary([{"eos/sharpness_ratio": r} for r in (0.2, 0.5, 1.0, 1.1)])
    {'mean': 1.05, 'min': 1.0, 'max': 1.1, 'count': 2}
    """
    ratios = [h[key] for h in history if key in h]
    if not ratios:
        raise ValueError(f"No {key} was recorded (is a threshold set?).")
    late = tail_values(ratios, tail)
    return {
        "mean": round(sum(late) / len(late), 12),
        "min": min(late),
        "max": max(late),
        "count": len(late),
    }
