"""Every config in ``configs/`` fits for two steps, its dataset swapped for generated files.

The configs name the real datasets (CIFAR, MNIST, ImageNet, WMT, tiny-shakespeare) under
``data/``; here each data module reads small files written in the real on-disk format,
with subset sizes shrunk to what the files hold. Everything else (model, optimizer,
scheduler, callbacks) is the config's own, except that every monitor measures at steps
0 and 2 with at most four Lanczos iterations on four samples (IASMonitor: on the whole
generated set), so a config costs seconds, not hours.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from data_files import write_cifar10, write_cifar100, write_image_folder, write_mnist

from lightning_eos.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

WORDS = "the a small house cat dog runs sees blue green tree under over river".split()
WORTE = "der die das kleine haus katze hund läuft sieht blaue grüne baum unter über".split()


def _parallel_text(lines: int, seed: int) -> tuple[list[str], list[str]]:
    g = torch.Generator().manual_seed(seed)
    en, de = [], []
    for _ in range(lines):
        ids = torch.randint(0, len(WORDS), (int(torch.randint(3, 9, (1,), generator=g)),))
        en.append(" ".join(WORDS[i] for i in ids.tolist()))
        de.append(" ".join(WORTE[i] for i in ids.flip(0).tolist()))
    return en, de


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """One folder with every dataset the configs read, in its real format."""
    root = tmp_path_factory.mktemp("datasets")
    write_cifar10(root / "cifar10")
    write_cifar100(root / "cifar100")
    write_mnist(root / "mnist")
    write_image_folder(root / "imagenet", [f"n0{i}" for i in range(4)], train=4, val=2)
    wmt = root / "wmt14_en_de"
    wmt.mkdir()
    for split, lines in (("train", 64), ("valid", 16)):
        en, de = _parallel_text(lines, seed=len(split))
        (wmt / f"{split}.en").write_text("\n".join(en) + "\n", encoding="utf-8")
        (wmt / f"{split}.de").write_text("\n".join(de) + "\n", encoding="utf-8")
    text = "".join(
        f"{'ABCDEFGH'[i % 8]}{'abcdefghijklmnopqrstuvwxyz'[: i % 26 + 1]} :,.!\n"
        for i in range(200)
    )
    (root / "shakespeare.txt").write_text(text, encoding="utf-8")
    return root


def _data_overrides(class_name: str, files: Path) -> dict:
    """Where each data module finds the generated files, and subset sizes they can hold."""
    return {
        "CIFARDataModule": {"num_train": 20, "num_val": 10, "verify": False},
        "MNISTDataModule": {"root": str(files / "mnist"), "num_train": 20, "num_val": 10},
        "ImageNetSubsetDataModule": {
            "root": str(files / "imagenet"),
            "source": "folder",
            "classes": 4,
            "images_per_class": 4,
            "val_per_class": 2,
        },
        "WMTDataModule": {"path": str(files / "wmt14_en_de"), "dataset": None, "num_val": 8},
        "CharLMDataModule": {"path": str(files / "shakespeare.txt"), "holdout_lines": 20},
    }.get(class_name, {})


def _fit_two_steps(config: Path, files: Path, tmp_path: Path) -> L.Trainer:
    spec = yaml.safe_load(config.read_text())
    data = spec["data"]
    name = data["class_path"].rsplit(".", 1)[-1]
    args = data.setdefault("init_args", {})
    args.update(_data_overrides(name, files))
    if name == "CIFARDataModule":
        args["root"] = str(files / args.get("dataset", "cifar10"))
        if args.get("dataset") == "cifar100":  # 20 images cannot cover 100 classes
            args.update(balanced=False)
    for key in ("num_train", "num_train_tokens"):  # generated sets are small
        if name in ("WMTDataModule", "CharLMDataModule") and args.get(key):
            args[key] = None
    if name in ("CIFARDataModule", "MNISTDataModule", "ImageNetSubsetDataModule"):
        if args.get("batch_size"):  # chunks that divide the 20 (16) generated samples
            args["batch_size"] = 8 if name == "ImageNetSubsetDataModule" else 10
    if name == "WMTDataModule":
        args.update(vocab_size=300, max_tokens=64 if args.get("max_tokens") else None)
    trainer = spec["trainer"]
    trainer.update(max_steps=2, logger=False, default_root_dir=str(tmp_path))
    trainer.pop("max_epochs", None)
    for callback in trainer.get("callbacks", []):
        cls = _callback_class(callback["class_path"])
        params = inspect.signature(cls.__init__).parameters
        init = callback.setdefault("init_args", {}) or {}
        callback["init_args"] = init
        if "max_iter" in params:  # a curvature monitor: measure at steps 0 and 2, cheaply
            init.update(every_n_steps=2, max_iter=4)
            if "loss_change" not in params:  # not IASMonitor, whose b comes from the loader
                init["num_samples"] = 4
            else:  # IASMonitor: a few Monte-Carlo minibatches from at most 256 samples
                init.update(samples=4, loss_change_samples=2)
                init["num_samples"] = min(init.get("num_samples") or 256, 256)
        if "dirpath" in params:
            init["dirpath"] = str(tmp_path / "plots")
    path = tmp_path / config.name
    path.write_text(yaml.safe_dump(spec))
    cli = build_cli(["fit", "--config", str(path)])
    return cli.trainer


def _callback_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_fits_two_steps_on_generated_files(config, files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = _fit_two_steps(config, files, tmp_path)
    assert trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())
    monitors = [c for c in trainer.callbacks if hasattr(c, "history") and hasattr(c, "max_iter")]
    for monitor in monitors:  # every monitor measured, at least once, a finite value
        assert monitor.history, type(monitor).__name__
        assert all(torch.isfinite(torch.tensor(v)) for v in monitor.history[-1].values())


def _runs_on_cpu(config: Path) -> bool:
    return yaml.safe_load(config.read_text())["trainer"].get("accelerator") == "cpu"


def test_every_paper_config_has_a_cpu_variant():
    """A figure's config for an accelerator comes with a ``_cpu`` twin on digits or
    synthetic data; a config that is CPU-sized itself (the toys) needs none."""
    papers = [c for c in CONFIGS if c.stem[:3].isdigit() and not c.stem.endswith("_cpu")]
    missing = [
        c.name
        for c in papers
        if not _runs_on_cpu(c) and not (c.parent / f"{c.stem}_cpu.yaml").exists()
    ]
    assert papers and not missing, missing
    for twin in (c for c in CONFIGS if c.stem.endswith("_cpu")):
        assert _runs_on_cpu(twin), twin.name
