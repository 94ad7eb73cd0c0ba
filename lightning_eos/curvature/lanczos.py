"""Lanczos for the largest algebraic eigenpairs of a symmetric operator, in plain torch.

After :math:`m` steps from a unit vector :math:`q_1`, Lanczos has an orthonormal basis
:math:`Q_m` of the Krylov space :math:`\\mathcal K_m(A, q_1)` and a tridiagonal
:math:`T_m = Q_m^\\top A Q_m` with :math:`A Q_m = Q_m T_m + \\beta_{m+1} q_{m+1} e_m^\\top`.
An eigenpair :math:`T_m s = \\theta s` gives the Ritz pair :math:`(\\theta, y = Q_m s)`
whose residual is known without another product:

.. math::

    \\lVert A y - \\theta y \\rVert = \\beta_{m+1} \\lvert s_m \\rvert .

Some eigenvalue lies within the residual of :math:`\\theta` (Bauer-Fike for a symmetric
matrix), and within :math:`r^2/\\delta` when the rest of the spectrum is at distance
:math:`\\delta` (Kato-Temple). Since :math:`\\theta_1` is a Rayleigh quotient,
:math:`\\theta_1 \\le \\lambda_1` always.

Stop rules (the estimate is compared with ``tol`` :math:`|\\theta|` for each of the top
``k``; the rule never stops on the change of the estimate between steps):

* ``"residual"`` (default): the residual :math:`r` itself. It is a rigorous bound, reported
  as :attr:`LanczosResult.error_bounds`: an eigenvalue lies within it. Requiring it small
  also keeps Lanczos going until the Ritz vector is accurate, which lets an eigenvalue above
  :math:`\\theta_1` that the start vector barely contained grow into view.
* ``"gap"``: the sharper estimate :math:`\\min(r, r^2/\\delta)`, with :math:`\\delta` the
  distance from :math:`\\theta` to the nearest interval :math:`[\\theta_j - r_j, \\theta_j +
  r_j]` of another Ritz value (in the first two steps :math:`r` alone). It is not a bound:
  an eigenvalue near the top that Lanczos has not resolved yet makes :math:`\\delta` too
  large, and a Ritz value that converged to :math:`\\lambda_2` is then accepted.

On small networks whose top two eigenvalues lie 1-10% apart
(``benchmarks/lambda1_reliability.py``, against dense ``eigvalsh``), ``"gap"`` reported
:math:`\\lambda_2` in 2.1% of 240 warm-started and 5.5% of 2,400 cold measurements;
``"residual"`` in none of the warm ones and 0.25% of the cold ones (0.04% at ``tol / 10``),
for 25-45% more products.

No Krylov method can certify that nothing lies above :math:`\\theta_1` without looking at
the whole space; the residual rule makes missing it rare, and the error bound says how far
the nearest eigenvalue is.

From one start vector, Lanczos sees one direction per eigenspace: an exactly repeated
eigenvalue (e.g. a linear model with several MSE outputs) is reported once.

Full reorthogonalization (classical Gram-Schmidt, twice) keeps :math:`Q_m` orthonormal,
so no ghost copies of converged eigenvalues appear. The ordering is by algebraic value:
a large negative eigenvalue is never reported as the top one.

Warm start: ``init`` holds earlier (weighted) Ritz vectors; the start vector is their
normalized sum. Pass ``restart_vectors`` of the previous result. They hold the top ``k``
Ritz vectors with weight 1 and up to ``restart_extra`` more, weighted by how close their
Ritz value is to the ``k``-th: :math:`w_i = \\max(0, 1 - (\\theta_k - \\theta_i) /
(\\omega |\\theta_k|))` with ``restart_window`` :math:`\\omega`. Only near-degenerate
directions can overtake the top ones between two measurements (at the edge of stability
the top eigenvalues cluster and cross), and a start vector without them converges to
the *previous* top eigenvalue. Directions far below the top are left out, because they
only dilute a good start vector and cost extra products. A random
start uses the given ``generator`` (a CPU generator), never the global RNG.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_eos.curvature.hessian import NonFiniteCurvatureError

MatVec = Callable[[Tensor], Tensor]
StopRule = Literal["gap", "residual"]


@dataclass
class LanczosResult:
    """Top-k Ritz pairs, in descending order of eigenvalue.

    Attributes:
        eigenvalues: ``(k,)`` Ritz values, largest first.
        eigenvectors: ``(k, n)`` unit Ritz vectors, row ``i`` for ``eigenvalues[i]``.
        residuals: ``(k,)`` residual norms :math:`\\lVert Ay - \\theta y\\rVert`.
        error_estimates: ``(k,)`` the stop rule's estimate of :math:`|\\lambda - \\theta|`.
        error_bounds: ``(k,)`` rigorous bounds: an eigenvalue of the operator lies within
            ``error_bounds[i]`` of ``eigenvalues[i]`` (the residual, plus the rounding of
            the recurrence).
        num_iterations: Lanczos steps taken, which is the number of matvecs.
        converged: whether every estimate met ``tol * |theta|``.
        restart_vectors: ``(j, n)`` weighted Ritz vectors to warm-start the next call
            with ``init`` (see the module docstring).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    error_estimates: Tensor
    error_bounds: Tensor
    num_iterations: int
    converged: bool
    restart_vectors: Tensor

    @property
    def error_bound(self) -> float:
        """The rigorous error bound of the top eigenvalue (see :attr:`error_bounds`)."""
        return float(self.error_bounds[0])


