"""Momentum optimizers and LinearWarmup against hand-written float64 references.

The references below share no code with lightning_eos.optim.momentum: they keep the
papers' iterate theta_t and displacement delta_t (or EMA m_t) as plain tensors and take
gradients with torch.autograd.grad.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import torch
from conftest import quiet_trainer, tiny_data, tiny_mlp
from torch import Tensor

from lightning_eos import thresholds as T
from lightning_eos.models import SupervisedTask
from lightning_eos.optim import (
    EMAHeavyBall,
    EMANesterov,
    GeneralizedMomentum,
    HeavyBall,
    LinearWarmup,
    Nesterov,
)

# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Method:
    """One optimizer and its reference: the look-ahead form or the EMA form."""

    cls: type
    form: str  # "lookahead" (theta/delta, gradient at theta + beta2 delta) or "ema_hb"/"ema_nag"
    lookahead: str | None = None  # beta2: the group's "momentum", its "lookahead", or 0

    def beta2(self, group: dict) -> float:
        return 0.0 if self.lookahead is None else group[self.lookahead]

    def gain(self, group: dict) -> float:
        """Threshold times eta / 2, from paper 002 Table 1 and paper 004 Thm. 2."""
        b = group["momentum"]
        if self.form == "lookahead":
            return (1 + b) / (1 + 2 * self.beta2(group))
        if self.form == "ema_hb":
            return (1 + b) / (1 - b)
        return (1 + b) / ((1 - b) * (1 + 2 * b))


METHODS = {
    "heavy_ball": Method(HeavyBall, "lookahead"),
    "nesterov": Method(Nesterov, "lookahead", lookahead="momentum"),
    "generalized": Method(GeneralizedMomentum, "lookahead", lookahead="lookahead"),
    "ema_heavy_ball": Method(EMAHeavyBall, "ema_hb"),
    "ema_nesterov": Method(EMANesterov, "ema_nag"),
}

CLOSED_FORMS = {
    "heavy_ball": lambda lr, g: T.heavy_ball_threshold(lr, g["momentum"]),
    "nesterov": lambda lr, g: T.nesterov_threshold(lr, g["momentum"]),
    "generalized": lambda lr, g: T.generalized_momentum_threshold(
        lr, g["momentum"], g["lookahead"]
    ),
    "ema_heavy_ball": lambda lr, g: T.ema_heavy_ball_threshold(lr, g["momentum"]),
    "ema_nesterov": lambda lr, g: T.ema_nesterov_threshold(lr, g["momentum"]),
}


def _build(name: str, params: Any, lr: float, momentum: float, lookahead: float = 0.3, **kw):
    method = METHODS[name]
    if method.cls is GeneralizedMomentum:
        kw["lookahead"] = lookahead
    return method.cls(params, lr=lr, momentum=momentum, **kw)


# ----------------------------------------------------------------------------- problem


def _problem(seed: int = 0) -> tuple[list[Tensor], Any]:
    """A tanh MLP (4-5-2) with MSE on 8 samples, in float64: four tensors and the loss."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randn(8, 2, generator=g, dtype=torch.float64)
    w1 = 0.5 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    b1 = 0.1 * torch.randn(5, generator=g, dtype=torch.float64)
    w2 = 0.5 * torch.randn(5, 2, generator=g, dtype=torch.float64)
    b2 = 0.1 * torch.randn(2, generator=g, dtype=torch.float64)

    def loss(params: list[Tensor]) -> Tensor:
        w1, b1, w2, b2 = params
        return ((torch.tanh(x @ w1 + b1) @ w2 + b2 - y) ** 2).mean()

    return [w1, b1, w2, b2], loss


def _grads(loss: Any, points: list[Tensor]) -> list[Tensor]:
    points = [p.detach().requires_grad_(True) for p in points]
    return list(torch.autograd.grad(loss(points), points))


def _lr(t: int) -> float:
    return 0.05 * (1 + 0.5 * math.sin(t))


# Two groups: the first layer on the defaults, the second with its own momentum, look-ahead
# (GeneralizedMomentum only), weight decay and half the learning rate.
LR_FACTOR = (1.0, 0.5)


