"""LightningDataModules.

Embedded
    :class:`DigitsDataModule` -- scikit-learn's digits, no download.
"""

from lightning_eos.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
