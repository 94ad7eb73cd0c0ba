"""WMTDataModule on generated parallel text files, against hand-built references."""

from __future__ import annotations

import random
import sys
from collections import Counter

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.data import _replace_dunder_methods
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler

from lightning_eos.callbacks._measurement_set import measurement_chunks
from lightning_eos.data.wmt import (
    SPECIAL_TOKENS,
    TokenBucketBatchSampler,
    TranslationPairs,
    WMTDataModule,
    train_joint_bpe,
)

EN = "the a cat dog house street runs sleeps quickly over under and is was big small , .".split()
DE = "der die das Katze Hund Haus Straße läuft schläft schnell über unter und ist war groß".split()


def _sentence(rng: random.Random, words: list[str], n: int) -> str:
    return " ".join(rng.choice(words) for _ in range(n))


@pytest.fixture
def corpus(tmp_path):
    """``train.{en,de}`` (300 lines, a few too long, one blank) and ``valid.{en,de}`` (40)."""
    rng = random.Random(0)
    splits = {}
    for split, n in (("train", 300), ("valid", 40)):
        en, de = [], []
        for i in range(n):
            k = rng.randint(2, 14)
            en.append(_sentence(rng, EN, k))
            de.append(_sentence(rng, DE, k + rng.randint(-1, 2)))
            if i % 50 == 7:  # far past max_len=48: must be dropped
                en[-1] = _sentence(rng, EN, 80)
        if split == "train":
            en[11], de[11] = "", "nur eine Seite"  # a blank side: skipped
            de[12] = "Zeile\u2028mit Trenner"  # a Unicode line separator inside a sentence
        for lang, lines in (("en", en), ("de", de)):
            (tmp_path / f"{split}.{lang}").write_text(
                "".join(line + "\n" for line in lines), encoding="utf-8"
            )
        splits[split] = (en, de)
    return tmp_path, splits


def _module(root, **kwargs) -> WMTDataModule:
    kwargs = {"vocab_size": 300, "max_len": 48, "num_val": 20, **kwargs}
    data = WMTDataModule(str(root), **kwargs)
    data.setup()
    return data


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def _expected_subset(tokenizer, en, de, seed, max_len, num=None, budget=None):
    """The documented walk, written out: seeded permutation, skip blank/too long, stop."""
    perm = torch.randperm(len(en), generator=torch.Generator().manual_seed(seed)).tolist()
    kept, total = [], 0
    for i in perm:
        if not en[i].strip() or not de[i].strip():
            continue
        x, y = _encode(tokenizer, en[i]), _encode(tokenizer, de[i])
        if len(x) + 1 > max_len or len(y) + 1 > max_len:
            continue
        if budget is not None and total + len(x) + len(y) + 2 > budget:
            break
        kept.append(i)
        total += len(x) + len(y) + 2
        if num is not None and len(kept) == num:
            break
    return sorted(kept), total


def test_subset_is_seeded_and_the_same_on_every_rank(corpus, monkeypatch):
    root, splits = corpus
    en, de = splits["train"]
    state = torch.get_rng_state()
    built = []
    for rank in ("0", "1"):
        for var in ("RANK", "LOCAL_RANK", "NODE_RANK"):
            monkeypatch.setenv(var, rank)
        built.append(_module(root, num_train=100, seed=3))
    a, b = built
    c = _module(root, num_train=100, seed=4)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not used
    assert torch.equal(a.train_indices, b.train_indices)
    assert not torch.equal(a.train_indices, c.train_indices)
    assert a.tokenizer.to_str() == b.tokenizer.to_str()
    for i in range(len(a.train_dataset)):
        for u, v in zip(a.train_dataset[i], b.train_dataset[i]):
            assert torch.equal(u, v)
    expected, _ = _expected_subset(a.tokenizer, en, de, seed=3, max_len=48, num=100)
    assert a.train_indices.tolist() == expected
    assert 11 not in expected  # blank side
    assert [t for t in SPECIAL_TOKENS] == [a.tokenizer.id_to_token(i) for i in range(4)]
    assert (a.pad_id, a.bos_id, a.eos_id, a.unk_id) == (0, 1, 2, 3)
    assert a.vocab_size == a.tokenizer.get_vocab_size() <= 300


