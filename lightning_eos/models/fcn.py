"""Fully connected networks."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

Activation = Literal["tanh", "relu", "gelu", "elu", "softplus", "identity"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "identity": nn.Identity,
}


class FCN(nn.Module):
    """A fully connected network: ``depth`` hidden layers of ``width`` units.

    Inputs with more than one feature dimension are flattened.

    Args:
        in_features: input size (64 for 8x8 digits).
        out_features: output size (number of classes).
        width: hidden units per layer.
        depth: number of hidden layers (``depth=0`` is a linear model).
        activation: nonlinearity after every hidden layer.
        bias: whether the linear layers have biases.

    Example:
        >>> net = FCN(in_features=64, out_features=10, width=200, depth=3)
        >>> sum(p.numel() for p in net.parameters())
        95410
    """

    def __init__(
        self,
        in_features: int = 64,
        out_features: int = 10,
        width: int = 200,
        depth: int = 3,
        activation: Activation = "tanh",
        bias: bool = True,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r}; choose one of {sorted(_ACTIVATIONS)}.")
        layers: list[nn.Module] = []
        fan_in = in_features
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width, bias=bias), _ACTIVATIONS[activation]()]
            fan_in = width
        layers.append(nn.Linear(fan_in, out_features, bias=bias))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))
