"""Models: the papers' architectures and a supervised LightningModule.

Fully connected networks
    :class:`FCN` -- :meth:`FCN.paper002` (5x200 tanh, App. G.1), :meth:`FCN.paper001`
    (3-layer ReLU, §2.2); :func:`lecun_normal_` -- weights :math:`N(0, 1/\\text{fan\\_in})`;
    :func:`glorot_normal_` -- paper 003's initialization.
Convolutional networks
    :class:`PaperCNN` -- paper 002, App. G.1; :class:`LayerNormCNN` -- paper 003, §3.1;
    :class:`SixCNN` -- paper 004's 6CNN (0.51M).
Residual networks
    :class:`ResNet20` -- He et al. CIFAR (paper 001); :class:`ResNet9` -- paper 004 (2.3M);
    :class:`WideResNet`, :func:`wrn_28_2` (paper 004), :func:`wrn_28_10` (paper 002);
    :func:`resnet50` -- torchvision (paper 002, Fig. 6).
Transformers
    :class:`EncoderDecoderTransformer` -- pre-LN / post-LN 6L-6L (paper 002, Fig. 7);
    :class:`CharTransformerLM` -- paper 003's character LM (Haiku's example).
Toy models (paper 001)
    :class:`DiagonalLinearNetwork` -- eq. (2); :class:`ScalarReLUNetwork` -- §3.1.
Tasks
    :class:`SupervisedTask` (classification, regression, LM, seq2seq), :func:`mse_loss`,
    :func:`half_mse_loss`, :func:`sequence_cross_entropy`, :func:`classification_loss`
"""

from lightning_eos.models.cnn import LayerNormCNN, PaperCNN, SixCNN
from lightning_eos.models.fcn import FCN, glorot_normal_, lecun_normal_
from lightning_eos.models.resnet import ResNet9, ResNet20, WideResNet, resnet50, wrn_28_2, wrn_28_10
from lightning_eos.models.task import (
    SupervisedTask,
    classification_loss,
    half_mse_loss,
    mse_loss,
    sequence_cross_entropy,
)
from lightning_eos.models.toy import DiagonalLinearNetwork, ScalarReLUNetwork
from lightning_eos.models.transformer import CharTransformerLM, EncoderDecoderTransformer

__all__ = [
    # Fully connected networks
    "FCN",
    "glorot_normal_",
    "lecun_normal_",
    # Convolutional networks
    "LayerNormCNN",
    "PaperCNN",
    "SixCNN",
    # Residual networks
    "ResNet20",
    "ResNet9",
    "WideResNet",
    "resnet50",
    "wrn_28_2",
    "wrn_28_10",
    # Transformers
    "CharTransformerLM",
    "EncoderDecoderTransformer",
    # Toy models (paper 001)
    "DiagonalLinearNetwork",
    "ScalarReLUNetwork",
    # Tasks
    "SupervisedTask",
    "classification_loss",
    "half_mse_loss",
    "mse_loss",
    "sequence_cross_entropy",
]
