"""Image data modules on small files written in the real on-disk formats.

CIFAR batches are pickled the way Python 2 wrote the originals (py2 ``str`` opcodes, so
``encoding="bytes"`` gives ``b"data"`` keys and torchvision's ``encoding="latin1"`` gives
``"data"``); MNIST files are big-endian idx; ImageFolder trees hold real JPEGs.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from data_files import (
    PER_CLASS,
    truncate,
    write_cifar10,
    write_cifar100,
    write_image_folder,
    write_mnist,
)
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision.datasets import CIFAR10

from lightning_eos.data import CIFARDataModule, ImageNetSubsetDataModule, MNISTDataModule
from lightning_eos.data._subsets import balanced_subset


def as_images(data: np.ndarray) -> torch.Tensor:
    """Rows of 1024 R, then G, then B values, row-major -> (n, 3, 32, 32)."""
    return torch.from_numpy(data).view(-1, 3, 32, 32)


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar10")
    return root, write_cifar10(root)


def cifar(root: Path, **kwargs) -> CIFARDataModule:
    kwargs = {"num_train": 100, "num_val": 20, "verify": False, **kwargs}
    data = CIFARDataModule(str(root), **kwargs)
    data.setup()
    return data


# ------------------------------------------------------------------------------------- CIFAR


def test_py2_pickles_load_with_either_encoding(cifar10):
    root, _ = cifar10
    raw = (root / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    assert {b"data", b"labels"} <= set(pickle.loads(raw, encoding="bytes"))
    assert {"data", "labels"} <= set(pickle.loads(raw, encoding="latin1"))


def test_cifar10_pixels_and_labels_round_trip(cifar10):
    root, splits = cifar10
    data = cifar(root, num_train=None, num_val=None, normalize="none", target="label")
    (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
    assert data.x_train.shape == (50 * PER_CLASS, 3, 32, 32)
    assert data.x_val.shape == (10 * PER_CLASS, 3, 32, 32)
    assert torch.equal(data.train_indices, torch.arange(50 * PER_CLASS))
    assert torch.equal(data.x_train, as_images(train_x).float() / 255)
    assert torch.equal(data.x_val, as_images(test_x[data.val_indices.numpy()]).float() / 255)
    assert torch.equal(data.y_train, torch.as_tensor(train_y))
    assert torch.equal(data.y_val, torch.as_tensor(test_y[data.val_indices.numpy()]))
    assert data.class_names[:2] == ["airplane", "automobile"] and data.num_classes == 10


def test_cifar100_fine_labels_and_names(tmp_path):
    splits = write_cifar100(tmp_path)
    data = cifar(tmp_path, dataset="cifar100", num_train=200, num_val=100, normalize="none")
    train_x, train_y = splits["train"]
    idx = data.train_indices.numpy()
    assert torch.equal(data.x_train, as_images(train_x[idx]).float() / 255)
    assert data.y_train.shape == (200, 100) and data.y_train.dtype == torch.float32
    assert torch.equal(data.y_train.argmax(1), torch.as_tensor(train_y[idx]))
    assert torch.equal(data.y_train.sum(0), torch.full((100,), 2.0))  # balanced
    assert data.class_names[7] == "fine_7"


def test_cifar_classes_are_balanced_and_remapped(cifar10):
    root, splits = cifar10
    data = cifar(root, classes=[7, 3], num_train=20, num_val=6, target="label")
    original = torch.as_tensor(splits["train"][1])[data.train_indices]
    assert torch.equal(data.y_train, (original == 3).long())  # 7 -> 0, 3 -> 1
    assert data.y_train.bincount().tolist() == [10, 10]
    assert data.y_val.bincount().tolist() == [3, 3]
    assert data.class_names == ["horse", "cat"] and data.num_classes == 2
    onehot = cifar(root, classes=[7, 3], num_train=20, num_val=6)
    assert torch.equal(onehot.y_train, torch.nn.functional.one_hot(data.y_train, 2).float())
    assert torch.equal(onehot.x_train, data.x_train)


def test_cifar_unbalanced_subset(cifar10):
    root, _ = cifar10
    data = cifar(root, classes=[0, 1, 2], num_train=31, num_val=17, balanced=False, target="label")
    assert len(data.y_train) == 31 and set(data.y_train.tolist()) <= {0, 1, 2}


def test_cifar_subset_is_deterministic_by_seed(cifar10):
    root, _ = cifar10
    a, b, c = (cifar(root, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.train_indices, b.train_indices) and torch.equal(a.x_train, b.x_train)
    assert torch.equal(a.val_indices, b.val_indices)
    assert not torch.equal(a.train_indices, c.train_indices)
    assert not torch.equal(a.val_indices, c.val_indices)
    # the training subset is drawn first: it does not depend on num_val
    assert torch.equal(cifar(root, num_val=40).train_indices, a.train_indices)


@pytest.mark.parametrize("dtype", ["float32", "float64"], ids=lambda d: f"dtype={d}")
def test_cifar_normalization_uses_training_statistics(cifar10, dtype):
    root, _ = cifar10
    raw = cifar(root, normalize="none", dtype="float64")
    std = cifar(root, normalize="standardize", dtype=dtype)
    center = cifar(root, normalize="center", dtype="float64")
    x = std.x_train.double()
    assert std.x_train.dtype == getattr(torch, dtype) and std.y_train.dtype == std.x_train.dtype
    tol = 1e-6 if dtype == "float32" else 1e-12
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=tol)
    assert torch.allclose(x.std((0, 2, 3), correction=0), torch.ones(3, dtype=torch.float64))
    mean = raw.x_train.mean((0, 2, 3), keepdim=True)
    scale = raw.x_train.std((0, 2, 3), correction=0, keepdim=True)
    assert torch.allclose(center.x_train, raw.x_train - mean)
    assert torch.allclose(center.x_val, raw.x_val - mean)  # validation: training statistics
    assert torch.allclose(std.x_val.double(), (raw.x_val - mean) / scale, atol=tol)


CIFAR_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR_LAYOUTS = {  # title, archive, and the folder and files it unpacks to
    "cifar10": (
        "CIFAR-10",
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py",
        "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch, "
        "batches.meta",
    ),
    "cifar100": ("CIFAR-100", "cifar-100-python.tar.gz", "cifar-100-python", "train, test, meta"),
}
CIFAR_WRITERS = {"cifar10": write_cifar10, "cifar100": write_cifar100}


def assert_names_cifar_layout(message: str, root: Path, dataset: str) -> None:
    """The message gives the expected files, where they come from, and that none is fetched."""
    title, archive, folder, files = CIFAR_LAYOUTS[dataset]
    assert f"python version of {title} ({archive} from {CIFAR_PAGE})" in message
    assert f"{root / folder}/ holding {files}." in message
    assert "setup never downloads" in message


def test_cifar_verify_keeps_torchvisions_md5_check(cifar10):
    root, _ = cifar10
    data = CIFARDataModule(str(root), num_train=100, num_val=20)  # verify=True
    batch = root / "cifar-10-batches-py" / "data_batch_1"  # written here: not the original
    with pytest.raises(ValueError, match=f"^{re.escape(str(batch))} fails torchvision's md5"):
        data.setup()
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py does not exist"):
        cifar(root / "missing")  # verify=False still needs the files


@pytest.mark.parametrize("verify", [True, False], ids=lambda v: f"verify={v}")
@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"], ids=lambda d: f"dataset={d}")
def test_cifar_missing_folder_names_the_layout_and_source(tmp_path, dataset, verify):
    folder = tmp_path / CIFAR_LAYOUTS[dataset][2]
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(folder))} does not exist") as err:
        cifar(tmp_path, dataset=dataset, verify=verify)
    assert_names_cifar_layout(str(err.value), tmp_path, dataset)
    assert isinstance(err.value.__cause__, RuntimeError)  # torchvision's, chained


def test_cifar_missing_file_is_named(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.unlink()
    with pytest.raises(FileNotFoundError, match=f"^Not found: {re.escape(str(path))}\\.") as err:
        cifar(tmp_path)
    assert_names_cifar_layout(str(err.value), tmp_path, "cifar10")


TRUNCATED = [
    ("cifar10", "data_batch_1"),
    ("cifar10", "test_batch"),
    ("cifar10", "batches.meta"),
    ("cifar100", "train"),
    ("cifar100", "meta"),
]


@pytest.mark.parametrize(("dataset", "name"), TRUNCATED, ids=[f"{d}-{n}" for d, n in TRUNCATED])
def test_cifar_truncated_file_is_named(tmp_path, dataset, name):
    CIFAR_WRITERS[dataset](tmp_path)
    path = tmp_path / CIFAR_LAYOUTS[dataset][2] / name
    truncate(path)
    headline = (
        f"^{re.escape(str(path))} is truncated or corrupt \\(\\d+ bytes; (UnpicklingError|EOFError)"
    )
    with pytest.raises(ValueError, match=headline) as err:
        cifar(tmp_path, dataset=dataset, num_train=None, num_val=None)
    assert_names_cifar_layout(str(err.value), tmp_path, dataset)
    assert isinstance(err.value.__cause__, (pickle.UnpicklingError, EOFError))  # chained


def test_cifar_md5_check_names_the_truncated_file(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    # torchvision's sums made those of the written files, so they pass as the originals do
    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5(n)] for n, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[n, md5(n)] for n, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5("batches.meta")})
    assert cifar(tmp_path, verify=True).x_train.shape == (100, 3, 32, 32)
    path = folder / "data_batch_3"
    expected = md5("data_batch_3")
    truncate(path)
    headline = f"^{re.escape(str(path))} fails torchvision's md5 check \\(expected {expected}"
    with pytest.raises(ValueError, match=headline) as err:
        cifar(tmp_path, verify=True)
    assert "truncated, corrupt or not the original" in str(err.value)
    assert_names_cifar_layout(str(err.value), tmp_path, "cifar10")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_train": 25}, "multiple of the 10 classes"),
        ({"num_train": 400}, "smallest chosen class has 30"),
        ({"num_train": 400, "balanced": False}, "choose 1 <= num_train <= 300"),
        ({"num_train": 30, "num_val": 7, "classes": [0]}, "num_val <= 6"),
    ],
    ids=["not-multiple", "too-many", "too-many-unbalanced", "val-too-many"],
)
def test_cifar_impossible_subsets_name_the_fix(cifar10, kwargs, match):
    root, _ = cifar10
    with pytest.raises(ValueError, match=match):
        cifar(root, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset": "cifar1000"}, "choose 'cifar10' or 'cifar100'"),
        ({"normalize": "zscore"}, "choose 'center'"),
        ({"target": "soft"}, "choose 'onehot'"),
        ({"classes": [0, 10]}, r"0\.\.9"),
        ({"classes": [1, 1]}, "distinct"),
        ({"num_train": 0}, "positive count"),
        ({"batch_size": 0}, "positive size"),
        ({"dtype": "float16"}, "choose 'float32'"),
    ],
)
def test_cifar_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CIFARDataModule("nowhere", **kwargs)


def shifts_and_flips(image: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """All 81 crops (padding 4 with ``fill``) of ``image`` and of its mirror image."""
    padded = fill.view(3, 1, 1).expand(3, 40, 40).clone()
    padded[:, 4:36, 4:36] = image
    crops = [padded[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
    crops = torch.stack(crops)
    return torch.cat([crops, crops.flip(-1)])


def test_cifar_augment_crops_and_flips_the_training_loader_only(cifar10):
    root, _ = cifar10
    data = cifar(root, augment=True, num_train=40, num_val=10)
    state = torch.get_rng_state()
    (x1, y1), (x2, _) = next(iter(data.train_dataloader())), next(iter(data.train_dataloader()))
    x_val, y_val = next(iter(data.val_dataloader()))
    loader = data.train_dataloader()
    (first,), (second,) = [[b[0] for b in loader] for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state)  # augmentation has its own generator
    assert torch.equal(y1, data.y_train) and x1.shape == data.x_train.shape
    assert torch.equal(x1, x2)  # a fresh loader repeats its seeded augmentations
    assert not torch.equal(first, second)  # epochs differ
    assert not torch.equal(x1, data.x_train)
    assert torch.equal(x_val, data.x_val) and torch.equal(y_val, data.y_val)
    fill = -data.mean / data.std  # normalized black
    for i in range(0, 40, 7):
        candidates = shifts_and_flips(data.x_train[i], fill.float())
        assert (candidates == x1[i]).flatten(1).all(1).any()
    plain = cifar(root, num_train=40, num_val=10)
    assert torch.equal(next(iter(plain.train_dataloader()))[0], plain.x_train)


def test_minibatches_are_shuffled_by_seed(cifar10):
    root, _ = cifar10
    data = cifar(root, batch_size=32, target="label")
    epochs = [torch.cat([y for _, y in data.train_dataloader()]) for _ in range(2)]
    assert not torch.equal(epochs[0], data.y_train)
    assert torch.equal(epochs[0], epochs[1])  # each loader restarts from the seed
    assert torch.equal(epochs[0].sort().values, data.y_train.sort().values)
    full = cifar(root, target="label")
    (batch,) = list(full.train_dataloader())
    assert torch.equal(batch[1], full.y_train)


# ------------------------------------------------------------------------------------- MNIST


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    return root, write_mnist(root)


def test_mnist_pixels_labels_and_flatten(mnist):
    root, splits = mnist
    kwargs = {"num_train": None, "num_val": 20, "normalize": "none", "target": "label"}
    data = MNISTDataModule(str(root), **kwargs)
    data.setup()
    images, labels = splits["train"]
    idx = data.train_indices.numpy()
    assert data.x_train.shape == (80, 1, 28, 28)  # balanced: 8 per class, not the extra 3s
    assert torch.equal(data.x_train[:, 0], torch.from_numpy(images[idx]).float() / 255)
    assert torch.equal(data.y_train, torch.as_tensor(labels[idx]))
    assert (
        data.y_train.bincount().tolist() == [8] * 10 and data.y_val.bincount().tolist() == [2] * 10
    )
    flat = MNISTDataModule(str(root), flatten=True, num_train=None, num_val=8, classes=[3, 5])
    flat.setup()
    assert flat.x_train.shape == (16, 784) and flat.y_train.shape == (16, 2)
    assert torch.allclose(flat.x_train.mean(), torch.tensor(0.0), atol=1e-6)
    everything = MNISTDataModule(str(root), num_train=None, num_val=None, balanced=False)
    everything.setup()
    assert len(everything.x_train) == 82 and len(everything.x_val) == 42


def test_mnist_missing_files_raise_torchvisions_error(tmp_path):
    with pytest.raises(RuntimeError, match="Dataset not found"):
        MNISTDataModule(str(tmp_path)).setup()


# ------------------------------------------------------------------------------- ImageFolder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    write_image_folder(root, ("n03", "n01", "n02"), train=5, val=3)  # sorted: n01, n02, n03
    return root


def imagenet(root: Path, **kwargs) -> ImageNetSubsetDataModule:
    kwargs = {"images_per_class": 3, "val_per_class": 2, "resolution": 16, **kwargs}
    data = ImageNetSubsetDataModule(str(root), **kwargs)
    data.setup()
    return data


def test_imagefolder_classes_images_and_resolution(folder):
    data = imagenet(folder, classes=2, target="label")
    assert data.class_names == ["n01", "n02"]
    assert data.x_train.shape == (6, 3, 16, 16) and data.x_val.shape == (4, 3, 16, 16)
    assert data.y_train.bincount().tolist() == [3, 3] and data.y_val.bincount().tolist() == [2, 2]
    for path, label in zip(data.train_files, data.y_train.tolist()):
        assert Path(path).parent.name == data.class_names[label]
        assert Path(path).parent.parent.name == "train"
    assert all(Path(p).parent.parent.name == "val" for p in data.val_files)
    x = data.x_train.double()
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-6)
    named = imagenet(folder, classes=["n03", "n01"], normalize="none")
    assert named.class_names == ["n03", "n01"] and named.y_train.shape == (6, 2)
    assert [Path(p).parent.name for p in named.train_files].count("n03") == 3
    assert torch.equal(named.y_train[:, 0], torch.tensor([0.0] * 3 + [1.0] * 3))  # n01 sorts first
    # PIL's bilinear resize of the shorter side to 16 (40x48 -> 16x19), center crop rows 2..17
    image = Image.open(named.train_files[0]).convert("RGB").resize((16, 19), Image.BILINEAR)
    expected = torch.from_numpy(np.array(image)[2:18]).permute(2, 0, 1).float() / 255
    assert torch.equal(named.x_train[0], expected)


def test_imagefolder_subset_is_deterministic_by_seed(folder):
    a, b, c = (imagenet(folder, classes=3, seed=s) for s in (0, 0, 3))
    assert a.train_files == b.train_files and torch.equal(a.x_train, b.x_train)
    assert a.train_files != c.train_files


def test_imagefolder_errors_name_the_fix(folder):
    with pytest.raises(ValueError, match="choose images_per_class <= 5"):
        imagenet(folder, classes=3, images_per_class=6)
    with pytest.raises(ValueError, match="choose classes <= 3"):
        imagenet(folder, classes=4)
    with pytest.raises(FileNotFoundError, match="exist in both"):
        imagenet(folder, classes=["n01", "n09"])
    with pytest.raises(ValueError, match="choose 'folder'"):
        ImageNetSubsetDataModule(str(folder), source="hub")


def assert_names_imagefolder_layout(message: str, root: Path) -> None:
    """The message gives the expected tree, that it is ILSVRC-2012's, and that none is fetched."""
    assert f"{root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG" in message
    assert "ILSVRC-2012" in message and "https://image-net.org" in message
    assert "that you provide locally" in message and "Nothing is downloaded" in message


