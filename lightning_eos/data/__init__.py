"""LightningDataModules.

Embedded
    :class:`DigitsDataModule` -- scikit-learn's digits, no download.
Synthetic (paper 001)
    :class:`SparseRegressionDataModule` -- App. B; :class:`Rank2DataModule` -- App. E.3.1;
    :class:`SinglePointDataModule` -- one example, for the toys of §3.1 and App. E.6.
"""

from lightning_eos.data.digits import DigitsDataModule
from lightning_eos.data.synthetic import (
    Rank2DataModule,
    SinglePointDataModule,
    SparseRegressionDataModule,
)

__all__ = [
    # Embedded
    "DigitsDataModule",
    # Synthetic (paper 001)
    "Rank2DataModule",
    "SinglePointDataModule",
    "SparseRegressionDataModule",
]
