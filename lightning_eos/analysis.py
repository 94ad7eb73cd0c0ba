"""Reference computations for paper 001's toy problems, in float64 NumPy (no Lightning).

Scalar ReLU network (§3, App. D)
    :func:`scalar_relu_trajectory`, :class:`ScalarReLUTrajectory` -- GD/PHB on
    :math:`\\tfrac12 u^2 v^2 \\mathbb{1}[u \\ge 0]` by eq. (5), with the GD->PHB and
    PHB->GD switches of §3.1 (Fig. 3).
    :func:`theorem2_bound`, :class:`Theorem2Bound` -- eq. (3) and Theorem 2's bound
    :math:`u_\\infty \\le C_u / (1 + \\eta C_v)` (App. D.4, Fig. 4).
Sparse-regression baselines (§2.1, App. B, Fig. 1)
    :func:`min_l1_solution` (basis pursuit), :func:`min_l2_solution` (pseudo-inverse),
    :func:`regression_test_loss`.

Every function takes NumPy arrays, sequences or torch tensors (on any device) and
computes in float64; the trajectory is a plain loop on purpose, a reference for the
autograd and optimizer code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from scipy.optimize import linprog

__all__ = [
    "ScalarReLUTrajectory",
    "Theorem2Bound",
    "min_l1_solution",
    "min_l2_solution",
    "regression_test_loss",
    "scalar_relu_trajectory",
    "theorem2_bound",
]


ArrayLike = npt.ArrayLike | torch.Tensor


def _float64(a: ArrayLike) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def _check_momentum(name: str, beta: float) -> None:
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"{name}={beta}; Polyak momentum needs 0 <= {name} < 1.")


@dataclass(frozen=True)
class ScalarReLUTrajectory:
    """GD/PHB iterates of the scalar ReLU network, :math:`t = 0, \\dots, T`.

    Attributes:
        u: :math:`u_t`, shape ``(T + 1,)``.
        v: :math:`v_t`, shape ``(T + 1,)``.
        loss: :math:`\\tfrac12 u_t^2 v_t^2 \\mathbb{1}[u_t \\ge 0]`, shape ``(T + 1,)``.
        switch_step: the step :math:`t` from which the second momentum was used
            (``None`` without a switch, or if :math:`u_t^2` never fell below
            :math:`2/\\eta`).
    """

    u: np.ndarray
    v: np.ndarray
    loss: np.ndarray
    switch_step: int | None

    @property
    def minimum_sharpness(self) -> np.ndarray:
        """:math:`u_t^2`: the sharpness of the minimum :math:`(u_t, 0)` below the iterate.

        §3.1 compares it with the maximum stable sharpness :math:`2/\\eta` (Fig. 3).
        """
        return self.u**2


def scalar_relu_trajectory(
    u0: float,
    v0: float,
    lr: float,
    momentum: float,
    steps: int,
    switch_to: float | None = None,
) -> ScalarReLUTrajectory:
    """GD/PHB on the scalar ReLU network with learning rate :math:`(1+\\beta)\\eta`.

    Paper 001, App. D.1, eq. (5), on :math:`L(u, v) = \\tfrac12 u^2 v^2 \\mathbb{1}[u \\ge 0]`:

    .. math::

        u_{t+1} - u_t &= \\beta(u_t - u_{t-1}) - \\eta(1+\\beta)\\, u_t v_t^2\\,
        \\mathbb{1}[u_t \\ge 0], \\\\
        v_{t+1} - v_t &= \\beta(v_t - v_{t-1}) - \\eta(1+\\beta)\\, u_t^2 v_t\\,
        \\mathbb{1}[u_t \\ge 0],

    with zero initial momentum (:math:`u_{-1} = u_0`, :math:`v_{-1} = v_0`). The
    :math:`(1+\\beta)` rescaling matches the maximum stable sharpness of GD and PHB at
    :math:`2/\\eta` (§2.1). This is ``torch.optim.SGD(lr=(1 + beta) * lr,
    momentum=beta)``. With ``switch_to`` set to :math:`\\beta'`, from the first step
    :math:`t` with :math:`u_t^2 < 2/\\eta` (the sharpness of the nearest minimum crosses
    the MSS) on, the momentum is :math:`\\beta'` and the learning rate
    :math:`(1+\\beta')\\eta`, and the last displacement :math:`u_t - u_{t-1}` carries
    over: ``momentum=0.9, switch_to=0`` is §3.1's PHB->GD, ``momentum=0,
    switch_to=0.9`` its GD->PHB. :class:`~lightning_eos.callbacks.OptimizerSwitch` decides
    on the measured :math:`\\lambda_1(H)` instead, which exceeds :math:`u_t^2` while
    :math:`v_t \\ne 0`: on Fig. 3's GD->PHB it switches at step 1123, this rule at 1122.

    Args:
        u0: :math:`u_0`.
        v0: :math:`v_0`.
        lr: :math:`\\eta`, the GD learning rate (PHB uses :math:`(1+\\beta)\\eta`).
        momentum: :math:`\\beta \\in [0, 1)`.
        steps: the number of updates :math:`T`.
        switch_to: :math:`\\beta'`, the momentum after crossing the MSS, or ``None``.

    Example:
        Paper 001, Fig. 3: PHB reduces the sharpness :math:`u^2` about four times as much
        as GD.

        >>> lr = (2 + 0.01) / 10.0**2
        >>> gd = scalar_relu_trajectory(10.0, 1e-6, lr, momentum=0.0, steps=2000)
        >>> phb = scalar_relu_trajectory(10.0, 1e-6, lr, momentum=0.9, steps=2000)
        >>> [round(100 - float(run.minimum_sharpness[-1]), 2) for run in (gd, phb)]
        [1.0, 3.87]
        >>> bool(gd.minimum_sharpness[-1] < 2 / lr)
        True
    """
    if not lr > 0:
        raise ValueError(f"lr={lr}; the learning rate must be positive.")
    if steps < 0:
        raise ValueError(f"steps={steps}; it must be nonnegative.")
    _check_momentum("momentum", momentum)
    if switch_to is not None:
        _check_momentum("switch_to", switch_to)
    u = np.empty(steps + 1, dtype=np.float64)
    v = np.empty(steps + 1, dtype=np.float64)
    ut, vt = float(u0), float(v0)
    u[0], v[0] = ut, vt
    du = dv = 0.0  # u_t - u_{t-1}: zero initial momentum
    beta, switch_step, mss = float(momentum), None, 2.0 / lr
    for t in range(steps):
        if switch_to is not None and switch_step is None and ut * ut < mss:
            beta, switch_step = float(switch_to), t
        step = lr * (1.0 + beta) if ut >= 0 else 0.0  # the dead ReLU has zero gradient
        u_next = ut + beta * du - step * ut * vt * vt
        v_next = vt + beta * dv - step * ut * ut * vt
        du, dv, ut, vt = u_next - ut, v_next - vt, u_next, v_next
        u[t + 1], v[t + 1] = ut, vt
    loss = 0.5 * u**2 * v**2 * (u >= 0)
    return ScalarReLUTrajectory(u=u, v=v, loss=loss, switch_step=switch_step)


@dataclass(frozen=True)
class Theorem2Bound:
    """Paper 001, eq. (3) and Theorem 2, evaluated on a finite trajectory.

    Attributes:
        tau_u: :math:`\\tau_u = \\inf\\{t : u_t^2 < (2-\\epsilon)/\\eta\\}`.
        c_u: :math:`C_u = (u_{\\tau_u} - \\beta u_{\\tau_u - 1}) / (1 - \\beta)`, the momentum
            built up along :math:`-\\nabla S` before the crossing (Hypothesis 1.1).
        c_v: :math:`C_v = \\frac{1+\\beta}{1-\\beta}\\sum_{t \\ge \\tau_u} v_t^2` over the
            given steps, the oscillation prolonged after it (Hypothesis 1.2).
        u_bar: Theorem 2's bound :math:`\\bar u_\\infty = C_u / (1 + \\eta C_v)`.
        u_final: the measured :math:`u_T`.
        delta_sharpness: the measured reduction :math:`\\Delta S = u_0^2 - u_T^2`.
        bound_reduction: the reduction the bound guarantees, :math:`u_0^2 - \\bar
            u_\\infty^2`.
    """

    tau_u: int
    c_u: float
    c_v: float
    u_bar: float
    u_final: float
    delta_sharpness: float
    bound_reduction: float

    @property
    def holds(self) -> bool:
        """Whether :math:`u_T \\le \\bar u_\\infty`."""
        return self.u_final <= self.u_bar

    @property
    def tightness(self) -> float:
        """:math:`(u_0^2 - \\bar u_\\infty^2) / \\Delta S`; 1 is a tight bound (App. D.4).

        NaN when :math:`\\Delta S = 0`.
        """
        if self.delta_sharpness == 0:
            return float("nan")
        return self.bound_reduction / self.delta_sharpness


def theorem2_bound(
    u: ArrayLike, v: ArrayLike, lr: float, momentum: float, eps: float
) -> Theorem2Bound:
    """Theorem 2's upper bound on :math:`u_\\infty` from a GD/PHB trajectory.

    Paper 001, eq. (3):

    .. math::

        \\tau_u = \\inf\\Big\\{t \\ge 0 : u_t^2 < \\frac{2-\\epsilon}{\\eta}\\Big\\}, \\quad
        C_u = \\frac{u_{\\tau_u} - \\beta u_{\\tau_u-1}}{1-\\beta}, \\quad
        C_v = \\frac{1+\\beta}{1-\\beta}\\sum_{t=\\tau_u}^{\\infty} v_t^2,

    and Theorem 2: if :math:`\\inf_t u_t \\ge 0` and :math:`\\epsilon, |v_0| < 1`, then
    :math:`u_\\infty \\le \\bar u_\\infty = C_u / (1 + \\eta C_v)`. The sum in
    :math:`C_v` runs over the given steps only (it converges fast once :math:`v_t`
    decays), and :math:`u_{-1} = u_0` if :math:`\\tau_u = 0`. App. D.4 finds
    :math:`u_0^2 - \\bar u_\\infty^2` a tight lower bound on
    :math:`\\Delta S = u_0^2 - u_T^2`.

    Args:
        u: :math:`u_0, \\dots, u_T` (e.g. :attr:`ScalarReLUTrajectory.u`).
        v: :math:`v_0, \\dots, v_T`.
        lr: :math:`\\eta`, the GD learning rate of the run (PHB used :math:`(1+\\beta)\\eta`).
        momentum: :math:`\\beta \\in [0, 1)` of the run.
        eps: :math:`\\epsilon \\in (0, 1)`, as in :math:`u_0^2 = (2+\\epsilon)/\\eta`.

    Raises:
        ValueError: if :math:`u_t^2` never falls below :math:`(2-\\epsilon)/\\eta`
            (:math:`\\tau_u` undefined: run more steps), or a hypothesis of Theorem 2
            fails (:math:`\\inf_t u_t < 0`, :math:`|v_0| \\ge 1`, :math:`\\epsilon`
            outside :math:`(0, 1)`).

    Example:
        >>> lr, eps = (2 + 0.01) / 10.0**2, 0.01
        >>> run = scalar_relu_trajectory(10.0, 1e-6, lr, momentum=0.9, steps=2000)
        >>> b = theorem2_bound(run.u, run.v, lr, momentum=0.9, eps=eps)
        >>> b.holds, round(b.delta_sharpness, 2), round(b.bound_reduction, 2)
        (True, 3.87, 3.86)
    """
    u, v = _float64(u).reshape(-1), _float64(v).reshape(-1)
    if u.shape != v.shape or u.size == 0:
        raise ValueError(f"u and v must be nonempty and of one length, got {u.size} and {v.size}.")
    if not lr > 0:
        raise ValueError(f"lr={lr}; the learning rate must be positive.")
    _check_momentum("momentum", momentum)
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps={eps}; Theorem 2 needs 0 < eps < 1.")
    if not abs(v[0]) < 1.0:
        raise ValueError(f"|v_0| = {abs(v[0])}; Theorem 2 needs |v_0| < 1.")
    if u.min() < 0:
        raise ValueError(
            f"inf u_t = {u.min():.3g} < 0: the ReLU died, so Theorem 2's hypothesis fails "
            "(Lemma 6 gives u_inf in closed form instead)."
        )
    crossed = np.flatnonzero(u**2 < (2.0 - eps) / lr)
    if crossed.size == 0:
        raise ValueError(
            f"u_t^2 never fell below (2 - eps)/lr = {(2.0 - eps) / lr:.6g} in {u.size - 1} "
            "steps, so tau_u is undefined; run more steps (or check lr and eps)."
        )
    tau = int(crossed[0])
    beta = float(momentum)
    u_prev = u[tau - 1] if tau > 0 else u[0]
    c_u = (u[tau] - beta * u_prev) / (1.0 - beta)
    c_v = (1.0 + beta) / (1.0 - beta) * float(np.sum(v[tau:] ** 2))
    u_bar = c_u / (1.0 + lr * c_v)
    return Theorem2Bound(
        tau_u=tau,
        c_u=float(c_u),
        c_v=c_v,
        u_bar=float(u_bar),
        u_final=float(u[-1]),
        delta_sharpness=float(u[0] ** 2 - u[-1] ** 2),
        bound_reduction=float(u[0] ** 2 - u_bar**2),
    )


def _regression_problem(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x, y = _float64(x), _float64(y).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x must be (n, d) and y (n,), got {x.shape} and {y.shape}.")
    return x, y


def min_l2_solution(x: ArrayLike, y: ArrayLike) -> np.ndarray:
    """The minimum :math:`\\ell_2`-norm least-squares solution :math:`X^+ \\mathbf{y}`.

    For :math:`n < d` and :math:`X` of full row rank it interpolates
    (:math:`X\\mathbf{w} = \\mathbf{y}`); it is the "ℓ2 baseline" of paper 001, Fig. 1,
    the limit of the LDN's gradient flow as :math:`\\alpha \\to \\infty` (App. A).

    Args:
        x: inputs :math:`X`, ``(n, d)``.
        y: targets, ``(n,)``.

    Example:
        >>> import numpy as np
        >>> min_l2_solution([[1.0, 1.0]], [2.0])
        array([1., 1.])
    """
    x, y = _regression_problem(x, y)
    return np.linalg.lstsq(x, y, rcond=None)[0]


def min_l1_solution(x: ArrayLike, y: ArrayLike) -> np.ndarray:
    """The minimum :math:`\\ell_1`-norm interpolator (basis pursuit).

    .. math::

        \\min_{\\mathbf{w}} \\lVert \\mathbf{w} \\rVert_1 \\ \\text{s.t.}\\ X\\mathbf{w} =
        \\mathbf{y} \\quad = \\quad \\min_{\\mathbf{p}, \\mathbf{q} \\ge 0}
        \\mathbf{1}^\\top(\\mathbf{p} + \\mathbf{q}) \\ \\text{s.t.}\\
        X(\\mathbf{p} - \\mathbf{q}) = \\mathbf{y},

    solved as a linear program by ``scipy.optimize.linprog`` (HiGHS), with
    :math:`\\mathbf{w} = \\mathbf{p} - \\mathbf{q}`. It is the "ℓ1 baseline" of paper
    001, Fig. 1, the limit of the LDN's gradient flow as :math:`\\alpha \\to 0`
    (Woodworth et al.; App. A); on App. B's data it recovers the sparse
    :math:`\\mathbf{w}_*`.

    Args:
        x: inputs :math:`X`, ``(n, d)``.
        y: targets, ``(n,)``; :math:`X\\mathbf{w} = \\mathbf{y}` must be feasible.

    Raises:
        ValueError: if no :math:`\\mathbf{w}` interpolates the data.

    Example:
        >>> min_l1_solution([[1.0, 2.0]], [2.0])  # the sparse vertex, not (0.4, 0.8)
        array([0., 1.])
    """
    x, y = _regression_problem(x, y)
    d = x.shape[1]
    result = linprog(
        c=np.ones(2 * d),
        A_eq=np.hstack([x, -x]),
        b_eq=y,
        bounds=(0, None),
        method="highs",
    )
    if result.status != 0:
        raise ValueError(f"basis pursuit failed: {result.message} (is Xw = y feasible?)")
    return result.x[:d] - result.x[d:]


def regression_test_loss(w: ArrayLike, x: ArrayLike, y: ArrayLike) -> float:
    """Half the mean squared error of the linear predictor :math:`\\mathbf{w}`.

    .. math:: \\frac{1}{2n}\\sum_{i=1}^n (\\langle \\mathbf{w}, \\mathbf{x}_i \\rangle - y_i)^2,

    the half-MSE of :class:`~lightning_eos.models.DiagonalLinearNetwork` with weights
    :math:`\\mathbf{w}`.

    Example:
        >>> regression_test_loss([1.0, 0.0], [[1.0, 1.0], [2.0, 0.0]], [1.0, 0.0])
        1.0
    """
    x, y = _regression_problem(x, y)
    w = _float64(w).reshape(-1)
    return float(0.5 * np.mean((x @ w - y) ** 2))
