"""WMT'14 English-German sentence pairs, BPE-tokenized, for paper 002's Transformer runs.

Paper 002 (§5, Figure 7) trains a 6L-6L encoder-decoder Transformer, Pre-LN and Post-LN,
"on the En->De WMT translation task" with Adam at :math:`\\eta = 10^{-3}` and a linear
warmup over 40k steps ("following standard practice", Popel and Bojar 2018), at batch
sizes 1024 and 10240, and watches the preconditioned sharpness track :math:`38/\\eta`.
It states no subset size, tokenizer or maximum length. The choices made here are
arguments: a seeded subset chosen in sentence pairs or in tokens, a joint byte-level BPE
trained on that subset, and pairs longer than ``max_len`` tokens dropped.

The pairs come from local parallel text files (never downloaded) or, when asked by name,
from the HuggingFace ``datasets`` library. Batches are ``((src, tgt_in), tgt_out)``:

============  ===========  ====================================================
``src``       ``(B, S)``   :math:`x` + ``[EOS]``, right-padded with ``pad_id``
``tgt_in``    ``(B, T)``   ``[BOS]`` + :math:`y`, right-padded with ``pad_id``
``tgt_out``   ``(B, T)``   :math:`y` + ``[EOS]``, right-padded with ``-100``
============  ===========  ====================================================

so ``F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten())`` ignores the padding with
torch's default ``ignore_index``.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile
from array import array
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "IGNORE_INDEX",
    "SPECIAL_TOKENS",
    "TokenBucketBatchSampler",
    "TranslationCollate",
    "TranslationPairs",
    "WMTDataModule",
    "train_joint_bpe",
]

SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
"""The special tokens, at ids 0, 1, 2, 3 of a tokenizer trained by :func:`train_joint_bpe`."""

IGNORE_INDEX = -100
"""The padding of ``tgt_out``: torch's cross-entropy ``ignore_index`` default."""

_BYTE_ALPHABET_SIZE = 256
_CHUNK = 4096  # sentence pairs read and tokenized at a time while choosing the subset


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as err:  # pragma: no cover - a dependency of lightning-eos
        raise ImportError(
            "WMTDataModule tokenizes with the HuggingFace `tokenizers` library: "
            "`pip install tokenizers`."
        ) from err
    return tokenizers


def train_joint_bpe(sentences: Iterable[str], vocab_size: int = 8000) -> Tokenizer:
    """A byte-level BPE tokenizer trained on ``sentences`` (both languages: a joint vocabulary).

    The special tokens :data:`SPECIAL_TOKENS` get ids 0-3 (``[PAD]``, ``[BOS]``,
    ``[EOS]``, ``[UNK]``), the 256 byte symbols come next, and merges of pairs seen at
    least twice fill the rest, up to ``vocab_size``. Being byte-level, every string is
    encoded without ``[UNK]`` and ``decode`` gives it back exactly. No normalization is
    applied, and no special token is added by ``encode``.

    Training is deterministic: it has no randomness, and the one known source of run-to-run
    differences in ``tokenizers``' BPE trainer (continuing-subword tokens numbered in hash
    order, huggingface/tokenizers#1794) is absent here, since every symbol belongs to the
    sorted byte alphabet.

    Args:
        sentences: the training text, one sentence per string.
        vocab_size: the largest vocabulary, special tokens and bytes included (at least
            260); a small corpus may end with fewer.

    Example:
        >>> tok = train_joint_bpe(["the house", "das Haus", "the cat", "die Katze"] * 5, 270)
        >>> [tok.token_to_id(t) for t in SPECIAL_TOKENS]
        [0, 1, 2, 3]
        >>> tok.decode(tok.encode("Grüße, the house!").ids)
        'Grüße, the house!'
    """
    minimum = len(SPECIAL_TOKENS) + _BYTE_ALPHABET_SIZE
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size}; a byte-level BPE needs at least {minimum} "
            f"({len(SPECIAL_TOKENS)} special tokens + {_BYTE_ALPHABET_SIZE} bytes)."
        )
    tk = _tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(sentences, trainer)
    return tokenizer


