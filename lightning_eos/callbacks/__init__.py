"""Lightning callbacks: when to measure, on which data, and where to log.

Monitors
    :class:`SharpnessMonitor` -- top Hessian eigenvalues and the optimizer's threshold.
Figures
    :class:`SharpnessPlot` -- PNG of the sharpness against its threshold at fit end.
"""

from lightning_eos.callbacks.plot import SharpnessPlot
from lightning_eos.callbacks.sharpness import SharpnessMonitor

__all__ = ["SharpnessMonitor", "SharpnessPlot"]
