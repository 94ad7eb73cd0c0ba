"""The preconditioner registry against hand-replayed steps, dense spectra and quadratics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import dense_hessian, mse, tiny_data, tiny_mlp

from lightning_eos.curvature import HessianOperator, PreconditionedOperator, lanczos
from lightning_eos.optim import (
    Adam,
    FrozenAdam,
    Nadam,
    Padam,
    PreconditionerNotReadyError,
    read_preconditioner,
    supported_optimizers,
    track_preconditioner,
)
from lightning_eos.thresholds import UnsupportedOptimizerError, preconditioned_threshold

LR = 0.01


def _frozen_adam(params):
    params = list(params)
    gen = torch.Generator().manual_seed(5)
    pc = [torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.1 for p in params]
    return FrozenAdam(params, preconditioner=pc, lr=LR, beta1=0.8, weight_decay=0.1)


# name -> factory(params); every registered optimizer, with its switches
CASES = {
    "Adam": lambda ps: torch.optim.Adam(ps, lr=LR, betas=(0.9, 0.99), weight_decay=0.1),
    "Adam-amsgrad": lambda ps: torch.optim.Adam(ps, lr=LR, amsgrad=True),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.5),
    "AdamW-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=LR, amsgrad=True, weight_decay=0.5),
    "NAdam": lambda ps: torch.optim.NAdam(ps, lr=LR, weight_decay=0.1),
    "NAdam-decoupled": lambda ps: torch.optim.NAdam(
        ps, lr=LR, weight_decay=0.1, decoupled_weight_decay=True
    ),
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=LR, weight_decay=0.1),
    "RMSprop-centered-momentum": lambda ps: torch.optim.RMSprop(
        ps, lr=LR, centered=True, momentum=0.9
    ),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=LR, lr_decay=0.1, weight_decay=0.1),
    "Adafactor": lambda ps: torch.optim.Adafactor(ps, lr=LR, weight_decay=0.1),
    "ours-Adam-no-bc": lambda ps: Adam(ps, lr=LR, bias_correction=False),
    "ours-Adam-bc-amsgrad-decoupled": lambda ps: Adam(
        ps, lr=LR, amsgrad=True, weight_decay=0.5, decoupled_weight_decay=True
    ),
    "ours-Padam": lambda ps: Padam(ps, lr=LR, weight_decay=0.1),
    "ours-Nadam": lambda ps: Nadam(ps, lr=LR, weight_decay=0.1),
    "ours-FrozenAdam": _frozen_adam,
}


def _params(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(3, 4, generator=gen, dtype=dtype)),  # factored
        torch.nn.Parameter(torch.randn(4, generator=gen, dtype=dtype)),
    ]


def _random_steps(optimizer, params, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        optimizer.step()


# --- 1. P rebuilt from the state is the denominator of the step just taken ------------


def _nadam_coefficients(group, t):
    beta1, psi = group["betas"][0], group["momentum_decay"]
    mu = beta1 * (1 - 0.5 * 0.96 ** (t * psi))
    mu_next = beta1 * (1 - 0.5 * 0.96 ** ((t + 1) * psi))
    return mu, mu_next


def _replay(name, opt, group, p, old, new, P):  # noqa: N803 - P is the math symbol
    """Each optimizer's own step, written out by hand with the registry's P."""
    theta, grad, state = old["theta"], old["grad"], old["state"]
    lr, wd, t = group["lr"], group.get("weight_decay", 0.0), float(new["step"])
    decoupled = group.get("decoupled_weight_decay", False) or name.startswith("AdamW")
    if wd and not decoupled and name != "Adafactor":
        grad = grad + wd * theta
    start = (1 - lr * wd) * theta if (wd and (decoupled or name == "Adafactor")) else theta
    if name.startswith(("Adam", "ours-Adam")) and not name.startswith("ours-Adam-no-bc"):
        return start - lr / (1 - group["betas"][0] ** t) * new["exp_avg"] / P
    if name in ("ours-Adam-no-bc", "ours-Padam", "ours-FrozenAdam"):
        return start - lr * new["exp_avg"] / P
    if name.startswith("NAdam"):
        mu, mu_next = _nadam_coefficients(group, t)
        product = float(new["mu_product"])
        return (
            start
            - lr * (1 - mu) / (1 - product) * grad / P
            - lr * mu_next / (1 - product * mu_next) * new["exp_avg"] / P
        )
    if name == "ours-Nadam":
        beta1 = group["betas"][0]
        return start - lr * (beta1 * new["exp_avg"] + (1 - beta1) * grad) / P
    if name == "RMSprop":
        return start - lr * grad / P
    if name == "RMSprop-centered-momentum":
        return start - lr * (group["momentum"] * state["momentum_buffer"] + grad / P)
    if name == "Adagrad":
        return start - lr / (1 + (t - 1) * group["lr_decay"]) * grad / P
    if name == "Adafactor":  # P carries RMS(theta) and the clip; the step size is rho_t
        return start - min(lr, t**-0.5) * grad / P
    raise AssertionError(name)


@pytest.mark.parametrize("name", CASES)
def test_replaying_the_last_step_with_the_registry_P_reproduces_it(name):
    params = _params()
    opt = CASES[name](params)
    track_preconditioner(opt)
    _random_steps(opt, params, 3)
    old = {
        id(p): {"theta": p.detach().clone(), "state": copy.deepcopy(opt.state[p])} for p in params
    }
    _random_steps(opt, params, 1, seed=2)
    for p in params:
        old[id(p)]["grad"] = p.grad.clone()
    reading = read_preconditioner(opt)
    assert [id(p) for p in reading.params] == [id(p) for p in params]
    group = opt.param_groups[0]
    for p, P in zip(reading.params, reading.diagonal, strict=True):  # noqa: N806
        expected = _replay(name, opt, group, p, old[id(p)], opt.state[p], P)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)


def test_param_groups_fold_their_learning_rates_into_P():
    a, b = _params()
    opt = torch.optim.Adam([{"params": [a]}, {"params": [b], "lr": 3 * LR}], lr=LR)
    _random_steps(opt, [a, b], 3)
    before = b.detach().clone()
    _random_steps(opt, [a, b], 1, seed=2)
    reading = read_preconditioner(opt)
    t = float(opt.state[b]["step"])
    assert reading.threshold == pytest.approx(38 * (1 - 0.9**t) / LR)
    # one threshold for all: b's step is LR-sized on its rescaled P
    expected = before - LR / (1 - 0.9**t) * opt.state[b]["exp_avg"] / reading.diagonal[1]
    torch.testing.assert_close(b.detach(), expected, rtol=0, atol=1e-12)


def test_groups_with_other_lr_decay_and_step_counts_replay_with_one_step_size():
    a, b = _params()
    c = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    groups = [
        {"params": [a]},
        {"params": [b, c], "lr": 3 * LR, "weight_decay": 0.2},  # coupled decay: into H
    ]
    opt = torch.optim.Adam(groups, lr=LR, weight_decay=0.1)
    _random_steps(opt, [a, b], 3)  # c starts late: its step count, so its bias correction, lags
    before = {id(p): p.detach().clone() for p in (a, b, c)}
    _random_steps(opt, [a, b, c], 1, seed=2)
    reading = read_preconditioner(opt)
    t_ref = float(opt.state[a]["step"])
    assert float(opt.state[c]["step"]) == 1 and t_ref == 4
    assert reading.l2 == (0.1, 0.2, 0.2)
    for p, P in zip(reading.params, reading.diagonal, strict=True):  # noqa: N806
        # every parameter moves by the reference step size on its folded P
        expected = before[id(p)] - LR / (1 - 0.9**t_ref) * opt.state[p]["exp_avg"] / P
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)


def test_zero_learning_rates_move_nothing():
    a, b = _params()
    opt = torch.optim.Adam([{"params": [a]}, {"params": [b], "lr": 0.0}], lr=LR)
    _random_steps(opt, [a, b], 2)
    reading = read_preconditioner(opt)
    assert [id(p) for p in reading.params] == [id(a)]  # b is frozen: P = inf, rows drop out
    diagonal, _ = reading.flat([a, b])
    assert torch.isinf(diagonal[a.numel() :]).all()
    opt.param_groups[0]["lr"] = 0.0  # a schedule annealed to zero
    with pytest.raises(PreconditionerNotReadyError, match="learning rate 0"):
        read_preconditioner(opt)
    adafactor = torch.optim.Adafactor([a], lr=0.0)
    track_preconditioner(adafactor)
    _random_steps(adafactor, [a], 1)
    with pytest.raises(PreconditionerNotReadyError, match="learning rate 0"):
        read_preconditioner(adafactor)


def test_complex_parameters_are_refused():
    z = torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))
    opt = torch.optim.Adam([z])
    z.grad = torch.ones(2, dtype=torch.complex64)
    opt.step()
    with pytest.raises(UnsupportedOptimizerError, match="Complex"):
        read_preconditioner(opt)


def test_frozen_adam_from_a_bias_corrected_adam_is_paper_eq_2():
    params = _params()
    adam = torch.optim.AdamW(params, lr=LR, weight_decay=0.5, amsgrad=True)
    _random_steps(adam, params, 4)
    frozen = FrozenAdam.from_optimizer(adam)
    t, reading = 4, read_preconditioner(adam)
    for p, P in zip(params, reading.diagonal, strict=True):  # noqa: N806
        state = frozen.state[p]
        torch.testing.assert_close(state["preconditioner"], (1 - 0.9**t) * P, rtol=1e-12, atol=0)
        assert torch.equal(state["exp_avg"], adam.state[p]["exp_avg"])
    assert frozen.param_groups[0]["decoupled_weight_decay"]
    assert preconditioned_threshold(frozen) == pytest.approx(
        38 / LR * (1 - LR * 0.5 / 2)  # AdamW's threshold, at eta = lr without bias correction
    )
    nadam = torch.optim.NAdam(params)
    _random_steps(nadam, params, 1)
    with pytest.raises(ValueError, match="EMA heavy-ball"):
        FrozenAdam.from_optimizer(nadam)


def test_errors_are_clear():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(UnsupportedOptimizerError, match=r"torch\.optim\.Adam.*Register"):
        read_preconditioner(torch.optim.SGD([p], lr=0.1))
    with pytest.raises(PreconditionerNotReadyError):
        read_preconditioner(torch.optim.Adam([p]))
    with pytest.raises(PreconditionerNotReadyError):
        read_preconditioner(torch.optim.Adagrad([p]))  # state exists, no step yet
    untracked = torch.optim.Adafactor([p])
    p.grad = torch.ones(2)
    untracked.step()
    with pytest.raises(PreconditionerNotReadyError, match="track_preconditioner"):
        read_preconditioner(untracked)
    maximizing = torch.optim.Adam([p], maximize=True)
    maximizing.step()
    with pytest.raises(UnsupportedOptimizerError, match="maximize"):
        read_preconditioner(maximizing)
    assert "torch.optim.Adafactor" in supported_optimizers()
    assert "lightning_eos.optim.FrozenAdam" in supported_optimizers()


def test_lightning_optimizer_and_wrappers_are_unwrapped():
    p = torch.nn.Parameter(torch.ones(2))
    inner = torch.optim.Adam([p], lr=LR)
    p.grad = torch.ones(2)
    inner.step()

    class Wrapper:  # what SAM-style wrappers look like
        base_optimizer = inner

    class LightningLike:
        _optimizer = Wrapper()

    assert preconditioned_threshold(LightningLike()) == preconditioned_threshold(inner)


# --- 2. lambda_1(P^-1 H) against a float64 dense reference ----------------------------


@pytest.mark.parametrize("name", CASES)
def test_preconditioned_sharpness_matches_dense_float64(name):
    torch.manual_seed(0)
    model = tiny_mlp().double()
    batch = tiny_data("mlp", "mse")
    moved = list(model.parameters())[2:]  # the optimizer moves the last layer only
    opt = CASES[name](moved)
    track_preconditioner(opt)
    for _ in range(3):
        opt.zero_grad()
        mse(model, batch).backward()
        opt.step()
    reading = read_preconditioner(opt)
    hessian = HessianOperator(model, mse, [batch])
    diagonal, shift = reading.flat(hessian.params)
    result = lanczos(PreconditionedOperator(hessian, diagonal, shift), k=1, tol=1e-12)

    dense = dense_hessian(model, mse, batch)
    first = sum(p.numel() for p in list(model.parameters())[:2])
    block = dense[first:, first:]  # the rows of parameters the optimizer moves
    P = torch.cat([d.reshape(-1) for d in reading.diagonal])  # noqa: N806
    l2 = torch.cat([torch.full((p.numel(),), w) for p, w in zip(moved, reading.l2, strict=True)])
    reference = torch.linalg.eigvals((block + torch.diag(l2).double()) / P[:, None]).real.max()
    assert result.eigenvalues[0].item() == pytest.approx(reference.item(), rel=1e-8)


# --- 3. thresholds on quadratics, with the optimizer's own step and P frozen ----------

MOMENTUM_KEYS = ("exp_avg", "momentum_buffer")


def _freeze(opt):
    return {
        id(p): {k: copy.deepcopy(v) for k, v in opt.state[p].items() if k not in MOMENTUM_KEYS}
        for g in opt.param_groups
        for p in g["params"]
    }


def _restore(opt, frozen):
    for g in opt.param_groups:
        for p in g["params"]:
            for k, v in frozen[id(p)].items():
                opt.state[p][k] = copy.deepcopy(v)


def _run_frozen_quadratic(name, dim, ratio, steps=800):
    """Run the real optimizer on 1/2 sum h_i x_i^2, restoring every non-momentum state entry
    before each step, so each step divides by the same P; h puts lambda_1(P^-1(H + l2)) at
    ``ratio`` times the registry's threshold. Returns |x_final| / |x_0|."""
    gen = torch.Generator().manual_seed(3)
    x = torch.nn.Parameter(torch.randn(dim, generator=gen, dtype=torch.float64))
    opt = CASES[name]([x])
    track_preconditioner(opt)
    _random_steps(opt, [x], 3)  # a nontrivial P
    frozen = _freeze(opt)
    x0 = 1e-12 * torch.randn(dim, generator=gen, dtype=torch.float64)  # g^2 << nu

    x.data.copy_(x0)  # a probe step from the frozen state reads the P every step will use
    x.grad = 1e-9 * torch.ones_like(x)
    opt.step()
    reading = read_preconditioner(opt)
    P, l2, threshold = reading.diagonal[0], reading.l2[0], reading.threshold  # noqa: N806
    spread = torch.linspace(1.0, 0.3, dim, dtype=torch.float64)
    h = ratio * threshold * P * spread - l2  # top eigenvalue of P^-1 (H + l2) = ratio * T
    assert ((h + l2) / P).max().item() == pytest.approx(ratio * threshold)

    x.data.copy_(x0)
    for p in [x]:
        for k in MOMENTUM_KEYS:
            if k in opt.state[p]:
                opt.state[p][k].zero_()
    for _ in range(steps):
        _restore(opt, frozen)
        x.grad = h * x.detach()
        opt.step()
        growth = (x.detach().norm() / x0.norm()).item()
        if not math.isfinite(growth) or growth > 1e3:
            return math.inf
    return growth


@pytest.mark.parametrize("dim", [1, 5], ids=["1d", "diagonal"])
@pytest.mark.parametrize("name", CASES)
def test_frozen_quadratic_converges_below_and_diverges_above_the_threshold(name, dim):
    assert _run_frozen_quadratic(name, dim, 0.98) < 1e-3
    assert _run_frozen_quadratic(name, dim, 1.02) == math.inf


def test_ema_heavy_ball_on_half_x_squared_diverges_iff_lr_above_38():
    """Paper 002, Fig. 2: EMA-HB(eta, 0.9) on x^2/2 diverges iff eta > 38."""

    def final(lr):
        x = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
        opt = FrozenAdam([x], preconditioner=1.0, lr=lr, beta1=0.9)
        for _ in range(3000):
            x.grad = x.detach().clone()
            opt.step()
        return x.abs().item()

    one = FrozenAdam([torch.nn.Parameter(torch.ones(1))], preconditioner=1.0, lr=1.0)
    assert preconditioned_threshold(one) == pytest.approx(38.0)
    assert final(37.6) < 1e-3
    assert final(38.4) > 1e3
