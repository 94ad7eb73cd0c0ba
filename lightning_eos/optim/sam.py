"""SAM, sharpness-aware minimization, as an optimizer that works under Lightning's closures.

Paper 003, eq. (1):

.. math:: w_{t+1} = w_t - \\eta \\nabla L\\Big(w_t + \\rho \\frac{\\nabla L(w_t)}{\\lVert
    \\nabla L(w_t) \\rVert}\\Big),

with the base optimizer's update in place of :math:`-\\eta\\,\\cdot` (SGD gives eq. (1)
exactly). One :meth:`SAM.step` calls the closure twice: at :math:`w` for the ascent
direction, then at :math:`w + e` for the gradient the base optimizer uses, after the
parameters are restored to :math:`w` bit for bit.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["SAM"]

OptimizerFactory = Callable[[Iterable[Any]], Optimizer]


@contextmanager
def buffers_restored(module: nn.Module | None = None) -> Iterator[None]:
    """Undo every buffer change made inside the block.

    With ``module``, all of its buffers (recursively) are snapshotted and copied back: this
    also covers compiled submodules and buffers changed outside ``forward``. Without it, a
    global forward pre-hook snapshots the own buffers of each module the first time it
    runs forward inside the block (BatchNorm's running statistics and
    ``num_batches_tracked``, so cumulative averages with ``momentum=None`` are restored
    too); that fallback misses modules inside ``torch.compile`` and buffers changed
    outside their module's ``forward``.
    """
    saved: dict[nn.Module, dict[str, Tensor]] = {}

    def snapshot(mod: nn.Module, args: Any = None) -> None:
        if mod not in saved:
            saved[mod] = {n: b.detach().clone() for n, b in mod.named_buffers(recurse=False)}

    handle = None
    if module is not None:
        for mod in module.modules():
            snapshot(mod)
    else:
        handle = nn.modules.module.register_module_forward_pre_hook(snapshot)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        with torch.no_grad():
            for mod, buffers in saved.items():
                for name, value in buffers.items():
                    current = getattr(mod, name, None)
                    if isinstance(current, Tensor):
                        current.copy_(value)


def refuse_accumulation(module: Any) -> None:
    """Raise if ``module`` is a LightningModule that accumulates gradients automatically."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None or not getattr(module, "automatic_optimization", False):
        return
    if trainer.accumulate_grad_batches > 1:
        raise RuntimeError(
            "SAM does not support accumulate_grad_batches > 1: its second pass would "
            "re-evaluate only the last micro-batch at the perturbed point. Use a larger "
            "batch or manual optimization with a closure over all micro-batches."
        )


