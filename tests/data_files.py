"""Small dataset files in the real on-disk formats, for tests (never downloaded).

CIFAR batches are pickled the way Python 2 wrote the originals (py2 ``str`` opcodes, so
``encoding="bytes"`` gives ``b"data"`` keys and torchvision's ``encoding="latin1"`` gives
``"data"``); MNIST files are big-endian idx; ImageFolder trees hold real JPEGs.
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

PER_CLASS = 6  # per CIFAR-10 batch file


class _Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` (BINSTRING), as the original CIFAR pickles do."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def py2_pickle(obj: object, path: Path) -> None:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    path.write_bytes(buffer.getvalue())


def cifar_batch(rng: np.random.Generator, labels: list[int], label_key: bytes, name: bytes):
    data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    batch = {
        b"batch_label": name,
        label_key: labels,
        b"data": data,
        b"filenames": [b"img_%d.png" % i for i in range(len(labels))],
    }
    return batch, data


def write_cifar10(root: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Five training batches and a test batch, ``PER_CLASS`` examples per class in each."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    splits = {"train": ([], []), "test": ([], [])}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = rng.permutation(np.repeat(np.arange(10), PER_CLASS)).tolist()
        batch, data = cifar_batch(rng, labels, b"labels", name.encode())
        py2_pickle(batch, folder / name)
        split = splits["test" if name == "test_batch" else "train"]
        split[0].append(data)
        split[1].extend(labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    meta = {b"num_cases_per_batch": 10 * PER_CLASS, b"label_names": names, b"num_vis": 3072}
    py2_pickle(meta, folder / "batches.meta")
    return {k: (np.concatenate(d), np.array(y)) for k, (d, y) in splits.items()}


def write_cifar100(root: Path, per_class: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for name in ("train", "test"):
        fine = rng.permutation(np.repeat(np.arange(100), per_class))
        batch, data = cifar_batch(rng, fine.tolist(), b"fine_labels", name.encode())
        batch[b"coarse_labels"] = (fine // 5).tolist()
        py2_pickle(batch, folder / name)
        out[name] = (data, fine)
    meta = {
        b"fine_label_names": [b"fine_%d" % i for i in range(100)],
        b"coarse_label_names": [b"coarse_%d" % i for i in range(20)],
    }
    py2_pickle(meta, folder / "meta")
    return out


def write_idx(path: Path, array: np.ndarray) -> None:
    magic = 2051 if array.ndim == 3 else 2049
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, per_class: tuple[int, int] = (8, 4), seed: int = 0):
    """``root/MNIST/raw`` idx files; two extra 3s per split (MNIST's classes are unequal)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    splits = {}
    for prefix, count in zip(("train", "t10k"), per_class):
        labels = rng.permutation(np.repeat(np.arange(10), count))
        labels = np.concatenate([labels, [3, 3]])
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        splits[prefix] = (images, labels)
    return splits


def write_image_folder(root: Path, classes, train: int, val: int, size=(48, 40), seed: int = 0):
    """``root/{train,val}/<class>/*.JPEG``: an ImageFolder tree of random JPEGs."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{name}_{i}.JPEG")


def truncate(path: Path, fraction: float = 0.5) -> None:
    """Cut ``path`` to ``fraction`` of its bytes, as an interrupted copy or download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
