"""tiny-shakespeare as a character-level language-modelling set, from a local text file."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_eos.data._loaders import seeded_loader

__all__ = ["CharLMDataModule"]

_SOURCE = (
    "CharLMDataModule expects a plain UTF-8 text file, such as tiny-shakespeare's input.txt "
    "(about 1.1 MB) from karpathy/char-rnn: https://raw.githubusercontent.com/karpathy/"
    "char-rnn/master/data/tinyshakespeare/input.txt. Nothing is downloaded at run time: "
    "save the file locally and pass its path."
)


class CharLMDataModule(L.LightningDataModule):
    """Next-character prediction on a local text file (tiny-shakespeare in paper 003).

    The vocabulary is the sorted set of characters of the whole file. The last
    ``holdout_lines`` lines are held out for validation (10000 in paper 003); the rest is
    cut into non-overlapping windows of ``seq_len + 1`` characters, and each window gives
    an input ``x = w[:-1]`` and a target ``y = w[1:]`` (integer tensors of shape
    ``(n, seq_len)``; 64 in paper 003). ``num_train`` keeps that many training windows,
    drawn by a ``torch.Generator`` seeded with ``seed`` (never the process rank, so every
    DDP rank holds the same set and the sampler splits it).

    Args:
        path: the text file (e.g. ``input.txt`` of tiny-shakespeare); never downloaded.
        seq_len: characters per input sequence.
        holdout_lines: trailing lines kept for validation.
        num_train: training windows to keep; ``None`` for all.
        seed: seed of the window subset and of minibatch shuffling.
        batch_size: ``None`` for full batch.
        shuffle: shuffle minibatches (seeded; irrelevant in full batch).

    :meth:`setup` raises :class:`FileNotFoundError` if ``path`` is not a file and
    :class:`ValueError` if it is not UTF-8; both say where the text comes from.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "t.txt")
        >>> _ = open(path, "w").write("abcabcabc\\nxyz\\n")
        >>> data = CharLMDataModule(path, seq_len=3, holdout_lines=1)
        >>> data.setup()
        >>> data.vocab
        ['\\n', 'a', 'b', 'c', 'x', 'y', 'z']
        >>> data.x_train.tolist(), data.y_train.tolist()  # "abcabcabc\\n", shifted by one
        ([[1, 2, 3], [1, 2, 3], [1, 2, 3]], [[2, 3, 1], [2, 3, 1], [2, 3, 0]])
    """

    def __init__(
        self,
        path: str,
        seq_len: int = 64,
        holdout_lines: int = 10000,
        num_train: int | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be at least 1.")
        if holdout_lines < 0:
            raise ValueError(f"holdout_lines={holdout_lines} must be nonnegative.")
        if num_train is not None and num_train < 1:
            raise ValueError(f"num_train={num_train}; use a positive count or None (all).")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; use a positive size or None (full).")
        self.path, self.seq_len, self.holdout_lines = path, seq_len, holdout_lines
        self.num_train, self.seed, self.batch_size, self.shuffle = (
            num_train,
            seed,
            batch_size,
            shuffle,
        )
        self.vocab: list[str] | None = None
        self.x_train: Tensor | None = None
        self.y_train: Tensor | None = None
        self.x_val: Tensor | None = None
        self.y_val: Tensor | None = None

    def _windows(self, text: str) -> tuple[Tensor, Tensor]:
        ids = torch.tensor([self._index[c] for c in text], dtype=torch.long)
        n = (len(ids) - 1) // self.seq_len
        if n < 1:
            raise ValueError(f"The text ({len(ids)} characters) is shorter than seq_len + 1.")
        x = ids[: n * self.seq_len].view(n, self.seq_len)
        y = ids[1 : n * self.seq_len + 1].view(n, self.seq_len)
        return x, y

    def setup(self, stage: str | None = None) -> None:
        if self.x_train is not None:
            return
        try:
            text = Path(self.path).read_text(encoding="utf-8")
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{self.path} not found. {_SOURCE}") from err
        except IsADirectoryError as err:
            raise FileNotFoundError(f"{self.path} is a folder, not a text file. {_SOURCE}") from err
        except UnicodeDecodeError as err:
            raise ValueError(f"{self.path} is not UTF-8 text ({err}). {_SOURCE}") from err
        self.vocab = sorted(set(text))
        self._index = {c: i for i, c in enumerate(self.vocab)}
        lines = text.splitlines(keepends=True)
        cut = len(lines) - self.holdout_lines
        if cut < 1:
            raise ValueError(
                f"{self.path} has {len(lines)} lines; holdout_lines={self.holdout_lines} "
                "leaves none for training."
            )
        self.x_train, self.y_train = self._windows("".join(lines[:cut]))
        if self.num_train is not None:
            if self.num_train > len(self.x_train):
                raise ValueError(
                    f"num_train={self.num_train} exceeds the {len(self.x_train)} windows."
                )
            g = torch.Generator().manual_seed(self.seed)
            keep = torch.randperm(len(self.x_train), generator=g)[: self.num_train].sort().values
            self.x_train, self.y_train = self.x_train[keep], self.y_train[keep]
        held_out = "".join(lines[cut:])
        if len(held_out) > self.seq_len:
            self.x_val, self.y_val = self._windows(held_out)
        else:
            self.x_val = self.y_val = torch.empty(0, self.seq_len, dtype=torch.long)

    @property
    def vocab_size(self) -> int:
        """The number of distinct characters (after :meth:`setup`)."""
        self.setup()
        return len(self.vocab)

    def _loader(self, x: Tensor, y: Tensor, shuffle: bool) -> DataLoader:
        return seeded_loader(TensorDataset(x, y), self.batch_size, shuffle, self.seed)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.x_train, self.y_train, self.shuffle)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.x_val, self.y_val, False)
