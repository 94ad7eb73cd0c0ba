"""SAM against a hand-written paper 003 eq. (1), in plain torch and in every Lightning mode."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_eos.data import DigitsDataModule
from lightning_eos.optim import SAM, read_preconditioner

RHO, LR = 0.1, 0.2


def _net(batchnorm=False):
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(16) if batchnorm else nn.Identity()
    return nn.Sequential(nn.Linear(64, 16), norm, nn.Tanh(), nn.Linear(16, 10))


def _data(n=96):
    dm = DigitsDataModule(num_train=n, num_val=16, batch_size=n, target="label", shuffle=False)
    dm.setup()
    return dm


def _grads(net, x, y, autocast=False):
    """Gradients as Lightning makes them; fp16 scales the loss by GradScaler's 2^16."""
    net.zero_grad()
    dtype = torch.float16 if autocast == "fp16" else torch.bfloat16
    scale = 2.0**16 if autocast == "fp16" else 1.0
    with torch.autocast("cpu", dtype=dtype, enabled=bool(autocast)):
        loss = F.cross_entropy(net(x), y)
    (loss * scale).backward()
    return [p.grad.detach().clone() / scale for p in net.parameters()]


def _reference_run(
    net, x, y, base, steps, rho=RHO, adaptive=False, clip=None, autocast=False, clip_value=None
):
    """Eq. (1) written out: e = rho T^2 g / |T g| (T = 1 or |w|), base step on g(w + e)."""
    params = list(net.parameters())
    for _ in range(steps):
        g = _grads(net, x, y, autocast)
        t = [p.detach().abs() if adaptive else torch.ones_like(p) for p in params]
        norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g, strict=True)))
        origin = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, ti, gi in zip(params, t, g, strict=True):
                p.add_(rho * ti**2 * gi / norm)
        g_sam = _grads(net, x, y, autocast)
        with torch.no_grad():
            for p, o in zip(params, origin, strict=True):
                p.copy_(o)
        for p, gi in zip(params, g_sam, strict=True):
            p.grad = gi
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        if clip_value is not None:
            torch.nn.utils.clip_grad_value_(params, clip_value)
        base.step()
    return net


BASES = {
    "sgd": (torch.optim.SGD, {"lr": LR}),
    "sgd-momentum": (torch.optim.SGD, {"lr": LR, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 1e-2}),
}


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("base", BASES)
def test_sam_step_is_eq_1(base, adaptive):
    cls, kwargs = BASES[base]
    x, y = _data().train_set.tensors
    net, ref = _net(), _net()
    opt = SAM(net.parameters(), cls, rho=RHO, adaptive=adaptive, **kwargs)
    for _ in range(4):

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    _reference_run(ref, x, y, cls(ref.parameters(), **kwargs), 4, adaptive=adaptive)
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # the base optimizer's state is SAM's state: its moments are in SAM's checkpoint
    assert opt.state is opt.base_optimizer.state
    assert bool(opt.state_dict()["state"]) == (base != "sgd")  # plain SGD keeps no state
    if base == "adam":
        assert read_preconditioner(opt).threshold > 0  # the registry sees through SAM


def test_a_non_finite_gradient_norm_skips_the_step():
    w = nn.Parameter(torch.ones(3))
    opt = SAM([w], torch.optim.SGD, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w * float("inf")).sum()
        loss.backward()
        return loss

    with pytest.warns(UserWarning, match="not finite"):
        opt.step(closure)
    assert torch.equal(w.detach(), torch.ones(3)) and not opt.state