class TranslationPairs(Dataset):
    """Tokenized sentence pairs, one per item: ``(src_ids, tgt_ids)`` int64 tensors.

    ``src_ids`` is the source :math:`x` followed by ``[EOS]``; ``tgt_ids`` is the bare target
    :math:`y` (:class:`TranslationCollate` adds ``[BOS]`` and ``[EOS]``). ``lengths[i]`` is
    the longest of the three sequences pair ``i`` puts in a batch,

    .. math:: \\ell_i = \\max(|x_i| + 1,\\ |y_i| + 1),

    which :class:`TokenBucketBatchSampler` buckets by, and ``num_tokens`` is
    :math:`\\sum_i (|x_i| + 1) + (|y_i| + 1)`, the source and predicted target tokens.
    The ids are held in two flat tensors, so the set pickles compactly to workers.

    Args:
        src: source token ids per pair, without special tokens.
        tgt: target token ids per pair, without special tokens.
        eos_id: the ``[EOS]`` id appended to each source.

    Example:
        >>> pairs = TranslationPairs([[7, 8], [9]], [[5], [6, 6, 6]], eos_id=2)
        >>> pairs[0], pairs.lengths, pairs.num_tokens
        ((tensor([7, 8, 2]), tensor([5])), [3, 4], 11)
    """

    def __init__(
        self, src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]], eos_id: int
    ) -> None:
        if len(src) != len(tgt):
            raise ValueError(f"{len(src)} sources but {len(tgt)} targets.")
        src_len = torch.tensor([len(s) + 1 for s in src], dtype=torch.long)
        tgt_len = torch.tensor([len(t) for t in tgt], dtype=torch.long)
        self._src = torch.tensor([i for s in src for i in (*s, eos_id)], dtype=torch.long)
        self._tgt = torch.tensor([i for t in tgt for i in t], dtype=torch.long)
        zero = torch.zeros(1, dtype=torch.long)
        self._src_start = torch.cat([zero, src_len.cumsum(0)]).tolist()
        self._tgt_start = torch.cat([zero, tgt_len.cumsum(0)]).tolist()
        self.eos_id = eos_id
        self.lengths: list[int] = torch.maximum(src_len, tgt_len + 1).tolist()
        self.num_tokens = int(src_len.sum() + tgt_len.sum() + len(tgt))

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        s, t = self._src_start, self._tgt_start
        return self._src[s[i] : s[i + 1]], self._tgt[t[i] : t[i + 1]]


class TranslationCollate:
    """Pad ``(src_ids, tgt_ids)`` pairs into ``((src, tgt_in), tgt_out)`` (a picklable collate).

    ``src`` is right-padded with ``pad_id``; ``tgt_in = [BOS] + y`` with ``pad_id`` and
    ``tgt_out = y + [EOS]`` with :data:`IGNORE_INDEX` (``-100``), so
    ``tgt_in[:, 1:]`` and ``tgt_out[:, :-1]`` agree on every real token.

    Args:
        pad_id: the ``[PAD]`` id.
        bos_id: the ``[BOS]`` id.
        eos_id: the ``[EOS]`` id.

    Example:
        >>> import torch
        >>> collate = TranslationCollate(pad_id=0, bos_id=1, eos_id=2)
        >>> pairs = [(torch.tensor([7, 2]), torch.tensor([5, 6]))]
        >>> pairs.append((torch.tensor([9, 9, 2]), torch.tensor([4])))
        >>> (src, tgt_in), tgt_out = collate(pairs)
        >>> src.tolist(), tgt_in.tolist(), tgt_out.tolist()
        ([[7, 2, 0], [9, 9, 2]], [[1, 5, 6], [1, 4, 0]], [[5, 6, 2], [4, 2, -100]])
    """

    def __init__(self, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2) -> None:
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

    def __call__(
        self, samples: Sequence[tuple[Tensor, Tensor]]
    ) -> tuple[tuple[Tensor, Tensor], Tensor]:
        b = len(samples)
        s_max = max(len(s) for s, _ in samples)
        t_max = max(len(t) for _, t in samples) + 1
        src = torch.full((b, s_max), self.pad_id, dtype=torch.long)
        tgt_in = torch.full((b, t_max), self.pad_id, dtype=torch.long)
        tgt_out = torch.full((b, t_max), IGNORE_INDEX, dtype=torch.long)
        for k, (s, t) in enumerate(samples):
            m = len(t)
            src[k, : len(s)] = s
            tgt_in[k, 0] = self.bos_id
            tgt_in[k, 1 : m + 1] = t
            tgt_out[k, :m] = t
            tgt_out[k, m] = self.eos_id
        return (src, tgt_in), tgt_out


