"""Fashion-MNIST: the IDX reader on files the test writes (good and corrupt), the real Debian files, the
training options (images per epoch, augmentation), and a rapid trial on a subset through the CLI."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pruneflow import data as data_module
from pruneflow.data import FASHION_MNIST_DIR, DatasetError, DatasetSpec, load_dataset, read_idx
from pruneflow.train import TrainOptions, augment_batch, train

STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx(images: np.ndarray | None = None, labels: np.ndarray | None = None, magic: int | None = None,
         count: int | None = None, cut: int = 0) -> bytes:
    if images is not None:
        head = [magic or 2051, count if count is not None else len(images), *images.shape[1:]]
        body = images.astype(np.uint8).tobytes()
    else:
        head = [magic or 2049, count if count is not None else len(labels)]
        body = labels.astype(np.uint8).tobytes()
    raw = b"".join(int(v).to_bytes(4, "big") for v in head) + body
    return raw[: len(raw) - cut] if cut else raw


def _write_set(folder: Path, n_train: int = 200, n_test: int = 50, compress: bool = True, **faults) -> Path:
    """A Fashion-MNIST-shaped folder; ``faults`` maps a stem to _idx keyword arguments that corrupt it."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, size=(n, 28, 28))
        images[:, 0, 0] = labels  # a pixel that tells each image's class, to follow images through the split
        for stem, kwargs in ((f"{split}-images-idx3-ubyte", {"images": images}),
                             (f"{split}-labels-idx1-ubyte", {"labels": labels})):
            raw = _idx(**{**kwargs, **faults.get(stem.replace("-", "_"), {})})
            if compress:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / stem).write_bytes(raw)
    return folder


def _spec(folder: Path, **kw) -> DatasetSpec:
    return DatasetSpec(name="fashion-mnist", path=str(folder), image_size=kw.pop("image_size", None), **kw)


@pytest.mark.parametrize("compress", [True, False])
def test_small_files_load_with_a_seeded_validation_split(tmp_path, compress):
    folder = _write_set(tmp_path / "f", compress=compress)
    d = load_dataset(_spec(folder, val_fraction=0.2, split_seed=1))
    assert (len(d.train[1]), len(d.val[1]), len(d.test[1])) == (160, 40, 50)
    assert d.num_classes == 10 and d.class_names[0] == "T-shirt/top" and d.input_shape == (1, 1, 28, 28)
    assert d.test[1].tolist() == (np.arange(50) % 10).tolist()  # the test file, in its own order
    assert torch.bincount(d.val[1]).tolist() == [4] * 10  # stratified
    again = load_dataset(_spec(folder, val_fraction=0.2, split_seed=1))
    other = load_dataset(_spec(folder, val_fraction=0.2, split_seed=2))
    assert torch.equal(again.val[0], d.val[0]) and not torch.equal(other.val[0], d.val[0])
    assert load_dataset(_spec(folder, image_size=32)).input_shape == (1, 1, 32, 32)


@pytest.mark.parametrize(("stem", "fault", "message"), [
    ("train_images_idx3_ubyte", {"magic": 2049}, r"magic number 0x00000801, expected 0x00000803"),
    ("t10k_labels_idx1_ubyte", {"magic": 2051}, r"magic number 0x00000803, expected 0x00000801"),
    ("train_images_idx3_ubyte", {"cut": 100}, r"header says 200 x 28 x 28 = 156800 bytes .* 156700 \(truncated\)"),
    ("train_labels_idx1_ubyte", {"count": 199, "cut": 1}, r"holds 200 images but .*train-labels.* 199 labels"),
    ("t10k_labels_idx1_ubyte", {"labels": np.array([1, 10] + [0] * 48)}, r"label 10 at index 1"),
])
def test_corrupt_files_are_refused_with_the_file_named(tmp_path, stem, fault, message):
    folder = _write_set(tmp_path / "f", **{stem: fault})
    with pytest.raises(DatasetError, match=message) as info:
        load_dataset(_spec(folder))
    assert stem.replace("_", "-") in str(info.value)


def test_a_torn_gzip_and_a_missing_file_are_named(tmp_path):
    folder = _write_set(tmp_path / "f")
    raw = (folder / "t10k-images-idx3-ubyte.gz").read_bytes()
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(raw[:100])
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte.gz: cannot read it as gzip"):
        load_dataset(_spec(folder))
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"has no t10k-images-idx3-ubyte.gz .*apt-get install dataset-fashion-mnist"):
        load_dataset(_spec(folder))
    with pytest.raises(DatasetError, match="shorter than an IDX header"):
        (tmp_path / "short").write_bytes(b"\0\0\x08")
        read_idx(tmp_path / "short", 2051)


def test_missing_folder_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match=r"nowhere does not exist; install Debian's dataset-fashion-mnist package"):
        load_dataset(DatasetSpec(name="fashion-mnist"))
    with pytest.raises(DatasetError, match="does not exist; expected the folder of the four IDX files"):
        load_dataset(_spec(tmp_path / "elsewhere"))