def _all_finite(tensors: list[Tensor]) -> bool:
    """One device sync for all of them."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def _lightning_parts(closure: Any) -> tuple[Any, Callable[[], Any] | None]:
    """(module, inner closure) of Lightning's ``partial(_wrap_closure, module, opt, closure)``.

    The inner closure runs ``training_step`` and backward without Lightning's after-closure
    work (``on_before_optimizer_step``, gradient clipping), which belongs to the second
    gradient only. ``(None, None)`` for any other closure.
    """
    args = getattr(closure, "args", ())
    if len(args) == 3 and getattr(args[0], "_trainer", None) is not None and callable(args[2]):
        return args[0], args[2]
    return None, None


class SAM(Optimizer):
    """Sharpness-aware minimization around any torch optimizer (paper 003, eq. (1)).

    The base optimizer is built on SAM's param groups and shares them and its state with
    SAM, so learning-rate schedulers drive it and checkpoints hold its moments.

    Args:
        params: parameters or param groups.
        base_optimizer: an optimizer class or factory ``params -> Optimizer`` (in YAML:
            ``class_path`` and ``init_args``), called with SAM's param groups.
        rho: the radius :math:`\\rho` of the ascent step.
        adaptive: ASAM: :math:`e = \\rho\\,T^2 g / \\lVert T g\\rVert` with
            :math:`T = |w|` (elementwise), instead of :math:`\\rho\\, g/\\lVert g\\rVert`.
        eps: added to the norm.
        per_replica: under DDP, ascend along each replica's own gradient: the first pass
            (forward and backward) runs inside ``no_sync()`` of the DDP module, so only
            the second gradient is averaged. Default: both passes are synchronized, and
            every replica takes the same ascent step. Lightning's DDP module is found
            from the closure; elsewhere set ``sam.ddp_module``.
        **base_kwargs: passed to ``base_optimizer`` when it is a class.

    In Lightning's automatic optimization the closure runs twice per step and
    ``global_step`` advances once. Gradient clipping by norm of the first gradient does
    not change :math:`g/\\lVert g\\rVert`, so the update is that of clipping the second
    gradient only (clipping by value would change the ascent direction: avoid it). The
    perturbed pass leaves BatchNorm buffers as they were, and
    ``perturbed`` is ``True`` during it (Lightning keeps that pass's outputs, so log the
    training loss only when ``not optimizer.perturbed`` to log the loss at :math:`w`).
    Under ``16-mixed``, GradScaler cannot call a closure: use
    :class:`lightning_eos.callbacks.SAMMixedPrecision`. A
    non-finite gradient norm at :math:`w` skips the step (parameters and state
    unchanged) with a warning. Manual optimization: pass a closure that zeroes the
    gradients, computes the loss and calls ``manual_backward``, to ``opt.step(closure)``.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> opt = SAM([w], torch.optim.SGD, rho=0.1, lr=0.5)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = (w**2).sum() / 2  # gradient w
        ...     loss.backward()
        ...     return loss
        >>> _ = opt.step(closure)
        >>> w.detach()  # w - 0.5 * (w + 0.1 * w / |w|)
        tensor([0.4776, 0.9553])
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] | OptimizerFactory = torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        eps: float = 1e-12,
        per_replica: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if rho < 0:
            raise ValueError(f"rho={rho} must be nonnegative.")
        super().__init__(params, dict(rho=rho, adaptive=adaptive))
        self.eps, self.per_replica = eps, per_replica
        self.ddp_module: Any = None  # set it (or let Lightning's closure reveal it) for per_replica
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self._link()
        self._origin: dict[Tensor, Tensor] = {}
        self.perturbed = False  # True while the closure runs at w + e
        self.module: nn.Module | None = None  # whose buffers the perturbed pass keeps

    def _link(self) -> None:
        """Share the base optimizer's param groups and state (one truth for checkpoints)."""
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            group.setdefault("rho", self.defaults["rho"])
            group.setdefault("adaptive", self.defaults["adaptive"])
        self.defaults = {**self.base_optimizer.defaults, **self.defaults}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self._link()

    # --- the two half steps -------------------------------------------------------------

    def perturbation(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """SAM's ascent step :math:`e` for ``grads`` at ``params``, by their groups' settings.

        :math:`e = \\rho\\, g/\\lVert g\\rVert`, or for ``adaptive`` groups (ASAM)
        :math:`\\rho\\, T^2 g/\\lVert T g\\rVert` with :math:`T = |w|`; the norm runs over
        all of them. Parameters outside SAM's groups get zero.
        """
        groups = {id(p): g for g in self.param_groups for p in g["params"]}
        scales = [
            p.detach().abs() if groups.get(id(p), {}).get("adaptive") else None for p in params
        ]
        scaled = [  # parameters SAM does not move count neither in e nor in the norm
            torch.zeros_like(g) if id(p) not in groups else g if t is None else t * g
            for p, g, t in zip(params, grads, scales, strict=True)
        ]
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.to(torch.float32)) for g in scaled])
        )
        out = []
        for p, g, t in zip(params, scaled, scales, strict=True):
            group = groups.get(id(p))
            rho = 0.0 if group is None else group["rho"]
            e = g * (rho / (norm.to(g.dtype) + self.eps))
            out.append(e if t is None else e * t)  # T^2 g / |T g|
        return out

    def _all_ranks_agree(self, ok: bool) -> bool:
        """Under ``per_replica`` the decision is local; make every rank take it if any must."""
        if not (self.per_replica and dist.is_available() and dist.is_initialized()):
            return ok
        flag = torch.tensor([float(ok)], device=self.param_groups[0]["params"][0].device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    @torch.no_grad()
    def first_step(self, warn: bool = True) -> bool:
        """Move to :math:`w + e`; return ``False`` (and stay) if the gradient norm is not finite."""
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return False
        e = self.perturbation(params, [p.grad for p in params])
        finite = _all_finite(e)
        if not self._all_ranks_agree(finite):
            if warn:
                warnings.warn(
                    "SAM: the gradient norm is not finite; the step is skipped.", stacklevel=3
                )
            return False
        self._origin = {}
        for p, x in zip(params, e, strict=True):
            self._origin[p] = p.detach().clone()
            p.add_(x)
        return True

    def _first_pass_sync(self, module: Any = None) -> Any:
        """``no_sync()`` of the DDP module for ``per_replica``, else nothing."""
        if not self.per_replica:
            return nullcontext()
        ddp = self.ddp_module
        if ddp is None and module is not None:  # Lightning: the strategy's wrapped model
            ddp = getattr(module.trainer.strategy, "model", None)
        no_sync = getattr(ddp, "no_sync", None)
        return no_sync() if no_sync is not None else nullcontext()

    def _gradients_finite(self) -> bool:
        return _all_finite(
            [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        )

    @contextmanager
    def perturbed_pass(self, module: nn.Module | None = None) -> Iterator[None]:
        """Run the second closure inside: gradients on, buffers restored, ``perturbed`` set.

        ``module`` (default: :attr:`module`) is the model whose buffers must not change;
        without one, a global forward hook catches the modules that run (see
        :func:`buffers_restored`). On exit the parameters are back at :math:`w`.
        """
        self.perturbed = True
        try:
            with torch.enable_grad(), buffers_restored(module or self.module):
                yield
        finally:
            self.perturbed = False
            self.restore()

    @torch.no_grad()
    def restore(self) -> None:
        """Back to :math:`w`, bit for bit."""
        for p, origin in self._origin.items():
            p.copy_(origin)
        self._origin = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One SAM step: ``closure`` at :math:`w`, ascend, ``closure`` at :math:`w+e`, descend."""
        if closure is None:
            raise RuntimeError(
                "SAM.step needs a closure that zeroes the gradients, computes the loss and "
                "backpropagates: it evaluates the gradient twice. Lightning passes one in "
                "automatic optimization; in manual optimization call opt.step(closure)."
            )
        module, inner = _lightning_parts(closure)
        refuse_accumulation(module)
        with torch.enable_grad(), self._first_pass_sync(module):
            loss = (inner or closure)()  # Lightning's hooks and clipping: second pass only
        if not self.first_step():
            return loss
        with self.perturbed_pass(module):
            closure()
        if not self._all_ranks_agree(self._gradients_finite()):
            warnings.warn("SAM: non-finite gradient at w + e; the step is skipped.", stacklevel=2)
            return loss
        self.base_optimizer.step()
        return loss
