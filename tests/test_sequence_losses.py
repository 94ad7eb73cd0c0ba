"""Token and sequence cross-entropy of SupervisedTask against hand-written sums."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_eos.models import SupervisedTask
from lightning_eos.models.task import accuracy, classification_loss


def _padded_batch(seed: int = 0, n: int = 5, length: int = 6, vocab: int = 7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, length, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (n, length), generator=g)
    lengths = torch.tensor([6, 1, 3, 4, 2])[:n]
    labels[torch.arange(length) >= lengths[:, None]] = -100  # padding after each sequence
    return logits, labels, lengths


def _by_hand(logits, labels):
    """-log softmax of every non-padding token, per sequence."""
    per_sequence = []
    for row_logits, row_labels in zip(logits, labels):
        total = 0.0
        for z, y in zip(row_logits.tolist(), row_labels.tolist()):
            if y != -100:
                total += math.log(sum(math.exp(v) for v in z)) - z[y]
        per_sequence.append(total)
    return per_sequence


def test_token_and_sequence_cross_entropy_match_hand_sums():
    logits, labels, lengths = _padded_batch()
    per_sequence = _by_hand(logits, labels)
    token_mean = classification_loss("cross_entropy", logits, labels)
    assert token_mean.item() == pytest.approx(sum(per_sequence) / lengths.sum().item(), rel=1e-12)
    sequence = classification_loss("sequence_cross_entropy", logits, labels)
    assert sequence.item() == pytest.approx(sum(per_sequence) / len(per_sequence), rel=1e-12)


def test_sequence_cross_entropy_is_exact_over_sample_weighted_chunks():
    """Measurements and full-batch accumulation weight chunks by their sample counts; the
    sentence-averaged loss survives that, the token mean does not (unequal padding)."""
    logits, labels, _ = _padded_batch()
    cuts = [(0, 2), (2, 5)]
    for name, exact in (("sequence_cross_entropy", True), ("cross_entropy", False)):
        whole = classification_loss(name, logits, labels).item()
        chunked = sum(
            (b - a) / len(logits) * classification_loss(name, logits[a:b], labels[a:b]).item()
            for a, b in cuts
        )
        assert (chunked == pytest.approx(whole, rel=1e-12)) is exact


def test_token_accuracy_ignores_padding():
    logits = torch.zeros(2, 3, 4)
    logits[..., 1] = 1.0  # predicts token 1 everywhere
    labels = torch.tensor([[1, 1, -100], [2, -100, -100]])
    assert accuracy(logits, labels).item() == pytest.approx(2 / 3)


class _PairModel(nn.Module):
    """Logits from (src, tgt_in): the embedding of tgt_in plus the mean embedding of src."""

    def __init__(self, vocab: int = 7) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, vocab)

    def forward(self, src, tgt_in):
        return self.embed(tgt_in) + self.embed(src).mean(1, keepdim=True)


def test_task_unpacks_seq2seq_inputs():
    torch.manual_seed(0)
    model = _PairModel()
    task = SupervisedTask(model, loss="sequence_cross_entropy")
    src, tgt_in = torch.randint(0, 7, (3, 4)), torch.randint(0, 7, (3, 5))
    tgt_out = torch.randint(0, 7, (3, 5))
    tgt_out[0, 3:] = -100
    loss = task.training_step(((src, tgt_in), tgt_out), 0)
    expected = classification_loss("sequence_cross_entropy", model(src, tgt_in), tgt_out)
    assert torch.equal(loss, expected)