def _orthogonalize(w: Tensor, basis: Tensor) -> Tensor:
    for _ in range(2):  # "twice is enough" (Kahan, Parlett)
        w = w - basis.T @ (basis @ w)
    return w


def _random_unit(n: int, generator: torch.Generator, like: Tensor) -> Tensor:
    v = torch.randn(n, generator=generator, dtype=torch.float64)
    return (v / v.norm()).to(dtype=like.dtype, device=like.device)


def lanczos(
    operator: MatVec | Tensor,
    k: int = 1,
    *,
    dim: int | None = None,
    init: Tensor | None = None,
    tol: float = 1e-4,
    max_iter: int = 100,
    restart_extra: int = 2,
    restart_window: float = 0.1,
    stop_rule: StopRule = "residual",
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    agree: Callable[[Tensor], Tensor] | None = None,
) -> LanczosResult:
    """Largest-algebraic ``k`` eigenpairs of a symmetric operator.

    Args:
        operator: a symmetric matrix, or a callable ``v -> A v`` on flat vectors.
        k: how many eigenpairs to return.
        dim: the operator's side; taken from the matrix, ``init`` or ``operator.dim``.
        init: warm start, ``(n,)`` or ``(j, n)`` earlier eigenvectors.
        tol: stop when every top-``k`` error estimate is at most ``tol * |theta|``.
        max_iter: at most this many matvecs.
        restart_extra: at most this many Ritz vectors beyond the top ``k`` go into
            ``restart_vectors``, to guard the next warm start against eigenvalue
            crossings.
        restart_window: relative distance below the ``k``-th Ritz value within which the
            extra Ritz vectors get a positive weight.
        stop_rule: ``"residual"`` (the rigorous :math:`r`) or ``"gap"`` (the estimate
            :math:`\\min(r, r^2/\\delta)`); see the module docstring.
        agree: for several processes running the same Lanczos on all-reduced products:
            maps a small tensor to one process's value of it on every process (a
            broadcast from rank 0). The stop and breakdown decisions go through it, so all
            processes take the same number of steps even if their floating point differs.
        generator: CPU generator for the random start (default: seeded with 0).
        dtype: working dtype of the basis (default: the matrix's or ``operator.dtype``,
            else ``init``'s, else float32).
        device: working device (same defaults as ``dtype``).

    Returns:
        A :class:`LanczosResult`.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> a = torch.randn(50, 50, generator=g, dtype=torch.float64)
        >>> a = a + a.T
        >>> res = lanczos(a, k=3, tol=1e-10)
        >>> torch.allclose(res.eigenvalues, torch.linalg.eigvalsh(a).flip(0)[:3])
        True
    """
    if isinstance(operator, Tensor):
        matrix = operator
        matvec: MatVec = lambda v: matrix @ v  # noqa: E731
        dim = matrix.shape[0] if dim is None else dim
        dtype, device = dtype or matrix.dtype, device or matrix.device
    else:
        matvec = operator
        dim = dim if dim is not None else getattr(operator, "dim", None)
        dtype = dtype or getattr(operator, "dtype", None)
        device = device or getattr(operator, "device", None)
    if init is not None:  # a warm start saved on another device (resume) follows the operator
        dtype, device = dtype or init.dtype, device or init.device
    if dim is None and init is not None:
        dim = init.shape[-1]
    if dim is None:
        raise ValueError("Cannot infer the operator's dimension; pass `dim`.")
    if stop_rule not in ("gap", "residual"):
        raise ValueError(f"stop_rule={stop_rule!r}; choose 'gap' or 'residual'.")
    if not 1 <= k <= dim:
        raise ValueError(f"k={k} must be between 1 and the dimension {dim}.")
    dtype, device = dtype or torch.float32, torch.device(device or "cpu")
    max_iter = min(max(max_iter, k), dim)
    generator = generator or torch.Generator().manual_seed(0)
    like = torch.empty(0, dtype=dtype, device=device)

    start = None
    if init is not None:
        if init.shape[-1] != dim:
            raise ValueError(
                f"The warm start has vectors of length {init.shape[-1]}, the operator's side "
                f"is {dim}; pass init=None to start cold."
            )
        start = init.reshape(-1, dim).to(dtype=dtype, device=device).sum(0)
        norm = start.norm()
        start = start / norm if torch.isfinite(norm) and norm > 0 else None
    q = start if start is not None else _random_unit(dim, generator, like)

    basis = torch.empty(min(max_iter, 16), dim, dtype=dtype, device=device)
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples q_j and q_{j+1}
    for m in range(1, max_iter + 1):
        if m > basis.shape[0]:
            grown = torch.empty(min(2 * basis.shape[0], max_iter), dim, dtype=dtype, device=device)
            grown[: m - 1] = basis[: m - 1]
            basis = grown
        basis[m - 1] = q
        w = matvec(q).to(dtype=dtype, device=device)
        if not torch.isfinite(w).all():
            raise NonFiniteCurvatureError("The operator returned a non-finite product.")
        alpha = float(q @ w)
        alphas.append(alpha)
        w = _orthogonalize(w, basis[:m])
        beta = float(w.norm())

        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        theta, s = torch.linalg.eigh(t)
        theta, s = theta.flip(0), s.flip(1)  # descending
        residuals = beta * s[-1].abs()
        if m >= 3 and stop_rule == "gap":
            # Distance to the intervals where the other Ritz values' eigenvalues may lie.
            # With two steps the second Ritz value lumps the whole rest of the spectrum
            # together and overstates the gap, so the quadratic bound waits for a third.
            gaps = (theta[:, None] - theta[None, :]).abs() - residuals[None, :]
            gaps.fill_diagonal_(float("inf"))
            gap = gaps.min(1).values.clamp_min(0.0)
            quadratic = torch.where(residuals > 0, residuals**2 / gap, torch.zeros_like(gap))
            errors = torch.minimum(residuals, quadratic)
        else:
            errors = residuals.clone()
        scale = theta.abs().clamp_min(torch.finfo(dtype).eps * max(theta.abs().max().item(), 1e-30))
        done = m >= k and bool((errors[:k] <= tol * scale[:k]).all())
        breakdown = beta <= 10 * torch.finfo(dtype).eps * max(abs(a) for a in alphas)
        if agree is not None:
            decision = agree(torch.tensor([float(done), float(breakdown)], device=device))
            done, breakdown = bool(decision[0]), bool(decision[1])
        if done or m == max_iter:
            break
        if breakdown:  # invariant subspace: continue in a fresh orthogonal direction
            q = _orthogonalize(_random_unit(dim, generator, like), basis[:m])
            q = q / q.norm()
            betas.append(0.0)
        else:
            q = w / beta
            betas.append(beta)

    top = min(k, m)
    ritz = s[:, : min(k + restart_extra, m)].T.to(dtype=dtype, device=device) @ basis[:m]
    kth = theta[top - 1]
    closeness = (theta[top : ritz.shape[0]] - kth) / (restart_window * kth.abs()) + 1.0
    weights = torch.cat([torch.ones(top, dtype=torch.float64), closeness.clamp(0.0, 1.0)])
    keep = weights > 0
    restart = ritz[keep] * weights[keep].to(dtype=dtype, device=device)[:, None]
    # the recurrence A Q = Q T + beta q e^T holds to about m * eps * |A| in floating point
    rounding = m * torch.finfo(dtype).eps * theta.abs().max()
    return LanczosResult(
        eigenvalues=theta[:top].to(dtype=dtype, device=device),
        eigenvectors=ritz[:top],
        residuals=residuals[:top],
        error_estimates=errors[:top],
        error_bounds=residuals[:top] + rounding,
        num_iterations=m,
        converged=done,
        restart_vectors=restart,
    )
