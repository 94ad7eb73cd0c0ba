"""The float64 references of paper 001: scalar ReLU trajectories, Theorem 2, l1/l2 baselines."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch

from lightning_eos.analysis import (
    min_l1_solution,
    min_l2_solution,
    regression_test_loss,
    scalar_relu_trajectory,
    theorem2_bound,
)
from lightning_eos.data import SparseRegressionDataModule
from lightning_eos.models import ScalarReLUNetwork, half_mse_loss

# paper 001, Fig. 3: beta = 0.9, eta = (2 + eps)/u0^2, eps = 0.01, (u0, v0) = (10, 1e-6)
U0, V0, EPS, BETA = 10.0, 1e-6, 0.01, 0.9
LR = (2 + EPS) / U0**2
SCENARIOS = {  # (momentum, switch_to)
    "GD": (0.0, None),
    "PHB->GD": (BETA, 0.0),
    "GD->PHB": (0.0, BETA),
    "PHB": (BETA, None),
}


def autograd_reference(momentum, switch_to, steps):
    """Eq. (1) by hand on ScalarReLUNetwork, gradients by autograd, learning rate (1+b) eta."""
    net = ScalarReLUNetwork(u0=U0, v0=V0).double()
    with torch.no_grad():  # exact float64 initial values, not float32-rounded ones
        net.u.fill_(U0)
        net.v.fill_(V0)
    x, y = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    params = [net.u, net.v]
    previous = [p.detach().clone() for p in params]
    us, vs, beta, switched = [U0], [V0], momentum, None
    for t in range(steps):
        if switch_to is not None and switched is None and net.u.item() ** 2 < 2 / LR:
            beta, switched = switch_to, t
        grads = torch.autograd.grad(half_mse_loss(net(x), y), params)
        with torch.no_grad():
            for p, prev, g in zip(params, previous, grads, strict=True):
                new = p - LR * (1 + beta) * g + beta * (p - prev)
                prev.copy_(p)
                p.copy_(new)
        us.append(net.u.item())
        vs.append(net.v.item())
    return np.array(us), np.array(vs), switched


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_trajectory_equals_autograd_heavy_ball(name):
    # 1200 steps: GD->PHB switches at t = 1122
    momentum, switch_to = SCENARIOS[name]
    run = scalar_relu_trajectory(U0, V0, LR, momentum, steps=1200, switch_to=switch_to)
    u, v, switched = autograd_reference(momentum, switch_to, steps=1200)
    assert run.switch_step == switched
    assert (switched is None) == (switch_to is None)
    # v grows ~1e5-fold and oscillates through 0: compare it on the scale of its peak
    np.testing.assert_allclose(run.u, u, rtol=1e-12)
    np.testing.assert_allclose(run.v, v, rtol=0, atol=1e-10 * np.abs(v).max())
    loss = 0.5 * u**2 * v**2
    np.testing.assert_allclose(run.loss, loss, rtol=0, atol=1e-10 * loss.max())


def test_trajectory_is_torch_sgd_with_momentum():
    run = scalar_relu_trajectory(U0, V0, LR, BETA, steps=300)
    params = [torch.tensor([U0], dtype=torch.float64), torch.tensor([V0], dtype=torch.float64)]
    params = [torch.nn.Parameter(p) for p in params]
    opt = torch.optim.SGD(params, lr=(1 + BETA) * LR, momentum=BETA)
    us = [U0]
    for _ in range(300):
        opt.zero_grad()
        u, v = params
        (0.5 * u**2 * v**2).sum().backward()
        opt.step()
        us.append(u.item())
    np.testing.assert_allclose(run.u, us, rtol=1e-12)


def test_dead_relu_keeps_only_its_momentum():
    # u < 0: zero gradient, so u_{t+1} - u_t = beta (u_t - u_{t-1}) (Lemma 6)
    run = scalar_relu_trajectory(0.1, 5.0, lr=0.5, momentum=0.5, steps=40)
    t0 = int(np.argmax(run.u < 0))
    assert t0 > 0
    steps = np.diff(run.u[t0 - 1 :])
    np.testing.assert_allclose(steps[1:], 0.5 * steps[:-1], rtol=1e-12)
    assert np.all(run.loss[t0:] == 0)


def test_sharpness_reduction_orders_as_in_fig3():
    # measured (2000 steps, float64): GD 0.998, PHB->GD 1.268, GD->PHB 1.819, PHB 3.872
    runs = {
        name: scalar_relu_trajectory(U0, V0, LR, m, steps=2000, switch_to=s)
        for name, (m, s) in SCENARIOS.items()
    }
    delta = {name: U0**2 - run.minimum_sharpness[-1] for name, run in runs.items()}
    assert delta["GD"] < delta["PHB->GD"] < delta["GD->PHB"] < delta["PHB"]
    expected = {"GD": 0.998, "PHB->GD": 1.268, "GD->PHB": 1.819, "PHB": 3.872}
    assert delta == pytest.approx(expected, abs=2e-3)
    for run in runs.values():
        assert run.minimum_sharpness[-1] < 2 / LR  # every run ends below the MSS
        assert run.loss[-1] < 1e-3 * run.loss.max() and run.u.min() > 0  # caught, alive
    for name in ("PHB->GD", "GD->PHB"):
        t = runs[name].switch_step
        assert runs[name].u[t] ** 2 < 2 / LR <= runs[name].u[t - 1] ** 2


# Theorem 2 on 2000 steps, measured tightness (u0^2 - ubar^2) / Delta S:
# beta 0.0-0.6: > 0.99998; 0.7: 0.99994; 0.8: 0.99965; 0.9: 0.9959; 0.95: 0.9790
# (and 0.99: 0.82, where u_T = 4.44 overshoots far; App. E.2). ubar - u_T >= 1.4e-9.
BETAS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]


def test_theorem2_bound_holds_and_is_tight_across_beta():
    bounds = []
    for beta in BETAS:
        run = scalar_relu_trajectory(U0, V0, LR, beta, steps=2000)
        b = theorem2_bound(run.u, run.v, LR, beta, EPS)
        assert b.holds, (beta, b)
        assert b.u_final <= b.u_bar and b.bound_reduction <= b.delta_sharpness
        assert b.tightness >= (0.99 if beta <= 0.9 else 0.97), (beta, b.tightness)
        bounds.append(b)
    # Fig. 4(a): C_u and 1/(1 + eta C_v) both decrease with beta (Hypothesis 1.1 and 1.2)
    c_u = [b.c_u for b in bounds]
    shrink = [1 / (1 + LR * b.c_v) for b in bounds]
    assert all(np.diff(c_u) < 0) and all(np.diff(shrink) < 0)
    # the crossing comes earlier with more momentum
    assert all(np.diff([b.tau_u for b in bounds]) < 0)


def test_theorem2_quantities_by_hand():
    u = np.array([3.0, 2.9, 2.5, 2.2, 2.1])
    v = np.array([0.1, 0.3, 0.2, 0.1, 0.05])
    lr, beta, eps = 0.3, 0.5, 0.5  # (2 - eps)/lr = 5
    # u_t^2: 9, 8.41, 6.25, 4.84, 4.41; the first below 5 is t = 3
    b = theorem2_bound(u, v, lr, beta, eps)
    assert b.tau_u == 3
    assert b.c_u == pytest.approx((2.2 - 0.5 * 2.5) / 0.5)
    assert b.c_v == pytest.approx(1.5 / 0.5 * (0.1**2 + 0.05**2))
    assert b.u_bar == pytest.approx(b.c_u / (1 + lr * b.c_v))
    assert b.delta_sharpness == pytest.approx(9 - 4.41)
    assert b.bound_reduction == pytest.approx(9 - b.u_bar**2)
    # tau_u = 0 uses u_{-1} = u_0
    b0 = theorem2_bound(u[3:], v[3:], lr, beta, eps)
    assert b0.tau_u == 0 and b0.c_u == pytest.approx(2.2)


@pytest.mark.parametrize(
    ("u", "v", "eps", "message"),
    [
        ([10.0, 9.99], [1e-6, 1e-6], 0.01, "never fell below"),
        ([10.0, 9.0, -0.1], [1e-6, 1e-3, 1.0], 0.01, "ReLU died"),
        ([10.0, 9.0], [1.5, 0.1], 0.01, "v_0"),
        ([10.0, 9.0], [0.1, 0.1], 1.5, "eps"),
    ],
    ids=["no-crossing", "dead", "v0>=1", "eps>=1"],
)
def test_theorem2_refuses_outside_its_hypotheses(u, v, eps, message):
    with pytest.raises(ValueError, match=message):
        theorem2_bound(u, v, LR, 0.9, eps)


# --- l1 / l2 baselines of Fig. 1 ---------------------------------------------------------


def brute_force_min_l1(x, y):
    """Basis pursuit by enumeration: an optimal vertex has support of n independent columns."""
    n, d = x.shape
    best = None
    for support in itertools.combinations(range(d), n):
        cols = x[:, support]
        if abs(np.linalg.det(cols)) < 1e-10:
            continue
        w = np.zeros(d)
        w[list(support)] = np.linalg.solve(cols, y)
        if best is None or np.abs(w).sum() < np.abs(best).sum():
            best = w
    return best


@pytest.mark.parametrize("seed", range(4), ids=lambda s: f"seed={s}")
def test_min_l1_equals_brute_force_and_min_l2_the_normal_equations(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(3, 8)), rng.normal(size=3)
    w1 = min_l1_solution(x, y)
    reference = brute_force_min_l1(x, y)
    assert np.abs(w1).sum() == pytest.approx(np.abs(reference).sum(), rel=1e-9)
    np.testing.assert_allclose(w1, reference, atol=1e-9)  # generic data: a unique optimum
    w2 = min_l2_solution(x, y)
    np.testing.assert_allclose(w2, x.T @ np.linalg.solve(x @ x.T, y), rtol=1e-10)


def test_l1_recovers_w_star_and_l2_generalizes_worse_on_app_b():
    # measured, seeds 0-2: l1 test loss ~1e-28 (exact recovery), l2 1.06, 1.40, 1.33
    data = SparseRegressionDataModule(dtype="float64")
    data.setup()
    x, y = data.x_train.numpy(), data.y_train.numpy()
    w1, w2 = min_l1_solution(data.x_train, data.y_train), min_l2_solution(x, y)
    np.testing.assert_allclose(w1, data.w_star.numpy(), atol=1e-10)
    assert regression_test_loss(w1, data.x_test, data.y_test) < 1e-18
    np.testing.assert_allclose(x @ w2, y, atol=1e-10)  # both interpolate
    np.testing.assert_allclose(x @ w1, y, atol=1e-10)
    assert regression_test_loss(w2, data.x_test, data.y_test) > 0.5
    # each is optimal in its own norm
    assert np.abs(w1).sum() < np.abs(w2).sum() and np.linalg.norm(w2) < np.linalg.norm(w1)


def test_infeasible_basis_pursuit_raises():
    with pytest.raises(ValueError, match="feasible"):
        min_l1_solution([[1.0, 0.0], [1.0, 0.0]], [1.0, 2.0])


def test_regression_test_loss_is_half_mse():
    rng = np.random.default_rng(0)
    x, y, w = rng.normal(size=(9, 4)), rng.normal(size=9), rng.normal(size=4)
    expected = half_mse_loss(torch.from_numpy(x @ w), torch.from_numpy(y)).item()
    assert regression_test_loss(w, x, y) == pytest.approx(expected, rel=1e-14)


def test_analysis_does_not_import_lightning():
    code = "import sys, lightning_eos.analysis; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
