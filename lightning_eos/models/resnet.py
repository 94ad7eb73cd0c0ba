"""Residual networks: ResNet-20, ResNet-9, Wide ResNets and torchvision's ResNet-50.

==================  ===========================  ===================================
model               parameters (10 classes)      used in
==================  ===========================  ===================================
:class:`ResNet20`   269,722                      paper 001, App. E.3.2, E.4.3
:class:`ResNet9`    2,274,880                    paper 004, §4.2 Remark (2.3M)
:func:`wrn_28_2`    1,467,610                    paper 004, §4.2 Remark
:func:`wrn_28_10`   36,479,194                   paper 002, App. G.1 (Fig. 4, 10, 11)
:func:`resnet50`    25,557,032 (1000 classes)    paper 002, Fig. 6 (ImageNet)
==================  ===========================  ===================================

Every activation is out of place (no ``inplace=True``), so double backward (the
Hessian-vector products of :mod:`lightning_eos.curvature`) works through all of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from torchvision.models import ResNet

__all__ = ["ResNet20", "ResNet9", "WideResNet", "resnet50", "wrn_28_10", "wrn_28_2"]


def _norm(channels: int, batchnorm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batchnorm else nn.Identity()


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def _scaled(width: int, multiplier: float) -> int:
    return max(1, round(width * multiplier))


class _BasicBlock(nn.Module):
    """He et al. (2016) CIFAR block: conv-BN-ReLU-conv-BN, plus shortcut, then ReLU.

    The shortcut is option A: identity, subsampled and zero-padded in channels when the
    shape changes, so it has no parameters.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, batchnorm: bool) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = _norm(c_out, batchnorm)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = _norm(c_out, batchnorm)
        self.stride = stride
        self.extra_channels = c_out - c_in

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra_channels))
        return F.relu(out + shortcut)


