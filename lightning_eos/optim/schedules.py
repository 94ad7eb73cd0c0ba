"""Learning-rate schedules of the papers.

* :class:`LinearWarmup` -- a linear ramp between absolute learning rates, then constant:
  paper 001, App. B (from :math:`\\eta_i = 10^{-8}` to :math:`\\eta_f` over
  :math:`\\eta_f\\cdot 10^6` steps) and paper 002, Fig. 7 (the threshold
  :math:`38/\\eta` falls as the warmup proceeds and pushes the preconditioned sharpness
  down).
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["LinearWarmup"]


class LinearWarmup(LRScheduler):
    """Set every group's learning rate to a linear ramp from ``lr_initial`` to ``lr_final``.

    At scheduler step :math:`t` (the number of ``step()`` calls; 0 at construction)

    .. math:: \\eta_t = \\eta_i + (\\eta_f - \\eta_i)\\,\\frac{\\min(t, T)}{T},

    with :math:`\\eta_i` = ``lr_initial``, :math:`\\eta_f` = ``lr_final`` and :math:`T` =
    ``steps``; after :math:`T` steps it holds :math:`\\eta_f`. The values are absolute, not
    multiples of the optimizer's ``lr``, and every group gets the same one. Paper 001,
    App. B warms up from :math:`\\eta_i = 10^{-8}` over :math:`T = \\eta_f\\cdot 10^6`
    steps; paper 002, Fig. 7, over 40k steps.

    Stepped once per optimizer step, it is the ``lr_scheduler`` factory of
    :class:`~lightning_eos.models.SupervisedTask` via
    ``functools.partial(LinearWarmup, lr_initial=..., lr_final=..., steps=...)``, and
    :func:`~lightning_eos.thresholds.stability_threshold` follows it live.

    Args:
        optimizer: the wrapped optimizer.
        lr_initial: :math:`\\eta_i \\ge 0`, the learning rate at step 0.
        lr_final: :math:`\\eta_f \\ge 0`, reached at step ``steps`` and kept after.
        steps: :math:`T \\ge 1`, the length of the ramp in scheduler steps.
        last_epoch: the index of the last step, to resume (torch's convention).

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> warmup = LinearWarmup(opt, lr_initial=0.0, lr_final=0.4, steps=4)
        >>> rates = [opt.param_groups[0]["lr"]]
        >>> for _ in range(6):
        ...     opt.step(); warmup.step(); rates.append(opt.param_groups[0]["lr"])
        >>> [round(r, 6) for r in rates]
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.4, 0.4]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        lr_initial: float,
        lr_final: float,
        steps: int,
        last_epoch: int = -1,
    ) -> None:
        if not (lr_initial >= 0 and lr_final >= 0):
            raise ValueError(
                f"LinearWarmup: lr_initial={lr_initial!r}, lr_final={lr_final!r}; pass learning "
                "rates >= 0 (paper 001 starts from lr_initial=1e-8)."
            )
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(
                f"LinearWarmup: steps={steps!r}; pass an integer >= 1 (the ramp's length in "
                "optimizer steps)."
            )
        self.lr_initial = float(lr_initial)
        self.lr_final = float(lr_final)
        self.steps = steps
        super().__init__(optimizer, last_epoch)

    def _lr_at(self, step: int) -> float:
        """:math:`\\eta_t` at scheduler step ``step``."""
        fraction = min(max(step, 0), self.steps) / self.steps
        return self.lr_initial + (self.lr_final - self.lr_initial) * fraction

    def get_lr(self) -> list[float]:
        """The learning rate of every group at the current step (``last_epoch``)."""
        return [self._lr_at(self.last_epoch)] * len(self.optimizer.param_groups)

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()
