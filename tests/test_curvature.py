"""Curvature engine against float64 dense Hessians and closed forms."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import cross_entropy, dense_hessian, mse, tiny_cnn, tiny_data, tiny_mlp
from torch import nn

from lightning_eos.curvature import (
    HessianOperator,
    NonFiniteCurvatureError,
    lanczos,
    measurement_context,
    rechunk,
)

CASES = [
    pytest.param(kind, loss, id=f"model={kind}-loss={loss}")
    for kind in ("mlp", "cnn")
    for loss in ("mse", "ce")
]


def _case(kind: str, loss: str):
    torch.manual_seed(0)
    model = (tiny_mlp() if kind == "mlp" else tiny_cnn()).double()
    batch = tiny_data(kind, loss)
    return model, (mse if loss == "mse" else cross_entropy), batch


@pytest.mark.parametrize(("kind", "loss"), CASES)
@pytest.mark.parametrize("chunk_size", [None, 4], ids=["chunks=1", "chunks=4+4+3"])
def test_top_k_matches_dense_eigvalsh(kind, loss, chunk_size):
    model, loss_fn, batch = _case(kind, loss)
    h = dense_hessian(model, loss_fn, batch)
    reference = torch.linalg.eigvalsh(h).flip(0)
    chunks = rechunk([batch], None, chunk_size)
    result = lanczos(HessianOperator(model, loss_fn, chunks), k=3, tol=1e-10)
    assert result.converged
    torch.testing.assert_close(result.eigenvalues, reference[:3], rtol=1e-8, atol=1e-10)
    # the residuals Lanczos reports are the true residuals of its Ritz pairs
    for lam, vec, res in zip(result.eigenvalues, result.eigenvectors, result.residuals):
        assert abs((h @ vec - lam * vec).norm().item() - res.item()) < 1e-8


@pytest.mark.parametrize(("kind", "loss"), CASES)
def test_uneven_chunks_are_weighted_by_sample_count(kind, loss):
    model, loss_fn, batch = _case(kind, loss)
    dense = dense_hessian(model, loss_fn, batch)
    v = torch.randn(dense.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for size in (2, 4, 5, 10):  # 11 samples: the last chunk is always shorter
        op = HessianOperator(model, loss_fn, rechunk([batch], None, size))
        torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-9, atol=1e-11)
    # an unweighted average of chunk Hessians would differ
    chunks = rechunk([batch], None, 8)
    naive = sum(HessianOperator(model, loss_fn, [c]).matvec(v) for c in chunks) / len(chunks)
    assert not torch.allclose(naive, dense @ v, rtol=1e-3)


@pytest.mark.parametrize("reuse_graph", [True, False])
def test_graph_reuse_gives_the_same_products(reuse_graph):
    model, loss_fn, batch = _case("mlp", "mse")
    dense = dense_hessian(model, loss_fn, batch)
    op = HessianOperator(model, loss_fn, [batch], reuse_graph=reuse_graph)
    for seed in range(3):
        v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(op.matvec(v), dense @ v)
    assert op.num_matvecs == 3


@pytest.mark.parametrize(("kind", "loss"), CASES)
def test_forward_over_reverse_is_exact_or_falls_back(kind, loss):
    model, loss_fn, batch = _case(kind, loss)
    dense = dense_hessian(model, loss_fn, batch)
    op = HessianOperator(model, loss_fn, rechunk([batch], None, 4), method="forward_over_reverse")
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the documented fallback may warn
        torch.testing.assert_close(op.matvec(v), dense @ v)
    if loss == "ce":  # forward-over-reverse really runs here (MSE falls back in torch 2.14)
        assert op.method == "forward_over_reverse"


def test_gradient_and_loss_match_the_full_batch():
    model, loss_fn, batch = _case("mlp", "ce")
    op = HessianOperator(model, loss_fn, rechunk([batch], None, 3))
    full = loss_fn(model, batch)
    grads = torch.autograd.grad(full, list(model.parameters()))
    torch.testing.assert_close(op.gradient(), torch.cat([g.reshape(-1) for g in grads]))
    assert op.loss() == pytest.approx(full.item(), rel=1e-12)


def test_non_finite_loss_raises():
    model, loss_fn, batch = _case("mlp", "mse")
    x, y = batch
    op = HessianOperator(model, loss_fn, [(x, y * float("nan"))])
    with pytest.raises(NonFiniteCurvatureError):
        lanczos(op, k=1)


def test_measurement_context_restores_buffers_modes_and_rng():
    import random

    import numpy as np

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None), nn.Dropout(0.5))
    model.train()
    model[2].eval()  # a user-set mode must survive too
    before = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    with measurement_context(model):
        assert model.training and not model[2].training
        model(torch.randn(8, 3))
        torch.rand(5), random.random(), np.random.rand()
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    assert torch.equal(rng[0], torch.get_rng_state())
    assert rng[1] == random.getstate() and np.array_equal(rng[2], np.random.get_state()[1])
    assert model.training and model[1].training and not model[2].training


def test_curvature_does_not_import_lightning():
    code = "import sys, lightning_eos.curvature; assert 'lightning' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_forward_over_reverse_falls_back_with_a_warning():
    model, _, batch = _case("mlp", "mse")

    class Square(torch.autograd.Function):  # old-style: unusable under torch.func
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return 2 * x * grad

    def loss_with_item(m, b):
        return Square.apply(m(b[0]) - b[1]).mean()

    loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    dense = dense_hessian(model, loss_fn, batch)
    op = HessianOperator(model, loss_with_item, [batch], method="forward_over_reverse")
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with pytest.warns(RuntimeWarning, match="falling back to double backward"):
        hv = op.matvec(v)
    assert op.method == "double_backward"
    torch.testing.assert_close(hv, dense @ v)


def test_unused_parameters_get_zero_curvature():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.unused = tiny_mlp(), nn.Linear(2, 2)

        def forward(self, x):
            return self.net(x)

    torch.manual_seed(0)
    model, loss_fn, batch = WithUnused().double(), mse, tiny_data("mlp", "mse")
    op = HessianOperator(model, loss_fn, rechunk([batch], None, 5))
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    dense = dense_hessian(model, loss_fn, batch)  # zero rows and columns for `unused`
    torch.testing.assert_close(op.matvec(v), dense @ v)
    n_used = sum(p.numel() for p in model.net.parameters())
    assert torch.count_nonzero(op.matvec(v)[n_used:]) == 0


def test_random_forward_is_replayed_so_products_are_one_matrix():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = tiny_data("mlp", "mse")

    def noisy(m, b):  # functional dropout is not a module: measurement_context cannot see it
        h = torch.nn.functional.dropout(m[1](m[0](b[0])), p=0.5, training=True)
        return ((m[2](h) - b[1]) ** 2).mean()

    op = HessianOperator(net, noisy, rechunk([(x, y)], None, 4))
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    state = torch.get_rng_state()
    assert torch.equal(op.matvec(v), op.matvec(v))
    assert torch.equal(state, torch.get_rng_state())
    # and the operator is symmetric, as one Hessian must be
    w = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    assert torch.dot(w, op.matvec(v)).item() == pytest.approx(torch.dot(v, op.matvec(w)).item())


def test_measurement_context_keeps_frozen_submodules_frozen():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model.train()
    model[1].eval()  # frozen BatchNorm: the training loss uses running statistics
    with measurement_context(model, mode="train"):
        assert model[0].training and not model[1].training and not model[2].training
    with measurement_context(model, mode="eval"):
        assert not any(m.training for m in model.modules())
    assert model[0].training and not model[1].training and model[2].training


@pytest.mark.parametrize(("kind", "loss"), CASES)
@pytest.mark.parametrize(
    ("dtype", "bound"), [(torch.float64, 1e-9), (torch.float32, 2e-4)], ids=["f64", "f32"]
)
def test_finite_difference_products_are_close_to_exact(kind, loss, dtype, bound):
    # documented error of the central difference: ~5e-11 in float64, ~3e-5 in float32
    model, loss_fn, batch = _case(kind, loss)
    dense = dense_hessian(model, loss_fn, batch)
    v = torch.randn(dense.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    v /= v.norm()
    model = model.to(dtype)
    x, y = batch
    chunks = rechunk([(x.to(dtype), y.to(dtype) if y.is_floating_point() else y)], None, 4)
    before = [p.detach().clone() for p in model.parameters()]
    op = HessianOperator(model, loss_fn, chunks, method="finite_difference")
    for length in (1.0, 1e-6, 100.0):  # the step follows v / |v|, so the length does not matter
        hv = op.matvec(length * v.to(dtype)).double()
        exact = length * (dense @ v)
        assert ((hv - exact).norm() / exact.norm()).item() < bound
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # restored bitwise


class _TinyAttention(nn.Module):
    """Self-attention (torch's fused SDPA inside) pooled into a scalar regression output."""

    def __init__(self, dim: int = 4, heads: int = 2) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, 1)

    def forward(self, x):
        out = self.attention(x, x, x, need_weights=False)[0]
        return self.head(out.mean(1)).squeeze(-1)