def _pack(indices: Sequence[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Batches of ``indices`` in order of length, each ``|B| max_{i in B} l_i <= max_tokens``.

    Ties in length keep the order of ``indices`` (the sampler's, random when it shuffles),
    so equal-length pairs meet different partners from epoch to epoch. A pair longer than
    ``max_tokens`` gets a batch of its own. The number of batches depends only on the
    multiset of lengths.
    """
    order = sorted(range(len(indices)), key=lambda p: (lengths[indices[p]], p))
    batches: list[list[int]] = []
    batch: list[int] = []
    for p in order:
        i = indices[p]
        if batch and (len(batch) + 1) * lengths[i] > max_tokens:  # lengths ascend
            batches.append(batch)
            batch = []
        batch.append(i)
    if batch:
        batches.append(batch)
    return batches


def _split_to(batches: list[list[int]], count: int) -> list[list[int]]:
    """Halve the batch with the most pairs (first of equals) until there are ``count``."""
    batches = list(batches)
    while len(batches) < count:
        k = max(range(len(batches)), key=lambda j: (len(batches[j]), -j))
        if len(batches[k]) < 2:
            raise RuntimeError(f"cannot split {len(batches)} batches of one pair into {count}.")
        half = len(batches[k]) // 2
        batches[k : k + 1] = [batches[k][:half], batches[k][half:]]
    return batches


class TokenBucketBatchSampler(BatchSampler):
    """Batches of similar-length pairs holding at most ``batch_size`` padded tokens.

    Each epoch, the indices the sampler yields are sorted by length :math:`\\ell_i` (ties
    in the sampler's order) and cut greedily into batches :math:`B` with

    .. math:: |B| \\cdot \\max_{i \\in B} \\ell_i \\le \\texttt{batch_size},

    the padded size of the batch (fairseq's ``max_tokens``); a pair longer than that forms
    a batch alone. Every index the sampler yields is served exactly once per epoch. When
    the sampler shuffles, the batch order is shuffled by a ``torch.Generator`` seeded from
    ``(seed, epoch)``, never the global RNG.

    The lengths are read from the sampler's dataset (``lengths``, as in
    :class:`TranslationPairs`): ``sampler.data_source`` for a ``SequentialSampler`` or
    ``RandomSampler``, ``sampler.dataset`` for a ``DistributedSampler``. The constructor
    is ``BatchSampler``'s, ``(sampler, batch_size, drop_last)``, with ``batch_size``
    meaning tokens, because that is how Lightning rebuilds a custom batch sampler around
    the ``DistributedSampler`` it injects under DDP
    (``lightning.pytorch.utilities.data._dataloader_init_kwargs_resolve_sampler``): each
    rank then buckets its own shard, and the union over ranks is the whole set.

    **DDP.** Ranks must take the same number of optimizer steps, or the gradient
    all-reduce hangs. Given a ``DistributedSampler``, every rank computes every rank's
    shard (a pure function of the sampler's seed and epoch, no communication) and splits
    its largest batches in halves until it has as many batches as the rank with the most.
    ``len()`` is that count for the sampler's current epoch; shards differ between
    epochs, so the count can move by a batch or so, while Lightning reads ``len()`` once:
    an epoch with one batch fewer ends early, one with a batch more leaves it out.

    Args:
        sampler: yields dataset indices (sequential, random or distributed).
        batch_size: the most padded tokens per batch (``max_tokens``).
        drop_last: accepted for ``BatchSampler``'s interface; a token budget has no
            "incomplete last batch", so nothing is dropped (a ``DistributedSampler`` with
            its own ``drop_last`` still trims its shard).
        seed: the batch-order seed; ``None`` takes the ``DistributedSampler``'s ``seed``,
            or the seed of the ``RandomSampler``'s generator, else 0.

    Example:
        >>> from torch.utils.data import SequentialSampler
        >>> pairs = TranslationPairs(
        ...     [[5] * n for n in (3, 1, 7, 2, 2)], [[6] * n for n in (1, 1, 6, 4, 1)], eos_id=2
        ... )
        >>> pairs.lengths
        [4, 2, 8, 5, 3]
        >>> sampler = TokenBucketBatchSampler(SequentialSampler(pairs), batch_size=10)
        >>> list(sampler), len(sampler)  # 2 * 3 <= 10, 2 * 5 <= 10, 1 * 8 <= 10
        ([[1, 4], [0, 3], [2]], 3)
    """

    def __init__(
        self,
        sampler: Sampler[int] | Iterable[int],
        batch_size: int,
        drop_last: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.seed = seed
        self.lengths = self._find_lengths(sampler)
        self._iterations = 0  # the epoch, for samplers without an ``epoch`` of their own

    @staticmethod
    def _find_lengths(sampler: Any) -> Sequence[int]:
        for name in ("data_source", "dataset"):
            dataset = getattr(sampler, name, None)
            if dataset is not None and getattr(dataset, "lengths", None) is not None:
                return dataset.lengths
        raise TypeError(
            f"TokenBucketBatchSampler reads per-item token lengths from `sampler.data_source."
            f"lengths` (SequentialSampler, RandomSampler) or `sampler.dataset.lengths` "
            f"(DistributedSampler); the {type(sampler).__name__} given has neither. Use a "
            "dataset with `lengths`, such as TranslationPairs."
        )

    @property
    def max_tokens(self) -> int:
        """The token budget ``batch_size``."""
        return self.batch_size

    def _shuffles(self) -> bool:
        return isinstance(self.sampler, RandomSampler) or bool(
            getattr(self.sampler, "shuffle", False)
        )

    def _batch_order_generator(self) -> torch.Generator:
        seed = self.seed
        if seed is None:
            seed = getattr(self.sampler, "seed", None)
        if seed is None:
            generator = getattr(self.sampler, "generator", None)
            seed = generator.initial_seed() if generator is not None else 0
        epoch = getattr(self.sampler, "epoch", None)
        if epoch is None:
            epoch = self._iterations
        # a stream apart from DistributedSampler's own ``manual_seed(seed + epoch)``
        return torch.Generator().manual_seed(0x5EED_0000 + int(seed) * 1_000_003 + int(epoch))

    def _shards(self, peek: bool) -> tuple[list[list[int]], int]:
        """Every rank's indices for this epoch, and this rank's position among them.

        With ``peek``, the sampler's generator is left as it was (for ``len()``).
        """
        s = self.sampler
        if isinstance(s, DistributedSampler) and s.num_replicas > 1:
            shards = []
            for rank in range(s.num_replicas):
                other = copy.copy(s)  # DistributedSampler's iteration is pure in (seed, epoch)
                other.rank = rank
                shards.append(list(other))
            return shards, s.rank
        if peek:
            if isinstance(s, SequentialSampler) or (
                isinstance(s, RandomSampler)
                and not s.replacement
                and s.num_samples == len(s.data_source)
            ):
                return [list(range(len(s)))], 0  # the count depends on the lengths only
            s = copy.copy(s)
            if getattr(s, "generator", None) is not None:
                s.generator = torch.Generator().set_state(s.generator.get_state())
        return [list(s)], 0

    def _batches(self, peek: bool) -> list[list[int]]:
        shards, rank = self._shards(peek)
        packed = [_pack(shard, self.lengths, self.batch_size) for shard in shards]
        return _split_to(packed[rank], max(len(p) for p in packed))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches(peek=False)
        if self._shuffles():
            order = torch.randperm(len(batches), generator=self._batch_order_generator())
            batches = [batches[k] for k in order.tolist()]
        self._iterations += 1
        return iter(batches)

    def __len__(self) -> int:
        return len(self._batches(peek=True))


class _Corpus(Protocol):
    def __len__(self) -> int: ...

    def pairs(self, indices: list[int]) -> list[tuple[str, str]]: ...


class _LineFile:
    """Random access to the lines of a UTF-8 text file through byte offsets.

    Only ``"\\n"`` ends a line (a trailing ``"\\r"`` is dropped), so sentences holding
    other Unicode line separators stay whole and the two sides stay aligned.
    """

    def __init__(self, path: Path) -> None:
        offsets = array("q", [0])
        with open(path, "rb") as f:
            for line in f:
                offsets.append(offsets[-1] + len(line))
        self.path, self.offsets = path, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lines(self, indices: Iterable[int]) -> list[str]:
        out = []
        with open(self.path, "rb") as f:
            for i in indices:
                f.seek(self.offsets[i])
                raw = f.read(self.offsets[i + 1] - self.offsets[i])
                out.append(raw.decode("utf-8").rstrip("\r\n"))
        return out


class _ParallelFiles:
    def __init__(self, source: Path, target: Path) -> None:
        self.source, self.target = _LineFile(source), _LineFile(target)
        if len(self.source) != len(self.target):
            raise ValueError(
                f"{source} has {len(self.source)} lines but {target} has {len(self.target)}; "
                "parallel files hold one sentence per line, aligned."
            )

    def __len__(self) -> int:
        return len(self.source)

    def pairs(self, indices: list[int]) -> list[tuple[str, str]]:
        return list(zip(self.source.lines(indices), self.target.lines(indices)))


class _HFTranslation:
    def __init__(self, table: Any, source_lang: str, target_lang: str) -> None:
        self.table, self.source_lang, self.target_lang = table, source_lang, target_lang

    def __len__(self) -> int:
        return len(self.table)

    def pairs(self, indices: list[int]) -> list[tuple[str, str]]:
        rows = self.table.select(indices)
        src, tgt = self.source_lang, self.target_lang
        if "translation" in rows.column_names:  # wmt14, wmt16, ...: {"translation": {lang: text}}
            return [(r[src], r[tgt]) for r in rows["translation"]]
        return list(zip(rows[src], rows[tgt]))


class _Empty:
    def __len__(self) -> int:
        return 0

    def pairs(self, indices: list[int]) -> list[tuple[str, str]]:
        return []


def _walk(corpus: _Corpus, order: Tensor) -> Iterator[tuple[int, str, str]]:
    """``(index, source, target)`` in the order of ``order``, skipping blank sides."""
    for start in range(0, len(order), _CHUNK):
        indices = order[start : start + _CHUNK].tolist()
        for i, (s, t) in zip(indices, corpus.pairs(indices)):
            if s.strip() and t.strip():
                yield i, s, t


def _atomic_save(tokenizer: Tokenizer, path: str) -> None:
    """Write ``tokenizer.json`` whole or not at all (every DDP rank writes the same file)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".json.tmp")
    os.close(fd)
    try:
        tokenizer.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class WMTDataModule(L.LightningDataModule):
    """A seeded subset of WMT'14 En-De (or any parallel corpus), BPE-tokenized (paper 002, §5).

    **Sources.** ``path`` is a directory of plain UTF-8 text files with one sentence per
    line, aligned across languages (as written by the usual WMT preprocessing scripts)::

        path/train.{source_lang}   path/train.{target_lang}    required
        path/valid.{source_lang}   path/valid.{target_lang}    optional (no validation
                                                               set without them)

    Or ``dataset="wmt14"`` with ``dataset_config="de-en"`` reads the ``"train"`` and
    ``"validation"`` (newstest2013) splits with ``datasets.load_dataset`` (which downloads
    them into its cache, in :meth:`prepare_data`). Nothing else is ever downloaded.

    **Subset.** The training pairs are visited in the order of a ``torch.Generator``
    permutation seeded with ``seed`` (never the process rank: every DDP rank builds the
    identical subset and the sampler splits it). Pairs with a blank side are skipped, and
    so are pairs that do not fit ``max_len``: a pair is kept when :math:`|x| + 1 \\le`
    ``max_len`` and :math:`|y| + 1 \\le` ``max_len`` (source with its ``[EOS]``, target
    with its ``[BOS]`` or ``[EOS]``). Longer pairs are dropped, not truncated: a truncated
    target is no longer a translation of its source. The walk stops after ``num_train``
    kept pairs, or, with ``num_train_tokens``, before the first pair that would bring the
    total of :math:`(|x| + 1) + (|y| + 1)` over the budget, so the subset's
    ``num_tokens`` :math:`\\le` ``num_train_tokens``. The kept pairs are stored in file
    order; ``train_indices`` are their line numbers. The validation subset (``num_val``
    pairs, same length filter) is drawn after the training subset from the same
    generator, so the training subset does not depend on ``num_val``.

    **Tokenizer.** ``tokenizer_file`` loads a saved ``tokenizer.json``; it must contain
    the tokens ``[PAD]``, ``[BOS]``, ``[EOS]`` and ``[UNK]`` (found by name, at any ids).
    By default a joint byte-level BPE of ``vocab_size`` (:func:`train_joint_bpe`,
    deterministic, ``[PAD]=0``, ``[BOS]=1``, ``[EOS]=2``, ``[UNK]=3``) is trained in
    :meth:`setup` on the candidate pairs, both languages: the first ``num_train`` non-blank
    pairs of the permutation, or, with ``num_train_tokens``, the first pairs whose
    whitespace words plus 2 per pair reach the budget (a pair has at least as many BPE
    tokens as words), or all pairs. The subset is then a prefix of these candidates, except
    where pairs over ``max_len`` were skipped and later pairs took their place. Every rank
    trains the same tokenizer. ``save_tokenizer`` writes it to a file to reuse.

    **Batches.** ``((src, tgt_in), tgt_out)`` (module docstring) collated by
    :class:`TranslationCollate`. ``max_tokens`` makes batches of at most that many padded
    tokens with :class:`TokenBucketBatchSampler` (shuffled by a generator seeded with
    ``seed``; under DDP, by Lightning's ``DistributedSampler`` seed and epoch);
    ``batch_size`` makes batches of that many pairs; neither gives full batch (one
    unshuffled batch of the whole subset). A measurement monitor picks its samples from
    ``train_dataloader().dataset`` by index and collates them the same way; with
    ``max_tokens`` the loader has no ``batch_size``, so give the monitor a
    ``chunk_size``.

    Args:
        path: the directory of parallel text files; exclusive with ``dataset``.
        dataset: a HuggingFace dataset name such as ``"wmt14"``; needs ``datasets``.
        dataset_config: its configuration, e.g. ``"de-en"``.
        source_lang: the source language code (file suffix or translation key).
        target_lang: the target language code.
        tokenizer_file: a saved ``tokenizers`` ``tokenizer.json``; ``None`` trains a BPE.
        vocab_size: the size of the BPE to train (ignored with ``tokenizer_file``); the
            property of the same name is the tokenizer's actual size.
        save_tokenizer: a file to write the tokenizer to in :meth:`setup`.
        max_len: the most tokens of a source with ``[EOS]`` or a target with one special
            token; longer pairs are dropped.
        num_train: training pairs to keep; exclusive with ``num_train_tokens``.
        num_train_tokens: the token budget of the training subset.
        num_val: validation pairs to keep (fewer if fewer fit ``max_len``); ``None``: all.
        seed: seed of the subsets and of the shuffling.
        max_tokens: padded tokens per training batch (length-bucketed); exclusive with
            ``batch_size``.
        batch_size: sentence pairs per batch.
        shuffle: shuffle the training batches each epoch (seeded); never in full batch.
        num_workers: ``DataLoader`` workers.
        cache_dir: the ``datasets`` cache directory (with ``dataset``).

    Example:
        >>> import os, tempfile
        >>> root = tempfile.mkdtemp()
        >>> pairs = [("the cat runs", "die Katze läuft"), ("the house", "das Haus")] * 20
        >>> for lang, side in (("en", 0), ("de", 1)):
        ...     text = "".join(p[side] + "\\n" for p in pairs)
        ...     _ = open(os.path.join(root, f"train.{lang}"), "w", encoding="utf-8").write(text)
        >>> data = WMTDataModule(root, vocab_size=300, num_train=8, max_tokens=64)
        >>> data.setup()
        >>> len(data.train_dataset), data.pad_id, data.bos_id, data.eos_id
        (8, 0, 1, 2)
        >>> x, y = data.train_dataset[0]
        >>> data.tokenizer.decode(y.tolist()) == pairs[int(data.train_indices[0])][1]
        True
        >>> (src, tgt_in), tgt_out = next(iter(data.train_dataloader()))
        >>> bool((tgt_in[:, 0] == data.bos_id).all()), src.shape[0] * src.shape[1] <= 64
        (True, True)
    """

    def __init__(
        self,
        path: str | None = None,
        dataset: str | None = None,
        dataset_config: str = "de-en",
        source_lang: str = "en",
        target_lang: str = "de",
        tokenizer_file: str | None = None,
        vocab_size: int = 8000,
        save_tokenizer: str | None = None,
        max_len: int = 128,
        num_train: int | None = None,
        num_train_tokens: int | None = None,
        num_val: int | None = 1000,
        seed: int = 0,
        max_tokens: int | None = None,
        batch_size: int | None = None,
        shuffle: bool = True,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if (path is None) == (dataset is None):
            raise ValueError(
                "Give exactly one source: `path=` a directory holding train.{lang} files, "
                "or `dataset=` a HuggingFace dataset name such as 'wmt14'."
            )
        if dataset is not None and importlib.util.find_spec("datasets") is None:
            raise ImportError(
                _NO_DATASETS.format(dataset=dataset, src=source_lang, tgt=target_lang)
            )
        if source_lang == target_lang:
            raise ValueError(f"source_lang and target_lang are both {source_lang!r}.")
        if num_train is not None and num_train_tokens is not None:
            raise ValueError("Give num_train (pairs) or num_train_tokens (tokens), not both.")
        if max_tokens is not None and batch_size is not None:
            raise ValueError(
                "Give max_tokens (padded tokens per batch) or batch_size (pairs), not both; "
                "neither means full batch."
            )
        for name, value in (
            ("num_train", num_train),
            ("num_train_tokens", num_train_tokens),
            ("num_val", num_val),
            ("max_tokens", max_tokens),
            ("batch_size", batch_size),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name}={value}; use a positive count or None.")
        if max_len < 2:
            raise ValueError(f"max_len={max_len}; a pair needs at least 2 tokens per side.")
        minimum = len(SPECIAL_TOKENS) + _BYTE_ALPHABET_SIZE
        if tokenizer_file is None and vocab_size < minimum:
            raise ValueError(f"vocab_size={vocab_size}; the byte-level BPE needs >= {minimum}.")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be nonnegative.")
        self.path, self.dataset, self.dataset_config = path, dataset, dataset_config
        self.source_lang, self.target_lang = source_lang, target_lang
        self.tokenizer_file, self.bpe_vocab_size = tokenizer_file, vocab_size
        self.save_tokenizer, self.max_len = save_tokenizer, max_len
        self.num_train, self.num_train_tokens, self.num_val = num_train, num_train_tokens, num_val
        self.seed, self.max_tokens, self.batch_size = seed, max_tokens, batch_size
        self.shuffle, self.num_workers, self.cache_dir = shuffle, num_workers, cache_dir
        self._tokenizer: Tokenizer | None = None
        self.special_ids: dict[str, int] | None = None
        self.train_dataset: TranslationPairs | None = None
        self.val_dataset: TranslationPairs | None = None
        self.train_indices: Tensor | None = None
        self.val_indices: Tensor | None = None

    # -- sources ---------------------------------------------------------------------

    def _load_hf(self, split: str) -> Any:
        try:
            import datasets
        except ImportError as err:
            raise ImportError(
                _NO_DATASETS.format(
                    dataset=self.dataset, src=self.source_lang, tgt=self.target_lang
                )
            ) from err
        return datasets.load_dataset(
            self.dataset, self.dataset_config, split=split, cache_dir=self.cache_dir
        )

    def _corpora(self) -> tuple[_Corpus, _Corpus]:
        src, tgt = self.source_lang, self.target_lang
        if self.dataset is not None:
            train = _HFTranslation(self._load_hf("train"), src, tgt)
            return train, _HFTranslation(self._load_hf("validation"), src, tgt)
        root = Path(self.path)
        files = {
            split: (root / f"{split}.{src}", root / f"{split}.{tgt}")
            for split in ("train", "valid")
        }
        missing = [str(f) for f in files["train"] if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"Missing {', '.join(missing)}: `path` must hold train.{src} and train.{tgt} "
                "(UTF-8, one sentence per line, aligned), and optionally valid.{src}/valid.{tgt}."
            )
        train = _ParallelFiles(*files["train"])
        present = [f.is_file() for f in files["valid"]]
        if any(present) and not all(present):
            raise FileNotFoundError(f"Found only one of {files['valid'][0]}, {files['valid'][1]}.")
        return train, (_ParallelFiles(*files["valid"]) if all(present) else _Empty())

    def prepare_data(self) -> None:
        if self.dataset is not None:  # download once per node into the datasets cache
            self._corpora()

    # -- tokenizer -------------------------------------------------------------------

    def _bpe_text(self, corpus: _Corpus, order: Tensor) -> Iterator[str]:
        words = 0
        for n, (_, s, t) in enumerate(_walk(corpus, order)):
            if self.num_train is not None and n >= self.num_train:
                return
            if self.num_train_tokens is not None:
                words += len(s.split()) + len(t.split()) + 2
                if words > self.num_train_tokens and n > 0:
                    return
            yield s
            yield t

    def _load_tokenizer(self) -> Tokenizer:
        tokenizer = _tokenizers().Tokenizer.from_file(self.tokenizer_file)
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(
                f"{self.tokenizer_file} lacks the token(s) {', '.join(missing)}; WMTDataModule "
                f"needs {', '.join(SPECIAL_TOKENS)} (train one with train_joint_bpe, or leave "
                "tokenizer_file=None)."
            )
        tokenizer.no_truncation()  # a saved tokenizer.json may carry either; pairs longer
        tokenizer.no_padding()  # than max_len are dropped here, and the collate pads
        return tokenizer

    # -- subset ----------------------------------------------------------------------

    def _select(
        self,
        corpus: _Corpus,
        order: Tensor,
        num: int | None,
        budget: int | None,
        name: str,
        strict: bool = True,
    ) -> tuple[TranslationPairs, Tensor]:
        tokenizer, max_len = self._tokenizer, self.max_len
        kept: list[tuple[int, list[int], list[int]]] = []
        total, done = 0, False
        walk = _walk(corpus, order)
        while not done and (chunk := list(islice(walk, _CHUNK))):
            src = tokenizer.encode_batch([s for _, s, _ in chunk], add_special_tokens=False)
            tgt = tokenizer.encode_batch([t for _, _, t in chunk], add_special_tokens=False)
            for (i, _, _), x, y in zip(chunk, src, tgt):
                x, y = x.ids, y.ids
                if len(x) + 1 > max_len or len(y) + 1 > max_len:
                    continue
                cost = len(x) + len(y) + 2
                if budget is not None and total + cost > budget:
                    done = True
                    break
                kept.append((i, x, y))
                total += cost
                if num is not None and len(kept) == num:
                    done = True
                    break
        if strict and num is not None and len(kept) < num:
            raise ValueError(
                f"{name}={num}, but only {len(kept)} pairs have both sides within "
                f"max_len={max_len} tokens; lower {name}, raise max_len, or use None (all)."
            )
        if strict and budget is not None and not done and total < budget:
            raise ValueError(
                f"num_train_tokens={budget} exceeds the {total} tokens of all pairs within "
                f"max_len={max_len}; lower it, raise max_len, or use None (all)."
            )
        kept.sort(key=lambda k: k[0])
        pairs = TranslationPairs([k[1] for k in kept], [k[2] for k in kept], self.eos_id)
        return pairs, torch.tensor([k[0] for k in kept], dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        train, valid = self._corpora()
        generator = torch.Generator().manual_seed(self.seed)
        train_order = torch.randperm(len(train), generator=generator)
        val_order = torch.randperm(len(valid), generator=generator)
        if self.tokenizer_file is not None:
            tokenizer = self._load_tokenizer()
        else:
            tokenizer = train_joint_bpe(self._bpe_text(train, train_order), self.bpe_vocab_size)
        self._tokenizer = tokenizer
        self.special_ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        if self.save_tokenizer is not None:
            _atomic_save(tokenizer, self.save_tokenizer)
        self.train_dataset, self.train_indices = self._select(
            train, train_order, self.num_train, self.num_train_tokens, "num_train"
        )
        if len(self.train_dataset) == 0:
            if self.num_train_tokens is not None:
                raise ValueError(
                    f"num_train_tokens={self.num_train_tokens} is below the first pair's "
                    "tokens; raise it."
                )
            raise ValueError(f"No training pair fits max_len={self.max_len}; raise max_len.")
        self.val_dataset, self.val_indices = self._select(
            valid, val_order, self.num_val, None, "num_val", strict=False
        )

    # -- properties ------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        """The ``tokenizers.Tokenizer`` (after :meth:`setup`, which this calls)."""
        if self._tokenizer is None:
            self.setup()
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size, special tokens included (the model's ``V``)."""
        return self.tokenizer.get_vocab_size()

    def _special(self, token: str) -> int:
        if self.special_ids is None:
            self.setup()
        return self.special_ids[token]

    @property
    def pad_id(self) -> int:
        """The ``[PAD]`` id (0 for a tokenizer trained here)."""
        return self._special("[PAD]")

    @property
    def bos_id(self) -> int:
        """The ``[BOS]`` id (1 for a tokenizer trained here)."""
        return self._special("[BOS]")

    @property
    def eos_id(self) -> int:
        """The ``[EOS]`` id (2 for a tokenizer trained here)."""
        return self._special("[EOS]")

    @property
    def unk_id(self) -> int:
        """The ``[UNK]`` id (3 for a tokenizer trained here)."""
        return self._special("[UNK]")

    # -- loaders ---------------------------------------------------------------------

    def _loader(self, data: TranslationPairs, train: bool) -> DataLoader:
        collate = TranslationCollate(self.pad_id, self.bos_id, self.eos_id)
        shuffle = train and self.shuffle
        generator = torch.Generator().manual_seed(self.seed)  # never the global RNG
        common = {"collate_fn": collate, "num_workers": self.num_workers}
        if self.max_tokens is not None:
            sampler = (
                RandomSampler(data, generator=generator) if shuffle else SequentialSampler(data)
            )
            batches = TokenBucketBatchSampler(sampler, self.max_tokens, drop_last=False)
            return DataLoader(data, batch_sampler=batches, generator=generator, **common)
        if self.batch_size is not None:
            return DataLoader(data, self.batch_size, shuffle=shuffle, generator=generator, **common)
        return DataLoader(data, max(len(data), 1), shuffle=False, **common)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_dataset, train=False)


_NO_DATASETS = (
    "dataset={dataset!r} is read with the HuggingFace `datasets` library, which is not "
    "installed: `pip install datasets`. Or, without it, pass `path=` a directory holding "
    "train.{src} and train.{tgt} (and optionally valid.{src}, valid.{tgt}): plain UTF-8 "
    "text, one sentence per line, aligned."
)