@pytest.mark.parametrize("classes", [2, ["n01", "n02"]], ids=["classes=2", "classes=names"])
def test_imagefolder_empty_root_names_the_layout_and_source(tmp_path, classes):
    headline = f"{tmp_path / 'train'} does not exist ({tmp_path} is empty)."
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(headline)}") as err:
        imagenet(tmp_path, classes=classes)
    assert_names_imagefolder_layout(str(err.value), tmp_path)
    root = tmp_path / "nowhere"
    with pytest.raises(
        FileNotFoundError, match=f"^{re.escape(str(root))} does not exist\\."
    ) as err:
        imagenet(root, classes=classes)
    assert_names_imagefolder_layout(str(err.value), root)


def remove_val(root: Path) -> None:
    shutil.rmtree(root / "val")


def empty_train(root: Path) -> None:
    shutil.rmtree(root / "train")
    (root / "train").mkdir()


def flatten_val(root: Path) -> None:
    """The validation images straight in ``val/``, as ILSVRC-2012's archive holds them."""
    for image in list((root / "val").glob("*/*.JPEG")):
        image.rename(root / "val" / image.name)
    for name in ("n01", "n02"):
        (root / "val" / name).rmdir()


def empty_val_class(root: Path) -> None:
    for image in (root / "val" / "n02").iterdir():
        image.unlink()


