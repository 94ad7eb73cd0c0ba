"""Lanczos on matrices with known spectra."""

from __future__ import annotations

import pytest
import torch

from lightning_eos.curvature import lanczos


def _symmetric(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    n = eigenvalues.numel()
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(eigenvalues.double()) @ q.T


def test_largest_algebraic_not_largest_magnitude():
    spectrum = torch.cat([torch.tensor([-50.0, 3.0, 2.5]), torch.linspace(-1, 1, 60)])
    a = _symmetric(spectrum)
    result = lanczos(a, k=2, tol=1e-10)
    torch.testing.assert_close(result.eigenvalues, torch.tensor([3.0, 2.5], dtype=torch.float64))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_and_residual_stop(k):
    g = torch.Generator().manual_seed(k)
    a = torch.randn(80, 80, generator=g, dtype=torch.float64)
    a = a + a.T
    result = lanczos(a, k=k, tol=1e-9)
    exact = torch.linalg.eigvalsh(a).flip(0)[:k]
    assert result.converged
    torch.testing.assert_close(result.eigenvalues, exact, rtol=1e-8, atol=1e-8)
    assert torch.allclose(
        result.eigenvectors @ result.eigenvectors.T, torch.eye(k, dtype=torch.float64), atol=1e-8
    )
    for lam, vec, res in zip(result.eigenvalues, result.eigenvectors, result.residuals):
        assert (a @ vec - lam * vec).norm().item() == pytest.approx(res.item(), abs=1e-9)


def test_warm_start_needs_fewer_products():
    spectrum = torch.cat(
        [torch.tensor([10.0, 9.0]), torch.rand(200, generator=torch.Generator().manual_seed(0)) * 8]
    )
    a = _symmetric(spectrum)
    cold = lanczos(a, k=1, tol=1e-6)
    b = a + 1e-3 * _symmetric(torch.randn(202, generator=torch.Generator().manual_seed(1)), seed=2)
    warm = lanczos(b, k=1, tol=1e-6, init=cold.restart_vectors)
    recold = lanczos(b, k=1, tol=1e-6)
    exact = torch.linalg.eigvalsh(b)[-1]
    assert warm.eigenvalues[0].item() == pytest.approx(exact.item(), rel=1e-6)
    assert warm.num_iterations < recold.num_iterations


def test_breakdown_on_low_rank_operator_still_finds_top_k():
    u = torch.randn(30, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = u @ torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)) @ u.T
    exact = torch.linalg.eigvalsh(a).flip(0)
    result = lanczos(a, k=3, tol=1e-8)
    torch.testing.assert_close(result.eigenvalues, exact[:3], atol=1e-8, rtol=1e-8)


def test_never_touches_the_global_rng():
    a = _symmetric(torch.linspace(0, 1, 40))
    state = torch.get_rng_state()
    first = lanczos(a, k=2)
    assert torch.equal(state, torch.get_rng_state())
    second = lanczos(a, k=2)
    assert torch.equal(first.eigenvalues, second.eigenvalues)  # deterministic


def test_matvec_callable_float32_follows_dtype():
    a = _symmetric(torch.linspace(0, 2, 30)).float()
    result = lanczos(lambda v: a @ v, k=1, dim=30)
    assert result.eigenvalues.dtype == torch.float32
    assert result.eigenvalues[0].item() == pytest.approx(2.0, rel=1e-4)


def test_identity_converges_without_nan():
    result = lanczos(torch.eye(10, dtype=torch.float64), k=3)
    assert result.converged and torch.isfinite(result.error_estimates).all()
    torch.testing.assert_close(result.eigenvalues[:1], torch.ones(1, dtype=torch.float64))


def test_residual_stop_rule_is_a_bound_where_the_gap_estimate_is_not():
    # an unresolved eigenvalue 1% below the top makes the gap estimate optimistic
    spectrum = torch.cat(
        [torch.tensor([10.0, 9.9]), torch.rand(100, generator=torch.Generator().manual_seed(0))]
    )
    a = _symmetric(spectrum)
    _, q = torch.linalg.eigh(a)
    init = (
        q[:, -1]
        + 0.3 * q[:, -2]
        + 0.05 * torch.randn(102, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    )
    for tol in (1e-3, 1e-4, 1e-6):
        result = lanczos(a, k=1, tol=tol, init=init, stop_rule="residual")
        assert result.converged
        assert abs(result.eigenvalues[0].item() - 10.0) <= tol * 10.0 * (1 + 1e-9)


def test_agree_hook_decides_when_to_stop():
    a = _symmetric(torch.linspace(0, 1, 40))
    never = lanczos(a, k=1, tol=1e-3, max_iter=25, agree=lambda t: torch.zeros_like(t))
    free = lanczos(a, k=1, tol=1e-3, max_iter=25)
    assert free.num_iterations < 25 and never.num_iterations == 25
