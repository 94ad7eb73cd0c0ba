"""Thresholds: the table, and quadratics just below and above each threshold."""

from __future__ import annotations

import pytest
import torch

from lightning_eos import thresholds as T


def _sgd(**kwargs):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param({"lr": 0.1}, 2 / 0.1, id="gd"),
        pytest.param({"lr": 0.1, "momentum": 0.9}, (2 + 2 * 0.9) / 0.1, id="heavy_ball"),
        pytest.param(
            {"lr": 0.1, "momentum": 0.9, "dampening": 0.9},
            (2 + 2 * 0.9) / ((1 - 0.9) * 0.1),
            id="ema_heavy_ball",
        ),
        pytest.param(
            {"lr": 0.1, "momentum": 0.5, "dampening": 0.2},
            (2 + 2 * 0.5) / (0.8 * 0.1),
            id="dampened",
        ),
        pytest.param(
            {"lr": 0.1, "momentum": 0.9, "nesterov": True},
            (2 + 2 * 0.9) / ((1 + 2 * 0.9) * 0.1),
            id="nesterov",
        ),
        pytest.param({"lr": 0.1, "weight_decay": 0.5}, 2 / 0.1 - 0.5, id="gd+wd"),
    ],
)
def test_stability_threshold_equals_the_table(kwargs, expected):
    assert T.stability_threshold(_sgd(**kwargs)) == pytest.approx(expected, rel=1e-12)


def test_formulas_agree_with_each_other():
    lr, b = 0.05, 0.7
    assert T.generalized_momentum_threshold(lr, b, 0.0) == pytest.approx(
        T.heavy_ball_threshold(lr, b)
    )
    assert T.generalized_momentum_threshold(lr, b, b) == pytest.approx(T.nesterov_threshold(lr, b))
    assert T.ema_heavy_ball_threshold(lr, b) == pytest.approx(
        T.heavy_ball_threshold((1 - b) * lr, b)
    )
    assert T.ema_nesterov_threshold(lr, b) == pytest.approx(T.nesterov_threshold((1 - b) * lr, b))
    assert T.ema_heavy_ball_threshold(1.0, 0.9) == pytest.approx(38.0)
    assert T.sam_edge(lr, 1e-10, 3.0) == pytest.approx(2 / lr, rel=1e-6)
    assert T.ias_threshold(lr, 0.25) == pytest.approx(0.5 / lr)


def test_sam_edge_is_the_prop2_fixed_point():
    # Prop. 2 of paper 003: lambda * eta * (1 + rho * lambda / |g|) = 2 at the edge
    lr, rho, g = 0.1, 0.05, 0.8
    lam = T.sam_edge(lr, rho, g)
    assert lam * lr * (1 + rho * lam / g) == pytest.approx(2.0)


def _final_distance(optimizer_kwargs: dict, curvature: float, steps: int = 4000) -> float:
    theta = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = torch.optim.SGD([theta], **optimizer_kwargs)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * curvature * theta**2).sum().backward()
        opt.step()
        if not torch.isfinite(theta).all() or theta.abs().item() > 1e12:
            return float("inf")
    return theta.abs().item()


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"lr": 0.1}, id="gd"),
        pytest.param({"lr": 0.1, "momentum": 0.9}, id="heavy_ball"),
        pytest.param({"lr": 0.1, "momentum": 0.5}, id="heavy_ball_0.5"),
        pytest.param({"lr": 0.1, "momentum": 0.9, "dampening": 0.9}, id="ema_heavy_ball"),
        pytest.param({"lr": 0.1, "momentum": 0.9, "nesterov": True}, id="nesterov"),
        pytest.param({"lr": 0.1, "momentum": 0.6, "weight_decay": 1.0}, id="heavy_ball+wd"),
    ],
)
def test_quadratic_converges_below_and_diverges_above(kwargs):
    threshold = T.stability_threshold(_sgd(**kwargs))
    assert _final_distance(kwargs, 0.98 * threshold) < 1e-6
    assert _final_distance(kwargs, 1.02 * threshold) > 1e6


def test_unknown_optimizer_raises_a_clear_error():
    adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(T.UnsupportedOptimizerError, match="torch.optim.SGD"):
        T.stability_threshold(adam)


def test_param_groups_with_different_thresholds_raise():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.1}, {"params": [q], "lr": 0.2}])
    with pytest.raises(T.UnsupportedOptimizerError, match="different thresholds"):
        T.stability_threshold(opt)


def test_reads_the_live_learning_rate():
    opt = _sgd(lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()
    assert T.stability_threshold(opt) == pytest.approx(2 / 0.05)
