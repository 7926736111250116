"""Data sets for pruneflow: load, split, resize and normalise image classification data.

Four data sets are built in (see :func:`list_datasets`):

``digits``
    scikit-learn's bundled 8x8 hand-written digits (1797 images, 10 classes, no download).
``fashion-mnist``
    Zalando's Fashion-MNIST (60,000 training and 10,000 test images, 28x28 grayscale, 10 classes) from
    the four original IDX files, by default where Debian's ``dataset-fashion-mnist`` package puts them
    (:data:`FASHION_MNIST_DIR`). Validation is carved from the training images; test is the test set.
``cifar10``
    the "CIFAR-10 python version" folder (``data_batch_1`` .. ``data_batch_5``, ``test_batch``,
    ``batches.meta``) read from local disk with a restricted unpickler.
``imagefolder``
    ``path/<class_name>/*.{png,jpg,jpeg,bmp,gif,webp}``, one sub-folder per class.

Every loader returns a :class:`DataSplits` with float32 ``[N, C, H, W]`` images normalised per channel
with the *train* split's mean and std, and int64 labels. Splits are stratified and deterministic for a
given ``split_seed``. All user-facing problems raise :class:`DatasetError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pruneflow.constants import DATASETS

if TYPE_CHECKING:  # torch is imported where tensors are made: the spec (and the benchmark worker) needs none
    import torch

__all__ = [
    "DataSplits",
    "DatasetError",
    "Augment",
    "DatasetSpec",
    "FASHION_MNIST_DIR",
    "IMAGE_EXTENSIONS",
    "dataset_cache",
    "list_datasets",
    "load_dataset",
    "load_dataset_cached",
    "register_dataset",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

#: Where Debian's dataset-fashion-mnist package installs the four IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")

_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_FILES = (*_CIFAR_TRAIN_FILES, "test_batch", "batches.meta")
_CIFAR_LAYOUT = (
    "expected the extracted 'CIFAR-10 python version' folder (cifar-10-batches-py/) containing "
    + ", ".join(_CIFAR_FILES)
)


class DatasetError(ValueError):
    """A data set cannot be loaded: missing files, malformed content, bad layout."""


class Augment(BaseModel):
    """Random augmentation of training batches (never of evaluation, recalibration or the parity images)."""

    model_config = ConfigDict(extra="forbid")

    crop_padding: int = Field(0, ge=0, le=16, description="random crop: pad each training image by this many "
                              "pixels (of the normalised mean) and crop it back at a random offset; 0 = off")
    hflip: bool = Field(False, description="flip each training image left-right with probability 0.5")


class DatasetSpec(BaseModel):
    """Which data set to load, how to split / resize it, and how its training batches are drawn."""

    model_config = ConfigDict(extra="forbid")

    name: Literal[DATASETS] = Field(  # type: ignore[valid-type]
        "digits", description="the data set: digits is built in; fashion-mnist reads Debian's dataset-fashion-mnist "
        "folder (or path); cifar10 and imagefolder read the folder given as path")
    path: str | None = Field(None, description="folder to read from; required for cifar10 and imagefolder, "
                             f"optional for fashion-mnist (default {FASHION_MNIST_DIR}), ignored for digits")
    image_size: int | None = Field(32, ge=8, le=512, description="images are resized to this many pixels square; "
                                   "empty keeps the native size")
    val_fraction: float = Field(0.2, gt=0, lt=0.5, description="fraction of the training data held out for "
                                "validation")
    test_fraction: float = Field(0.2, ge=0, lt=0.5, description="fraction held out for the test split (ignored by "
                                 "cifar10 and fashion-mnist, which have their own test set)")
    split_seed: int = Field(0, ge=0, description="seed of the train/val/test split")
    max_train_samples: int | None = Field(None, ge=1, description="keep only the first k samples of a "
                                          "deterministic stratified permutation of the train split")
    images_per_epoch: int | None = Field(None, ge=1, description="train on this many images an epoch, a fresh "
                                         "seeded sample of the train split each epoch; empty: all of it")
    augment: Augment = Field(default_factory=Augment, description="augmentation of training batches")

    #: fields that change how training draws batches, not the tensors: left out of the disk cache's key
    TRAINING_FIELDS: ClassVar[tuple[str, ...]] = ("images_per_epoch", "augment")

    def train_options(self) -> dict[str, Any]:
        """The keyword arguments of :class:`pruneflow.train.TrainOptions` this spec sets."""
        return {"images_per_epoch": self.images_per_epoch, "crop_padding": self.augment.crop_padding,
                "hflip": self.augment.hflip}

    @model_validator(mode="after")
    def _check_path(self) -> DatasetSpec:
        if self.name in ("cifar10", "imagefolder") and not (self.path and self.path.strip()):
            raise ValueError(f"'path' is required for the {self.name!r} data set (the folder to read from)")
        return self


@dataclass(repr=False)
class DataSplits:
    """Train/val/test tensors plus what a model needs to know about them."""

    name: str
    train: tuple[torch.Tensor, torch.Tensor]  # X float32 [N, C, H, W] normalised, y int64 [N]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    in_channels: int
    image_size: int  # H == W
    class_names: list[str]
    #: Per-channel mean / std (of the train split, after resizing) that were used to normalise.
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, self.in_channels, self.image_size, self.image_size)

    def __repr__(self) -> str:
        return (
            f"DataSplits(name={self.name!r}, train={len(self.train[1])}, val={len(self.val[1])}, "
            f"test={len(self.test[1])}, num_classes={self.num_classes}, input_shape={self.input_shape})"
        )


Loader = Callable[[DatasetSpec], DataSplits]
_REGISTRY: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Decorator registering ``loader(spec) -> DataSplits`` under ``name``.

    A new name must also be added to ``DatasetSpec.name``'s ``Literal`` so that specs can select it.
    """

    def decorator(fn: Loader) -> Loader:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"data set {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