def test_step_without_a_closure_explains_itself():
    opt = SAM([nn.Parameter(torch.ones(1))], torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_batchnorm_buffers_see_one_forward_pass_per_step():
    x, y = _data().train_set.tensors
    for momentum in (0.1, None):  # None: cumulative average, counted by num_batches_tracked
        net = _net(batchnorm=True)
        net[1].momentum = momentum
        plain = copy.deepcopy(net)
        opt = SAM(net.parameters(), torch.optim.SGD, rho=RHO, lr=LR)

        def closure(net=net, opt=opt):
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        plain(x)  # one ordinary training forward pass
        for (name, a), b in zip(net[1].named_buffers(), plain[1].buffers(), strict=True):
            assert torch.equal(a, b), (momentum, name)


# --- Lightning ----------------------------------------------------------------------------


class Net(L.LightningModule):
    def __init__(self, base="sgd", manual=False, batchnorm=False, compile=False):
        super().__init__()
        self.net = _net(batchnorm)
        if compile:
            self.net = torch.compile(self.net, backend="eager")
        self.base, self.calls, self.hook_calls = base, 0, 0
        self.automatic_optimization = not manual

    def on_before_optimizer_step(self, optimizer):
        self.hook_calls += 1

    def loss(self, batch):
        x, y = batch
        self.calls += 1
        return F.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            return self.loss(batch)
        opt = self.optimizers()  # the recipe for manual optimization: pass a closure

        def closure():
            opt.zero_grad()
            loss = self.loss(batch)
            self.manual_backward(loss)
            return loss

        return opt.step(closure=closure)

    def configure_optimizers(self):
        cls, kwargs = BASES[self.base]
        return SAM(self.parameters(), cls, rho=RHO, **kwargs)


def _fit(steps=5, tmp_path=None, model=None, ckpt_path=None, **kwargs):
    model = model or Net()
    trainer = quiet_trainer(tmp_path, max_steps=steps, **kwargs)
    trainer.fit(model, _data(), ckpt_path=ckpt_path)
    return model, trainer


def _assert_matches_reference(model, base="sgd", steps=5, **reference_kwargs):
    cls, kwargs = BASES[base]
    x, y = _data().train_set.tensors
    ref = _net()
    _reference_run(ref, x, y, cls(ref.parameters(), **kwargs), steps, **reference_kwargs)
    for a, b in zip(model.net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.detach().float(), b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_automatic_optimization_runs_the_closure_twice_per_step(base):
    model, trainer = _fit(model=Net(base))
    assert trainer.global_step == 5 and model.calls == 10
    _assert_matches_reference(model, base)


def test_manual_optimization_recipe():
    model, trainer = _fit(model=Net(manual=True))
    assert trainer.global_step == 5 and model.calls == 10
    _assert_matches_reference(model)


def test_bf16_mixed():
    model, _ = _fit(precision="bf16-mixed")
    _assert_matches_reference(model, autocast=True)


def test_gradient_clipping_and_hooks_apply_to_the_second_gradient_only():
    model, _ = _fit(gradient_clip_val=0.05)
    assert model.hook_calls == 5  # on_before_optimizer_step once per step
    _assert_matches_reference(model, clip=0.05)
    model, _ = _fit(gradient_clip_val=1e-3, gradient_clip_algorithm="value")
    _assert_matches_reference(model, clip_value=1e-3)


def test_a_non_finite_gradient_at_the_perturbed_point_skips_the_step():
    w = nn.Parameter(torch.ones(3))
    opt = SAM([w], torch.optim.SGD, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum() * (float("inf") if opt.perturbed else 1.0)
        loss.backward()
        return loss

    with pytest.warns(UserWarning, match="w \\+ e"):
        opt.step(closure)
    assert torch.equal(w.detach(), torch.ones(3))


def test_batchnorm_buffers_are_kept_for_a_compiled_model_in_lightning():
    x, y = _data().train_set.tensors
    model, _ = _fit(1, model=Net(batchnorm=True, compile=True))
    plain = _net(batchnorm=True).train()
    plain(x)  # the one forward pass at w of the only step
    for a, b in zip(model.net._orig_mod[1].buffers(), plain[1].buffers(), strict=True):
        assert torch.equal(a, b)


def test_gradient_accumulation_is_refused():
    with pytest.raises(RuntimeError, match="accumulate_grad_batches"):
        _fit(accumulate_grad_batches=2)


def test_checkpoint_resume_continues_exactly(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    full, full_trainer = _fit(
        6, tmp_path, Net("adam"), callbacks=[saver], enable_checkpointing=True
    )
    (ckpt,) = (tmp_path / "ckpt").glob("*step=3.ckpt")
    resumed, resumed_trainer = _fit(6, tmp_path, Net("adam"), ckpt_path=str(ckpt))
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    full_state = full_trainer.optimizers[0].state_dict()["state"]
    resumed_opt = resumed_trainer.optimizers[0]
    assert resumed_opt.state is resumed_opt.base_optimizer.state  # still linked after loading
    for key, value in full_state.items():
        assert torch.equal(
            value["exp_avg_sq"], resumed_opt.state_dict()["state"][key]["exp_avg_sq"]
        )


# --- the SAM-edge (paper 003, Prop. 2 and Fig. 1) -------------------------------------------


def test_sam_edge_ratio_to_2_over_eta_behaves_as_fig_1():
    from lightning_eos.thresholds import sam_edge

    def ratio(alpha, lr=0.1, rho=0.05):  # alpha = lr |g| / (2 rho)
        return sam_edge(lr, rho, 2 * rho * alpha / lr) / (2 / lr)

    assert ratio(1e6) == pytest.approx(1.0, rel=1e-3)
    assert ratio(1e-8) / 1e-4 == pytest.approx(1.0, rel=1e-3)  # ~ sqrt(alpha)
    values = [ratio(a) for a in (1e-3, 1e-2, 1e-1, 1, 10, 100)]
    assert values == sorted(values)  # increasing in alpha


@pytest.mark.parametrize("side", [0.99, 1.01])
def test_prop_2_sam_descends_iff_lambda_is_below_the_edge(side):
    """On l(w) = lambda w^2 / 2 the gradient is aligned with the only eigenvector."""
    from lightning_eos.thresholds import sam_threshold

    w = nn.Parameter(torch.tensor([0.7], dtype=torch.float64))
    opt = SAM([w], torch.optim.SGD, rho=0.05, lr=0.1)
    lam = 1.0  # |g| = lambda |w| depends on lambda: iterate lambda = side * edge(|g|)
    for _ in range(200):
        lam = side * sam_threshold(opt, lam * abs(w.item()))
    assert lam == pytest.approx(side * sam_threshold(opt, lam * abs(w.item())), rel=1e-12)
    before = 0.5 * lam * w.item() ** 2

    def closure():
        opt.zero_grad()
        loss = 0.5 * lam * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    after = 0.5 * lam * w.item() ** 2
    assert (after < before) == (side < 1)


# --- SharpnessMonitor under SAM ---------------------------------------------------------------


def test_monitor_logs_the_sam_edge_and_the_alignments_against_float64():
    from lightning_eos.callbacks import SharpnessMonitor
    from lightning_eos.thresholds import sam_edge

    monitor = SharpnessMonitor(every_n_steps=5, num_samples=None, tol=1e-8, alignment=True)
    model, trainer = _fit(callbacks=[monitor])
    last = monitor.history[-1]
    assert last["step"] == 5 and "eos/eig_3" in last  # top-3 by default under SAM

    net = copy.deepcopy(model.net).double()
    x, y = trainer.datamodule.train_set.tensors
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss(flat):
        chunks = flat.split([s.numel() for s in shapes])
        values = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return F.cross_entropy(torch.func.functional_call(net, values, (x.double(),)), y)

    g = torch.func.grad(loss)(flat0)
    g_sam = torch.func.grad(loss)(flat0 + RHO * g / g.norm())
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.func.hessian(loss)(flat0))
    q1 = eigenvectors[:, -1]

    assert last["eos/grad_norm"] == pytest.approx(g.norm().item(), rel=1e-5)
    edge = sam_edge(LR, RHO, g.norm().item())
    assert last["eos/sam_edge"] == pytest.approx(edge, rel=1e-5)
    assert last["eos/threshold"] == last["eos/sam_edge"]
    assert last["eos/sharpness_ratio"] == pytest.approx(eigenvalues[-1].item() / edge, rel=1e-4)
    top3 = [last["eos/sharpness"], last["eos/eig_2"], last["eos/eig_3"]]
    torch.testing.assert_close(
        torch.tensor(top3, dtype=torch.float64), eigenvalues.flip(0)[:3], rtol=1e-4, atol=0
    )
    cosine = (q1 @ g).abs() / g.norm()
    cosine_sam = (q1 @ g_sam).abs() / g_sam.norm()
    assert last["eos/grad_alignment"] == pytest.approx(cosine.item(), abs=1e-4)
    assert last["eos/sam_grad_alignment"] == pytest.approx(cosine_sam.item(), abs=1e-4)


def test_sam_edge_needs_sam_over_plain_gradient_descent():
    from lightning_eos.callbacks import SharpnessMonitor
    from lightning_eos.thresholds import UnsupportedOptimizerError

    with pytest.raises(UnsupportedOptimizerError, match="plain SAM around gradient descent"):
        _fit(model=Net("adam"), callbacks=[SharpnessMonitor()])
    monitor = SharpnessMonitor(every_n_steps=5, threshold=None)
    _fit(model=Net("adam"), callbacks=[monitor])
    assert "eos/threshold" not in monitor.history[-1] and "eos/eig_3" in monitor.history[-1]


# --- 16-mixed with a GradScaler -------------------------------------------------------------


class InfAt(Net):
    """Returns an infinite loss on the first or the perturbed pass of step ``at``."""

    def __init__(self, at=None, which="perturbed"):
        super().__init__()
        self.at, self.which = at, which

    def loss(self, batch):
        loss = super().loss(batch)
        opt = self.trainer.optimizers[0]
        hit = self.trainer.global_step == self.at and opt.perturbed == (self.which == "perturbed")
        return loss * float("inf") if hit else loss


def _fit_16_mixed(model, steps):
    from lightning_eos.callbacks import SAMMixedPrecision

    plugin = SAMMixedPrecision("16-mixed", device="cpu")
    model, trainer = _fit(steps, model=model, plugins=[plugin])
    return model, plugin.scaler


def test_16_mixed_matches_eq_1_under_autocast():
    model, scaler = _fit_16_mixed(Net(), 5)
    assert model.calls == 10 and scaler.get_scale() == 2.0**16  # no overflow, no skip
    _assert_matches_reference(model, autocast="fp16")


@pytest.mark.parametrize("which", ["first", "perturbed"])
def test_16_mixed_skips_a_step_with_an_inf_and_keeps_the_weights(which):
    clean, _ = _fit_16_mixed(Net(), 2)
    hit, scaler = _fit_16_mixed(InfAt(at=2, which=which), 3)  # step 3 sees an inf
    for a, b in zip(clean.parameters(), hit.parameters(), strict=True):
        assert torch.equal(a, b)  # the third step was skipped, w restored bit for bit
    assert scaler.get_scale() == 2.0**15  # and the scale halved


def test_preconditioned_monitor_sees_through_sam_to_adam():
    from lightning_eos.callbacks import PreconditionedSharpnessMonitor

    monitor = PreconditionedSharpnessMonitor(every_n_steps=5, num_samples=None)
    _fit(model=Net("adam"), callbacks=[monitor])
    last = monitor.history[-1]
    assert last["eos/preconditioned_threshold"] == pytest.approx(38 * (1 - 0.9**5) / 1e-2)
    assert "eos/sam_edge" not in last and "eos/grad_norm" in last


def test_supervised_task_logs_the_loss_at_w_not_at_the_perturbed_point():
    from functools import partial

    from lightning_eos.models import FCN, SupervisedTask

    torch.manual_seed(0)
    model = SupervisedTask(
        FCN(width=16, depth=1), "cross_entropy", partial(SAM, base_optimizer=torch.optim.SGD, lr=LR)
    )
    x, y = _data().train_set.tensors
    at_w = F.cross_entropy(copy.deepcopy(model.model)(x), y).item()
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(model, _data())
    assert trainer.callback_metrics["train/loss"].item() == pytest.approx(at_w, rel=1e-6)
