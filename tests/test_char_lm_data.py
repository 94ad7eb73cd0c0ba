"""CharLMDataModule on a generated text file, against a hand-built reference."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from lightning_eos.data import CharLMDataModule


@pytest.fixture
def text_file(tmp_path):
    rng = random.Random(0)
    lines = [
        "".join(rng.choice("abcdefg hij,.") for _ in range(rng.randint(5, 40))) + "\n"
        for _ in range(300)
    ]
    path = tmp_path / "input.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return path, lines


def test_windows_vocab_and_holdout_match_a_hand_reference(text_file):
    path, lines = text_file
    data = CharLMDataModule(str(path), seq_len=16, holdout_lines=50)
    data.setup()
    vocab = sorted(set("".join(lines)))
    assert data.vocab == vocab and data.vocab_size == len(vocab)
    train, held = "".join(lines[:250]), "".join(lines[250:])
    for x, y, text in ((data.x_train, data.y_train, train), (data.x_val, data.y_val, held)):
        n = (len(text) - 1) // 16
        assert x.shape == y.shape == (n, 16) and x.dtype == torch.long
        for i in (0, n // 2, n - 1):
            window = text[16 * i : 16 * i + 17]
            assert "".join(vocab[j] for j in x[i]) == window[:-1]
            assert "".join(vocab[j] for j in y[i]) == window[1:]


def test_subset_is_seeded_and_the_same_on_every_rank(text_file):
    path, _ = text_file
    state = torch.get_rng_state()
    a = CharLMDataModule(str(path), seq_len=8, holdout_lines=50, num_train=100, seed=3)
    b = CharLMDataModule(str(path), seq_len=8, holdout_lines=50, num_train=100, seed=3)
    c = CharLMDataModule(str(path), seq_len=8, holdout_lines=50, num_train=100, seed=4)
    for d in (a, b, c):
        d.setup()
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not used
    dataset = a.train_dataloader().dataset
    shards = [list(DistributedSampler(dataset, 2, r, shuffle=False)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(100))


def test_bad_arguments_name_the_fix(text_file):
    path, _ = text_file
    with pytest.raises(ValueError, match="leaves none for training"):
        CharLMDataModule(str(path), holdout_lines=300).setup()
    with pytest.raises(ValueError, match="exceeds"):
        CharLMDataModule(str(path), seq_len=8, holdout_lines=50, num_train=10**6).setup()
    with pytest.raises(ValueError, match="seq_len"):
        CharLMDataModule(str(path), seq_len=0)


CHAR_RNN = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)


def no_file(path: Path) -> None:
    pass


def a_folder(path: Path) -> None:
    path.mkdir()


def latin1_text(path: Path) -> None:
    path.write_bytes("Thou art a caf\u00e9.\n".encode("latin-1"))


BAD_FILES = {  # how the path is made, the error, the message's headline
    "missing": (no_file, FileNotFoundError, FileNotFoundError, "{path} not found."),
    "folder": (a_folder, FileNotFoundError, IsADirectoryError, "{path} is a folder, not a text"),
    "latin-1": (latin1_text, ValueError, UnicodeDecodeError, "{path} is not UTF-8 text ("),
}


@pytest.mark.parametrize(("make", "error", "cause", "headline"), BAD_FILES.values(), ids=BAD_FILES)
def test_bad_text_file_says_what_is_expected_and_where_it_comes_from(
    tmp_path, make, error, cause, headline
):
    path = tmp_path / "input.txt"
    make(path)
    data = CharLMDataModule(str(path), seq_len=8, holdout_lines=1)  # constructing reads nothing
    with pytest.raises(error, match=f"^{re.escape(headline.format(path=path))}") as err:
        data.setup()
    message = str(err.value)
    assert "expects a plain UTF-8 text file, such as tiny-shakespeare's input.txt" in message
    assert f"from karpathy/char-rnn: {CHAR_RNN}." in message
    assert "Nothing is downloaded at run time" in message
    assert isinstance(err.value.__cause__, cause)  # the original, chained
