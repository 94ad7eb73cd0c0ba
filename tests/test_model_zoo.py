"""The papers' architectures: sizes against the papers, gradients, and Hessian-vector products.

References: the parameter counts the papers quote (with the tolerance their "≈" implies),
the exact counts pinned as regressions, and for the curvature a float64 central
difference of gradients (independent of :class:`HessianOperator`) plus the symmetry
:math:`u^\\top H v = v^\\top H u`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import n_params
from torch import Tensor, nn

from lightning_eos.curvature import HessianOperator, flatten, unflatten
from lightning_eos.models import (
    FCN,
    LayerNormCNN,
    PaperCNN,
    ResNet9,
    ResNet20,
    SixCNN,
    WideResNet,
    resnet50,
    wrn_28_2,
    wrn_28_10,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], nn.Module]
    image_size: int = 32  # 3 x size x size images, two of them


# ---------------------------------------------------------------- parameter counts

# (id, build, exact count, paper's count or None, relative tolerance of the paper's "≈")
COUNTS = [
    # paper 002, App. G.1: 3072 -> 5 x 200 tanh -> 10
    ("fcn-002", lambda: FCN.paper002(3072, 10), 777_410, None, 0.0),
    # paper 001, Fig. 14: "3-layer width-200 FCN" on CIFAR-10
    ("fcn-001-relu", lambda: FCN.paper001(3072, 10, width=200), 656_810, None, 0.0),
    # paper 002, App. G.1 (no count quoted)
    ("cnn-002", PaperCNN, 567_530, None, 0.0),
    # paper 003, §3.1 (no count quoted): 3x3 convs 16, 32 + LayerNorm + linear head
    ("cnn-003-layernorm", LayerNormCNN, 25_674, None, 0.0),
    # paper 004: "6CNN, m = 0.51M" -- 508,618 is 0.3% below
    ("6cnn-004", SixCNN, 508_618, 0.51e6, 0.01),
    ("6cnn-004-bn", lambda: SixCNN(batchnorm=True), 509_322, 0.51e6, 0.01),
    # He et al. (2016), Table 6: ResNet-20 "0.27M" -- 269,722 is 0.1% below
    ("resnet20", ResNet20, 269_722, 0.27e6, 0.01),
    ("resnet20-nobn", lambda: ResNet20(batchnorm=False), 268_346, 0.27e6, 0.01),
    # paper 004: "ResNet-9 (m = 2.3M)" -- 2,274,880 is 1.1% below
    ("resnet9", ResNet9, 2_274_880, 2.3e6, 0.02),
    ("resnet9-nobn", lambda: ResNet9(batchnorm=False), 2_272_192, 2.3e6, 0.02),
    # Zagoruyko & Komodakis (2016), Table 1: WRN-28-10 "36.5M" -- 36,479,194 is 0.06% below;
    # paper 004 quotes 36M for "WRN-28-2", which is this size, not WRN-28-2's
    ("wrn-28-10", wrn_28_10, 36_479_194, 36.5e6, 0.01),
    ("wrn-28-10-nobn", lambda: wrn_28_10(batchnorm=False), 36_461_254, 36.5e6, 0.01),
    # WRN-28-2: 1.5M (Zagoruyko & Komodakis' widths at k = 2) -- 1,467,610 is 2.2% below
    ("wrn-28-2", wrn_28_2, 1_467_610, 1.5e6, 0.03),
    ("wrn-28-2-nobn", lambda: wrn_28_2(batchnorm=False), 1_464_006, 1.5e6, 0.03),
    # He et al. (2016) / torchvision: ResNet-50 "25.6M" at 1000 classes -- 25,557,032 is 0.2% below
    ("resnet50", resnet50, 25_557_032, 25.6e6, 0.01),
]


@pytest.mark.parametrize(
    ("build", "exact", "paper", "rtol"), [c[1:] for c in COUNTS], ids=[c[0] for c in COUNTS]
)
def test_parameter_count(build, exact, paper, rtol, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a model tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    with torch.device("meta"):  # sizes only: no memory, no initialization cost
        count = n_params(build())
    assert count == exact
    if paper is not None:
        assert abs(count - paper) <= rtol * paper


# ---------------------------------------------------------------- forward and backward

# Full-size models in float32, in train mode (BatchNorm uses batch statistics).
FULL_SIZE = [
    Case("fcn-002", lambda: FCN.paper002(3072, 10)),
    Case("fcn-001-relu", lambda: FCN.paper001(3072, 10)),
    Case("cnn-002", PaperCNN),
    Case("cnn-003-layernorm", LayerNormCNN),
    Case("6cnn-004", SixCNN),
    Case("6cnn-004-bn", lambda: SixCNN(batchnorm=True)),
    Case("resnet20", ResNet20),
    Case("resnet20-nobn", lambda: ResNet20(batchnorm=False)),
    Case("resnet9", ResNet9),
    Case("resnet9-nobn", lambda: ResNet9(batchnorm=False)),
    Case("wrn-28-2", wrn_28_2),
    Case("wrn-28-2-nobn", lambda: wrn_28_2(batchnorm=False)),
    # resnet50, wrn-28-10: test_large_models_float32
]


@pytest.mark.parametrize("case", FULL_SIZE, ids=[c.id for c in FULL_SIZE])
def test_forward_backward(case: Case):
    torch.manual_seed(0)
    model = case.build().train()
    x = torch.randn(2, 3, case.image_size, case.image_size)
    logits = model(x)
    assert logits.shape == (2, 10)
    cross_entropy(model, (x, torch.tensor([0, 1]))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


# ---------------------------------------------------------------- Hessian-vector products

# float64 HVP checks at full size.
HVP_CASES = [
    Case("fcn-002", lambda: FCN.paper002(3072, 10)),
    Case("fcn-001-relu", lambda: FCN.paper001(3072, 10)),
    Case("cnn-002", PaperCNN),
    Case("cnn-003-layernorm", LayerNormCNN),
    Case("6cnn-004", SixCNN),
    Case("6cnn-004-bn", lambda: SixCNN(batchnorm=True)),
    Case("resnet20", ResNet20),
    Case("resnet20-nobn", lambda: ResNet20(batchnorm=False)),
    Case("resnet9", ResNet9),
    Case("resnet9-nobn", lambda: ResNet9(batchnorm=False)),
    Case("wrn-28-2", wrn_28_2),
    Case("wrn-28-2-nobn", lambda: wrn_28_2(batchnorm=False)),
]


def gradient_at(model: nn.Module, flat: Tensor, batch) -> Tensor:
    flat = flat.detach().requires_grad_()
    names = [n for n, _ in model.named_parameters()]
    values = dict(zip(names, unflatten(flat, list(model.parameters())), strict=True))
    loss = cross_entropy(lambda x: torch.func.functional_call(model, values, (x,)), batch)
    (grad,) = torch.autograd.grad(loss, flat)
    return grad


@pytest.mark.parametrize("case", HVP_CASES, ids=[c.id for c in HVP_CASES])
def test_hvp_float64(case: Case):
    torch.manual_seed(0)
    model = case.build().double().train()
    x = torch.randn(2, 3, case.image_size, case.image_size, dtype=torch.float64)
    batch = (x, torch.tensor([3, 7]))
    op = HessianOperator(model, cross_entropy, [batch])
    g = torch.Generator().manual_seed(1)
    u, v = (torch.randn(op.dim, generator=g, dtype=torch.float64) for _ in range(2))
    v = v / v.norm()
    hv, hu = op.matvec(v), op.matvec(u)

    uhv, vhu = torch.dot(u, hv), torch.dot(v, hu)
    assert torch.isclose(uhv, vhu, rtol=1e-4, atol=0.0)  # typically ~1e-13

    # central difference of gradients along the unit vector v; float64 rounding error
    # ~1e-16/eps, truncation ~eps^2; eps small so no ReLU or max-pool switches branch
    theta = flatten(list(model.parameters())).detach()
    eps = 1e-6
    fd = gradient_at(model, theta + eps * v, batch) - gradient_at(model, theta - eps * v, batch)
    fd = fd / (2 * eps)
    assert (hv - fd).norm() <= 1e-5 * fd.norm()
    assert fd.norm() > 0


@pytest.mark.parametrize(
    ("build", "size"),
    [
        (lambda: resnet50(10), 64),  # 2x2 maps before the last BN
        (lambda: wrn_28_10(10), 32),
        (lambda: wrn_28_10(10, batchnorm=False), 32),
    ],
    ids=["resnet50", "wrn-28-10", "wrn-28-10-nobn"],
)
def test_large_models_float32(build, size):
    """The big ones in train mode: backward, and u.Hv == v.Hu over all their parameters."""
    torch.manual_seed(0)
    model = build().train()
    batch = (torch.randn(2, 3, size, size), torch.tensor([3, 7]))
    assert model(batch[0]).shape == (2, 10)
    cross_entropy(model, batch).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    op = HessianOperator(model, cross_entropy, [batch])
    g = torch.Generator().manual_seed(1)
    u, v = (torch.randn(op.dim, generator=g) for _ in range(2))
    uhv, vhu = torch.dot(u, op.matvec(v)), torch.dot(v, op.matvec(u))
    assert torch.isfinite(uhv) and uhv != 0
    assert torch.isclose(uhv, vhu, rtol=1e-3, atol=0.0)  # float32 sums over millions of terms


# ---------------------------------------------------------------- paper-specific details


def test_unnormalized_wrn_has_learnable_residual_scalars_initialized_to_one():
    """Paper 002, App. G.1: without BN, a learnable scalar (init 1) after each residual branch."""
    torch.manual_seed(0)
    net = wrn_28_2(batchnorm=False)
    names = [n for n, _ in net.named_parameters() if n.endswith("residual_scale")]
    assert len(names) == 12  # 4 blocks per group x 3 groups
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    for block in net.blocks:
        assert isinstance(block.residual_scale, nn.Parameter)
        assert block.residual_scale.shape == () and block.residual_scale.item() == 1.0
    x = torch.randn(2, 3, 32, 32)
    cross_entropy(net, (x, torch.tensor([0, 1]))).backward()
    assert all(b.residual_scale.grad.abs() > 0 for b in net.blocks)
    # batch-normalized: no scalars
    assert not any(n.endswith("residual_scale") for n, _ in wrn_28_2().named_parameters())


def test_zero_residual_scale_makes_blocks_the_identity():
    torch.manual_seed(0)
    net = WideResNet(16, 2, batchnorm=False, residual_scale_init=0.0)
    same_shape = [b for b in net.blocks if b.shortcut is None]
    assert len(same_shape) == 3  # every block but the first of each group
    for block in same_shape:
        x = torch.randn(2, block.conv1.in_channels, 8, 8)
        assert torch.equal(block(x), x)
    # the whole network: each group's later blocks are skipped, the logits are unchanged
    y = torch.randn(2, 3, 32, 32)
    out = net.stem(y)
    for block in net.blocks:
        if block.shortcut is not None:
            out = block(out)
    expected = net.fc(F.relu(out).mean(dim=(2, 3)))
    torch.testing.assert_close(net(y), expected, rtol=0, atol=0)


def test_fcn_paper002_init_is_lecun_normal_with_zero_biases():
    torch.manual_seed(0)
    net = FCN.paper002(3072, 10)
    linears = [m for m in net.net if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [200] * 5 + [10]
    assert sum(isinstance(m, nn.Tanh) for m in net.net) == 5
    for m in linears[:-1]:  # 200 x fan_in weights: the variance is within a few percent
        assert m.bias.abs().max() == 0
        assert abs(m.weight.var().item() * m.in_features - 1) < 0.05


def test_fcn_default_init_is_unchanged():
    """Existing configs' ``FCN(in, out, width, depth, activation)`` draws the same weights."""
    torch.manual_seed(0)
    net = FCN(64, 10, 16, 2, "relu")
    torch.manual_seed(0)
    reference = nn.Sequential(
        nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10)
    )
    for p, q in zip(net.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


def test_glorot_normal_init_has_the_glorot_variance():
    torch.manual_seed(0)
    net = FCN(784, 10, 1000, 3, "relu", init="glorot_normal")
    for m in (m for m in net.net if isinstance(m, nn.Linear)):
        assert m.bias.abs().max() == 0
        target = 2 / (m.in_features + m.out_features)
        assert abs(m.weight.var().item() / target - 1) < 0.05


def test_layernorm_cnn_normalizes_channels_at_every_pixel():
    torch.manual_seed(0)
    net = LayerNormCNN().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    conv, _, norm, _ = net.features[:4]
    h = torch.relu(conv(x))
    mean, var = h.mean(1, keepdim=True), h.var(1, unbiased=False, keepdim=True)
    expected = (h - mean) / torch.sqrt(var + norm.eps)  # scale 1, offset 0 at init
    torch.testing.assert_close(norm(h), expected)
    assert net.features[0].bias.abs().max() == 0


def test_paper_cnn_init_and_shapes():
    torch.manual_seed(0)
    net = PaperCNN()
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (64, (5, 5), (0, 0)),
        (96, (3, 3), (0, 0)),
        (128, (3, 3), (1, 1)),
    ]
    assert net.classifier[0].in_features == 128 * 2 * 2
    for m in [*convs, *(m for m in net.classifier if isinstance(m, nn.Linear))]:
        assert m.bias.abs().max() == 0
    big = net.classifier[0]
    assert abs(big.weight.var().item() * big.in_features - 1) < 0.05


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: WideResNet(depth=27), "6n \\+ 4"),
        (lambda: SixCNN(image_size=40), "multiple of 16"),
        (lambda: PaperCNN(image_size=22), "at least 23"),
    ],
    ids=["wrn-depth", "6cnn-image-size", "cnn-002-image-size"],
)
def test_constructors_name_the_fix(build, match):
    with pytest.raises(ValueError, match=match):
        build()
