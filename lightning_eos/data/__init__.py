"""LightningDataModules.

Embedded
    :class:`DigitsDataModule` -- scikit-learn's digits, no download.
Synthetic (paper 001)
    :class:`SparseRegressionDataModule` -- App. B; :class:`Rank2DataModule` -- App. E.3.1;
    :class:`SinglePointDataModule` -- one example, for the toys of §3.1 and App. E.6.
Images (torchvision's real loaders, seeded class-balanced subsets as tensors)
    :class:`CIFARDataModule` -- CIFAR-10/100 (papers 001, 002);
    :class:`MNISTDataModule` -- MNIST (paper 003's MLP);
    :class:`ImageNetSubsetDataModule` -- a few ImageNet classes at low resolution.
Text
    :class:`CharLMDataModule` -- character-level LM from a local file (tiny-shakespeare,
    paper 003); :class:`WMTDataModule` -- WMT En-De subsets from local parallel text or
    ``datasets``, BPE from ``tokenizers``, token-bucketed batches (paper 002, Fig. 7).
Synthetic text (the Transformer configs' CPU twins)
    :class:`MarkovLMDataModule` -- next-token windows of a random Markov chain;
    :class:`ReversalTranslationDataModule` -- reverse-and-map "translation".
"""

from lightning_eos.data.cifar import CIFARDataModule
from lightning_eos.data.digits import DigitsDataModule
from lightning_eos.data.imagenet import ImageNetSubsetDataModule
from lightning_eos.data.mnist import MNISTDataModule
from lightning_eos.data.shakespeare import CharLMDataModule
from lightning_eos.data.synthetic import (
    Rank2DataModule,
    SinglePointDataModule,
    SparseRegressionDataModule,
)
from lightning_eos.data.synthetic_text import MarkovLMDataModule, ReversalTranslationDataModule
from lightning_eos.data.wmt import WMTDataModule

__all__ = [
    # Embedded
    "DigitsDataModule",
    # Synthetic (paper 001)
    "Rank2DataModule",
    "SinglePointDataModule",
    "SparseRegressionDataModule",
    # Images
    "CIFARDataModule",
    "ImageNetSubsetDataModule",
    "MNISTDataModule",
    # Text
    "CharLMDataModule",
    "WMTDataModule",
    # Synthetic text
    "MarkovLMDataModule",
    "ReversalTranslationDataModule",
]