def keep(root: Path) -> None:
    pass


BROKEN_TREES = {  # what breaks the tree, the classes asked for, the message's headline
    "val-missing": (remove_val, ["n01", "n02"], "{root}/val does not exist."),
    "train-without-classes": (empty_train, 2, "{root}/train holds no class folders."),
    "val-flat": (flatten_val, ["n01", "n02"], "{root}/val holds no class folders."),
    "val-class-without-images": (empty_val_class, 2, "No images in {root}/val/n02 (torchvision"),
    "class-missing": (keep, ["n01", "n09"], "class folders ['n09'] not found in {root}/train;"),
}


@pytest.mark.parametrize(("damage", "classes", "headline"), BROKEN_TREES.values(), ids=BROKEN_TREES)
def test_imagefolder_broken_tree_names_the_folder_and_layout(tmp_path, damage, classes, headline):
    write_image_folder(tmp_path, ("n01", "n02"), train=2, val=1)
    damage(tmp_path)
    headline = re.escape(headline.format(root=tmp_path))
    with pytest.raises(FileNotFoundError, match=f"^{headline}") as err:
        imagenet(tmp_path, classes=classes, images_per_class=1, val_per_class=1)
    assert_names_imagefolder_layout(str(err.value), tmp_path)


# ----------------------------------------------------------------------------- all modules


