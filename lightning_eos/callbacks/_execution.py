"""How the trained module runs inside a measurement: precision, input conversion, compilation.

* **Inputs** of the measurement set go through the steps Lightning's training loop applies
  to every batch: the precision plugin's ``convert_input`` (``64-true`` makes floating
  tensors float64, ``bf16-true``/``16-true`` half precision), the module's
  ``on_before_batch_transfer``, and the strategy's ``batch_to_device`` (with
  ``transfer_batch_to_device`` and ``on_after_batch_transfer``) -- see :func:`batch_preparer`.
* **Precision.** Hessian-vector products in half precision carry two or three significant
  digits, not enough for Lanczos to resolve a 1% gap. Under ``bf16-true`` or ``16-true``
  the float16/bfloat16 parameters and buffers are therefore cast to float32 in place for
  the measurement and cast back afterwards (:func:`float32_weights`). Every bfloat16 and
  float16 value is exactly representable in float32, so the round trip restores them bit
  for bit; the measurement is that of the same weights in float32 arithmetic, on inputs
  rounded as training rounds them. Under ``64-true`` everything stays float64 and the
  precision plugin's forward context (float64 default dtype) is entered, as in training.
  Mixed precisions keep float32 weights; :class:`~lightning_eos.curvature.HessianOperator`
  turns autocast off.
* **Compilation.** ``torch.compile`` (of the LightningModule or of submodules) has no double
  backward through AOT autograd. Inside a measurement, :func:`eager` sets
  ``torch.compiler.set_stance("force_eager")``: the compiled functions run their original
  Python code, and the compiled training graph is neither used nor recompiled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.plugins.precision import DoublePrecision
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

_HALF = (torch.float16, torch.bfloat16)


@contextmanager
def float32_weights(module: nn.Module) -> Iterator[bool]:
    """Cast float16/bfloat16 parameters and buffers to float32, and back on exit (exactly).

    The ``Parameter`` objects stay the same (only their data is swapped), so optimizers
    and hooks that hold them are unaffected. Yields whether anything was cast.

    Example:
        >>> layer = nn.Linear(2, 2).to(torch.bfloat16)
        >>> before = layer.weight.detach().clone()
        >>> with float32_weights(layer) as cast:
        ...     cast, layer.weight.dtype
        (True, torch.float32)
        >>> layer.weight.dtype, torch.equal(layer.weight, before)
        (torch.bfloat16, True)
    """
    cast = [t for t in (*module.parameters(), *module.buffers()) if t.dtype in _HALF]
    dtypes = [t.dtype for t in cast]
    with torch.no_grad():
        for tensor in cast:
            tensor.data = tensor.data.float()
    try:
        yield bool(cast)
    finally:
        with torch.no_grad():
            for tensor, dtype in zip(cast, dtypes, strict=True):
                tensor.data = tensor.data.to(dtype)


def _to_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.dtype in _HALF else tensor


def batch_preparer(trainer: Trainer, upcast: bool) -> Callable[[Any], Any]:
    """A chunk of the measurement set -> the batch ``training_step`` would receive.

    Lightning's training loop: ``precision_plugin.convert_input``, the module's
    ``on_before_batch_transfer``, then ``strategy.batch_to_device``. With ``upcast`` (the
    weights were cast by :func:`float32_weights`), half-precision inputs are cast to
    float32 afterwards: rounded as in training, computed in float32.
    """
    module = trainer.lightning_module

    def prepare(chunk: Any) -> Any:
        chunk = trainer.precision_plugin.convert_input(chunk)
        chunk = module.on_before_batch_transfer(chunk, 0)
        chunk = trainer.strategy.batch_to_device(chunk)
        if upcast:
            chunk = apply_to_collection(chunk, torch.Tensor, _to_float32)
        return chunk

    return prepare


@contextmanager
def eager() -> Iterator[None]:
    """Run ``torch.compile``'d functions eagerly (their original code) inside the block."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield


@contextmanager
def measurement_execution(trainer: Trainer, module: nn.Module) -> Iterator[Callable[[Any], Any]]:
    """Everything above for one measurement; yields the chunk preparer to give the operator."""
    with ExitStack() as stack:
        stack.enter_context(eager())
        upcast = stack.enter_context(float32_weights(module))
        if isinstance(trainer.precision_plugin, DoublePrecision):
            stack.enter_context(trainer.precision_plugin.forward_context())
        yield batch_preparer(trainer, upcast)
