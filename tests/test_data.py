"""Tests for pruneflow.data: digits, a fake CIFAR-10 folder and a tiny image folder (nothing downloaded)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from pruneflow.constants import DATASETS
from pruneflow.data import (
    DatasetError,
    DatasetSpec,
    DataSplits,
    list_datasets,
    load_dataset,
    register_dataset,
)

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.tobytes() for r in x.reshape(len(x), -1).numpy()}


# ---------------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_native() -> DataSplits:
    return load_dataset(DatasetSpec(name="digits", image_size=None))


def test_digits_shapes_and_sizes(digits_native: DataSplits) -> None:
    d = digits_native
    assert d.name == "digits"
    assert (d.num_classes, d.in_channels, d.image_size) == (10, 1, 8)
    assert d.input_shape == (1, 1, 8, 8)
    assert d.class_names == [str(i) for i in range(10)]
    sizes = [len(d.train[1]), len(d.val[1]), len(d.test[1])]
    assert sum(sizes) == 1797
    assert abs(sizes[1] - 0.2 * 1797) < 10 and abs(sizes[2] - 0.2 * 1797) < 10
    for x, y in (d.train, d.val, d.test):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8) and x.shape[0] == y.shape[0]


def test_digits_splits_disjoint_and_stratified(digits_native: DataSplits) -> None:
    d = digits_native
    tr, va, te = _rows(d.train[0]), _rows(d.val[0]), _rows(d.test[0])
    assert len(tr) + len(va) + len(te) == 1797  # load_digits has no duplicate images
    assert not (tr & va) and not (tr & te) and not (va & te)
    for _, y in (d.train, d.val, d.test):
        counts = torch.bincount(y, minlength=10)
        assert (counts > 0).all()
        # proportions follow the full data set (about 10% per class)
        assert counts.min() >= 0.8 * counts.float().mean()


def test_digits_normalised_with_train_stats(digits_native: DataSplits) -> None:
    x = digits_native.train[0]
    assert abs(x.mean().item()) < 1e-4
    assert abs(x.std(correction=0).item() - 1) < 1e-4
    assert len(digits_native.mean) == len(digits_native.std) == 1
    assert 0 < digits_native.mean[0] < 1  # statistics of the [0, 1]-scaled pixels
    # val/test use the same transform: roughly, but not exactly, standardised
    assert abs(digits_native.val[0].mean().item()) < 0.1


def test_digits_deterministic_and_seed_dependent(digits_native: DataSplits) -> None:
    again = load_dataset(DatasetSpec(name="digits", image_size=None))
    for a, b in zip(
        (digits_native.train, digits_native.val, digits_native.test),
        (again.train, again.val, again.test),
        strict=True,
    ):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other = load_dataset(DatasetSpec(name="digits", image_size=None, split_seed=1))
    assert _rows(other.test[0]) != _rows(digits_native.test[0])


def test_digits_resize_to_32() -> None:
    d = load_dataset(DatasetSpec(name="digits", image_size=32))
    assert d.image_size == 32 and d.input_shape == (1, 1, 32, 32)
    assert d.train[0].shape[1:] == (1, 32, 32)
    assert abs(d.train[0].mean().item()) < 1e-4


def test_digits_max_train_samples_is_stratified_prefix() -> None:
    d = load_dataset(DatasetSpec(image_size=None, max_train_samples=50))
    assert len(d.train[1]) == 50
    assert torch.bincount(d.train[1], minlength=10).tolist() == [5] * 10
    full = load_dataset(DatasetSpec(image_size=None))
    assert len(d.val[1]) == len(full.val[1]) and len(d.test[1]) == len(full.test[1])
    # the subsample is the first 50 of the full (deterministic) train order
    assert torch.equal(d.train[1], full.train[1][:50])


def test_test_fraction_zero_gives_empty_test() -> None:
    d = load_dataset({"name": "digits", "image_size": None, "test_fraction": 0})
    assert d.test[0].shape == (0, 1, 8, 8) and d.test[1].shape == (0,)
    assert len(d.train[1]) + len(d.val[1]) == 1797


# ---------------------------------------------------------------------------------------------- spec


def test_spec_cifar_requires_path() -> None:
    with pytest.raises(ValidationError, match="path"):
        DatasetSpec(name="cifar10")
    with pytest.raises(ValidationError, match="path"):
        DatasetSpec(name="imagefolder", path="  ")


def test_spec_image_size_bounds() -> None:
    with pytest.raises(ValidationError) as e:
        DatasetSpec(image_size=4)
    assert "image_size" in str(e.value)
    with pytest.raises(ValidationError, match="image_size"):
        DatasetSpec(image_size=1024)


def test_spec_unknown_name_lists_allowed() -> None:
    with pytest.raises(ValidationError) as e:
        DatasetSpec(name="mnist")
    msg = str(e.value)
    assert "name" in msg
    for allowed in ("digits", "fashion-mnist", "cifar10", "imagefolder"):
        assert allowed in msg


def test_spec_forbids_extra_and_checks_fractions() -> None:
    with pytest.raises(ValidationError, match="batch_size"):
        DatasetSpec(batch_size=3)
    with pytest.raises(ValidationError, match="val_fraction"):
        DatasetSpec(val_fraction=0.5)
    with pytest.raises(ValidationError, match="max_train_samples"):
        DatasetSpec(max_train_samples=0)


def test_registry() -> None:
    assert list_datasets() == ["cifar10", "digits", "fashion-mnist", "imagefolder"] == sorted(DATASETS)

    @register_dataset("dummy-test")
    def _dummy(spec: DatasetSpec) -> DataSplits:  # pragma: no cover - never loaded
        raise AssertionError

    try:
        assert "dummy-test" in list_datasets()
        with pytest.raises(ValueError, match="already registered"):
            register_dataset("digits")(_dummy)
    finally:
        from pruneflow import data

        data._REGISTRY.pop("dummy-test")


# ---------------------------------------------------------------------------------------------- cifar10


def _write_cifar(
    root: Path, per_batch: int = 20, n_test: int = 10, protocol: int = pickle.DEFAULT_PROTOCOL
) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def dump(name: str, obj: object) -> None:
        with (root / name).open("wb") as f:
            pickle.dump(obj, f, protocol=protocol)

    for b in range(1, 6):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [(i + b) % 10 for i in range(per_batch)]
        dump(f"data_batch_{b}", {b"batch_label": b"training batch", b"labels": labels, b"data": data})
    test = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    test[0] = 0
    test[0, :1024] = 255  # image 0 of the test batch: pure red
    dump("test_batch", {b"batch_label": b"testing batch", b"labels": list(range(n_test)), b"data": test})
    dump(
        "batches.meta",
        {
            b"label_names": [n.encode() for n in CIFAR_NAMES],
            b"num_cases_per_batch": per_batch,
            b"num_vis": 3072,
        },
    )


def test_cifar10_fake_folder(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "cifar-10-batches-py")
    # the parent folder is accepted too
    d = load_dataset(DatasetSpec(name="cifar10", path=str(tmp_path), image_size=None))
    assert d.class_names == CIFAR_NAMES
    assert (d.num_classes, d.in_channels, d.image_size) == (10, 3, 32)
    assert len(d.train[1]) == 80 and len(d.val[1]) == 20 and len(d.test[1]) == 10
    assert d.train[0].shape == (80, 3, 32, 32) and d.test[0].shape == (10, 3, 32, 32)
    assert d.test[1].tolist() == list(range(10))
    for _, y in (d.train, d.val):
        assert torch.bincount(y, minlength=10).min() > 0
    assert torch.allclose(d.train[0].mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    # channel-major layout: test image 0 is red
    red = d.test[0][0] * torch.tensor(d.std).view(3, 1, 1) + torch.tensor(d.mean).view(3, 1, 1)
    assert torch.allclose(red[0], torch.ones(32, 32), atol=1e-4)
    assert torch.allclose(red[1:], torch.zeros(2, 32, 32), atol=1e-4)


def test_cifar10_resize_and_subsample(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    d = load_dataset(DatasetSpec(name="cifar10", path=str(tmp_path), image_size=16, max_train_samples=30))
    assert d.train[0].shape == (30, 3, 16, 16) and d.test[0].shape == (10, 3, 16, 16)
    assert d.input_shape == (1, 3, 16, 16)


def test_cifar10_legacy_python2_style_pickles(tmp_path: Path) -> None:
    """Protocol 2 and the pre-numpy-2 module path, as in the real (Python 2) batch files."""
    _write_cifar(tmp_path, protocol=2)
    for f in tmp_path.iterdir():
        f.write_bytes(f.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    d = load_dataset(DatasetSpec(name="cifar10", path=str(tmp_path)))
    assert len(d.train[1]) + len(d.val[1]) == 100 and d.class_names == CIFAR_NAMES


def test_cifar10_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError) as e:
        load_dataset(DatasetSpec(name="cifar10", path=str(missing)))
    assert (
        str(missing) in str(e.value) and "does not exist" in str(e.value) and "data_batch_1" in str(e.value)
    )


def test_cifar10_missing_batch_file(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(DatasetError, match="missing data_batch_4"):
        load_dataset(DatasetSpec(name="cifar10", path=str(tmp_path)))


def test_cifar10_malformed_batch(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    with (tmp_path / "data_batch_3").open("wb") as f:
        pickle.dump({b"labels": [0] * 20, b"data": np.zeros((20, 100), np.uint8)}, f)
    with pytest.raises(DatasetError) as e:
        load_dataset(DatasetSpec(name="cifar10", path=str(tmp_path)))
    msg = str(e.value)
    assert "data_batch_3" in msg and "[20, 100]" in msg and "[N, 3072]" in msg


def test_cifar10_missing_key(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    with (tmp_path / "test_batch").open("wb") as f:
        pickle.dump({b"data": np.zeros((10, 3072), np.uint8)}, f)
    with pytest.raises(DatasetError, match=r"test_batch: missing key\(s\) \['labels'\]"):
        load_dataset(DatasetSpec(name="cifar10", path=str(tmp_path)))


def test_cifar10_garbage_file(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    (tmp_path / "batches.meta").write_bytes(b"this is not a pickle")
    with pytest.raises(DatasetError, match="batches.meta"):
        load_dataset(DatasetSpec(name="cifar10", path=str(tmp_path)))


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_forbidden_global_not_executed(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with (tmp_path / "data_batch_1").open("wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": []}, f)
    with pytest.raises(DatasetError) as e:
        load_dataset(DatasetSpec(name="cifar10", path=str(tmp_path)))
    assert "refusing to unpickle" in str(e.value) and "system" in str(e.value)
    assert "data_batch_1" in str(e.value)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- imagefolder


def _write_folder(root: Path, classes=("cat", "dog", "bird"), per_class: int = 6, mode: str = "RGB") -> None:
    rng = np.random.default_rng(0)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            w, h = 10 + 3 * i, 12 + 2 * ci
            shape = (h, w, 3) if mode == "RGB" else (h, w)
            arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
            ext = ".PNG" if i == 0 else ".png"
            Image.fromarray(arr, mode=mode).save(root / c / f"img{i}{ext}")


def test_imagefolder_rgb(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    d = load_dataset(DatasetSpec(name="imagefolder", path=str(tmp_path), image_size=16))
    assert d.class_names == ["bird", "cat", "dog"]
    assert (d.num_classes, d.in_channels, d.image_size) == (3, 3, 16)
    assert [len(d.train[1]), len(d.val[1]), len(d.test[1])] == [12, 3, 3]
    for x, y in (d.train, d.val, d.test):
        assert x.shape[1:] == (3, 16, 16)
        assert sorted(y.tolist())[:1] == [0] and set(y.tolist()) == {0, 1, 2}
    assert torch.allclose(d.train[0].mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)


def test_imagefolder_grayscale_native_size(tmp_path: Path) -> None:
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.fromarray(np.full((9, 9), 20 * i, np.uint8), mode="L").save(tmp_path / c / f"{i}.bmp")
    d = load_dataset(DatasetSpec(name="imagefolder", path=str(tmp_path), image_size=None, test_fraction=0))
    assert (d.in_channels, d.image_size) == (1, 9)
    assert len(d.train[1]) + len(d.val[1]) == 8 and len(d.test[1]) == 0


def test_imagefolder_native_size_needs_equal_sizes(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    with pytest.raises(DatasetError, match="differ in size"):
        load_dataset(DatasetSpec(name="imagefolder", path=str(tmp_path), image_size=None))


def test_imagefolder_empty_class(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError) as e:
        load_dataset(DatasetSpec(name="imagefolder", path=str(tmp_path)))
    assert "empty" in str(e.value) and "no images" in str(e.value)


def test_imagefolder_unreadable_image(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    bad = tmp_path / "dog" / "broken.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    with pytest.raises(DatasetError) as e:
        load_dataset(DatasetSpec(name="imagefolder", path=str(tmp_path)))
    assert str(bad) in str(e.value)


def test_imagefolder_path_problems(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(DatasetSpec(name="imagefolder", path=str(tmp_path / "missing")))
    f = tmp_path / "file.png"
    f.write_bytes(b"")
    with pytest.raises(DatasetError, match="not a folder"):
        load_dataset(DatasetSpec(name="imagefolder", path=str(f)))
    _write_folder(tmp_path / "one", classes=("only",))
    with pytest.raises(DatasetError, match="at least 2"):
        load_dataset(DatasetSpec(name="imagefolder", path=str(tmp_path / "one")))


def test_imagefolder_class_too_small_for_split(tmp_path: Path) -> None:
    _write_folder(tmp_path, classes=("a", "b"), per_class=2)
    with pytest.raises(DatasetError, match="'a' has only 2"):
        load_dataset(DatasetSpec(name="imagefolder", path=str(tmp_path)))
    d = load_dataset(DatasetSpec(name="imagefolder", path=str(tmp_path), test_fraction=0))
    assert len(d.train[1]) == 2 and len(d.val[1]) == 2