@pytest.fixture(params=["cifar", "mnist", "imagefolder"])
def build(request, cifar10, mnist, folder):
    if request.param == "cifar":
        return lambda: cifar(cifar10[0], num_train=60, num_val=10)
    if request.param == "mnist":
        return lambda: MNISTDataModule(str(mnist[0]), num_train=30, num_val=10)
    return lambda: imagenet(folder, classes=2)


def test_ranks_build_the_same_subset_and_the_sampler_splits_it(build):
    subsets = []
    for _ in range(2):
        data = build()  # what each DDP process does: its own module, the same seed
        data.setup()
        subsets.append(data)
        assert torch.equal(data.x_train, subsets[0].x_train)
        assert torch.equal(data.y_train, subsets[0].y_train)
    dataset = subsets[0].train_dataloader().dataset
    parts = [
        list(DistributedSampler(dataset, num_replicas=2, rank=r, shuffle=False)) for r in range(2)
    ]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == list(range(len(dataset)))


def test_setup_and_loaders_leave_the_global_rng_alone(build):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    data = build()
    data.setup()
    list(data.train_dataloader())
    list(data.val_dataloader())
    assert torch.equal(torch.get_rng_state(), state)


def test_balanced_subset_draws_within_each_class():
    labels = torch.arange(40) % 4
    idx = balanced_subset(labels, 8, [1, 3], True, torch.Generator().manual_seed(0))
    assert labels[idx].bincount(minlength=4).tolist() == [0, 4, 0, 4]
    assert len(set(idx.tolist())) == 8


