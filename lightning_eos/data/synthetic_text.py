"""Synthetic token sequences for the Transformer configs' CPU twins.

Both modules serve batches in the layout of their real counterparts, so the same model,
task and monitors run on them: :class:`MarkovLMDataModule` yields ``(x, y)`` next-token
windows like :class:`~lightning_eos.data.CharLMDataModule`, and
:class:`ReversalTranslationDataModule` yields ``((src, tgt_in), tgt_out)`` like
:class:`~lightning_eos.data.WMTDataModule`. Everything is drawn from a
``torch.Generator`` seeded with ``seed`` (never the global RNG or the process rank).
"""

from __future__ import annotations

import bisect

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_eos.data._loaders import seeded_loader
from lightning_eos.data.wmt import TranslationCollate, TranslationPairs

__all__ = ["MarkovLMDataModule", "ReversalTranslationDataModule"]


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be positive.")


class MarkovLMDataModule(L.LightningDataModule):
    """Next-token prediction on text from a random sparse Markov chain.

    Token :math:`a` is followed by one of ``branching`` successors drawn once for the
    chain, with Dirichlet(1) probabilities :math:`P_{ab}`, so the best possible loss is
    the chain's entropy rate :math:`-\\sum_a \\pi_a \\sum_b P_{ab}\\log P_{ab}` (``pi`` the
    stationary distribution), well above zero and well below :math:`\\log V`: a
    small Transformer has something to learn. One long stream is cut into windows of
    ``seq_len + 1`` tokens; ``x = w[:-1]`` and ``y = w[1:]`` are ``(n, seq_len)`` integer
    tensors, as in :class:`~lightning_eos.data.CharLMDataModule`.

    Args:
        vocab_size: number of tokens :math:`V`.
        seq_len: tokens per input sequence.
        num_train: training windows.
        num_val: validation windows (from the same stream, after the training ones).
        branching: successors per token.
        seed: seed of the chain, the stream and of minibatch shuffling.
        batch_size: ``None`` for full batch.
        shuffle: shuffle minibatches (seeded; irrelevant in full batch).

    Example:
        >>> data = MarkovLMDataModule(vocab_size=5, seq_len=4, num_train=3, num_val=1)
        >>> data.setup()
        >>> data.x_train.shape, bool((data.x_train[:, 1:] == data.y_train[:, :-1]).all())
        (torch.Size([3, 4]), True)
    """

    def __init__(
        self,
        vocab_size: int = 65,
        seq_len: int = 64,
        num_train: int = 1024,
        num_val: int = 128,
        branching: int = 3,
        seed: int = 0,
        batch_size: int | None = None,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        _check_positive(
            vocab_size=vocab_size, seq_len=seq_len, num_train=num_train, branching=branching
        )
        _check_positive(batch_size=batch_size)
        if num_val < 0:
            raise ValueError(f"num_val={num_val} must be nonnegative.")
        if branching > vocab_size:
            raise ValueError(f"branching={branching} exceeds vocab_size={vocab_size}.")
        self.vocab_size, self.seq_len, self.branching = vocab_size, seq_len, branching
        self.num_train, self.num_val, self.seed = num_train, num_val, seed
        self.batch_size, self.shuffle = batch_size, shuffle
        self.transition: Tensor | None = None
        self.x_train = self.y_train = self.x_val = self.y_val = None

    def setup(self, stage: str | None = None) -> None:
        if self.x_train is not None:
            return
        g = torch.Generator().manual_seed(self.seed)
        v, k = self.vocab_size, self.branching
        successors = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(v)])
        weights = -torch.log(torch.rand(v, k, generator=g, dtype=torch.float64))  # Dirichlet(1)
        self.transition = torch.zeros(v, v, dtype=torch.float64)
        self.transition.scatter_(1, successors, weights / weights.sum(1, keepdim=True))
        windows = self.num_train + self.num_val
        length = windows * (self.seq_len + 1)
        # inverse-CDF sampling of each successor from one seeded uniform per token
        cdf = self.transition.cumsum(1).tolist()
        uniforms = torch.rand(length, generator=g, dtype=torch.float64).tolist()
        stream = [int(torch.randint(v, (1,), generator=g))]
        for u in uniforms[1:]:
            row = cdf[stream[-1]]
            stream.append(min(bisect.bisect_right(row, u * row[-1]), v - 1))
        w = torch.tensor(stream, dtype=torch.long).view(windows, self.seq_len + 1)
        x, y = w[:, :-1], w[:, 1:]
        n = self.num_train
        self.x_train, self.y_train, self.x_val, self.y_val = x[:n], y[:n], x[n:], y[n:]

    def entropy_rate(self) -> float:
        """The chain's entropy rate in nats per token: the lowest expected loss."""
        self.setup()
        p = self.transition
        evals, evecs = torch.linalg.eig(p.T)
        pi = evecs[:, torch.argmin((evals - 1).abs())].real
        pi = pi / pi.sum()
        logs = torch.where(p > 0, p.log(), torch.zeros_like(p))
        return float(-(pi[:, None] * p * logs).sum())

    def _loader(self, x: Tensor, y: Tensor, shuffle: bool) -> DataLoader:
        return seeded_loader(TensorDataset(x, y), self.batch_size, shuffle, self.seed)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.x_train, self.y_train, self.shuffle)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.x_val, self.y_val, False)


