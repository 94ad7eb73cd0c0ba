"""The Transformer configs' CPU-twin data: a Markov text and a reversal translation task."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_eos.data import MarkovLMDataModule, ReversalTranslationDataModule


def test_markov_text_follows_its_chain_and_its_loss_floor_is_the_entropy_rate():
    data = MarkovLMDataModule(vocab_size=20, seq_len=32, num_train=512, num_val=16, seed=3)
    data.setup()
    p = data.transition
    assert torch.allclose(p.sum(1), torch.ones(20, dtype=torch.float64))
    assert ((p > 0).sum(1) == 3).all()  # branching successors per token
    x, y = data.x_train.flatten(), data.y_train.flatten()
    assert (p[x, y] > 0).all()  # every transition in the text is one of the chain's
    assert torch.equal(data.x_train[:, 1:], data.y_train[:, :-1])

    # the stationary distribution by power iteration, independently of entropy_rate()
    pi = torch.full((20,), 1 / 20, dtype=torch.float64)
    for _ in range(10_000):
        pi = pi @ p
    logs = torch.where(p > 0, p.log(), torch.zeros_like(p))
    rate = float(-(pi[:, None] * p * logs).sum())
    assert data.entropy_rate() == pytest.approx(rate, rel=1e-9)
    nll = -p[x, y].log()  # the loss of the true model on the training text
    stderr = nll.std().item() / math.sqrt(len(nll)) * 10  # tokens are correlated: generous
    assert abs(nll.mean().item() - rate) < stderr
    assert rate < 0.5 * math.log(20)  # well below the uniform loss: there is something to learn


def test_markov_text_is_seeded():
    a, b, c = (MarkovLMDataModule(num_train=8, num_val=2, seed=s) for s in (0, 0, 1))
    for d in (a, b, c):
        d.setup()
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)


def test_reversal_targets_are_the_mapped_reversed_sources():
    data = ReversalTranslationDataModule(vocab_size=30, num_train=200, num_val=10, seed=1)
    data.setup()
    mapping: dict[int, int] = {}
    for i in range(len(data.train_dataset)):
        src, tgt = data.train_dataset[i]
        assert src[-1].item() == 2 and len(src) - 1 == len(tgt)  # x + [EOS], bare y
        for a, b in zip(src[:-1].tolist(), reversed(tgt.tolist())):
            assert 4 <= a < 30 and mapping.setdefault(a, b) == b  # one word, one translation
    assert len(set(mapping.values())) == len(mapping)  # a permutation of the words

    (src, tgt_in), tgt_out = next(iter(data.train_dataloader()))  # full batch, padded
    assert src.shape[0] == tgt_in.shape[0] == 200
    assert (tgt_in[:, 0] == 1).all()  # [BOS]
    real = tgt_out != -100
    assert torch.equal(real, torch.cat([torch.ones_like(real[:, :1]), tgt_in[:, 1:] != 0], 1))
    rows = real.sum(1) - 1  # the last real target is [EOS]
    assert (tgt_out[torch.arange(200), rows] == 2).all()
