"""Models: the papers' architectures and a supervised LightningModule.

Networks
    :class:`FCN`
Toy models (paper 001)
    :class:`DiagonalLinearNetwork` -- eq. (2); :class:`ScalarReLUNetwork` -- §3.1.
Tasks
    :class:`SupervisedTask`, :func:`mse_loss`, :func:`half_mse_loss`,
    :func:`classification_loss`
"""

from lightning_eos.models.fcn import FCN
from lightning_eos.models.task import (
    SupervisedTask,
    classification_loss,
    half_mse_loss,
    mse_loss,
)
from lightning_eos.models.toy import DiagonalLinearNetwork, ScalarReLUNetwork

__all__ = [
    # Networks
    "FCN",
    # Toy models (paper 001)
    "DiagonalLinearNetwork",
    "ScalarReLUNetwork",
    # Tasks
    "SupervisedTask",
    "classification_loss",
    "half_mse_loss",
    "mse_loss",
]
