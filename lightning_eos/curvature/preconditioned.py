"""The preconditioned Hessian :math:`P^{-1/2}(H + \\mathrm{diag}(s))P^{-1/2}` as a symmetric matvec.

Paper 002, §2: for a diagonal preconditioner :math:`P`, :math:`P^{-1/2}HP^{-1/2}` and
:math:`P^{-1}H` are similar, so the symmetric form has the eigenvalues of
:math:`P^{-1}H` (the preconditioned sharpness is :math:`\\lambda_1`) and Lanczos applies.
An eigenvector :math:`u` of the symmetric form gives :math:`P^{-1/2}u` for
:math:`P^{-1}H`. The optional shift :math:`s` adds coupled (L2) weight decay to
:math:`H`. Entries with :math:`P = \\infty` (parameters the optimizer does not move)
have zero rows and columns.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["PreconditionedOperator"]


class PreconditionedOperator:
    """:math:`v \\mapsto D(H + \\mathrm{diag}(s))Dv` with :math:`D = P^{-1/2}`.

    Args:
        hessian: the symmetric operator :math:`H` (a callable on flat vectors with
            ``dim``, ``dtype`` and ``device``, e.g. :class:`HessianOperator`).
        diagonal: :math:`P` as a flat vector, positive (``inf`` allowed).
        shift: :math:`s` as a flat vector, or ``None``.

    Example:
        >>> h = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> p = torch.tensor([4.0, 0.5], dtype=torch.float64)
        >>> op = PreconditionedOperator(lambda v: h @ v, p)
        >>> dense = torch.stack([op(e) for e in torch.eye(2, dtype=torch.float64)], 1)
        >>> ref = torch.linalg.eigvals(torch.diag(1 / p) @ h).real.sort().values
        >>> torch.allclose(torch.linalg.eigvalsh(dense), ref)
        True
    """

    def __init__(self, hessian: Any, diagonal: Tensor, shift: Tensor | None = None) -> None:
        diagonal = diagonal.detach().to(torch.float64)
        if not bool((diagonal > 0).all()):
            raise ValueError("The preconditioner must be positive (inf allowed, not NaN).")
        self.hessian = hessian
        self.dtype = getattr(hessian, "dtype", diagonal.dtype)
        self.device = getattr(hessian, "device", diagonal.device)
        self.dim = getattr(hessian, "dim", diagonal.numel())
        if diagonal.numel() != self.dim:
            raise ValueError(f"The preconditioner has {diagonal.numel()} entries, not {self.dim}.")
        self.scale = diagonal.rsqrt().to(dtype=self.dtype, device=self.device)  # inf -> 0
        self.shift = None
        if shift is not None:
            self.shift = (shift.detach().to(torch.float64) / diagonal).to(
                dtype=self.dtype, device=self.device
            )

    def __call__(self, v: Tensor) -> Tensor:
        out = self.scale * self.hessian(self.scale * v)
        return out if self.shift is None else out + self.shift * v

    matvec = __call__
