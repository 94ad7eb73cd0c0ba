"""Plain convolutional networks: the CNNs of papers 002 and 003 and the 6CNN of paper 004.

All take ``image_size`` so that the flattened width of their fully connected head is
known at construction (no lazy modules: the parameter count, and so the Hessian's side,
is fixed before the first batch).
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_eos.models.fcn import glorot_normal_, lecun_normal_

__all__ = ["LayerNormCNN", "PaperCNN", "SixCNN"]


def _pooled(size: int, window: int = 3, stride: int = 2) -> int:
    """Side of a "valid" max-pool's output."""
    return (size - window) // stride + 1


class PaperCNN(nn.Module):
    """The CNN of paper 002, App. G.1 (Fig. 4a: full-batch Adam on CIFAR-10).

    Three times (Conv => ReLU => max-pool), then FC => ReLU => FC => ReLU => FC:

    ======  ===========================================  ==================
    layer   paper 002, App. G.1                          32x32 output
    ======  ===========================================  ==================
    conv1   64 filters, 5x5, "valid"                      64 x 28 x 28
    pool1   3x3 window, stride 2                          64 x 13 x 13
    conv2   96 filters, 3x3, "valid"                      96 x 11 x 11
    pool2   3x3 window, stride 2                          96 x 5 x 5
    conv3   128 filters, 3x3, "same"                      128 x 5 x 5
    pool3   3x3 window, stride 2                          128 x 2 x 2
    fc1     512                                           512
    fc2     256                                           256
    fc3     ``num_classes``                               10
    ======  ===========================================  ==================

    The paper gives no padding for the pools; we use "valid" (Flax's and Keras'
    default), which gives the table above. Weights are :math:`\\mathcal{N}(0,
    1/\\text{fan\\_in})`, biases zero (App. G.1). On 3x32x32 inputs with 10 classes it
    has **567,530** parameters.

    Args:
        num_classes: outputs of the last layer.
        in_channels: image channels.
        image_size: side of the square input images (at least 23).
        width_multiplier: scales every conv and hidden FC width (1 is the paper's).

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> net = PaperCNN()
        >>> sum(p.numel() for p in net.parameters())
        567530
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        width_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        side = image_size
        for shrink in (4, 2, 0):  # conv1 and conv2 are "valid", conv3 is "same"
            side -= shrink
            if side < 3:
                raise ValueError(f"image_size={image_size} is too small; use at least 23.")
            side = _pooled(side)
        c1, c2, c3, f1, f2 = (max(1, round(w * width_multiplier)) for w in (64, 96, 128, 512, 256))
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(c1, c2, 3),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(c3 * side * side, f1),
            nn.ReLU(),
            nn.Linear(f1, f2),
            nn.ReLU(),
            nn.Linear(f2, num_classes),
        )
        lecun_normal_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class SixCNN(nn.Module):
    """A 6-layer CNN of the size of paper 004's "6CNN" (§4.2, Remark: m = 0.51M).

    Paper 004 names the network ("a simple 6-layer CNN (6CNN, m = 0.51M)") and its
    parameter count, but not its layers. This is our reconstruction, four 3x3 convolutions
    and two fully connected layers, each convolution followed by ReLU and a 2x2 max-pool:

    ======  =========================  ==============
    layer   width                      32x32 output
    ======  =========================  ==============
    conv1   ``width``        (32)      32 x 16 x 16
    conv2   ``2 * width``    (64)      64 x 8 x 8
    conv3   ``4 * width``    (128)     128 x 4 x 4
    conv4   ``4 * width``    (128)     128 x 2 x 2
    fc1     ``hidden``       (512)     512
    fc2     ``num_classes``            10
    ======  =========================  ==============

    On 3x32x32 inputs with 10 classes it has **508,618** parameters (0.51M), 509,322
    with BatchNorm. PyTorch's default initialization, as the paper gives none.

    Args:
        num_classes: outputs of the last layer.
        in_channels: image channels.
        image_size: side of the square input images (a multiple of 16).
        width: channels of the first convolution; the others are 2x and 4x it.
        hidden: width of the hidden fully connected layer.
        batchnorm: BatchNorm after every convolution (before the ReLU); paper 004 trains
            some runs with BatchNorm (§4.3 and §5, Remark).

    Example:
        >>> import torch
        >>> net = SixCNN()
        >>> sum(p.numel() for p in net.parameters())
        508618
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        width: int = 32,
        hidden: int = 512,
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        if image_size < 16 or image_size % 16:
            raise ValueError(f"image_size={image_size}; use a multiple of 16 (four 2x2 pools).")
        widths = (width, 2 * width, 4 * width, 4 * width)
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out in widths:
            layers.append(nn.Conv2d(c_in, c_out, 3, padding=1))
            if batchnorm:
                layers.append(nn.BatchNorm2d(c_out))
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        side = image_size // 16
        self.classifier = nn.Sequential(
            nn.Linear(c_in * side * side, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class _ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels at every pixel of ``(n, C, H, W)`` maps."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class LayerNormCNN(nn.Module):
    """The CNN of paper 003 (SAM, §3.1) for its CIFAR-10 experiments (Fig. 7-11).

    "Two blocks comprised of a convolutional layer with a ReLU nonlinearity followed by
    layer normalization, then 2x2 max pooling with a 2x2 stride. In the first block the
    convolutional layer had 16 channels, and in the second block, it had 32 channels",
    with Glorot-normal weights. The paper leaves open the kernel size, the padding, what
    the layer norm normalizes and the head; we take 3x3 "same" convolutions (Haiku's
    default padding), a LayerNorm over the channels of each pixel with a learned scale and
    offset, and one linear layer to the classes. Biases start at zero.

    On 3x32x32 inputs with 10 classes it has 25,674 parameters.

    Args:
        num_classes: outputs of the last layer.
        in_channels: image channels.
        image_size: side of the square input images (a multiple of 4).
        channels: the two blocks' channels.
        kernel_size: side of the (odd) convolution kernels.

    Example:
        >>> net = LayerNormCNN()
        >>> sum(p.numel() for p in net.parameters())
        25674
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        channels: tuple[int, int] = (16, 32),
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size={image_size}; two 2x2 poolings need a multiple of 4.")
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out in channels:
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2),
                nn.ReLU(),
                _ChannelLayerNorm(c_out),
                nn.MaxPool2d(2, 2),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in * (image_size // 4) ** 2, num_classes)
        glorot_normal_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))