def test_token_budget_and_length_filter(corpus):
    root, splits = corpus
    en, de = splits["train"]
    data = _module(root, num_train_tokens=1500, seed=1)
    ds = data.train_dataset
    tokens = sum(len(x) + len(y) + 1 for x, y in (ds[i] for i in range(len(ds))))
    assert tokens == ds.num_tokens <= 1500
    expected, total = _expected_subset(data.tokenizer, en, de, seed=1, max_len=48, budget=1500)
    assert data.train_indices.tolist() == expected and total == tokens
    assert tokens > 1500 - 2 * 48  # stopped at the first pair over budget, not earlier
    long_lines = [i for i in range(len(en)) if len(_encode(data.tokenizer, en[i])) + 1 > 48]
    assert long_lines and not set(long_lines) & set(expected)
    assert all(len(x) <= 48 and len(y) + 1 <= 48 for x, y in (ds[i] for i in range(len(ds))))
    assert ds.lengths == [max(len(x), len(y) + 1) for x, y in (ds[i] for i in range(len(ds)))]
    # a budget of exactly every pair's tokens is met, not refused; one below the first
    # pair's cost names the budget
    # (with a fixed tokenizer: a trained one depends on the budget)
    _, everything = _expected_subset(data.tokenizer, en, de, seed=1, max_len=48)
    data.tokenizer.save(str(root / "fixed.json"))
    fixed = {"tokenizer_file": str(root / "fixed.json"), "seed": 1}
    assert len(_module(root, num_train_tokens=everything, **fixed).train_dataset) > 250
    with pytest.raises(ValueError, match="num_train_tokens=3 is below"):
        _module(root, num_train_tokens=3, **fixed)


def test_collate_decodes_back_with_shifted_targets(corpus):
    root, splits = corpus
    data = _module(root, num_train=60, seed=0)
    ((src, tgt_in), tgt_out), *rest = list(data.train_dataloader())  # full batch, file order
    assert not rest and src.shape[0] == 60 and tgt_in.shape == tgt_out.shape
    tok = data.tokenizer
    for split, ds, indices in (
        ("train", data.train_dataset, data.train_indices),
        ("valid", data.val_dataset, data.val_indices),
    ):
        en, de = splits[split]
        assert len(ds) == len(indices) > 0
        for k, i in enumerate(indices.tolist()):
            x, y = ds[k]
            assert tok.decode(x.tolist()) == en[i] and tok.decode(y.tolist()) == de[i]
    en, de = splits["train"]
    for k, i in enumerate(data.train_indices.tolist()):
        x, y = _encode(tok, en[i]), _encode(tok, de[i])
        s, m = len(x) + 1, len(y)
        assert src[k, :s].tolist() == x + [2] and (src[k, s:] == 0).all()
        assert tgt_in[k, : m + 1].tolist() == [1] + y and (tgt_in[k, m + 1 :] == 0).all()
        assert tgt_out[k, : m + 1].tolist() == y + [2] and (tgt_out[k, m + 1 :] == -100).all()
        assert tok.decode(src[k].tolist()) == en[i]
        assert tok.decode(tgt_in[k].tolist()) == de[i]
        assert tok.decode(tgt_out[k, : m + 1].tolist()) == de[i]
    m = (tgt_out != -100).sum(1) - 1  # target lengths |y|
    in_y = torch.arange(tgt_out.shape[1] - 1) < m[:, None]
    assert torch.equal(tgt_in[:, 1:][in_y], tgt_out[:, :-1][in_y])  # shifted by one
    assert torch.equal(tgt_out.gather(1, m[:, None]).flatten(), torch.full_like(m, 2))


def test_line_separator_inside_a_sentence_keeps_the_files_aligned(corpus):
    root, splits = corpus
    data = _module(root, seed=0)  # all pairs that fit
    indices = data.train_indices.tolist()
    assert 12 in indices
    x, y = data.train_dataset[indices.index(12)]
    assert data.tokenizer.decode(y.tolist()) == "Zeile\u2028mit Trenner"
    assert data.tokenizer.decode(x.tolist()) == splits["train"][0][12]


def test_bpe_training_is_deterministic(corpus):
    _, splits = corpus
    text = [s for side in splits["train"] for s in side]
    # tokenizers' hash maps are seeded per map, so two trainings in one process already
    # visit the words in different orders.
    a, b = train_joint_bpe(text, 400), train_joint_bpe(list(reversed(text)), 400)
    assert a.to_str() == b.to_str()
    assert [a.encode(s).ids for s in text] == [b.encode(s).ids for s in text]
    assert 260 < a.get_vocab_size() <= 400  # merges run out on this small corpus
    with pytest.raises(ValueError, match="at least 260"):
        train_joint_bpe(text, 100)