def _hyper(name: str, weight_decay: float, match_gd: bool) -> list[dict]:
    first = {"momentum": 0.9, "weight_decay": weight_decay, "match_gd": match_gd}
    second = {"momentum": 0.5, "weight_decay": 3 * weight_decay, "match_gd": match_gd}
    if METHODS[name].cls is GeneralizedMomentum:
        first["lookahead"], second["lookahead"] = 0.3, 0.7
    return [first, second]


def _groups(name: str, params: list[Tensor], weight_decay: float, match_gd: bool):
    first, second = _hyper(name, weight_decay, match_gd)
    second = {"params": params[2:], **second}
    return _build(name, [{"params": params[:2]}, second], lr=0.05, **first)


def _reference(name: str, start: list[Tensor], loss: Any, hyper: list[dict], steps: int):
    """The papers' recursion on plain tensors; returns the points the optimizer stores."""
    method = METHODS[name]
    group_of = [0, 0, 1, 1]
    beta2 = [method.beta2(h) if method.form == "lookahead" else 0.0 for h in hyper]
    theta = [p.clone() for p in start]
    state = [torch.zeros_like(p) for p in start]  # delta_{t-1} or m_{t-1}
    for t in range(steps):
        points = [th + beta2[k] * s for th, s, k in zip(theta, state, group_of)]
        grads = _grads(loss, points)
        for i, k in enumerate(group_of):
            h = hyper[k]
            b = h["momentum"]
            eta = _lr(t) * LR_FACTOR[k] * (method.gain(h) if h["match_gd"] else 1.0)
            g = grads[i] + h["weight_decay"] * points[i]
            if method.form == "lookahead":  # paper 004, Thm. 2
                state[i] = b * state[i] - eta * g
                theta[i] = theta[i] + state[i]
            elif method.form == "ema_hb":  # paper 002, Table 1
                state[i] = b * state[i] + (1 - b) * g
                theta[i] = theta[i] - eta * state[i]
            else:
                state[i] = b * state[i] + (1 - b) * g
                theta[i] = theta[i] - eta * (b * state[i] + (1 - b) * g)
    return [th + beta2[k] * s for th, s, k in zip(theta, state, group_of)]


def _run(opt: torch.optim.Optimizer, params: list[Tensor], loss: Any, steps: int, lrs=_lr):
    for t in range(steps):
        for k, group in enumerate(opt.param_groups):
            group["lr"] = lrs(t) * LR_FACTOR[k]
        for p, g in zip(params, _grads(loss, params), strict=True):
            p.grad = g
        opt.step()


# ----------------------------------------------------------------------------- trajectories


@pytest.mark.parametrize("weight_decay", [0.0, 0.01], ids=["wd=0", "wd=0.01"])
@pytest.mark.parametrize("match_gd", [False, True], ids=["match_gd=no", "match_gd=yes"])
@pytest.mark.parametrize("name", list(METHODS))
def test_matches_the_papers_recursion_under_a_changing_lr(name, match_gd, weight_decay):
    start, loss = _problem()
    params = [torch.nn.Parameter(p.clone()) for p in start]
    _run(_groups(name, params, weight_decay, match_gd), params, loss, steps=50)
    expected = _reference(name, start, loss, _hyper(name, weight_decay, match_gd), steps=50)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)
    moved = sum((p.detach() - s).abs().sum() for p, s in zip(params, start, strict=True))
    assert moved > 1e-2  # the test is not vacuous


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(METHODS))
def test_dtype_is_kept_and_params_without_grad_are_skipped(name, dtype):
    a = torch.nn.Parameter(torch.ones(3, dtype=dtype))
    frozen = torch.nn.Parameter(torch.ones(2, dtype=dtype))
    opt = _build(name, [a, frozen], lr=0.1, momentum=0.9)
    for _ in range(3):
        a.grad = a.detach().clone()
        opt.step()
    assert a.dtype == dtype and all(
        v.dtype == dtype for v in opt.state[a].values() if torch.is_tensor(v)
    )
    assert torch.equal(frozen.detach(), torch.ones(2, dtype=dtype)) and frozen not in opt.state