# ------------------------------------------------------------------------------------- CLI


def test_lightning_cli_builds_and_fits_the_modules(mnist, cifar10, folder, tmp_path):
    from lightning_eos.cli import build_cli

    trainer = [
        "--trainer.max_steps=2",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    model = [
        "--model=lightning_eos.models.SupervisedTask",
        "--model.model=lightning_eos.models.FCN",
        "--model.model.in_features=784",
        "--model.model.out_features=2",
        "--model.model.width=8",
        "--model.model.depth=1",
        "--model.optimizer=torch.optim.SGD",
        "--model.optimizer.lr=0.1",
    ]
    data = [
        "--data=lightning_eos.data.MNISTDataModule",
        f"--data.root={mnist[0]}",
        "--data.classes=[3, 5]",
        "--data.num_train=16",
        "--data.num_val=8",
        "--data.flatten=true",
    ]
    cli = build_cli(["fit", *model, *data, *trainer])
    assert cli.trainer.global_step == 2 and cli.datamodule.x_train.shape == (16, 784)
    others = [
        [
            "--data=lightning_eos.data.CIFARDataModule",
            f"--data.root={cifar10[0]}",
            "--data.verify=false",
            "--data.augment=true",
            "--data.normalize=center",
        ],
        [
            "--data=lightning_eos.data.ImageNetSubsetDataModule",
            f"--data.root={folder}",
            "--data.classes=[n02, n01]",
        ],
    ]
    for args in others:
        cli = build_cli([*model, *args, *trainer], run=False)
        assert cli.datamodule.x_train is None  # built, not set up
    assert cli.datamodule.classes == ["n02", "n01"]


# ------------------------------------------------------------------------- digits as images


def test_digits_images_are_the_standardized_features_on_their_grid():
    from lightning_eos.data import DigitsDataModule

    flat = DigitsDataModule(num_train=50, num_val=10)
    grid = DigitsDataModule(num_train=50, num_val=10, image_size=8, channels=3)
    big = DigitsDataModule(num_train=50, num_val=10, image_size=32, channels=3)
    for data in (flat, grid, big):
        data.setup()
    x, x_grid, x_big = (d.train_set.tensors[0] for d in (flat, grid, big))
    assert x_grid.shape == (50, 3, 8, 8) and x_big.shape == (50, 3, 32, 32)
    for c in range(3):
        assert torch.equal(x_grid[:, c].reshape(50, 64), x)
    # bilinear upsampling by 4 (align_corners=False) samples pixel k at k -+ 1/8, k -+ 3/8,
    # so a 4x4 block averages to 3/4 of its pixel + 1/8 of each neighbour, per axis
    pooled = torch.nn.functional.avg_pool2d(x_big[:, :1], 4)
    kernel = torch.tensor([0.125, 0.75, 0.125])
    expected = torch.nn.functional.conv2d(
        x.view(50, 1, 8, 8), torch.outer(kernel, kernel)[None, None]
    )
    torch.testing.assert_close(pooled[:, :, 1:-1, 1:-1], expected)
    assert torch.equal(grid.train_set.tensors[1], flat.train_set.tensors[1])