def test_saved_tokenizer_round_trips(corpus, tmp_path):
    root, _ = corpus
    path = tmp_path / "out" / "tokenizer.json"
    a = _module(root, num_train=80, save_tokenizer=str(path))
    b = _module(root, num_train=80, tokenizer_file=str(path))
    assert path.is_file() and a.tokenizer.to_str() == b.tokenizer.to_str()
    assert torch.equal(a.train_indices, b.train_indices)
    for i in range(len(a.train_dataset)):
        for u, v in zip(a.train_dataset[i], b.train_dataset[i]):
            assert torch.equal(u, v)
    # truncation and padding saved in a tokenizer file are switched off: pairs keep their
    # length (and longer ones are dropped by max_len), padding is the collate's job
    a.tokenizer.enable_truncation(5)
    a.tokenizer.enable_padding(length=40)
    a.tokenizer.save(str(tmp_path / "truncating.json"))
    c = _module(root, num_train=80, tokenizer_file=str(tmp_path / "truncating.json"))
    assert torch.equal(c.train_indices, b.train_indices)
    for i in range(len(b.train_dataset)):
        for u, v in zip(c.train_dataset[i], b.train_dataset[i]):
            assert torch.equal(u, v)
    # a tokenizer file without [BOS]
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bare = Tokenizer(models.BPE(unk_token="[UNK]"))
    bare.pre_tokenizer = pre_tokenizers.Whitespace()
    bare.train_from_iterator(
        ["a b c"], trainers.BpeTrainer(special_tokens=["[PAD]", "[UNK]"], show_progress=False)
    )
    bare.save(str(tmp_path / "bare.json"))
    with pytest.raises(ValueError, match=r"lacks the token\(s\) \[BOS\], \[EOS\]"):
        _module(root, tokenizer_file=str(tmp_path / "bare.json"))


def _check_batches(batches, lengths, max_tokens):
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= max_tokens


def test_bucket_sampler_covers_each_index_once_within_the_budget(corpus):
    root, _ = corpus
    data = _module(root, seed=0, max_tokens=200)
    ds = data.train_dataset
    loader = data.train_dataloader()
    sampler = loader.batch_sampler
    assert isinstance(sampler, TokenBucketBatchSampler)
    epochs = []
    for _ in range(2):
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(ds)))
        _check_batches(batches, ds.lengths, 200)
        for b in batches:  # sorted by length inside a batch
            assert [ds.lengths[i] for i in b] == sorted(ds.lengths[i] for i in b)
        epochs.append(batches)
    assert epochs[0] != epochs[1]  # reshuffled
    again = data.train_dataloader().batch_sampler
    assert list(again) == epochs[0]  # seeded: a fresh loader repeats epoch 0
    for (src, tgt_in), _ in loader:  # the padded tensors themselves
        assert src.shape[0] * max(src.shape[1], tgt_in.shape[1]) <= 200
    lonely = TokenBucketBatchSampler(RandomSampler(ds), 1)  # budget below every pair
    assert sorted(len(b) for b in lonely) == [1] * len(ds)


def test_bucket_sampler_shards_cover_the_set_under_ddp(corpus):
    root, _ = corpus
    data = _module(root, seed=0)
    ds = data.train_dataset
    assert len(ds) % 2 == 1  # odd: the DistributedSampler pads one index
    for epoch in range(3):
        served, counts = [], []
        for rank in (0, 1):
            dist = DistributedSampler(ds, 2, rank, shuffle=True, seed=0)
            dist.set_epoch(epoch)
            sampler = TokenBucketBatchSampler(dist, 150, drop_last=False)
            batches = list(sampler)
            assert len(batches) == len(sampler)
            _check_batches(batches, ds.lengths, 150)
            mine = sorted(i for b in batches for i in b)
            assert mine == sorted(dist)  # exactly this rank's shard, each index once
            served += mine
            counts.append(len(batches))
        assert counts[0] == counts[1]  # equal step counts: no DDP hang
        assert set(served) == set(range(len(ds)))
        assert len(served) == len(ds) + 1 and max(Counter(served).values()) == 2


@pytest.mark.parametrize("captured", [False, True], ids=["plain", "lightning-hook"])
def test_lightning_reinstantiates_the_bucket_sampler_per_rank(corpus, captured):
    root, _ = corpus
    data = _module(root, seed=0, max_tokens=150)
    ds = data.train_dataset
    if captured:  # as the Trainer calls train_dataloader(): init arguments are recorded
        with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
            loader = data.train_dataloader()
    else:
        loader = data.train_dataloader()
    assert hasattr(loader.batch_sampler, "__pl_saved_args") == captured  # the path Lightning takes
    seen, counts = [], []
    for rank in (0, 1):
        dist = DistributedSampler(ds, 2, rank, shuffle=True, seed=0)
        new = _update_dataloader(loader, dist, mode=RunningStage.TRAINING)
        assert isinstance(new.batch_sampler, TokenBucketBatchSampler)
        assert new.batch_sampler.sampler is dist and new.batch_sampler.max_tokens == 150
        batches = list(new.batch_sampler)
        counts.append(len(batches))
        seen += [i for b in batches for i in b]
        n = 0
        for (src, tgt_in), _ in new:
            assert src.shape[0] * max(src.shape[1], tgt_in.shape[1]) <= 150
            n += src.shape[0]
        assert n == len(dist)
    assert counts[0] == counts[1]
    assert set(seen) == set(range(len(ds)))


