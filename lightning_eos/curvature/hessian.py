"""Hessian-vector products of the mean training loss over a fixed measurement set.

The measurement set is a list of chunks (batches) with sample counts :math:`n_c`,
:math:`N = \\sum_c n_c`. If ``loss_fn`` returns the *mean* loss :math:`L_c` of a chunk,
the mean loss over the set and its Hessian are

.. math::

    L(\\theta) = \\sum_c \\frac{n_c}{N} L_c(\\theta), \\qquad
    H v = \\sum_c \\frac{n_c}{N} \\nabla^2 L_c(\\theta)\\, v ,

so a short last chunk gets its true weight instead of a full chunk's. Only one chunk's
graph lives at a time, so memory is bounded by one chunk. Every evaluation of chunk
:math:`c` replays the same random streams (torch, ``random`` and NumPy seeded with
``seed + c`` inside a forked RNG),
so randomness drawn in ``forward`` (functional or attention dropout) is the same in every
product and Lanczos sees one matrix; the caller's RNG state is left untouched.
Parameters the loss does not use have zero rows and columns. When the whole set is one
chunk, the first-order graph :math:`\\nabla L` is built once and every product is one
extra backward pass through it (``reuse_graph``).

Several processes (DDP): with a ``reduce`` hook that sums a tensor over processes, each
process holds its own chunks, the sample count :math:`N` is summed once, and every
product, gradient and loss is the sum of the local weighted terms, so uneven shards stay
exact. A non-finite value on one process turns its local term into NaNs instead of
raising, so the reduced result is NaN on every process and all of them raise
:class:`NonFiniteCurvatureError` together, after the same collective (no deadlock). Any
other error travels as a flag in that collective and is raised on every process too.

Three ways to compute :math:`Hv`:

* ``"double_backward"`` (reverse-over-reverse): :math:`\\nabla_\\theta (\\nabla L \\cdot v)`;
  works for every model with twice-differentiable ops.
* ``"forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad``. Some models
  make it raise (torch 2.14 with tanh + MSE: "ZeroTensors are immutable"); the operator
  then warns once and falls back to double backward for good.
* ``"finite_difference"``: the central difference
  :math:`(\\nabla L(\\theta+\\varepsilon v) - \\nabla L(\\theta-\\varepsilon v))/2\\varepsilon`,
  along the unit vector :math:`v/\\lVert v\\rVert` (scaled back afterwards), with
  two first-order gradients and no second-order graph, for sharded parameters (FSDP)
  and kernels without double backward. Its error is :math:`O(\\varepsilon^2)` from the
  third derivative plus :math:`O(u/\\varepsilon)` from rounding (:math:`u` the unit
  roundoff); the default :math:`\\varepsilon` is :math:`u^{1/3}` times
  :math:`\\max(1, \\lVert\\theta\\rVert/\\sqrt{n})`. The parameters are restored
  bit for bit afterwards.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_eos.curvature._batches import batch_size
from lightning_eos.curvature.context import preserved_rng, seed_all

LossFn = Callable[[nn.Module, Any], Tensor]
HVPMethod = Literal["double_backward", "forward_over_reverse", "finite_difference"]
Reduce = Callable[[Tensor], Tensor]


class NonFiniteCurvatureError(FloatingPointError):
    """A loss, gradient or Hessian-vector product in a measurement was NaN or infinite."""


class FailedOnAnotherProcessError(RuntimeError):
    """Raised on the other processes when a measurement fails on one of them (see its error)."""


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into views shaped like ``like``."""
    return [
        v.view_as(t) for v, t in zip(vector.split([t.numel() for t in like]), like, strict=True)
    ]


