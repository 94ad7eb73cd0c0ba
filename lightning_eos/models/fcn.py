"""Fully connected networks."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

Activation = Literal["tanh", "relu", "gelu", "elu", "softplus", "identity"]
Init = Literal["pytorch", "lecun_normal", "glorot_normal"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "identity": nn.Identity,
}


def lecun_normal_(module: nn.Module) -> None:
    """Weights :math:`\\mathcal{N}(0, 1/\\text{fan\\_in})`, biases zero, in every Linear/Conv.

    The initialization of paper 002, App. G.1 ("weights are initialized with variance
    1 / fan_in ... biases ... initialized to zero"). Other modules are left alone.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
            fan_in = m.weight[0].numel()  # in_features, or in_channels/groups * kernel area
            with torch.no_grad():
                m.weight.normal_(0.0, fan_in**-0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def glorot_normal_(module: nn.Module) -> None:
    """Weights :math:`\\mathcal{N}(0, 2/(\\text{fan\\_in} + \\text{fan\\_out}))`, biases zero.

    Glorot & Bengio's normal initialization (``torch.nn.init.xavier_normal_``; JAX's and
    Haiku's ``glorot_normal``), which paper 003 uses for its MLP and CNN (§3.1). Applies to
    every Linear/Conv layer; other modules are left alone.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class FCN(nn.Module):
    """A fully connected network: ``depth`` hidden layers of ``width`` units.

    Inputs with more than one feature dimension are flattened.

    Two papers' networks (see the constructors :meth:`paper002` and :meth:`paper001`):

    * paper 002, App. G.1: 5 hidden layers of width 200, tanh, weights
      :math:`\\mathcal{N}(0, 1/\\text{fan\\_in})` and zero biases
      (``depth=5, width=200, activation="tanh", init="lecun_normal"``);
      on CIFAR-10 (3072 inputs) it has 777,410 parameters.
    * paper 001, §2.2 and Fig. 2 / App. E: "3-layer" ReLU FCNs, read as three linear
      layers, i.e. two hidden layers (``depth=2, activation="relu"``), of width 200 or 256
      on CIFAR-10 subsets (width 64 on the rank-2 data of App. E.3.1); PyTorch's
      default initialization, as the paper names no other.

    Args:
        in_features: input size (64 for 8x8 digits, 3072 for CIFAR-10).
        out_features: output size (number of classes).
        width: hidden units per layer.
        depth: number of hidden layers (``depth=0`` is a linear model).
        activation: nonlinearity after every hidden layer.
        bias: whether the linear layers have biases.
        init: ``"pytorch"`` keeps :class:`torch.nn.Linear`'s default (uniform,
            variance :math:`1/(3\\,\\text{fan\\_in})`); ``"lecun_normal"`` draws weights
            from :math:`\\mathcal{N}(0, 1/\\text{fan\\_in})` and zeroes the biases
            (paper 002, App. G.1); ``"glorot_normal"`` draws them from
            :math:`\\mathcal{N}(0, 2/(\\text{fan\\_in}+\\text{fan\\_out}))`, zero biases
            (paper 003, §3.1).

    Example:
        >>> net = FCN(in_features=64, out_features=10, width=200, depth=3)
        >>> sum(p.numel() for p in net.parameters())
        95410
        >>> _ = torch.manual_seed(0)
        >>> net = FCN.paper002(in_features=3072, out_features=10)
        >>> sum(p.numel() for p in net.parameters())
        777410
        >>> first = net.net[0]
        >>> bool(first.bias.abs().max() == 0), round(first.weight.var().item() * 3072, 1)
        (True, 1.0)
        >>> relu = FCN.paper001(in_features=3072, out_features=10, width=200)
        >>> [m.out_features for m in relu.net if isinstance(m, nn.Linear)]
        [200, 200, 10]
    """

    def __init__(
        self,
        in_features: int = 64,
        out_features: int = 10,
        width: int = 200,
        depth: int = 3,
        activation: Activation = "tanh",
        bias: bool = True,
        init: Init = "pytorch",
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r}; choose one of {sorted(_ACTIVATIONS)}.")
        if init not in ("pytorch", "lecun_normal", "glorot_normal"):
            raise ValueError(f"init={init!r}; choose 'pytorch', 'lecun_normal' or 'glorot_normal'.")
        layers: list[nn.Module] = []
        fan_in = in_features
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width, bias=bias), _ACTIVATIONS[activation]()]
            fan_in = width
        layers.append(nn.Linear(fan_in, out_features, bias=bias))
        self.net = nn.Sequential(*layers)
        if init == "lecun_normal":
            lecun_normal_(self)
        elif init == "glorot_normal":
            glorot_normal_(self)

    @classmethod
    def paper002(cls, in_features: int = 3072, out_features: int = 10) -> FCN:
        """Paper 002, App. G.1: 5 hidden layers of 200 tanh units, LeCun-normal, zero biases."""
        return cls(in_features, out_features, 200, 5, activation="tanh", init="lecun_normal")

    @classmethod
    def paper001(cls, in_features: int = 3072, out_features: int = 10, width: int = 200) -> FCN:
        """Paper 001, Fig. 2 and App. E: the "3-layer" ReLU FCN (two hidden layers of ``width``)."""
        return cls(in_features, out_features, width=width, depth=2, activation="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))