class ResNet20(nn.Module):
    """ResNet-20 for CIFAR (He et al., 2016, §4.2), the ResNet20 of paper 001 (App. E.3.2).

    A 3x3 stem of 16 channels, then three stages of three basic blocks with 16, 32 and
    64 channels (the second and third stages start with stride 2), global average pooling
    and a linear layer: :math:`6 \\cdot 3 + 2 = 20` weight layers. Shortcuts are
    parameter-free (He et al.'s option A). Convolutions have He-normal weights
    (fan-in) and no biases. With 10 classes it has **269,722** parameters (0.27M), of
    which 1,376 are BatchNorm's; 268,346 without BatchNorm.

    Args:
        num_classes: outputs of the last layer.
        in_channels: image channels.
        width_multiplier: scales the 16/32/64 channels.
        batchnorm: BatchNorm after every convolution; ``False`` drops it (no other change).

    Example:
        >>> import torch
        >>> net = ResNet20()
        >>> sum(p.numel() for p in net.parameters())
        269722
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_multiplier: float = 1.0,
        batchnorm: bool = True,
    ) -> None:
        super().__init__()
        widths = [_scaled(w, width_multiplier) for w in (16, 32, 64)]
        self.stem = nn.Sequential(
            _conv3x3(in_channels, widths[0]), _norm(widths[0], batchnorm), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for stage, c_out in enumerate(widths):
            for i in range(3):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(_BasicBlock(c_in, c_out, stride, batchnorm))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        out = self.blocks(self.stem(x))
        return self.fc(out.mean(dim=(2, 3)))


def _conv_bn(c_in: int, c_out: int, batchnorm: bool, kernel: int = 3, **kwargs) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, kernel, bias=False, **kwargs)
    return nn.Sequential(conv, _norm(c_out, batchnorm), nn.ReLU())


class _Residual(nn.Module):
    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.branch = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


class ResNet9(nn.Module):
    """The ResNet-9 of paper 004 (§4.2, Remark: m = 2.3M), from ``wbaek/torchskeleton``.

    Paper 004 takes ResNet-9 from https://github.com/wbaek/torchskeleton (its footnote 3):
    Kakao Brain's DAWNBench CIFAR-10 network (``bin/dawnbench/cifar10.py``), where each
    ``conv`` is a bias-free convolution, BatchNorm and ReLU:

    ==========  ============================================  ==============
    layer       torchskeleton                                 32x32 output
    ==========  ============================================  ==============
    prep        conv 3x3, 64                                  64 x 32 x 32
    layer1      conv 5x5 stride 2, 128                        128 x 16 x 16
    res1        x + conv 3x3, 128 (twice)                     128 x 16 x 16
    layer2      conv 3x3, 256; max-pool 2                     256 x 8 x 8
    res2        x + conv 3x3, 256 (twice)                     256 x 8 x 8
    layer3      conv 3x3 (no padding), 128                    128 x 6 x 6
    head        global max-pool; linear (no bias); times 0.2  10
    ==========  ============================================  ==============

    Weights are uniform with variance :math:`1/\\text{fan\\_in}` (torchskeleton's
    ``kaiming_uniform_(mode="fan_in", nonlinearity="linear")``). With 10 classes it has
    **2,274,880** parameters (2.3M); 2,272,192 without BatchNorm (paper 004, Fig. 38
    trains "ResNet-9 without BN"). This is not the Myrtle.ai ResNet-9 (6.6M).

    Args:
        num_classes: outputs of the last layer.
        in_channels: image channels.
        width_multiplier: scales every width (64/128/256).
        batchnorm: BatchNorm after every convolution.
        output_scale: the constant the logits are multiplied by (0.2 in torchskeleton).

    Example:
        >>> import torch
        >>> net = ResNet9()
        >>> sum(p.numel() for p in net.parameters())
        2274880
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_multiplier: float = 1.0,
        batchnorm: bool = True,
        output_scale: float = 0.2,
    ) -> None:
        super().__init__()
        c64, c128, c256 = (_scaled(w, width_multiplier) for w in (64, 128, 256))
        bn = batchnorm
        self.features = nn.Sequential(
            _conv_bn(in_channels, c64, bn, padding=1),
            _conv_bn(c64, c128, bn, kernel=5, stride=2, padding=2),
            _Residual(_conv_bn(c128, c128, bn, padding=1), _conv_bn(c128, c128, bn, padding=1)),
            _conv_bn(c128, c256, bn, padding=1),
            nn.MaxPool2d(2),
            _Residual(_conv_bn(c256, c256, bn, padding=1), _conv_bn(c256, c256, bn, padding=1)),
            _conv_bn(c256, c128, bn, padding=0),
            nn.AdaptiveMaxPool2d(1),
        )
        self.fc = nn.Linear(c128, num_classes, bias=False)
        self.output_scale = output_scale
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="linear")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(1)) * self.output_scale


class _WideBlock(nn.Module):
    """Pre-activation wide basic block (Zagoruyko & Komodakis, 2016).

    ``BN-ReLU-conv-BN-ReLU-conv`` plus the shortcut; when the shape changes the shortcut
    is a 1x1 convolution of the pre-activated input. Without BatchNorm the residual branch
    is multiplied by a learnable scalar ``residual_scale`` (paper 002, App. G.1).
    """

    def __init__(
        self, c_in: int, c_out: int, stride: int, batchnorm: bool, residual_scale_init: float
    ) -> None:
        super().__init__()
        self.bn1 = _norm(c_in, batchnorm)
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn2 = _norm(c_out, batchnorm)
        self.conv2 = _conv3x3(c_out, c_out)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
        self.residual_scale: nn.Parameter | None = None
        if not batchnorm:
            self.residual_scale = nn.Parameter(torch.tensor(float(residual_scale_init)))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        branch = self.conv2(F.relu(self.bn2(self.conv1(out))))
        if self.residual_scale is not None:
            branch = self.residual_scale * branch
        return shortcut + branch