def load_dataset(spec: DatasetSpec | Mapping[str, Any]) -> DataSplits:
    """Load, split, resize and normalise the data set described by ``spec``."""
    if not isinstance(spec, DatasetSpec):
        spec = DatasetSpec.model_validate(spec)
    try:
        loader = _REGISTRY[spec.name]
    except KeyError:
        raise DatasetError(
            f"unknown data set {spec.name!r}; available: {', '.join(list_datasets())}"
        ) from None
    return loader(spec)


# --------------------------------------------------------------------------------------------------
# splitting / tensor helpers shared by the loaders


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed % (2**64), stream])


def _interleave(idx: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Order ``idx`` so that every prefix is (approximately) stratified by ``y[idx]``.

    Each class is shuffled, then its i-th member gets the key (i + u_c) / n_c with a random per-class
    offset u_c; sorting by the key spreads every class evenly over the whole ordering.
    """
    if len(idx) == 0:
        return idx
    labels = y[idx]
    keys = np.empty(len(idx), dtype=np.float64)
    for c in np.unique(labels):
        pos = np.flatnonzero(labels == c)
        pos = rng.permutation(pos)
        keys[pos] = (np.arange(len(pos)) + rng.random()) / len(pos)
    return idx[np.argsort(keys, kind="stable")]


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def _stratified_split(
    y: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    class_names: list[str],
    what: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic stratified split of ``range(len(y))``; every class lands in every non-empty split."""
    rng = _rng(seed, 0)
    need = 1 + (val_fraction > 0) + (test_fraction > 0)
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        n = len(members)
        if n < need:
            name = class_names[c] if 0 <= c < len(class_names) else str(c)
            raise DatasetError(
                f"{what}: class {name!r} has only {n} sample(s); at least {need} are needed to put one "
                f"in each of train/val{'/test' if test_fraction > 0 else ''} (add images or set test_fraction: 0)"
            )
        n_test = max(1, _round_half_up(test_fraction * n)) if test_fraction > 0 else 0
        n_val = max(1, _round_half_up(val_fraction * n))
        while n - n_test - n_val < 1:  # keep at least one training sample
            if n_test > 1 and n_test >= n_val:
                n_test -= 1
            else:
                n_val -= 1
        parts[2].append(members[:n_test])
        parts[1].append(members[n_test : n_test + n_val])
        parts[0].append(members[n_test + n_val :])
    train, val, test = (
        _interleave(np.concatenate(p).astype(np.int64) if p else np.zeros(0, np.int64), y, rng) for p in parts
    )
    return train, val, test


def _limit_train(train_idx: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    # train_idx is already in a stratified (interleaved) order, so its prefix is a stratified subsample.
    if spec.max_train_samples is not None and spec.max_train_samples < len(train_idx):
        return train_idx[: spec.max_train_samples]
    return train_idx


def _to_tensor(x: np.ndarray, scale: float, size: int, chunk: int = 4096) -> torch.Tensor:
    """uint8/float ``[N, C, H, W]`` numpy -> float32 tensor in [0, 1] resized to ``size`` x ``size``."""
    import torch

    n, c, h, w = x.shape
    if (h, w) == (size, size):
        out = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32)
        return out.mul_(scale)
    out = torch.empty((n, c, size, size), dtype=torch.float32)
    antialias = size < min(h, w)
    for start in range(0, n, chunk):
        part = torch.from_numpy(np.ascontiguousarray(x[start : start + chunk])).to(torch.float32).mul_(scale)
        out[start : start + chunk] = torch.nn.functional.interpolate(
            part, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias
        )
    return out


def _assemble(
    name: str,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    class_names: list[str],
    scale: float,
    size: int,
) -> DataSplits:
    """Convert numpy splits to tensors and normalise every split with the train split's statistics."""
    import torch

    tensors = {
        k: (_to_tensor(x, scale, size), torch.from_numpy(y.astype(np.int64))) for k, (x, y) in splits.items()
    }
    x_train = tensors["train"][0]
    std, mean = torch.std_mean(x_train, dim=(0, 2, 3), correction=0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant channel: only centre it
    m = mean.view(1, -1, 1, 1)
    s = std.view(1, -1, 1, 1)
    for x, _ in tensors.values():
        x.sub_(m).div_(s)
    c = x_train.shape[1]
    return DataSplits(
        name=name,
        train=tensors["train"],
        val=tensors["val"],
        test=tensors["test"],
        num_classes=len(class_names),
        in_channels=c,
        image_size=size,
        class_names=list(class_names),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
    )


# --------------------------------------------------------------------------------------------------
# digits


@register_dataset("digits")
def _load_digits(spec: DatasetSpec) -> DataSplits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)[:, None, :, :]  # [1797, 1, 8, 8], values 0..16
    y = np.asarray(bunch.target, dtype=np.int64)
    class_names = [str(i) for i in range(10)]
    train, val, test = _stratified_split(
        y, spec.val_fraction, spec.test_fraction, spec.split_seed, class_names, "digits"
    )
    train = _limit_train(train, spec)
    size = spec.image_size or images.shape[-1]
    parts = {k: (images[idx], y[idx]) for k, idx in (("train", train), ("val", val), ("test", test))}
    return _assemble("digits", parts, class_names, 1.0 / 16.0, size)


# --------------------------------------------------------------------------------------------------
# CIFAR-10 (python version), read with a restricted unpickler


def _numpy_global(module: str, name: str) -> Any:
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        # numpy < 2 has no numpy._core, numpy >= 2 keeps numpy.core only as a deprecated alias.
        alt = (
            module.replace("numpy._core", "numpy.core")
            if "._core" in module
            else module.replace("numpy.core", "numpy._core")
        )
        return getattr(importlib.import_module(alt), name)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles written with protocol < 3 store bytes as _codecs.encode(text, "latin1").
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise DatasetError(f"refusing to decode bytes with codec {encoding!r} while unpickling")
    return text.encode("latin1")


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_global(
        "numpy._core.multiarray", "_reconstruct"
    ),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_global(
        "numpy._core.multiarray", "_reconstruct"
    ),
    ("numpy.core.multiarray", "scalar"): lambda: _numpy_global("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): lambda: _numpy_global("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_global("numpy._core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_global("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays (all a CIFAR-10 batch contains)."""

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise DatasetError(
                f"refusing to unpickle global '{module}.{name}': CIFAR-10 batches only contain dicts, lists and "
                "numpy arrays, so this file is not a CIFAR-10 batch (and may be malicious)"
            )
        return factory()


def _read_cifar_pickle(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
    except DatasetError as e:
        raise DatasetError(f"{path}: {e}") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        OSError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
    ) as e:
        raise DatasetError(
            f"{path}: cannot read as a CIFAR-10 python batch ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_cifar_pickle(path)
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        raise DatasetError(
            f"{path}: missing key(s) {missing}; found {sorted(batch)}; expected b'data' (uint8 [N, 3072]) "
            "and b'labels' (N ints)"
        )
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = (
            f"{data.dtype} array of shape {list(data.shape)}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise DatasetError(
            f"{path}: 'data' is a {got}; expected a uint8 array of shape [N, 3072] (3x32x32 images)"
        )
    try:
        labels = np.asarray(batch["labels"])
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{path}: 'labels' is not a list of ints ({e})") from None
    if labels.ndim != 1 or len(labels) != len(data) or (len(labels) and labels.dtype.kind not in "iu"):
        raise DatasetError(
            f"{path}: 'labels' has shape {list(labels.shape)} (dtype {labels.dtype}); expected {len(data)} ints "
            "(one per image)"
        )
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"{path}: labels range from {labels.min()} to {labels.max()}; expected 0..{num_classes - 1}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_folder(spec: DatasetSpec) -> Path:
    root = Path(str(spec.path)).expanduser()
    if not root.exists():
        raise DatasetError(f"cifar10: folder {root} does not exist; {_CIFAR_LAYOUT}")
    if not root.is_dir():
        hint = (
            " (extract it first: tar xzf cifar-10-python.tar.gz)"
            if root.name.endswith((".tar.gz", ".tgz"))
            else ""
        )
        raise DatasetError(f"cifar10: {root} is not a folder{hint}; {_CIFAR_LAYOUT}")
    nested = root / "cifar-10-batches-py"
    if not (root / "data_batch_1").exists() and nested.is_dir():
        root = nested
    missing = [f for f in _CIFAR_FILES if not (root / f).is_file()]
    if missing:
        raise DatasetError(f"cifar10: {root} is missing {', '.join(missing)}; {_CIFAR_LAYOUT}")
    return root


@register_dataset("cifar10")
def _load_cifar10(spec: DatasetSpec) -> DataSplits:
    root = _cifar_folder(spec)
    meta_path = root / "batches.meta"
    meta = _read_cifar_pickle(meta_path)
    names = meta.get("label_names")
    if not isinstance(names, list | tuple) or not names or not all(isinstance(n, bytes | str) for n in names):
        raise DatasetError(
            f"{meta_path}: expected b'label_names' to be a list of class names (10 for CIFAR-10), "
            f"found {type(names).__name__ if names is not None else 'nothing'}"
        )
    class_names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]

    xs, ys = zip(*(_cifar_batch(root / f, len(class_names)) for f in _CIFAR_TRAIN_FILES), strict=True)
    x_all, y_all = np.concatenate(xs), np.concatenate(ys)
    x_test, y_test = _cifar_batch(root / "test_batch", len(class_names))

    train, val, _ = _stratified_split(
        y_all, spec.val_fraction, 0.0, spec.split_seed, class_names, f"cifar10 ({root})"
    )
    train = _limit_train(train, spec)
    parts = {
        "train": (x_all[train], y_all[train]),
        "val": (x_all[val], y_all[val]),
        "test": (x_test, y_test),
    }
    return _assemble("cifar10", parts, class_names, 1.0 / 255.0, spec.image_size or 32)


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST: the four original IDX files (gzip-compressed or not)

_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC = 2051, 2049  # 0x00000803 (ubyte, 3 dims), 0x00000801 (ubyte, 1 dim)
_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _idx_path(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DatasetError(f"fashion-mnist: {root} has no {stem}.gz (nor {stem}); expected the four IDX files "
                       + ", ".join(f"{f}.gz" for pair in _FASHION_FILES.values() for f in pair)
                       + f" (apt-get install {FASHION_MNIST_PACKAGE} puts them in {FASHION_MNIST_DIR})")


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """An IDX file of unsigned bytes (``magic`` 2051: images [N, rows, cols]; 2049: labels [N]), checked:
    its magic number, and a body exactly as long as its header says. DatasetError names the file."""
    import gzip

    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DatasetError(f"{path}: cannot read it as {'gzip' if path.suffix == '.gz' else 'IDX'} ({exc})") from None
    ndim = 3 if magic == _IDX_IMAGES_MAGIC else 1
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise DatasetError(f"{path}: {len(raw)} bytes, shorter than an IDX header ({header} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        kind = "images" if magic == _IDX_IMAGES_MAGIC else "labels"
        raise DatasetError(f"{path}: magic number {found:#010x}, expected {magic:#010x} (IDX {kind} of unsigned bytes)")
    dims = [int.from_bytes(raw[4 * (1 + i):4 * (2 + i)], "big") for i in range(ndim)]
    expected = int(np.prod(dims))
    body = len(raw) - header
    if body != expected:
        raise DatasetError(f"{path}: header says {' x '.join(map(str, dims))} = {expected} bytes of data, the file has "
                           f"{body} ({'truncated' if body < expected else 'trailing bytes'})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()  # writable, for torch


def _fashion_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = (_idx_path(root, f) for f in _FASHION_FILES[split])
    x = read_idx(images_file, _IDX_IMAGES_MAGIC)
    y = read_idx(labels_file, _IDX_LABELS_MAGIC)
    if x.shape[1:] != (28, 28):
        raise DatasetError(f"{images_file}: images of {x.shape[1]}x{x.shape[2]} pixels, expected 28x28")
    if len(x) != len(y):
        raise DatasetError(f"{images_file} holds {len(x)} images but {labels_file} {len(y)} labels")
    bad = np.flatnonzero(y >= len(FASHION_MNIST_CLASSES))
    if bad.size:
        raise DatasetError(f"{labels_file}: label {int(y[bad[0]])} at index {int(bad[0])} ({bad.size} in all); "
                           f"labels must be 0-{len(FASHION_MNIST_CLASSES) - 1}")
    return x[:, None, :, :], y.astype(np.int64)


@register_dataset("fashion-mnist")
def _load_fashion_mnist(spec: DatasetSpec) -> DataSplits:
    root = Path(spec.path or FASHION_MNIST_DIR).expanduser()
    if not root.is_dir():
        hint = (f"install Debian's {FASHION_MNIST_PACKAGE} package (apt-get install {FASHION_MNIST_PACKAGE}), "
                "or give dataset.path" if spec.path is None else "expected the folder of the four IDX files")
        raise DatasetError(f"fashion-mnist: folder {root} does not exist; {hint}")
    x_all, y_all = _fashion_split(root, "train")
    x_test, y_test = _fashion_split(root, "test")
    class_names = list(FASHION_MNIST_CLASSES)
    train, val, _ = _stratified_split(y_all, spec.val_fraction, 0.0, spec.split_seed, class_names,
                                      f"fashion-mnist ({root})")
    train = _limit_train(train, spec)
    parts = {"train": (x_all[train], y_all[train]), "val": (x_all[val], y_all[val]), "test": (x_test, y_test)}
    return _assemble("fashion-mnist", parts, class_names, 1.0 / 255.0, spec.image_size or 28)


# --------------------------------------------------------------------------------------------------
# image folder


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()


@register_dataset("imagefolder")
def _load_imagefolder(spec: DatasetSpec) -> DataSplits:
    from PIL import Image, ImageOps, UnidentifiedImageError

    root = Path(str(spec.path)).expanduser()
    layout = f"expected one sub-folder per class holding images ({', '.join(IMAGE_EXTENSIONS)}), e.g. {root}/cat/001.png"
    if not root.exists():
        raise DatasetError(f"imagefolder: path {root} does not exist; {layout}")
    if not root.is_dir():
        raise DatasetError(f"imagefolder: path {root} is not a folder; {layout}")
    class_dirs = sorted(
        (d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name
    )
    if len(class_dirs) < 2:
        found = ", ".join(d.name for d in class_dirs) or "none"
        raise DatasetError(
            f"imagefolder: {root} has {len(class_dirs)} class folder(s) ({found}); need at least 2; {layout}"
        )

    files: list[Path] = []
    labels: list[int] = []
    for label, d in enumerate(class_dirs):
        imgs = sorted((p for p in d.rglob("*") if _is_image(p)), key=lambda p: p.as_posix())
        if not imgs:
            raise DatasetError(
                f"imagefolder: class folder {d} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                "any case)"
            )
        files += imgs
        labels += [label] * len(imgs)

    errors = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)

    # Pass 1: read headers only (mode and size) to pick the channel count and check sizes.
    modes: set[str] = set()
    sizes: dict[tuple[int, int], Path] = {}
    for f in files:
        try:
            with Image.open(f) as im:
                modes.add(im.mode)
                sizes.setdefault(im.size, f)
        except errors as e:
            raise DatasetError(f"imagefolder: cannot read image {f}: {e}") from None
    mode = "L" if modes == {"L"} else "RGB"
    if spec.image_size is None:
        if len(sizes) > 1:
            (s1, f1), (s2, f2) = list(sizes.items())[:2]
            raise DatasetError(
                f"imagefolder: image_size is None (keep native size) but images differ in size: {f1} is "
                f"{s1[0]}x{s1[1]}, {f2} is {s2[0]}x{s2[1]}; set image_size to resize them all"
            )
        (w, h), f1 = next(iter(sizes.items()))
        if w != h:
            raise DatasetError(
                f"imagefolder: image_size is None but the images are not square ({w}x{h}, e.g. {f1}); "
                "set image_size to resize them"
            )
        size = w
    else:
        size = spec.image_size

    # Pass 2: decode, convert, resize.
    channels = 1 if mode == "L" else 3
    x = np.empty((len(files), size, size, channels), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = ImageOps.exif_transpose(im)
                if im.mode != mode:
                    if im.mode in ("P", "PA", "LA", "1") or "transparency" in im.info:
                        im = im.convert("RGBA")
                    im = im.convert(mode)
                if im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except errors as e:
            raise DatasetError(f"imagefolder: cannot read image {f}: {e}") from None
        x[i] = arr.reshape(size, size, channels)
    x = x.transpose(0, 3, 1, 2)  # NCHW view; _to_tensor makes it contiguous
    y = np.asarray(labels, dtype=np.int64)
    class_names = [d.name for d in class_dirs]

    train, val, test = _stratified_split(
        y, spec.val_fraction, spec.test_fraction, spec.split_seed, class_names, f"imagefolder ({root})"
    )
    train = _limit_train(train, spec)
    parts = {k: (x[idx], y[idx]) for k, idx in (("train", train), ("val", val), ("test", test))}
    return _assemble("imagefolder", parts, class_names, 1.0 / 255.0, size)


# ----------------------------------------------------------------------------------------- caching

#: Folder of the on-disk data set cache, or None (no disk cache). Set with :func:`dataset_cache`; the
#: Airflow tasks use one so that each task process does not import scikit-learn and resize the data set
#: again (about 1-2 s of CPU a task).
_CACHE_DIR: Path | None = None
#: Data sets whose content follows from their spec and the installed packages alone (no user folder that
#: could change under the cache): only these are cached on disk.
_DISK_CACHEABLE = ("digits", "fashion-mnist")


def _tensor_key(spec: DatasetSpec) -> str:
    """The spec as far as it decides the tensors (how training draws batches does not)."""
    return spec.model_dump_json(exclude=set(DatasetSpec.TRAINING_FIELDS))


@contextlib.contextmanager
def dataset_cache(folder: str | Path | None):
    """Within the block, built-in data sets are cached on disk in ``folder`` (None: not cached), keyed by
    their spec, the source of this module and the versions of the packages that build them, so a changed
    loader or package never serves stale tensors. Restores the previous setting after it."""
    global _CACHE_DIR
    before = _CACHE_DIR
    _CACHE_DIR = Path(folder) if folder else None
    try:
        yield
    finally:
        _CACHE_DIR = before


def _cache_file(spec: DatasetSpec, folder: Path | None) -> Path | None:
    if folder is None or spec.name not in _DISK_CACHEABLE:
        return None
    h = hashlib.sha256(_tensor_key(spec).encode())
    h.update(Path(__file__).read_bytes())
    if spec.name == "fashion-mnist":  # files on disk: replaced files must not be served from a stale cache
        root = Path(spec.path or FASHION_MNIST_DIR).expanduser()
        for stem in (f for pair in _FASHION_FILES.values() for f in pair):
            with contextlib.suppress(DatasetError, OSError):
                st = _idx_path(root, stem).stat()
                h.update(f"{stem}:{st.st_size}:{st.st_mtime_ns}".encode())
    for pkg in ("torch", "numpy", "scikit-learn"):
        try:
            h.update(f"{pkg}={metadata.version(pkg)}".encode())
        except metadata.PackageNotFoundError:
            pass
    return folder / f"{spec.name}-{h.hexdigest()[:20]}.pt"


def _read_cache(path: Path) -> DataSplits | None:
    if not path.is_file():
        return None
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return DataSplits(**{**payload, **{k: tuple(payload[k]) for k in ("train", "val", "test", "mean", "std")}})
    except Exception:  # unreadable (a torn or foreign file): load from the source and rewrite it
        return None


def _load_disk_cached(spec: DatasetSpec, folder: Path | None) -> DataSplits:
    path = _cache_file(spec, folder)
    if path is None:
        return load_dataset(spec)
    data = _read_cache(path)
    if data is not None:
        return data
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    # Concurrent tasks that miss the cache wait for the first one to build the data set, not all build it.
    with FileLock(str(path) + ".lock"):
        data = _read_cache(path)
        if data is not None:
            return data
        data = load_dataset(spec)
        import torch

        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            torch.save({f.name: getattr(data, f.name) for f in dataclasses.fields(data)}, tmp)
            tmp.replace(path)  # atomic: a reader without the lock sees the old file, the new one or none
        except OSError:
            tmp.unlink(missing_ok=True)
    return data


@functools.lru_cache(maxsize=4)
def _load_memory_cached(spec_json: str, folder: Path | None) -> DataSplits:
    return _load_disk_cached(DatasetSpec.model_validate_json(spec_json), folder)


def load_dataset_cached(spec: DatasetSpec) -> DataSplits:
    """:func:`load_dataset`, loaded once per process (the stages of an in-process trial share it), and once
    per machine for the built-in data sets within :func:`dataset_cache`. Callers must not modify the tensors."""
    return _load_memory_cached(_tensor_key(spec), _CACHE_DIR)