def _trajectory(opt_factory, lrs, steps=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))
    opt = opt_factory([w])
    points, grads = [w.detach().clone()], []
    for t in range(steps):
        opt.param_groups[0]["lr"] = lrs(t)
        w.grad = torch.sin(3 * w.detach()) + w.detach() ** 3  # non-quadratic
        grads.append(w.grad.clone())
        opt.step()
        points.append(w.detach().clone())
    return points, grads


def test_heavy_ball_is_torch_sgd_momentum_at_constant_lr():
    ours, _ = _trajectory(partial(HeavyBall, lr=0.1, momentum=0.9), lambda t: 0.1)
    torch_, _ = _trajectory(partial(torch.optim.SGD, lr=0.1, momentum=0.9), lambda t: 0.1)
    for a, b in zip(ours, torch_, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


def test_nesterov_is_torch_sgd_nesterov_at_constant_lr():
    ours, _ = _trajectory(partial(Nesterov, lr=0.1, momentum=0.9), lambda t: 0.1)
    torch_, _ = _trajectory(
        partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True), lambda t: 0.1
    )
    for a, b in zip(ours, torch_, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


def test_under_a_schedule_torch_rescales_the_displacement_and_eq1_does_not():
    beta = 0.9
    ramp = lambda t: 0.01 * (t + 1)  # noqa: E731  a warmup: eta_t / eta_{t-1} > 1
    theirs, g_t = _trajectory(partial(torch.optim.SGD, lr=0.01, momentum=beta), ramp)
    ours, g_o = _trajectory(partial(HeavyBall, lr=0.01, momentum=beta), ramp)
    for t in range(1, len(g_t)):
        # torch: w_{t+1} - w_t = beta (eta_t / eta_{t-1}) (w_t - w_{t-1}) - eta_t g_t
        torch_step = beta * ramp(t) / ramp(t - 1) * (theirs[t] - theirs[t - 1]) - ramp(t) * g_t[t]
        torch.testing.assert_close(theirs[t + 1] - theirs[t], torch_step, rtol=1e-10, atol=1e-14)
        # paper 001, eq. (1): w_{t+1} - w_t = beta (w_t - w_{t-1}) - eta_t g_t
        eq1_step = beta * (ours[t] - ours[t - 1]) - ramp(t) * g_o[t]
        torch.testing.assert_close(ours[t + 1] - ours[t], eq1_step, rtol=1e-10, atol=1e-14)
    assert (ours[-1] - theirs[-1]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- thresholds

BETAS = [0.0, 0.5, 0.9]


def _quadratic_final_norm(opt_factory, lam1: float, steps: int = 1000) -> float:
    """Run on f = 1/2 sum lam_i theta_i^2, lam = lam1 * (1, 0.6, 0.2); the final norm."""
    lam = lam1 * torch.tensor([1.0, 0.6, 0.2], dtype=torch.float64)
    theta = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = opt_factory([theta])
    for _ in range(steps):
        theta.grad = lam * theta.detach()
        opt.step()
        norm = theta.detach().norm().item()
        if not math.isfinite(norm) or norm > 1e12:
            return math.inf
    return norm


@pytest.mark.parametrize("weight_decay", [0.0, 2.5], ids=["wd=0", "wd=2.5"])
@pytest.mark.parametrize("match_gd", [False, True], ids=["match_gd=no", "match_gd=yes"])
@pytest.mark.parametrize("beta", BETAS, ids=[f"beta={b}" for b in BETAS])
@pytest.mark.parametrize("name", list(METHODS))
def test_quadratic_converges_below_and_diverges_above(name, beta, match_gd, weight_decay):
    factory = partial(
        _build, name, lr=0.1, momentum=beta, weight_decay=weight_decay, match_gd=match_gd
    )
    edge = T.stability_threshold(factory([torch.nn.Parameter(torch.zeros(1))]))
    assert _quadratic_final_norm(factory, 0.97 * edge) < 1e-6
    assert _quadratic_final_norm(factory, 1.03 * edge) > 1e6


@pytest.mark.parametrize("weight_decay", [0.0, 2.5], ids=["wd=0", "wd=2.5"])
@pytest.mark.parametrize("beta", BETAS, ids=[f"beta={b}" for b in BETAS])
@pytest.mark.parametrize("name", list(METHODS))
def test_threshold_is_the_closed_form_and_match_gd_gives_2_over_lr(name, beta, weight_decay):
    lr, p = 0.1, [torch.nn.Parameter(torch.zeros(1))]
    opt = _build(name, p, lr=lr, momentum=beta, weight_decay=weight_decay)
    group = opt.param_groups[0]
    expected = CLOSED_FORMS[name](lr, group) - weight_decay
    assert T.stability_threshold(opt) == pytest.approx(expected, rel=1e-14)
    matched = _build(name, p, lr=lr, momentum=beta, weight_decay=weight_decay, match_gd=True)
    assert T.stability_threshold(matched) == pytest.approx(2 / lr - weight_decay, rel=1e-14)
    # match_gd's step size puts the closed form at 2 / lr too
    eta = lr * METHODS[name].gain(group)
    assert CLOSED_FORMS[name](eta, group) == pytest.approx(2 / lr, rel=1e-12)


def test_thresholds_of_the_named_special_cases():
    p = [torch.nn.Parameter(torch.zeros(1))]
    lr, b = 0.1, 0.9
    hb = T.stability_threshold(GeneralizedMomentum(p, lr=lr, momentum=b, lookahead=0.0))
    nag = T.stability_threshold(GeneralizedMomentum(p, lr=lr, momentum=b, lookahead=b))
    assert hb == pytest.approx(T.stability_threshold(HeavyBall(p, lr=lr, momentum=b)))
    assert nag == pytest.approx(T.stability_threshold(Nesterov(p, lr=lr, momentum=b)))
    assert T.stability_threshold(EMAHeavyBall(p, lr=1.0, momentum=0.9)) == pytest.approx(38.0)


def test_param_groups_with_different_thresholds_raise_and_equal_ones_agree():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = HeavyBall([{"params": [a]}, {"params": [b], "momentum": 0.5}], lr=0.1)
    with pytest.raises(T.UnsupportedOptimizerError, match="different thresholds"):
        T.stability_threshold(opt)
    # with match_gd every momentum gives 2 / lr, to the bit
    opt = HeavyBall([{"params": [a]}, {"params": [b], "momentum": 0.5}], lr=0.1, match_gd=True)
    assert T.stability_threshold(opt) == 2 / 0.1


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"lr": -0.1}, id="lr<0"),
        pytest.param({"lr": 0.1, "momentum": 1.0}, id="momentum=1"),
        pytest.param({"lr": 0.1, "momentum": -0.1}, id="momentum<0"),
        pytest.param({"lr": 0.1, "weight_decay": -1.0}, id="wd<0"),
        pytest.param({"lr": 0.1, "lookahead": 1.0}, id="lookahead=1"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs):
    with pytest.raises(ValueError, match="pass|must lie"):
        GeneralizedMomentum([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def test_heavy_ball_and_nesterov_refuse_a_lookahead():
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(TypeError):
        HeavyBall([p], lr=0.1, lookahead=0.5)
    for cls in (HeavyBall, Nesterov):
        with pytest.raises(ValueError, match="GeneralizedMomentum"):
            cls([{"params": [p], "lookahead": 0.5}], lr=0.1)
    with pytest.raises(ValueError, match="momentum"):
        EMANesterov([{"params": [p], "momentum": 1.5}], lr=0.1)
    with pytest.raises(TypeError, match="match_gd"):
        EMAHeavyBall([p], lr=0.1, match_gd="yes")


def test_sgd_ias_threshold_refuses_weight_decay_and_the_ema_forms():
    p = [torch.nn.Parameter(torch.zeros(1))]
    assert T.sgd_ias_threshold(HeavyBall(p, lr=0.1, match_gd=True), 0.5) == pytest.approx(10.0)
    nesterov = Nesterov(p, lr=0.1, momentum=0.5)  # paper 004's gamma(beta, beta) = 1.5/2
    assert T.sgd_ias_threshold(nesterov, 0.5) == pytest.approx(0.5 * 20 * 1.5 / 2)
    with pytest.raises(T.UnsupportedOptimizerError, match="weight decay"):
        T.sgd_ias_threshold(HeavyBall(p, lr=0.1, weight_decay=0.1), 0.5)
    for ema in (EMAHeavyBall, EMANesterov):  # no IAS edge for them in paper 004
        with pytest.raises(T.UnsupportedOptimizerError, match="EMA forms"):
            T.sgd_ias_threshold(ema(p, lr=0.1), 0.5)


# ----------------------------------------------------------------------------- GD <-> PHB


@pytest.mark.parametrize("match_gd", [False, True], ids=["match_gd=no", "match_gd=yes"])
@pytest.mark.parametrize(("before", "after"), [(0.0, 0.9), (0.9, 0.0)], ids=["GD->PHB", "PHB->GD"])
def test_switching_momentum_carries_the_displacement(before, after, match_gd):
    start, loss = _problem(seed=2)
    params = [torch.nn.Parameter(p.clone()) for p in start]
    lr, switch, steps = 0.05, 10, 25
    opt = HeavyBall(params, lr=lr, momentum=before, match_gd=match_gd)
    w = [p.clone() for p in start]
    w_prev = [p.clone() for p in start]
    for t in range(steps):
        beta = before if t < switch else after
        opt.param_groups[0]["momentum"] = beta
        assert T.stability_threshold(opt) == pytest.approx(
            2 / lr if match_gd else 2 * (1 + beta) / lr, rel=1e-14
        )
        eta = lr * (1 + beta) if match_gd else lr  # paper 001, §2.1: eta_PHB = (1 + beta) eta
        for p, g in zip(params, _grads(loss, params), strict=True):
            p.grad = g
        opt.step()
        # paper 001, eq. (1), by hand
        grads = _grads(loss, w)
        w, w_prev = [wi - eta * gi + beta * (wi - pi) for wi, gi, pi in zip(w, grads, w_prev)], w
    for p, e in zip(params, w, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)


def test_a_lookahead_change_applies_from_the_next_gradient():
    # paper 004's recursion with beta2 changed at step s: the gradient of step s was taken at
    # theta_s + beta2_old delta_{s-1} (the stored point); from step s + 1 on, beta2_new
    start, loss = _problem(seed=3)
    params = [torch.nn.Parameter(p.clone()) for p in start]
    opt = GeneralizedMomentum(params, lr=0.05, momentum=0.8, lookahead=0.2)
    theta, delta = [p.clone() for p in start], [torch.zeros_like(p) for p in start]
    beta2_of_point = 0.2
    for t in range(20):
        beta2 = 0.2 if t < 8 else 0.6
        opt.param_groups[0]["lookahead"] = beta2
        for p, g in zip(params, _grads(loss, params), strict=True):
            p.grad = g
        opt.step()
        grads = _grads(loss, [th + beta2_of_point * d for th, d in zip(theta, delta)])
        delta = [0.8 * d - 0.05 * g for d, g in zip(delta, grads)]
        theta = [th + d for th, d in zip(theta, delta)]
        beta2_of_point = beta2
    for p, th, d in zip(params, theta, delta, strict=True):
        torch.testing.assert_close(p.detach(), th + beta2_of_point * d, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- LinearWarmup


def test_linear_warmup_values_and_the_live_threshold():
    p = [torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))]
    opt = HeavyBall(p, lr=1.0, momentum=0.9)
    warmup = LinearWarmup(opt, lr_initial=0.01, lr_final=0.05, steps=4)
    expected = [0.01, 0.02, 0.03, 0.04, 0.05, 0.05, 0.05, 0.05]
    for t, lr in enumerate(expected):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-14), t
        assert T.stability_threshold(opt) == pytest.approx(T.heavy_ball_threshold(lr, 0.9))
        p[0].grad = torch.ones(1, dtype=torch.float64)
        opt.step()
        warmup.step()