class WideResNet(nn.Module):
    """Wide ResNet WRN-``depth``-``widen_factor`` (Zagoruyko & Komodakis, 2016).

    A 3x3 stem of 16 channels, then three groups of :math:`n = (\\text{depth} - 4)/6`
    pre-activation blocks with :math:`16k`, :math:`32k` and :math:`64k` channels
    (:math:`k` = ``widen_factor``; strides 1, 2, 2), a final BN-ReLU, global average
    pooling and a linear layer. Convolutions have no biases and He-normal (fan-out)
    weights; the linear bias starts at zero. No dropout.

    Paper 002 (App. G.1) uses "four blocks per group, and a channel multiplier of 10",
    i.e. WRN-28-10 (:func:`wrn_28_10`), batch-normalized on CIFAR-100 and un-normalized on
    CIFAR-10 (Fig. 4). Un-normalized (``batchnorm=False``) every BatchNorm is removed and
    a learnable scalar, initialized to 1 (``residual_scale_init``), multiplies the residual
    branch of every block. With ``residual_scale_init=0`` every block whose input and
    output shapes agree is the identity at initialization (as in SkipInit).

    Parameters with 10 classes: WRN-28-10 **36,479,194** (36,461,254 un-normalized, the
    12 scalars included), WRN-28-2 **1,467,610** (1,464,006 un-normalized), WRN-16-4
    2,748,890.

    Args:
        depth: total depth :math:`6n + 4`.
        widen_factor: channel multiplier :math:`k`.
        num_classes: outputs of the last layer.
        in_channels: image channels.
        batchnorm: pre-activation BatchNorm (``False``: none, and the learnable scalar).
        residual_scale_init: initial value of the scalars (only without BatchNorm).

    Example:
        >>> import torch
        >>> net = WideResNet(depth=10, widen_factor=1, batchnorm=False)
        >>> [b.residual_scale.item() for b in net.blocks]
        [1.0, 1.0, 1.0]
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        batchnorm: bool = True,
        residual_scale_init: float = 1.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth={depth}; a Wide ResNet has depth 6n + 4 (10, 16, 22, 28...).")
        if widen_factor < 1:
            raise ValueError(f"widen_factor={widen_factor}; use a positive integer.")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = _conv3x3(in_channels, 16)
        blocks: list[nn.Module] = []
        c_in = 16
        for group, c_out in enumerate(widths):
            for i in range(n):
                stride = 2 if group > 0 and i == 0 else 1
                blocks.append(_WideBlock(c_in, c_out, stride, batchnorm, residual_scale_init))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = _norm(c_in, batchnorm)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(out.mean(dim=(2, 3)))


def wrn_28_2(num_classes: int = 10, in_channels: int = 3, batchnorm: bool = True) -> WideResNet:
    """WRN-28-2 of paper 004 (§4.2, Remark): 1,467,610 parameters with 10 classes.

    Paper 004 quotes "WRN-28-2 (m = 36M)", but 36M is the size of WRN-28-10
    (:func:`wrn_28_10`, 36,479,194); WRN-28-2 has about 1.5M. We build WRN-28-2.
    """
    return WideResNet(28, 2, num_classes, in_channels, batchnorm)


def wrn_28_10(
    num_classes: int = 10,
    in_channels: int = 3,
    batchnorm: bool = True,
    residual_scale_init: float = 1.0,
) -> WideResNet:
    """WRN-28-10 of paper 002 (App. G.1): 36,479,194 parameters with 10 classes."""
    return WideResNet(28, 10, num_classes, in_channels, batchnorm, residual_scale_init)


def resnet50(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """The ResNet-50 of torchvision (paper 002, Fig. 6: minibatch Adam on ImageNet), untrained.

    No pretrained weights are loaded and nothing is downloaded. With 1000 classes it has
    25,557,032 parameters (25.6M). ``in_channels`` other than 3 replaces the stem
    convolution.

    Example:
        >>> net = resnet50(num_classes=10)
        >>> sum(p.numel() for p in net.parameters())
        23528522
    """
    import torchvision  # on demand: the other models do not need it

    net = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return net
