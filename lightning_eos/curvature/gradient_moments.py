"""Gradient noise of minibatch SGD and how it meets the Hessian (paper 004).

Over a measurement set of :math:`N` samples with per-sample losses :math:`\\ell_i`,
:math:`L = \\tfrac1N\\sum_i \\ell_i` and :math:`g_i = \\nabla\\ell_i`, the second moment of
the gradient of a batch of :math:`b` samples drawn uniformly from :math:`n` is

.. math::

    S_1 = \\tfrac1N \\textstyle\\sum_i g_i g_i^\\top, \\qquad S_n = \\nabla L\\,\\nabla L^\\top,
    \\qquad S_b = \\frac{\\gamma_{n,b}}{b} S_1 + \\Big(1 - \\frac{\\gamma_{n,b}}{b}\\Big) S_n,

with :math:`\\gamma_{n,b} = (n-b)/(n-1)` without replacement and :math:`1` with
replacement (paper 004, eq. 1 with :math:`C_b = S_b - S_n`, and §5). Every trace is
therefore linear between its two ends:

.. math::

    \\operatorname{tr}(S_b) = \\tfrac{\\gamma}{b}\\operatorname{tr}(S_1)
        + (1-\\tfrac{\\gamma}{b})\\lVert\\nabla L\\rVert^2, \\qquad
    \\operatorname{tr}(HS_b) = \\tfrac{\\gamma}{b}\\operatorname{tr}(HS_1)
        + (1-\\tfrac{\\gamma}{b})\\,\\nabla L^\\top H \\nabla L,

where :math:`\\operatorname{tr}(HS_1) = \\tfrac1N\\sum_i g_i^\\top H g_i` costs one
Hessian-vector product per sample: it is computed exactly, or estimated from a seeded
sample of :math:`k` per-sample gradients (without replacement; standard error
:math:`s/\\sqrt{k}\\,\\sqrt{1-k/N}` with :math:`s` the sample standard deviation).
The interaction-aware sharpness (IAS, Definition 1) and the concentration of the batch
gradient (Definition 2, eq. 17) are

.. math::

    \\lVert H\\rVert_{S_b} = \\frac{\\operatorname{tr}(HS_b)}{\\operatorname{tr}(S_b)}, \\qquad
    \\rho_b = \\frac{\\operatorname{tr}(S_n)}{\\operatorname{tr}(S_b)}
            = \\frac{1}{\\frac{\\gamma}{b}\\frac1\\rho + 1 - \\frac{\\gamma}{b}}, \\quad
    \\rho = \\rho_1,

and on a quadratic one SGD step changes the loss in expectation by (eq. 7, Theorem 1)

.. math::

    \\mathbb{E}_\\xi[L_{t+1}] - L_t = \\frac{\\eta^2}{2}\\operatorname{tr}(S_n)
        \\Big(\\frac{\\operatorname{tr}(HS_b)}{\\operatorname{tr}(S_n)} - \\frac{2}{\\eta}\\Big),

so SGD is unstable exactly when :math:`\\lVert H\\rVert_{S_b} > 2\\rho_b/\\eta`. Full-batch
GD is :math:`b = n`: :math:`\\lVert H\\rVert_{S_n} = g^\\top H g/\\lVert g\\rVert^2`.

Per-sample gradients come from ``torch.func`` (``vmap`` of ``grad`` over
``functional_call``), a few samples at a time; a loss that ``vmap`` cannot trace falls back
to one backward pass per sample, with a warning. They need per-sample losses that average
to the chunk loss, so BatchNorm in train mode (which couples the samples of a batch) is
refused: measure in eval mode, where it normalizes with its running statistics. The
mean of the per-sample gradients is checked against :math:`\\nabla L` on every
measurement, so a loss that couples samples some other way raises
:class:`BatchCoupledLossError` instead of returning a wrong number.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_eos.curvature._batches import index_batch, slice_batch, split_leaves
from lightning_eos.curvature.context import preserved_rng, seed_all
from lightning_eos.curvature.hessian import (
    HessianOperator,
    NonFiniteCurvatureError,
    _LossModule,
    flatten,
    unflatten,
)

__all__ = [
    "BatchCoupledLossError",
    "GradientMoments",
    "IASResult",
    "batch_concentration",
    "expected_loss_change",
    "has_batchnorm",
    "interaction_aware_sharpness",
    "loss_at",
    "sampling_coefficient",
]


class BatchCoupledLossError(ValueError):
    """Per-sample losses do not average to the batch loss (e.g. BatchNorm in train mode)."""


def sampling_coefficient(n: int, b: int, replacement: bool = False) -> float:
    """:math:`\\gamma_{n,b}`: :math:`(n-b)/(n-1)` without replacement, 1 with (paper 004, eq. 1).

    >>> sampling_coefficient(8, 3), sampling_coefficient(8, 8), sampling_coefficient(8, 8, True)
    (0.7142857142857143, 0.0, 1.0)
    """
    if n < 1 or b < 1:
        raise ValueError(f"n={n} and b={b} must be positive.")
    if replacement:
        return 1.0
    if b > n:
        raise ValueError(f"A batch of {b} cannot be drawn without replacement from {n} samples.")
    return 1.0 if n == 1 else (n - b) / (n - 1)


def batch_concentration(rho: float, n: int, b: int, replacement: bool = False) -> float:
    """:math:`\\rho_b = 1/(\\tfrac{\\gamma_{n,b}}{b}\\tfrac1\\rho + 1 - \\tfrac{\\gamma_{n,b}}{b})`.

    Paper 004, eq. 17: about :math:`b\\rho/\\gamma_{n,b}` for small batches (the linear
    regime), saturating at 1 for large ones.

    >>> round(batch_concentration(0.01, n=8192, b=1), 6), batch_concentration(0.01, 8192, 8192)
    (0.01, 1.0)
    """
    if not 0 < rho <= 1:
        raise ValueError(f"rho={rho} must lie in (0, 1].")
    weight = sampling_coefficient(n, b, replacement) / b
    return 1.0 / (weight / rho + 1.0 - weight)


class GradientMoments:
    """Per-sample gradients over the measurement set of a :class:`HessianOperator`.

    Uses the operator's model, loss, chunks, parameters, device moves, random streams and
    ``reduce`` hook, so everything here is of the same loss :math:`L` as its Hessian and,
    with ``reduce``, sums over processes (each process holds its own chunks).

    Args:
        hessian: the operator whose measurement set and loss to use.
        offsets: the index, in the whole measurement set, of the first sample of each of
            this process's chunks; default: the chunks in order, in one process.
        per_sample_chunk: samples whose gradients are materialized at once
            (memory: this many times the number of parameters).
        vectorize: use ``torch.func.vmap``; ``False`` runs one backward pass per sample.
        isolate: a context manager factory around every ``vmap`` attempt that undoes
            what a loss traced under ``vmap`` may leave behind when tracing fails (e.g.
            a metric updated with batched tensors); default: nothing.
    """

    def __init__(
        self,
        hessian: HessianOperator,
        *,
        offsets: Sequence[int] | None = None,
        per_sample_chunk: int = 64,
        vectorize: bool = True,
        isolate: Callable[[], AbstractContextManager[Any]] = nullcontext,
    ) -> None:
        if per_sample_chunk < 1:
            raise ValueError(f"per_sample_chunk={per_sample_chunk} must be positive.")
        self.hessian = hessian
        self.counts = list(hessian.chunk_sizes)
        if offsets is None:
            if hessian.reduce is not None:
                raise ValueError("With several processes, pass each chunk's global offset.")
            offsets = [sum(self.counts[:i]) for i in range(len(self.counts))]
        if len(offsets) != len(self.counts):
            raise ValueError(f"{len(offsets)} offsets for {len(self.counts)} chunks.")
        self.offsets = list(offsets)
        self.per_sample_chunk = per_sample_chunk
        self.vectorize = vectorize
        self.isolate = isolate
        self._checked = False

    @property
    def num_samples(self) -> int:
        """:math:`N`, the size of the whole measurement set (all processes)."""
        return self.hessian.num_samples

    # --- per-sample gradients -----------------------------------------------------------

    def _grads(self, index: int, batch: object) -> Tensor:
        """Rows :math:`g_i` of the samples of ``batch`` (a slice of chunk ``index``)."""
        op = self.hessian
        with preserved_rng(op.model), op._loss_context():
            seed_all(op.seed + index)
            if self.vectorize:
                try:
                    with self.isolate():
                        return self._vmapped(batch)
                except Exception as err:  # noqa: BLE001 - any tracing failure falls back
                    warnings.warn(
                        f"Per-sample gradients by torch.func.vmap failed ({err}); using one "
                        "backward pass per sample instead.",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                    self.vectorize = False
            return self._looped(batch)

    def _vmapped(self, batch: object) -> Tensor:
        op = self.hessian
        wrapper = _LossModule(op.model, op.loss_fn)
        keys = wrapper.keys(op.params)
        leaves, rebuild = split_leaves(batch)
        count = int(leaves[0].shape[0])
        batched = [t.dim() > 0 and t.shape[0] == count for t in leaves]

        def loss_of_one(primals: dict[str, Tensor], *sample: Tensor) -> Tensor:
            it = iter(sample)
            one = [next(it).unsqueeze(0) if b else t for t, b in zip(leaves, batched)]
            return torch.func.functional_call(wrapper, primals, (rebuild(one),), strict=False)

        primals = {k: p.detach() for k, p in zip(keys, op.params)}
        inputs = [t for t, b in zip(leaves, batched) if b]
        grads = torch.func.vmap(torch.func.grad(loss_of_one), in_dims=(None, *[0] * len(inputs)))(
            primals, *inputs
        )
        return torch.cat([grads[k].reshape(count, -1) for k in keys], dim=1)

    def _looped(self, batch: object) -> Tensor:
        op = self.hessian
        count = int(split_leaves(batch)[0][0].shape[0])
        rows = []
        for j in range(count):
            with torch.enable_grad():
                loss = op.loss_fn(op.model, slice_batch(batch, j, j + 1))
                grads = torch.autograd.grad(loss, op.params, allow_unused=True)
            rows.append(
                flatten([torch.zeros_like(p) if g is None else g for p, g in zip(op.params, grads)])
            )
        return torch.stack(rows)

    def _check_per_sample(self) -> None:
        if self._checked:
            return
        coupled = [
            type(m).__name__
            for m in self.hessian.model.modules()
            if isinstance(m, _BatchNorm) and m.training
        ]
        if coupled:
            raise BatchCoupledLossError(
                f"Per-sample gradients are undefined with {coupled[0]} in train mode: it "
                "normalizes each sample with its batch's statistics. Measure in eval mode "
                "(running statistics; IASMonitor(mode='eval')), or use a model without "
                "BatchNorm."
            )
        self._checked = True

    def _blocks(self, index: int, positions: Tensor | None = None) -> Iterator[Tensor]:
        """Per-sample gradient blocks of local chunk ``index`` (at ``positions``, repeats ok)."""
        self._check_per_sample()
        chunk = self.hessian._prepare(self.hessian.chunks[index])
        if positions is None:
            positions = torch.arange(self.counts[index])
        for start in range(0, len(positions), self.per_sample_chunk):
            part = positions[start : start + self.per_sample_chunk]
            yield self._grads(index, index_batch(chunk, part))

    def _local_members(self, indices: Tensor) -> Iterator[tuple[int, Tensor, Tensor]]:
        """(local chunk, rows of ``indices`` in it, positions inside the chunk)."""
        for i, (offset, count) in enumerate(zip(self.offsets, self.counts)):
            rows = torch.nonzero((indices >= offset) & (indices < offset + count)).flatten()
            if len(rows):
                yield i, rows, indices[rows] - offset

    # --- reductions ---------------------------------------------------------------------

    def second_moment(self) -> tuple[float, Tensor]:
        """:math:`(\\operatorname{tr} S_1, \\tfrac1N\\sum_i g_i)` over the whole measurement set.

        Sums are accumulated in float64 and reduced over processes in one collective.
        """
        op = self.hessian
        n = float(self.num_samples)

        def local_sum() -> Tensor:
            total = torch.zeros(1 + op.dim, dtype=torch.float64, device=op.device)
            for i in range(len(op.chunks)):
                for block in self._blocks(i):
                    block = block.double()
                    total[0] += block.square().sum() / n
                    total[1:] += block.sum(0) / n
            return total

        total = op._reduced(local_sum, 1 + op.dim, torch.float64)
        return float(total[0]), total[1:].to(op.dtype)

    def sample_gradients(self, indices: Tensor) -> Tensor:
        """The per-sample gradients :math:`g_i` of global ``indices``, as rows (every process)."""
        op = self.hessian
        indices = torch.as_tensor(indices, dtype=torch.long).flatten()

        def local_sum() -> Tensor:
            rows = torch.zeros(len(indices), op.dim, dtype=op.dtype, device=op.device)
            for i, members, positions in self._local_members(indices):
                done = 0
                for block in self._blocks(i, positions):
                    rows[members[done : done + len(block)]] = block.to(op.dtype)
                    done += len(block)
            return rows.flatten()

        return op._reduced(local_sum, len(indices) * op.dim).view(len(indices), op.dim)

    def minibatch_gradient(self, indices: Tensor) -> Tensor:
        """:math:`g_\\xi = \\tfrac1b\\sum_{i\\in\\xi} g_i` for global ``indices`` (repeats too)."""
        op = self.hessian
        indices = torch.as_tensor(indices, dtype=torch.long).flatten()

        def local_sum() -> Tensor:
            total = torch.zeros(op.dim, dtype=torch.float64, device=op.device)
            for i, _, positions in self._local_members(indices):
                for block in self._blocks(i, positions):
                    total += block.double().sum(0)
            return total / len(indices)

        return op._reduced(local_sum, op.dim, torch.float64).to(op.dtype)


def loss_at(hessian: HessianOperator, shift: Tensor) -> float:
    """:math:`L(\\theta + \\text{shift})` on the operator's set.

    Evaluated with ``torch.func.functional_call`` on shifted copies, so the parameters are
    never written to (a graph the operator cached stays valid).
    """
    op = hessian
    wrapper = _LossModule(op.model, op.loss_fn)
    steps = unflatten(shift.to(op.dtype), op.params)
    shifted = {k: p.detach() + s for k, p, s in zip(wrapper.keys(op.params), op.params, steps)}

    def local_sum() -> Tensor:
        total = torch.zeros(1, dtype=torch.float64, device=op.device)
        with torch.no_grad():
            for i, weight in enumerate(op.weights):
                chunk = op._prepare(op.chunks[i])
                with preserved_rng(op.model), op._loss_context():
                    seed_all(op.seed + i)
                    loss = torch.func.functional_call(wrapper, shifted, (chunk,), strict=False)
                if not torch.isfinite(loss):
                    raise NonFiniteCurvatureError(f"The loss after the step is {loss.item()}.")
                total += weight * loss.double()
        return total

    return float(op._reduced(local_sum, 1, torch.float64))


@dataclass(frozen=True)
class IASResult:
    """The gradient-noise traces of one measurement, and what paper 004 builds from them.

    ``trace_HS_1`` is exact when ``hs1_samples == num_samples``, otherwise the mean over a
    sample of ``hs1_samples`` per-sample gradients, with standard error
    ``trace_HS_1_stderr``. :meth:`at_batch_size` re-evaluates everything for another
    batch size at no cost: only :math:`\\gamma/b` changes. A full-batch GD measurement
    (:math:`\\gamma_{n,n} = 0`) needs no per-sample gradient and leaves the per-sample
    end NaN (``hs1_samples == 0``).
    """

    num_samples: int  # N, the measurement set
    population: int  # n in gamma_{n,b}: the set the batches are drawn from
    batch_size: int
    replacement: bool
    trace_S_1: float
    trace_S_n: float
    trace_HS_1: float
    trace_HS_1_stderr: float
    trace_HS_n: float
    hs1_samples: int

    @property
    def batch_weight(self) -> float:
        """:math:`\\gamma_{n,b}/b`, the weight of the per-sample end in :math:`S_b`."""
        gamma = sampling_coefficient(self.population, self.batch_size, self.replacement)
        return gamma / self.batch_size

    @property
    def rho(self) -> float:
        """:math:`\\rho = \\operatorname{tr}(S_n)/\\operatorname{tr}(S_1)`."""
        return self.trace_S_n / self.trace_S_1

    @property
    def trace_S_b(self) -> float:
        return _between(self.batch_weight, self.trace_S_1, self.trace_S_n)

    @property
    def trace_HS_b(self) -> float:
        return _between(self.batch_weight, self.trace_HS_1, self.trace_HS_n)

    @property
    def rho_b(self) -> float:
        """:math:`\\rho_b = \\operatorname{tr}(S_n)/\\operatorname{tr}(S_b)` (eq. 17)."""
        return self.trace_S_n / self.trace_S_b

    @property
    def ias(self) -> float:
        """:math:`\\lVert H\\rVert_{S_b} = \\operatorname{tr}(HS_b)/\\operatorname{tr}(S_b)`."""
        return self.trace_HS_b / self.trace_S_b

    @property
    def ias_stderr(self) -> float:
        """Standard error of :attr:`ias` from the sampled :math:`\\operatorname{tr}(HS_1)`."""
        w = self.batch_weight
        return 0.0 if w == 0 else w * self.trace_HS_1_stderr / self.trace_S_b

    @property
    def instability(self) -> float:
        """:math:`\\operatorname{tr}(HS_b)/\\operatorname{tr}(S_n)`: unstable above :math:`2/\\eta`.

        Theorem 1 of paper 004.
        """
        return self.trace_HS_b / self.trace_S_n

    def threshold(self, lr: float) -> float:
        """The edge :math:`2\\rho_b/\\eta` of the IAS for SGD (paper 004, eq. 16)."""
        return 2.0 * self.rho_b / lr

    def predicted_loss_change(self, lr: float) -> float:
        """:math:`(\\mathbb{E}[L_{t+1}] - L_t)/\\operatorname{tr}(S_n)` on a quadratic, eq. (7)."""
        return lr**2 / 2 * (self.instability - 2.0 / lr)

    def at_batch_size(self, batch_size: int) -> IASResult:
        """The same measurement read for batches of ``batch_size``."""
        sampling_coefficient(self.population, batch_size, self.replacement)  # validates
        return replace(self, batch_size=batch_size)


def _between(weight: float, per_sample: float, full_batch: float) -> float:
    """:math:`w\\,a + (1-w)\\,b`, exactly the full-batch end when :math:`w = 0` (GD)."""
    return full_batch if weight == 0 else weight * per_sample + (1 - weight) * full_batch


def _quadratic_forms(hessian: HessianOperator, rows: Tensor) -> list[float]:
    return [float(g.double() @ hessian.matvec(g).double()) for g in rows]


def interaction_aware_sharpness(
    hessian: HessianOperator,
    batch_size: int,
    *,
    moments: GradientMoments | None = None,
    population: int | None = None,
    replacement: bool = False,
    samples: int | None = None,
    generator: torch.Generator | None = None,
) -> IASResult:
    """Measure tr(S_1), tr(S_n), tr(HS_1), tr(HS_n) on the operator's set (module docstring).

    Args:
        hessian: :math:`H` and the measurement set.
        batch_size: :math:`b`, the number of samples per SGD step (all processes).
        moments: the per-sample gradient engine; default ``GradientMoments(hessian)``.
        population: :math:`n` in :math:`\\gamma_{n,b}`, the size of the set batches are
            drawn from; default the measurement set's size :math:`N`.
        replacement: batches drawn with replacement (:math:`\\gamma = 1`).
        samples: per-sample gradients for :math:`\\operatorname{tr}(HS_1)`; ``None`` or
            at least :math:`N`: all of them (exact, :math:`N` products).
        generator: draws the sample (CPU generator; identical on every process).

    Raises:
        BatchCoupledLossError: the per-sample gradients do not average to :math:`\\nabla L`.
    """
    moments = moments or GradientMoments(hessian)
    n_set = hessian.num_samples
    population = population or n_set
    gradient = hessian.gradient()
    trace_S_n = float(gradient.double() @ gradient.double())
    if trace_S_n == 0:  # a stationary point: the IAS and rho_b are 0/0
        raise NonFiniteCurvatureError("The gradient is zero: the IAS and rho_b are undefined.")
    trace_HS_n = _quadratic_forms(hessian, gradient[None])[0]
    result = IASResult(
        num_samples=n_set,
        population=population,
        batch_size=batch_size,
        replacement=replacement,
        trace_S_1=math.nan,
        trace_S_n=trace_S_n,
        trace_HS_1=math.nan,
        trace_HS_1_stderr=math.nan,
        trace_HS_n=trace_HS_n,
        hs1_samples=0,
    )
    if result.batch_weight == 0:  # full-batch GD: S_b = S_n, no per-sample gradient needed
        return result
    trace_S_1, mean_gradient = moments.second_moment()
    mismatch = float((mean_gradient - gradient).double().norm())
    if mismatch > 1e-3 * math.sqrt(trace_S_1) + 1e-6 * float(gradient.double().norm()):
        raise BatchCoupledLossError(
            "The per-sample gradients do not average to the gradient of the batch loss "
            f"(|mean g_i - grad L| = {mismatch:.3g}, rms |g_i| = {math.sqrt(trace_S_1):.3g}): "
            "the loss couples the samples of a batch (BatchNorm in train mode, a loss that "
            "is not a mean over samples, randomness in forward)."
        )
    if samples is None or samples >= n_set:
        chosen = torch.arange(n_set)
    else:
        if samples < 2:
            raise ValueError(f"samples={samples}: at least 2 are needed for a standard error.")
        chosen = torch.randperm(n_set, generator=generator)[:samples]
    values: list[float] = []
    for start in range(0, len(chosen), moments.per_sample_chunk):
        rows = moments.sample_gradients(chosen[start : start + moments.per_sample_chunk])
        values.extend(_quadratic_forms(hessian, rows))
    x = torch.tensor(values, dtype=torch.float64)
    k = len(values)
    stderr = 0.0
    if k < n_set:  # simple random sample without replacement: s/sqrt(k) * sqrt(1 - k/N)
        stderr = float(x.std() / math.sqrt(k) * math.sqrt(1 - k / n_set))
    return replace(
        result,
        trace_S_1=trace_S_1,
        trace_HS_1=float(x.mean()),
        trace_HS_1_stderr=stderr,
        hs1_samples=k,
    )


def expected_loss_change(
    hessian: HessianOperator,
    lr: float,
    batch_size: int,
    *,
    moments: GradientMoments | None = None,
    replacement: bool = False,
    samples: int = 16,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """:math:`\\mathbb{E}_\\xi[L(\\theta - \\eta g_\\xi)] - L(\\theta)` and its standard error.

    Batches of ``batch_size`` are drawn from the measurement set (``samples`` of them,
    each a real SGD step taken on a copy-free shift of the parameters, which are
    restored bit for bit); the full batch without replacement is one exact GD step.
    Compare with :meth:`IASResult.predicted_loss_change` times
    :math:`\\operatorname{tr}(S_n)` (paper 004, eq. 7).
    """
    moments = moments or GradientMoments(hessian)
    n = hessian.num_samples
    sampling_coefficient(n, batch_size, replacement)
    start = hessian.loss()
    if batch_size == n and not replacement:
        return loss_at(hessian, -lr * hessian.gradient()) - start, 0.0
    changes = []
    for _ in range(samples):
        if replacement:
            batch = torch.randint(n, (batch_size,), generator=generator)
        else:
            batch = torch.randperm(n, generator=generator)[:batch_size]
        changes.append(loss_at(hessian, -lr * moments.minibatch_gradient(batch)) - start)
    x = torch.tensor(changes, dtype=torch.float64)
    stderr = float(x.std() / math.sqrt(len(changes))) if len(changes) > 1 else float("nan")
    return float(x.mean()), stderr


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm layer (which couples the samples of a batch)."""
    return any(isinstance(m, _BatchNorm) for m in model.modules())