def test_linear_warmup_sets_every_group_and_resumes():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 3.0}, {"params": [b], "lr": 7.0}], lr=1.0)
    warmup = LinearWarmup(opt, lr_initial=0.0, lr_final=1.0, steps=10)
    for _ in range(3):
        opt.step()
        warmup.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.3, 0.3])
    resumed = LinearWarmup(opt, lr_initial=0.0, lr_final=1.0, steps=10)
    resumed.load_state_dict(warmup.state_dict())
    opt.step()
    resumed.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4, 0.4])


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"lr_initial": -1.0, "lr_final": 0.1, "steps": 3}, id="lr_initial<0"),
        pytest.param({"lr_initial": 0.0, "lr_final": -0.1, "steps": 3}, id="lr_final<0"),
        pytest.param({"lr_initial": 0.0, "lr_final": 0.1, "steps": 0}, id="steps=0"),
        pytest.param({"lr_initial": 0.0, "lr_final": 0.1, "steps": 2.5}, id="steps=2.5"),
    ],
)
def test_linear_warmup_validates(kwargs):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="LinearWarmup"):
        LinearWarmup(opt, **kwargs)


def test_linear_warmup_as_the_lr_scheduler_of_supervised_task(tmp_path):
    torch.manual_seed(0)
    x, y = tiny_data("mlp", "mse")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
    task = SupervisedTask(
        tiny_mlp().double(),
        optimizer=partial(HeavyBall, lr=1.0, momentum=0.9, match_gd=True),
        lr_scheduler=partial(LinearWarmup, lr_initial=0.0, lr_final=0.1, steps=10),
    )
    trainer = quiet_trainer(tmp_path, max_steps=4)
    trainer.fit(task, loader)
    (opt,) = trainer.optimizers
    assert trainer.global_step == 4
    assert opt.param_groups[0]["lr"] == pytest.approx(0.04)
    assert T.stability_threshold(opt) == pytest.approx(2 / 0.04)


