"""Gradient moments and the interaction-aware sharpness against exhaustive enumeration.

The references are independent of the code under test: per-sample gradients by one
``autograd.grad`` per sample, the float64 dense Hessian, and every minibatch of a tiny
set enumerated (all C(n, b) subsets; all multisets with their multinomial weights for
sampling with replacement).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import dense_hessian, mse, tiny_data, tiny_mlp
from torch import nn

from lightning_eos.curvature import (
    BatchCoupledLossError,
    GradientMoments,
    HessianOperator,
    batch_concentration,
    expected_loss_change,
    flatten,
    interaction_aware_sharpness,
    sampling_coefficient,
)

N = 8


def _reference_gradients(model, loss_fn, x, y):
    """Rows g_i, one autograd call per sample, in float64."""
    params = list(model.parameters())
    rows = []
    for i in range(len(x)):
        grads = torch.autograd.grad(loss_fn(model, (x[i : i + 1], y[i : i + 1])), params)
        rows.append(flatten(grads).detach())
    return torch.stack(rows)


def _enumerated(G, H, b, replacement):
    """E||g_xi||^2 and E g_xi^T H g_xi over every batch of size b, exactly."""
    n = len(G)
    total_s = total_hs = total_w = 0.0
    if replacement:  # multisets, each with its multinomial count of ordered draws
        batches = itertools.combinations_with_replacement(range(n), b)
    else:
        batches = itertools.combinations(range(n), b)
    for batch in batches:
        weight = 1.0
        if replacement:
            counts = torch.bincount(torch.tensor(batch), minlength=n)
            weight = math.factorial(b) / math.prod(math.factorial(int(c)) for c in counts)
        g = G[list(batch)].mean(0)
        total_s += weight * float(g @ g)
        total_hs += weight * float(g @ H @ g)
        total_w += weight
    return total_s / total_w, total_hs / total_w


@pytest.fixture
def tiny_case():
    torch.manual_seed(0)
    model = tiny_mlp().double()
    x, y = tiny_data("mlp", "mse", n=N, seed=3)
    G = _reference_gradients(model, mse, x, y)
    H = dense_hessian(model, mse, (x, y))
    return model, x, y, G, H


@pytest.mark.parametrize("replacement", [False, True])
@pytest.mark.parametrize("chunks", [1, 3])
def test_ias_equals_enumeration_of_every_minibatch(tiny_case, replacement, chunks):
    model, x, y, G, H = tiny_case
    size = math.ceil(N / chunks)
    batches = [(x[i : i + size], y[i : i + size]) for i in range(0, N, size)]
    op = HessianOperator(model, mse, batches)
    result = interaction_aware_sharpness(op, batch_size=3, replacement=replacement)
    trace_S_b, trace_HS_b = _enumerated(G, H, 3, replacement)
    grad = G.mean(0)
    assert result.hs1_samples == N and result.trace_HS_1_stderr == 0.0
    assert result.trace_S_b == pytest.approx(trace_S_b, rel=1e-10)
    assert result.trace_HS_b == pytest.approx(trace_HS_b, rel=1e-10)
    assert result.ias == pytest.approx(trace_HS_b / trace_S_b, rel=1e-10)
    assert result.rho_b == pytest.approx(float(grad @ grad) / trace_S_b, rel=1e-10)
    assert result.instability == pytest.approx(trace_HS_b / float(grad @ grad), rel=1e-10)
    # and the two ends themselves
    assert result.trace_S_1 == pytest.approx(float((G * G).sum(1).mean()), rel=1e-12)
    assert result.trace_HS_1 == pytest.approx(
        float(torch.einsum("ij,jk,ik->i", G, H, G).mean()), rel=1e-10
    )
    assert result.trace_HS_n == pytest.approx(float(grad @ H @ grad), rel=1e-10)
    assert result.ias <= float(torch.linalg.eigvalsh(H)[-1]) + 1e-12  # Definition 1


@pytest.mark.parametrize("replacement", [False, True])
def test_gamma_and_rho_b_match_enumeration_for_every_batch_size(tiny_case, replacement):
    model, x, y, G, H = tiny_case
    grad = G.mean(0)
    S_1 = G.T @ G / N
    S_n = torch.outer(grad, grad)
    rho = float(grad @ grad) / float(torch.trace(S_1))
    op = HessianOperator(model, mse, [(x, y)])
    result = interaction_aware_sharpness(op, batch_size=1, replacement=replacement)
    for b in range(1, N + 1):
        trace_S_b, trace_HS_b = _enumerated(G, H, b, replacement)
        # C_b = S_b - S_n = (gamma/b)(S_1 - S_n): paper 004 eq. 1, on the trace
        gamma = sampling_coefficient(N, b, replacement)
        expected_gamma = 1.0 if replacement else (N - b) / (N - 1)
        assert gamma == pytest.approx(expected_gamma, abs=1e-15)
        assert trace_S_b - float(torch.trace(S_n)) == pytest.approx(
            gamma / b * float(torch.trace(S_1 - S_n)), rel=1e-9, abs=1e-15
        )
        rho_b = float(torch.trace(S_n)) / trace_S_b
        assert batch_concentration(rho, N, b, replacement) == pytest.approx(rho_b, rel=1e-10)
        at_b = result.at_batch_size(b)
        assert at_b.rho_b == pytest.approx(rho_b, rel=1e-10)
        assert at_b.ias == pytest.approx(trace_HS_b / trace_S_b, rel=1e-10)
    # GD: the IAS of the full batch is g^T H g / |g|^2 (the b = n end)
    gd = result.at_batch_size(N)
    if not replacement:
        assert gd.rho_b == pytest.approx(1.0) and gd.ias == pytest.approx(
            float(grad @ H @ grad / (grad @ grad)), rel=1e-10
        )


def test_vmap_and_one_backward_per_sample_agree(tiny_case):
    model, x, y, G, H = tiny_case
    op = HessianOperator(model, mse, [(x, y)])
    for vectorize in (True, False):
        moments = GradientMoments(op, vectorize=vectorize, per_sample_chunk=3)
        torch.testing.assert_close(
            moments.sample_gradients(torch.arange(N)), G, rtol=1e-12, atol=1e-14
        )
        torch.testing.assert_close(
            moments.minibatch_gradient(torch.tensor([1, 1, 5])), (2 * G[1] + G[5]) / 3
        )


def test_a_loss_that_vmap_cannot_trace_falls_back_with_a_warning(tiny_case):
    model, x, y, G, _ = tiny_case

    def untraceable(m, batch):  # .item() inside the loss: data-dependent, vmap refuses it
        loss = mse(m, batch)
        return loss * (1.0 if loss.item() >= 0 else 2.0)

    moments = GradientMoments(HessianOperator(model, untraceable, [(x, y)]))
    with pytest.warns(RuntimeWarning, match="one backward pass per sample"):
        rows = moments.sample_gradients(torch.arange(N))
    torch.testing.assert_close(rows, G)


def test_the_standard_error_is_honest_and_shrinks_as_one_over_sqrt_k():
    torch.manual_seed(1)
    model = tiny_mlp().double()
    n = 240
    x, y = tiny_data("mlp", "mse", n=n, seed=5)
    op = HessianOperator(model, mse, [(x, y)])
    exact = interaction_aware_sharpness(op, batch_size=16).trace_HS_1
    spreads, reported = {}, {}
    for k in (6, 24, 96):
        estimates, errors = [], []
        for seed in range(48):
            result = interaction_aware_sharpness(
                op, batch_size=16, samples=k, generator=torch.Generator().manual_seed(seed)
            )
            estimates.append(result.trace_HS_1)
            errors.append(result.trace_HS_1_stderr)
        estimates = torch.tensor(estimates, dtype=torch.float64)
        spreads[k] = float(((estimates - exact) ** 2).mean().sqrt())  # unbiased: spread about truth
        reported[k] = float(torch.tensor(errors).pow(2).mean().sqrt())
        assert spreads[k] == pytest.approx(reported[k], rel=0.3)
    fpc = {k: math.sqrt(1 - k / n) for k in spreads}  # sampling without replacement
    for small, large in ((6, 24), (24, 96)):  # 4x the samples: half the error (times the fpc)
        expected = 2.0 * fpc[small] / fpc[large]
        assert reported[small] / reported[large] == pytest.approx(expected, rel=0.25)
        assert spreads[small] / spreads[large] == pytest.approx(expected, rel=0.35)


def test_on_a_quadratic_the_expected_loss_change_is_eq_7_exactly():
    torch.manual_seed(2)
    model = nn.Linear(3, 2).double()  # MSE of a linear model: an exact quadratic in theta
    x, y = tiny_data("mlp", "mse", n=N, seed=7)
    x, y = x[:, :3], y[:, :2]
    op = HessianOperator(model, mse, [(x, y)])
    G = _reference_gradients(model, mse, x, y)
    theta = flatten(list(model.parameters())).detach()
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())

    def loss_at(flat):
        from lightning_eos.curvature import unflatten

        values = dict(zip(names, unflatten(flat, params)))
        return float(F.mse_loss(torch.func.functional_call(model, values, (x,)), y))

    lr = 0.7
    for b, replacement in ((3, False), (3, True), (N, False)):
        result = interaction_aware_sharpness(op, batch_size=b, replacement=replacement)
        batches = (
            itertools.product(range(N), repeat=b)
            if replacement
            else itertools.combinations(range(N), b)
        )
        changes = [
            loss_at(theta - lr * G[list(batch)].mean(0)) - loss_at(theta) for batch in batches
        ]
        enumerated = sum(changes) / len(changes)
        predicted = result.predicted_loss_change(lr) * result.trace_S_n
        assert predicted == pytest.approx(enumerated, rel=1e-10)
        # the sampled estimator is unbiased: within 4 standard errors (exact for GD)
        mean, stderr = expected_loss_change(
            op,
            lr,
            b,
            replacement=replacement,
            samples=400,
            generator=torch.Generator().manual_seed(0),
        )
        assert abs(mean - enumerated) <= 4 * stderr + 1e-12
    assert list(model.parameters())[0].data_ptr() == params[0].data_ptr()
    assert torch.equal(flatten(params).detach(), theta)  # restored bit for bit


def test_batchnorm_in_train_mode_is_refused_and_eval_mode_works():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = tiny_data("mlp", "mse", n=N)
    op = HessianOperator(model, mse, [(x, y)])
    with pytest.raises(BatchCoupledLossError, match="BatchNorm1d in train mode"):
        interaction_aware_sharpness(op, batch_size=2)
    # full-batch GD needs no per-sample gradient: g^T H g / |g|^2 with batch statistics
    gd = interaction_aware_sharpness(op, batch_size=N)
    H = dense_hessian(model, mse, (x, y))
    g = flatten(torch.autograd.grad(mse(model, (x, y)), list(model.parameters())))
    assert gd.hs1_samples == 0 and gd.rho_b == 1.0 and gd.ias_stderr == 0.0
    assert gd.ias == pytest.approx(float(g @ H @ g / (g @ g)), rel=1e-10)
    model.eval()
    G = _reference_gradients(model, mse, x, y)
    result = interaction_aware_sharpness(HessianOperator(model, mse, [(x, y)]), batch_size=2)
    assert result.trace_S_1 == pytest.approx(float((G * G).sum(1).mean()), rel=1e-10)


def test_a_loss_that_is_not_a_mean_over_samples_raises():
    model = tiny_mlp().double()
    x, y = tiny_data("mlp", "mse", n=N)

    def summed(m, batch):
        return F.mse_loss(m(batch[0]), batch[1], reduction="sum")

    with pytest.raises(BatchCoupledLossError, match="do not average"):
        interaction_aware_sharpness(HessianOperator(model, summed, [(x, y)]), batch_size=2)


def test_wrong_batch_sizes_are_refused(tiny_case):
    model, x, y, _, _ = tiny_case
    op = HessianOperator(model, mse, [(x, y)])
    with pytest.raises(ValueError, match="without replacement"):
        interaction_aware_sharpness(op, batch_size=N + 1)
    with pytest.raises(ValueError, match="rho"):
        batch_concentration(0.0, 10, 2)


def test_the_loss_change_leaves_the_operator_usable(tiny_case):
    # one chunk: the operator caches its first-order graph; the shifted losses must not
    # write to the parameters it was built from
    model, x, y, G, H = tiny_case
    op = HessianOperator(model, mse, [(x, y)])
    first = interaction_aware_sharpness(op, batch_size=3)
    before = flatten(list(model.parameters())).detach().clone()
    change, _ = expected_loss_change(op, 0.1, 3, samples=4, generator=torch.Generator())
    again = interaction_aware_sharpness(op, batch_size=3)
    assert again.ias == first.ias and torch.equal(flatten(list(model.parameters())), before)
    # and one SGD step from the first 3 samples, written out by hand
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    from lightning_eos.curvature import loss_at, unflatten

    step = -0.1 * G[:3].mean(0)
    values = dict(zip(names, unflatten(before + step, params)))
    expected = float(F.mse_loss(torch.func.functional_call(model, values, (x,)), y))
    assert loss_at(op, step) == pytest.approx(expected, rel=1e-12)


def test_a_zero_gradient_is_a_skipped_measurement_not_a_crash():
    from lightning_eos.curvature import NonFiniteCurvatureError

    model = nn.Linear(2, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    x = torch.randn(6, 2, dtype=torch.float64)
    op = HessianOperator(model, mse, [(x, torch.zeros(6, 1, dtype=torch.float64))])
    with pytest.raises(NonFiniteCurvatureError, match="gradient is zero"):
        interaction_aware_sharpness(op, batch_size=2)