class ReversalTranslationDataModule(L.LightningDataModule):
    """A synthetic translation task: the target is the source reversed, word by word mapped.

    Sources are random sentences of ``min_len`` to ``max_len`` "words" (ids
    ``4 .. vocab_size - 1``; 0-3 are ``[PAD]``, ``[BOS]``, ``[EOS]``, ``[UNK]`` as in
    :class:`~lightning_eos.data.WMTDataModule`); the target of :math:`x_1 \\dots x_m` is
    :math:`\\sigma(x_m) \\dots \\sigma(x_1)` for a fixed random permutation
    :math:`\\sigma` of the words. Sentence lengths differ, so batches are padded exactly as
    WMT's: ``((src, tgt_in), tgt_out)`` from :class:`~lightning_eos.data.wmt.TranslationCollate`,
    with padded target positions ``-100``. The encoder-decoder Transformer learns it
    (attention must reverse the order), so the WMT configs' CPU twins train the same model,
    loss and monitors on it.

    Args:
        vocab_size: token ids including the four special ones.
        min_len: shortest source sentence.
        max_len: longest source sentence.
        num_train: training pairs.
        num_val: validation pairs.
        seed: seed of the permutation, the sentences and minibatch shuffling.
        batch_size: sentences per batch; ``None`` for full batch.
        shuffle: shuffle minibatches (seeded; irrelevant in full batch).

    Example:
        >>> data = ReversalTranslationDataModule(vocab_size=10, num_train=2, num_val=1)
        >>> data.setup()
        >>> (src, tgt_in), tgt_out = next(iter(data.train_dataloader()))
        >>> bool((tgt_out == -100).sum() == (tgt_in == 0).sum())  # padding lines up
        True
    """

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(
        self,
        vocab_size: int = 64,
        min_len: int = 3,
        max_len: int = 12,
        num_train: int = 1024,
        num_val: int = 128,
        seed: int = 0,
        batch_size: int | None = None,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        _check_positive(min_len=min_len, num_train=num_train, batch_size=batch_size)
        if vocab_size < 6:
            raise ValueError(
                f"vocab_size={vocab_size}; four ids are special, keep at least 2 words."
            )
        if max_len < min_len:
            raise ValueError(f"max_len={max_len} is below min_len={min_len}.")
        if num_val < 0:
            raise ValueError(f"num_val={num_val} must be nonnegative.")
        self.vocab_size, self.min_len, self.max_len = vocab_size, min_len, max_len
        self.num_train, self.num_val, self.seed = num_train, num_val, seed
        self.batch_size, self.shuffle = batch_size, shuffle
        self.collate = TranslationCollate(self.pad_id, self.bos_id, self.eos_id)
        self.train_dataset: TranslationPairs | None = None
        self.val_dataset: TranslationPairs | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        g = torch.Generator().manual_seed(self.seed)
        words = self.vocab_size - 4
        sigma = torch.randperm(words, generator=g) + 4
        total = self.num_train + self.num_val
        lengths = torch.randint(self.min_len, self.max_len + 1, (total,), generator=g).tolist()
        sources = [(torch.randint(words, (n,), generator=g) + 4).tolist() for n in lengths]
        targets = [sigma[torch.tensor(x[::-1]) - 4].tolist() for x in sources]
        n = self.num_train
        self.train_dataset = TranslationPairs(sources[:n], targets[:n], self.eos_id)
        self.val_dataset = TranslationPairs(sources[n:], targets[n:], self.eos_id)

    def _loader(self, dataset: TranslationPairs, shuffle: bool) -> DataLoader:
        return seeded_loader(dataset, self.batch_size, shuffle, self.seed, self.collate)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_dataset, self.shuffle)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_dataset, False)