def test_measurement_set_collates_by_index(corpus):
    root, _ = corpus
    data = _module(root, num_train=30, max_tokens=200)
    loader = data.train_dataloader()
    chunks = measurement_chunks(loader, num_samples=10, chunk_size=4, seed=0)
    assert [c[1].shape[0] for c in chunks] == [4, 4, 2]
    chosen = sorted(torch.randperm(30, generator=torch.Generator().manual_seed(0))[:10].tolist())
    for chunk, start in zip(chunks, (0, 4, 8)):  # the samples chosen by index, collated
        expected = loader.collate_fn([data.train_dataset[i] for i in chosen[start : start + 4]])
        (src, tgt_in), tgt_out = chunk
        (e_src, e_in), e_out = expected
        assert torch.equal(src, e_src) and torch.equal(tgt_in, e_in)
        assert torch.equal(tgt_out, e_out)


def test_wmt14_without_datasets_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails
    with pytest.raises(ImportError, match="pip install datasets"):
        WMTDataModule(dataset="wmt14")
    data = WMTDataModule.__new__(WMTDataModule)  # the lazy import inside, too
    data.dataset, data.source_lang, data.target_lang = "wmt14", "en", "de"
    with pytest.raises(ImportError, match="pass `path=`"):
        data._load_hf("train")


def test_bad_arguments_name_the_fix(corpus, tmp_path):
    root, _ = corpus
    with pytest.raises(ValueError, match="exactly one source"):
        WMTDataModule()
    with pytest.raises(ValueError, match="exactly one source"):
        WMTDataModule(str(root), dataset="wmt14")
    with pytest.raises(ValueError, match="not both"):
        WMTDataModule(str(root), num_train=5, num_train_tokens=100)
    with pytest.raises(ValueError, match="not both"):
        WMTDataModule(str(root), max_tokens=100, batch_size=4)
    with pytest.raises(ValueError, match="only .* pairs"):
        _module(root, num_train=10**5)
    with pytest.raises(ValueError, match="exceeds"):
        _module(root, num_train_tokens=10**7)
    with pytest.raises(FileNotFoundError, match="train.en"):
        _module(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train.en").write_text("a\nb\n", encoding="utf-8")
    (tmp_path / "bad" / "train.de").write_text("a\n", encoding="utf-8")
    with pytest.raises(ValueError, match="aligned"):
        _module(tmp_path / "bad")
    with pytest.raises(TypeError, match="lengths"):
        TokenBucketBatchSampler(RandomSampler(range(5)), 10)


class _TinySeq2Seq(nn.Module):
    def __init__(self, vocab: int, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.out = nn.Linear(width, vocab)

    def forward(self, src, tgt_in):
        memory = self.embed(src).mean(1, keepdim=True)
        return self.out(torch.tanh(self.embed(tgt_in) + memory))


class _Task(L.LightningModule):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.model = _TinySeq2Seq(vocab)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        (src, tgt_in), tgt_out = batch
        logits = self.model(src, tgt_in)
        assert logits.shape == (*tgt_out.shape, self.model.out.out_features)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten())
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_two_training_steps_with_a_trainer(corpus):
    root, _ = corpus
    data = WMTDataModule(str(root), vocab_size=300, max_len=48, num_train=40, max_tokens=200)
    task = _Task(data.vocab_size)
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        accelerator="cpu",
    )
    trainer.fit(task, datamodule=data)
    assert trainer.global_step == 2 and len(task.losses) == 2
    assert all(torch.isfinite(torch.tensor(task.losses)))


def test_pairs_dataset_holds_what_it_was_given():
    pairs = TranslationPairs([[7, 8], [], [9]], [[5], [6, 6], []], eos_id=2)
    assert [tuple(t.tolist() for t in pairs[i]) for i in range(3)] == [
        ([7, 8, 2], [5]),
        ([2], [6, 6]),
        ([9, 2], []),
    ]
    assert pairs.lengths == [3, 3, 2] and pairs.num_tokens == (3 + 1 + 2) + (2 + 3 + 1)
