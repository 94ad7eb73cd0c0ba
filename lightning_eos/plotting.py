"""Figures of the sharpness against its threshold, written to files (never shown)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_sharpness(
    history: Sequence[dict[str, float]], path: str | Path, title: str | None = None
) -> Path:
    """Draw :math:`\\lambda_1` (and :math:`\\lambda_{2..k}`) with the threshold, dashed.

    Args:
        history: the monitor's records: ``{"step": ..., "eos/sharpness": ..., ...}``.
        path: the image file to write (format from its suffix).
        title: the figure title.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    k = 2
    while any(f"eos/eig_{k}" in h for h in history):
        ax.plot(
            steps,
            [h.get(f"eos/eig_{k}") for h in history],
            lw=0.8,
            alpha=0.5,
            label=f"$\\lambda_{k}$",
        )
        k += 1
    ax.plot(steps, [h["eos/sharpness"] for h in history], color="C0", label="$\\lambda_1$")
    if any("eos/threshold" in h for h in history):
        ax.plot(steps, [h.get("eos/threshold") for h in history], "k--", label="threshold")
    ax.set_xlabel("step")
    ax.set_ylabel("sharpness")
    ax.set_title(title or "sharpness and its stability threshold")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def edge_summary(history: Sequence[dict[str, float]], tail: float = 0.5) -> dict[str, float]:
    """Mean, min and max of ``eos/sharpness_ratio`` over the last ``tail`` of the records.

    >>> edge_summary([{"eos/sharpness_ratio": r} for r in (0.2, 0.5, 1.0, 1.1)])
    {'mean': 1.05, 'min': 1.0, 'max': 1.1, 'count': 2}
    """
    ratios = [h["eos/sharpness_ratio"] for h in history if "eos/sharpness_ratio" in h]
    if not ratios:
        raise ValueError("No eos/sharpness_ratio was recorded (is a threshold set?).")
    late = ratios[int(len(ratios) * (1 - tail)) :] or ratios[-1:]
    return {
        "mean": round(sum(late) / len(late), 12),
        "min": min(late),
        "max": max(late),
        "count": len(late),
    }
