"""Models: the papers' architectures and a supervised LightningModule.

Networks
    :class:`FCN`
Tasks
    :class:`SupervisedTask`, :func:`mse_loss`, :func:`classification_loss`
"""

from lightning_eos.models.fcn import FCN
from lightning_eos.models.task import SupervisedTask, classification_loss, mse_loss

__all__ = ["FCN", "SupervisedTask", "classification_loss", "mse_loss"]