def _parse_task(init_args: dict) -> Any:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SupervisedTask, "task")
    model = {"class_path": "torch.nn.Linear", "init_args": {"in_features": 2, "out_features": 1}}
    config = parser.parse_object({"task": {"model": model, **init_args}})
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return instantiate(config).task


def test_the_optimizers_build_from_yaml_class_paths():
    task = _parse_task(
        {
            "optimizer": {
                "class_path": "lightning_eos.optim.GeneralizedMomentum",
                "init_args": {"lr": 0.1, "momentum": 0.8, "lookahead": 0.4, "match_gd": True},
            }
        }
    )
    opt = task.optimizer_factory(task.parameters())
    assert isinstance(opt, GeneralizedMomentum) and T.stability_threshold(opt) == 20.0


def test_linear_warmup_builds_from_a_yaml_class_path():
    task = _parse_task(
        {
            "optimizer": {"class_path": "lightning_eos.optim.HeavyBall", "init_args": {"lr": 1}},
            "lr_scheduler": {
                "class_path": "lightning_eos.optim.LinearWarmup",
                "init_args": {"lr_initial": 0.0, "lr_final": 0.1, "steps": 10},
            },
        }
    )
    opt = task.optimizer_factory(task.parameters())
    assert isinstance(task.scheduler_factory(opt), LinearWarmup)


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("name", list(METHODS))
def test_state_dict_round_trip_is_bitwise(name):
    start, loss = _problem(seed=4)

    def fresh(params):
        return _groups(name, params, weight_decay=0.01, match_gd=True)

    straight = [torch.nn.Parameter(p.clone()) for p in start]
    _run(fresh(straight), straight, loss, steps=20)

    first = [torch.nn.Parameter(p.clone()) for p in start]
    opt = fresh(first)
    _run(opt, first, loss, steps=10)
    saved = opt.state_dict()
    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed = fresh(second)
    resumed.load_state_dict(saved)
    _run(resumed, second, loss, steps=10, lrs=lambda t: _lr(t + 10))
    for a, b in zip(straight, second, strict=True):
        assert torch.equal(a, b)