class _LossModule(nn.Module):
    """Holds ``model`` as a submodule so ``functional_call`` can swap its parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)

    def keys(self, params: Sequence[Tensor]) -> list[str]:
        """The ``functional_call`` names of ``params`` (parameters of ``model``)."""
        names = {id(p): n for n, p in self.named_parameters()}
        return [names[id(p)] for p in params]


class HessianOperator:
    """The Hessian of the mean loss over fixed chunks, as a symmetric matvec on flat vectors.

    Args:
        model: the module whose parameters are differentiated.
        loss_fn: ``loss_fn(model, chunk)`` returns the mean loss of the chunk (a scalar).
        chunks: the measurement set, already split into chunks.
        params: the parameters to differentiate; default: all with ``requires_grad``.
        method: how to compute the product (see the module docstring).
        reuse_graph: build :math:`\\nabla L` once and reuse it for every product. Default:
            when there is exactly one chunk.
        prepare_chunk: applied to each chunk before ``loss_fn`` (e.g. a device move).
        num_samples_fn: the number of samples of a chunk (default: leading dimension of
            its first tensor).
        seed: seed of the random stream replayed for each chunk.
        reduce: sums a tensor over processes (e.g. an all-reduce); every process must
            build the operator and call each method the same number of times. ``chunks``
            may be empty on a process then.
        fd_eps: the finite-difference step (default: see the module docstring).

    The loss is evaluated in float32 semantics with autocast disabled, whatever the
    ambient precision context, and with scaled-dot-product attention on its math kernel
    (the fused kernels have no double backward).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        >>> x, y = torch.randn(7, 3).double(), torch.randn(7, 1).double()
        >>> mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
        >>> chunks = [(x[:4], y[:4]), (x[4:], y[4:])]  # uneven chunks
        >>> op = HessianOperator(model, mse, chunks)
        >>> params = tuple(model.parameters())
        >>> def full_loss(*p):
        ...     names = [n for n, _ in model.named_parameters()]
        ...     out = torch.func.functional_call(model, dict(zip(names, p)), (x,))
        ...     return ((out - y) ** 2).mean()
        >>> blocks = torch.autograd.functional.hessian(full_loss, params)
        >>> dense = torch.cat([torch.cat([b.reshape(p.numel(), q.numel())
        ...     for b, q in zip(row, params)], 1) for row, p in zip(blocks, params)])
        >>> v = torch.randn(op.dim, dtype=torch.float64)
        >>> torch.allclose(op.matvec(v), dense @ v)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        chunks: Sequence[Any],
        *,
        params: Sequence[Tensor] | None = None,
        method: HVPMethod = "double_backward",
        reuse_graph: bool | None = None,
        prepare_chunk: Callable[[Any], Any] | None = None,
        num_samples_fn: Callable[[Any], int] = batch_size,
        seed: int = 0,
        reduce: Reduce | None = None,
        fd_eps: float | None = None,
    ) -> None:
        if not chunks and reduce is None:
            raise ValueError("The measurement set has no chunks.")
        if method not in ("double_backward", "forward_over_reverse", "finite_difference"):
            raise ValueError(
                f"method={method!r}; choose 'double_backward', 'forward_over_reverse' or "
                "'finite_difference'."
            )
        self.model = model
        self.loss_fn = loss_fn
        self.chunks = list(chunks)
        self.params = (
            list(params)
            if params is not None
            else [p for p in model.parameters() if p.requires_grad]
        )
        self.method: HVPMethod = method
        if reuse_graph is None:  # finite differences never need a second-order graph
            reuse_graph = len(self.chunks) == 1 and method != "finite_difference"
        self.reuse_graph = reuse_graph
        self._prepare = prepare_chunk or (lambda chunk: chunk)
        self.seed = seed
        self.reduce = reduce
        self.fd_eps = fd_eps
        counts: list[int] = []

        def local_count() -> Tensor:
            counts.extend(num_samples_fn(c) for c in self.chunks)
            return torch.tensor([float(sum(counts))], dtype=torch.float64, device=self.device)

        # the global count goes through _reduced so that a failure on one process is shared
        total = float(self._reduced(local_count, 1, torch.float64))
        if total <= 0:
            raise ValueError("The measurement set has no samples.")
        self.num_samples = int(total)
        self.chunk_sizes = counts  # this process's chunks
        self.weights = [n / total for n in counts]
        self.num_matvecs = 0
        self._graphs: list[tuple[Tensor, list[Tensor]]] | None = None
        self._loss: float | None = None
        self._gradient: Tensor | None = None

    @property
    def dim(self) -> int:
        """Number of parameters, the side of the Hessian."""
        return sum(p.numel() for p in self.params)

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype, which products are returned in."""
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        """The parameters' device."""
        return self.params[0].device

    @contextmanager
    def _loss_context(self) -> Iterator[None]:
        """Autocast off and attention on the math kernel while the loss is evaluated.

        The fused scaled-dot-product-attention kernels (flash, memory-efficient, cuDNN,
        and the CPU flash kernel) have no double backward; the math kernel is plain
        differentiable ops, so every HVP method sees the same twice-differentiable
        function. Training keeps whatever kernel it chose.
        """
        with ExitStack() as stack:
            if self.device.type in ("cpu", "cuda", "xpu", "mps"):
                stack.enter_context(torch.autocast(self.device.type, enabled=False))
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            yield

    def _chunk_loss(self, index: int) -> Tensor:
        with preserved_rng(self.model), self._loss_context():
            seed_all(self.seed + index)
            loss = self.loss_fn(self.model, self._prepare(self.chunks[index]))
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise TypeError("loss_fn must return a scalar tensor (the mean loss of the chunk).")
        if not torch.isfinite(loss):
            raise NonFiniteCurvatureError(f"The measurement loss is {loss.item()}.")
        return loss

    def _first_order(self, index: int, create_graph: bool = True) -> tuple[Tensor, list[Tensor]]:
        with torch.enable_grad():
            loss = self._chunk_loss(index)
            grads = torch.autograd.grad(
                loss, self.params, create_graph=create_graph, allow_unused=True
            )
        return loss.detach(), [
            torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)
        ]

    def _graphs_or_none(self) -> list[tuple[Tensor, list[Tensor]]] | None:
        if self.reuse_graph and self._graphs is None:
            self._graphs = [self._first_order(i) for i in range(len(self.chunks))]
        return self._graphs

    def _reduced(
        self, local_sum: Callable[[], Tensor], size: int, dtype: torch.dtype | None = None
    ) -> Tensor:
        """Sum of the local weighted terms over processes, with every process agreeing on failure.

        One collective per call, whatever happens locally: a process whose local term
        fails sends NaNs, plus a flag in the same reduction when the failure is not a
        non-finite value, so every process raises together instead of leaving the others
        waiting: :class:`NonFiniteCurvatureError` for non-finite values, the original
        error on the process where anything else went wrong and a
        :class:`FailedOnAnotherProcessError` on the others.
        """
        dtype = dtype or self.dtype
        try:
            local, error = local_sum().to(dtype), None
        except Exception as err:  # noqa: BLE001 - re-raised below, after the collective
            if self.reduce is None:
                raise
            local, error = torch.full((size,), float("nan"), dtype=dtype, device=self.device), err
        if self.reduce is None:
            total = local
        else:
            failed = error is not None and not isinstance(error, NonFiniteCurvatureError)
            flags = torch.tensor([float(failed)], dtype=dtype, device=self.device)
            reduced = self.reduce(torch.cat([local, flags]))
            total, failures = reduced[:size], reduced[size:].item()
            if failed:
                raise error
            if failures > 0:
                raise FailedOnAnotherProcessError(
                    "The measurement failed on another process; see its error."
                )
        if not torch.isfinite(total).all():
            where = f" ({error})" if error is not None else ""
            raise NonFiniteCurvatureError(f"A measurement value is not finite{where}.")
        return total

    def loss(self) -> float:
        """The mean loss over the measurement set."""
        if self._loss is None:

            def local_sum() -> Tensor:
                graphs = self._graphs_or_none()
                if graphs is not None:
                    losses = [g[0] for g in graphs]
                else:
                    with torch.no_grad():
                        losses = [self._chunk_loss(i) for i in range(len(self.chunks))]
                total = torch.zeros(1, dtype=torch.float64, device=self.device)
                for w, loss in zip(self.weights, losses):
                    total.add_(loss.detach().double().reshape(1), alpha=w)
                return total

            self._loss = float(self._reduced(local_sum, 1, torch.float64))
        return self._loss

    def gradient(self) -> Tensor:
        """The flat gradient :math:`\\nabla L` of the mean loss over the measurement set.

        Computed once per operator (like :meth:`loss`); a copy is returned.
        """
        if self._gradient is None:
            self._gradient = self._reduced_gradient()
        return self._gradient.clone()

    def _reduced_gradient(self) -> Tensor:
        def local_sum() -> Tensor:
            graphs = self._graphs_or_none()
            if graphs is None:
                return self._local_gradient()
            total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
            for weight, (_, grads) in zip(self.weights, graphs):
                total.add_(flatten([g.detach() for g in grads]), alpha=weight)
            return total

        return self._reduced(local_sum, self.dim)

    def matvec(self, v: Tensor) -> Tensor:
        """:math:`Hv` for a flat vector ``v`` of length :attr:`dim`."""
        if v.shape != (self.dim,):
            raise ValueError(f"Expected a vector of shape ({self.dim},), got {tuple(v.shape)}.")
        v = v.to(dtype=self.dtype, device=self.device)

        def local_sum() -> Tensor:
            if self.method == "finite_difference":
                return self._finite_difference(v)
            tangents = unflatten(v, self.params)
            total = torch.zeros_like(v)
            for i in range(len(self.chunks)):
                total.add_(self._chunk_hvp(i, tangents), alpha=self.weights[i])
            return total  # a non-finite product is caught by _reduced, on every process

        total = self._reduced(local_sum, self.dim)
        self.num_matvecs += 1
        return total

    __call__ = matvec

    def _chunk_hvp(self, i: int, tangents: list[Tensor]) -> Tensor:
        if self.method == "forward_over_reverse":
            try:
                return self._forward_over_reverse(i, tangents)
            except RuntimeError as err:
                warnings.warn(
                    f"Forward-over-reverse HVP failed ({err}); falling back to double "
                    "backward for this operator.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self.method = "double_backward"
        graphs = self._graphs_or_none()
        grads = graphs[i][1] if graphs is not None else self._first_order(i)[1]
        used = [j for j, g in enumerate(grads) if g.requires_grad]
        if not used:  # the loss is linear in every parameter
            return torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        hvp = torch.autograd.grad(
            [grads[j] for j in used],
            self.params,
            grad_outputs=[tangents[j] for j in used],
            retain_graph=graphs is not None,
            allow_unused=True,
        )
        return flatten([torch.zeros_like(p) if h is None else h for p, h in zip(self.params, hvp)])

    def _forward_over_reverse(self, index: int, tangents: list[Tensor]) -> Tensor:
        wrapper = _LossModule(self.model, self.loss_fn)
        keys = wrapper.keys(self.params)
        batch = self._prepare(self.chunks[index])

        def loss_of(primals: dict[str, Tensor]) -> Tensor:
            with self._loss_context():
                return torch.func.functional_call(wrapper, primals, (batch,), strict=False)

        primals = {k: p.detach() for k, p in zip(keys, self.params)}
        tangent = dict(zip(keys, tangents))
        with preserved_rng(self.model):
            seed_all(self.seed + index)
            _, hvp = torch.func.jvp(torch.func.grad(loss_of), (primals,), (tangent,))
        return flatten([hvp[k] for k in keys])

    def _local_gradient(self) -> Tensor:
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for i in range(len(self.chunks)):
            total.add_(flatten(self._first_order(i, create_graph=False)[1]), alpha=self.weights[i])
        return total

    def _finite_difference(self, v: Tensor) -> Tensor:
        saved = [p.detach().clone() for p in self.params]
        eps = self.fd_eps
        if eps is None:
            scale = max(1.0, float(flatten(saved).norm()) / self.dim**0.5)
            eps = torch.finfo(self.dtype).eps ** (1 / 3) * scale
        length = float(v.norm())
        if length == 0:
            return torch.zeros_like(v)
        step = [t * (eps / length) for t in unflatten(v, self.params)]

        def set_params(values: list[Tensor]) -> None:
            with torch.no_grad():
                for p, value in zip(self.params, values):
                    p.copy_(value)

        try:
            set_params([s0 + d for s0, d in zip(saved, step)])
            plus = self._local_gradient()
            set_params([s0 - d for s0, d in zip(saved, step)])
            minus = self._local_gradient()
        finally:
            set_params(saved)
        return (plus - minus) * (length / (2 * eps))