def _attention_by_hand(model: _TinyAttention, flat: torch.Tensor, x: torch.Tensor):
    """The same function as ``_TinyAttention`` written out with softmax(QK^T/sqrt(d))V."""
    shapes = [p.shape for p in model.parameters()]
    w_in, b_in, w_out, b_out, w_head, b_head = torch.split(flat, [s.numel() for s in shapes])
    dim, heads = model.attention.embed_dim, model.attention.num_heads
    w_in, w_out, w_head = w_in.view(3 * dim, dim), w_out.view(dim, dim), w_head.view(1, dim)
    q, k, v = (x @ w_in.T + b_in).split(dim, -1)
    n, t, d = x.shape[0], x.shape[1], dim // heads
    q, k, v = (z.view(n, t, heads, d).transpose(1, 2) for z in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, -1)
    out = (weights @ v).transpose(1, 2).reshape(n, t, dim) @ w_out.T + b_out
    return (out.mean(1) @ w_head.T + b_head).squeeze(-1)


def test_attention_models_are_measured_on_the_math_kernel():
    """torch's fused CPU attention kernel has no double backward; a measurement must still
    give the exact Hessian (the operator evaluates the loss with the math kernel)."""
    torch.manual_seed(0)
    model = _TinyAttention().double()
    x, y = torch.randn(6, 3, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    grad = torch.autograd.grad(loss_fn(model, (x, y)), list(model.parameters()), create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):  # why the context is needed
        torch.autograd.grad(sum(g.sum() for g in grad), list(model.parameters()))

    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    dense = torch.autograd.functional.hessian(
        lambda f: ((_attention_by_hand(model, f, x) - y) ** 2).mean(), flat0
    )
    for method in ("double_backward", "forward_over_reverse"):
        op = HessianOperator(model, loss_fn, [(x[:4], y[:4]), (x[4:], y[4:])], method=method)
        v = torch.randn(op.dim, dtype=torch.float64)
        torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-9, atol=1e-10)
    top = lanczos(HessianOperator(model, loss_fn, [(x, y)]), k=1, tol=1e-10).eigenvalues[0]
    torch.testing.assert_close(top, torch.linalg.eigvalsh(dense)[-1], rtol=1e-8, atol=1e-10)
