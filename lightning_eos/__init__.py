"""lightning-eos: watch the edge of stability while you train with PyTorch Lightning.

Subpackages
    :mod:`lightning_eos.curvature` (pure torch), :mod:`lightning_eos.callbacks`,
    :mod:`lightning_eos.data`, :mod:`lightning_eos.models`,
    :mod:`lightning_eos.thresholds`, :mod:`lightning_eos.loggers`.
"""

__version__ = "0.1.0"
