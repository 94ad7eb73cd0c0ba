"""Paper 001's toy networks: the linear diagonal network and the scalar ReLU network.

Both are plain :class:`torch.nn.Module` s whose parameters are ordinary tensors, so they
work in float64, under ``torch.func.functional_call`` and with double backward (the
Hessian code of :mod:`lightning_eos.curvature`). With the half-MSE loss
(:func:`~lightning_eos.models.task.half_mse_loss`) and the data of
:mod:`lightning_eos.data.synthetic` they give the paper's losses exactly:

* :class:`DiagonalLinearNetwork` on sparse regression (paper 001, §2.1, eq. 2, App. B),
  and with ``dim=1`` on the single point :math:`(x, y) = (1, 1)` the LDN loss
  :math:`\\tfrac12(u^2 - v^2 - 1)^2` (App. E.2, E.5--E.6);
* :class:`ScalarReLUNetwork` on :math:`(x, y) = (1, 0)`: the loss
  :math:`\\tfrac12 u^2 v^2 \\mathbb{1}[u \\ge 0]` of §3.1 (Theorem 2, App. D).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["DiagonalLinearNetwork", "ScalarReLUNetwork"]


DType = Literal["float32", "float64"]


def _dtype(name: DType) -> torch.dtype:
    """The parameters' dtype.

    Build float64 toys with ``dtype="float64"``, not ``.double()``, which would keep the
    float32 rounding of the initial values (1e-6 is not exact in float32).
    """
    if name not in ("float32", "float64"):
        raise ValueError(f"dtype={name!r}; choose 'float32' or 'float64'.")
    return torch.float64 if name == "float64" else torch.float32


class DiagonalLinearNetwork(nn.Module):
    """Depth-2 linear diagonal network (LDN), paper 001, eq. (2).

    .. math::

        f(\\mathbf{x}; \\mathbf{u}, \\mathbf{v}) = \\langle \\mathbf{u} \\odot \\mathbf{u}
        - \\mathbf{v} \\odot \\mathbf{v}, \\mathbf{x} \\rangle,
        \\qquad \\mathbf{w} := \\mathbf{u} \\odot \\mathbf{u} - \\mathbf{v} \\odot \\mathbf{v},

    initialized at :math:`\\mathbf{u}_0 = \\mathbf{v}_0 = \\alpha \\mathbf{1}`, so
    :math:`\\mathbf{w}_0 = 0` (App. B; small :math:`\\alpha` biases gradient flow to the
    minimum :math:`\\ell_1` solution, large :math:`\\alpha` to the minimum :math:`\\ell_2`
    one). With the half-MSE loss :math:`L = \\frac{1}{2n}\\sum_i (f(\\mathbf{x}_i) - y_i)^2`,
    residuals :math:`r_i`, :math:`G = X^\\top X / n` and :math:`\\mathbf{g} = X^\\top
    \\mathbf{r} / n`, the Hessian over :math:`(\\mathbf{u}, \\mathbf{v})` is

    .. math::

        \\nabla^2 L = J G J^\\top + \\begin{bmatrix} 2\\operatorname{diag}(\\mathbf{g}) & 0 \\\\
        0 & -2\\operatorname{diag}(\\mathbf{g}) \\end{bmatrix}, \\qquad
        J = \\begin{bmatrix} 2\\operatorname{diag}(\\mathbf{u}) \\\\
        -2\\operatorname{diag}(\\mathbf{v}) \\end{bmatrix}.

    For ``dim=1`` and :math:`(x, y) = (1, 1)` this is App. E.6, eq. (17).

    Args:
        dim: input dimension :math:`d` (100 in App. B).
        alpha: initialization scale :math:`\\alpha` of both ``u`` and ``v``.
        u0: if given, every coordinate of ``u`` starts here instead of at ``alpha``.
        v0: if given, every coordinate of ``v`` starts here instead of at ``alpha``.
        dtype: ``"float32"`` or ``"float64"`` (exact float64 initial values).

    Example:
        The LDN loss :math:`\\tfrac12(u^2-v^2-1)^2` and its Hessian, eq. (17):

        >>> import torch
        >>> from torch.func import functional_call
        >>> net = DiagonalLinearNetwork(dim=1, u0=1.5, v0=0.5).double()
        >>> x, y = torch.ones(1, 1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
        >>> def loss(u, v):
        ...     out = functional_call(net, {"u": u, "v": v}, (x,))
        ...     return 0.5 * ((out - y) ** 2).mean()
        >>> H = torch.autograd.functional.hessian(loss, (net.u.detach(), net.v.detach()))
        >>> H = torch.cat([torch.cat(row, dim=1) for row in H])
        >>> u, v = 1.5, 0.5
        >>> eq17 = [[6 * u**2 - 2 * v**2 - 2, -4 * u * v], [-4 * u * v, 6 * v**2 - 2 * u**2 + 2]]
        >>> torch.allclose(H, torch.tensor(eq17, dtype=torch.float64))
        True
        >>> net.weights()
        tensor([2.], dtype=torch.float64)
    """

    def __init__(
        self,
        dim: int = 100,
        alpha: float = 0.1,
        u0: float | None = None,
        v0: float | None = None,
        dtype: DType = "float32",
    ) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim={dim}; the network needs at least one input dimension.")
        self.dim = dim
        kind = _dtype(dtype)
        self.u = nn.Parameter(torch.full((dim,), float(alpha if u0 is None else u0), dtype=kind))
        self.v = nn.Parameter(torch.full((dim,), float(alpha if v0 is None else v0), dtype=kind))

    def weights(self) -> Tensor:
        """The linear coefficients :math:`\\mathbf{w}` (eq. 2), detached."""
        return (self.u * self.u - self.v * self.v).detach()

    def forward(self, x: Tensor) -> Tensor:
        """:math:`\\langle \\mathbf{w}, \\mathbf{x}_i\\rangle` for ``(n, dim)`` inputs: ``(n,)``."""
        x = x.flatten(1)
        if x.shape[-1] != self.dim:
            raise ValueError(f"inputs have {x.shape[-1]} features; the network has dim={self.dim}.")
        return x @ (self.u * self.u - self.v * self.v)


class ScalarReLUNetwork(nn.Module):
    """The scalar ReLU network :math:`f(x) = v\\,\\mathrm{relu}(u x)` of paper 001, §3.1.

    On the single point :math:`(x, y) = (1, 0)` the half-MSE loss is

    .. math::

        L(u, v) = \\tfrac12 u^2 v^2 \\mathbb{1}[u \\ge 0], \\qquad
        \\nabla^2 L = \\begin{bmatrix} v^2 & 2uv \\\\ 2uv & u^2 \\end{bmatrix}
        \\ (u > 0), \\qquad \\nabla^2 L = 0 \\ (u < 0).

    Its minima with :math:`u > 0` are the line :math:`v = 0`, where the sharpness is
    :math:`u^2` (along :math:`v`): gradient descent with learning rate :math:`\\eta` is
    stable there only while :math:`u^2 < 2/\\eta`. §3.1 starts at
    :math:`u_0^2 = (2+\\epsilon)/\\eta`, just above that edge, with a tiny :math:`v_0`;
    :func:`lightning_eos.analysis.scalar_relu_trajectory` is the reference trajectory.
    ``u`` and ``v`` are parameters of shape ``(1,)``.

    Args:
        u0: initial :math:`u` (10 in paper 001, Fig. 3).
        v0: initial :math:`v` (:math:`10^{-6}` in Fig. 3).
        dtype: ``"float32"`` or ``"float64"`` (exact float64 initial values).

    Example:
        >>> import torch
        >>> from torch.func import functional_call
        >>> net = ScalarReLUNetwork(u0=3.0, v0=0.5).double()
        >>> x = torch.ones(1, 1, dtype=torch.float64)
        >>> def loss(u, v):
        ...     return 0.5 * (functional_call(net, {"u": u, "v": v}, (x,)) ** 2).mean()
        >>> loss(net.u, net.v).item()  # u^2 v^2 / 2
        1.125
        >>> H = torch.autograd.functional.hessian(loss, (net.u.detach(), net.v.detach()))
        >>> H = torch.cat([torch.cat(row, dim=1) for row in H])
        >>> torch.allclose(H, torch.tensor([[0.25, 3.0], [3.0, 9.0]], dtype=torch.float64))
        True
    """

    def __init__(self, u0: float = 10.0, v0: float = 1e-6, dtype: DType = "float32") -> None:
        super().__init__()
        self.u = nn.Parameter(torch.tensor([float(u0)], dtype=_dtype(dtype)))
        self.v = nn.Parameter(torch.tensor([float(v0)], dtype=_dtype(dtype)))

    def forward(self, x: Tensor) -> Tensor:
        """:math:`v\\,\\mathrm{relu}(u x_i)` of inputs ``(n,)`` or ``(n, 1)``, shape ``(n,)``."""
        x = x.reshape(x.shape[0], -1)
        if x.shape[-1] != 1:
            raise ValueError(f"inputs have {x.shape[-1]} features; the scalar network takes 1.")
        return self.v * torch.relu(self.u * x[:, 0])