def test_the_real_files_have_the_published_counts():
    assert Path(FASHION_MNIST_DIR).is_dir(), "make test installs Debian's dataset-fashion-mnist (scripts/system-deps.sh)"
    d = load_dataset(DatasetSpec(name="fashion-mnist", image_size=None, val_fraction=0.1))
    assert len(d.train[1]) + len(d.val[1]) == 60_000 and len(d.val[1]) == 6_000 and len(d.test[1]) == 10_000
    assert torch.bincount(d.test[1]).tolist() == [1000] * 10  # the published test set: 1,000 per class
    assert torch.bincount(torch.cat([d.train[1], d.val[1]])).tolist() == [6000] * 10
    assert d.input_shape == (1, 1, 28, 28)
    assert abs(float(d.train[0].mean())) < 1e-3  # normalised with the training split's statistics


def test_augmentation_moves_and_flips_training_images_only_when_asked():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(augment_batch(x, 0, False, gen), x)
    flipped = augment_batch(x, 0, True, torch.Generator().manual_seed(0))
    for a, b in zip(flipped, x, strict=True):
        assert torch.equal(a, b) or torch.equal(a, b.flip(2))
    crops = [augment_batch(x, 2, False, torch.Generator().manual_seed(s)) for s in range(8)]
    assert all(c.shape == x.shape for c in crops)
    assert any(not torch.equal(c, x) for c in crops)
    for c in crops:  # every crop is a window of the zero-padded image
        padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
        for i in range(2):
            assert any(torch.equal(c[i], padded[i, :, dy:dy + 4, dx:dx + 4]) for dy in range(5) for dx in range(5))
    again = augment_batch(x, 2, True, torch.Generator().manual_seed(3))
    assert torch.equal(again, augment_batch(x, 2, True, torch.Generator().manual_seed(3)))  # seeded


def test_images_per_epoch_draws_a_subset_each_epoch(tmp_path):
    from pruneflow.models import build_model

    d = load_dataset(_spec(_write_set(tmp_path / "f", n_train=300)))
    model = build_model("smallcnn", 1, 10, width=4)
    history, _ = train(model, d.train, d.val, TrainOptions(epochs=2, batch_size=32, images_per_epoch=70,
                                                           crop_padding=2, hflip=True))
    assert [h["images"] for h in history] == [70, 70]
    history, _ = train(model, d.train, d.val, TrainOptions(epochs=1, batch_size=32))
    assert history[0]["images"] == len(d.train[1])


def test_spec_training_options_reach_the_trainer():
    spec = DatasetSpec(name="fashion-mnist", images_per_epoch=5000, augment={"crop_padding": 4, "hflip": True})
    assert spec.train_options() == {"images_per_epoch": 5000, "crop_padding": 4, "hflip": True}
    TrainOptions(epochs=1, **spec.train_options())  # every key is an option of the trainer
    with pytest.raises(ValueError, match="crop_padding"):
        DatasetSpec(name="fashion-mnist", augment={"crop_padding": -1})
    with pytest.raises(ValueError, match="fashion-mnist"):
        DatasetSpec(name="fashion")  # the error lists the allowed names


def test_rapid_trial_on_a_subset_through_the_cli(tmp_path):
    """The real files, a small subset: a named baseline trained on first use, then one rapid trial."""
    spec = {
        "name": "fm", "trial_id": "fm-cli", "model": {"name": "smallcnn", "kwargs": {"width": 8}},
        "dataset": {"name": "fashion-mnist", "image_size": 16, "max_train_samples": 600, "val_fraction": 0.02,
                    "augment": {"crop_padding": 2, "hflip": True}},
        "baseline": {"checkpoint": "smallcnn-fm16-subset", "epochs": 2, "lr": 0.05},
        "pruning": {"groups": [{"name": "c2", "patterns": ["conv2"], "sparsity": 0.5}]},
        "benchmark": {"rounds": 2, "iterations": 10, "warmup": 2},
        "artifacts": str(tmp_path / "trials"), "db": f"sqlite:///{tmp_path / 'results.db'}",
    }
    path = tmp_path / "fm.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PRUNEFLOW_BASELINES": str(tmp_path / "baselines")}
    proc = subprocess.run([sys.executable, "-m", "pruneflow.cli", "trial", str(path), "--json"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "succeeded"
    baseline = json.loads((tmp_path / "baselines" / "smallcnn-fm16-subset" / "baseline.json").read_text())
    assert baseline["dataset"]["name"] == "fashion-mnist" and baseline["dataset"]["augment"]["hflip"] is True
    assert [h["images"] for h in baseline["history"]] == [600, 600]  # the subset, every epoch
    thin = json.loads((tmp_path / "trials" / "fm-cli" / "thin.json").read_text())
    assert thin["params_after"] < thin["params_before"]


def test_disk_cache_is_keyed_by_the_files_and_not_by_training_options(tmp_path):
    import os

    folder = _write_set(tmp_path / "f")
    cache = tmp_path / "cache"
    first = data_module._load_disk_cached(_spec(folder), cache)
    data_module._load_disk_cached(_spec(folder, images_per_epoch=50, augment={"hflip": True}), cache)
    assert len(list(cache.glob("fashion-mnist-*.pt"))) == 1  # how batches are drawn does not change the tensors
    _write_set(folder, n_test=30)  # the files replaced: a new key, never the stale tensors
    for f in folder.iterdir():
        os.utime(f, ns=(1, 1))
    again = data_module._load_disk_cached(_spec(folder), cache)
    assert len(first.test[1]) == 50 and len(again.test[1]) == 30
