"""Image-classification datasets as NumPy arrays: bundled digits, synthetic, IDX and npz files."""

from __future__ import annotations

import gzip
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from converters.errors import ConfigError, DatasetError

__all__ = [
    "DATASETS",
    "Dataset",
    "load_dataset",
    "load_digits",
    "load_idx",
    "load_npz",
    "save_npz",
    "synthetic",
    "train_test_split",
]

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"); data is big-endian.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Dataset:
    """Labelled samples held in memory.

    Attributes:
        x: float32 samples, ``(N, C, H, W)`` for images (any ``(N, ...)`` with ndim >= 2 works).
        y: int64 labels, shape ``(N,)``, each in ``[0, num_classes)``.
        num_classes: number of classes the labels index into (>= 1).
        name: short human-readable name, kept by ``subset`` and the splits.

    Arrays are converted to float32 / int64 on construction; integer-valued float labels are
    accepted, anything else raises DatasetError.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        x = np.asarray(self.x)
        y = np.asarray(self.y)
        where = f"dataset {self.name!r}"
        if x.ndim < 2:
            raise DatasetError(f"{where}: x must have ndim >= 2 (N, ...), got shape {x.shape}")
        if x.dtype.kind not in "fiub":
            raise DatasetError(f"{where}: x must be numeric, got dtype {x.dtype}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DatasetError(
                f"{where}: y must have shape ({x.shape[0]},) to match x, got {y.shape}"
            )
        if y.dtype.kind == "f":
            if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
                raise DatasetError(f"{where}: y must hold integer labels, got non-integer floats")
        elif y.dtype.kind not in "iu":
            raise DatasetError(f"{where}: y must be integer labels, got dtype {y.dtype}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int | np.integer):
            raise DatasetError(f"{where}: num_classes must be an int, got {self.num_classes!r}")
        if self.num_classes < 1:
            raise DatasetError(f"{where}: num_classes must be >= 1, got {self.num_classes}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.ascontiguousarray(y, dtype=np.int64)
        if not np.all(np.isfinite(x)):
            raise DatasetError(f"{where}: x must be finite, found NaN or Inf")
        if y.size and (y.min() < 0 or y.max() >= self.num_classes):
            raise DatasetError(
                f"{where}: y must be in [0, {self.num_classes}), got range [{y.min()}, {y.max()}]"
            )
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "num_classes", int(self.num_classes))

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: np.ndarray | list[int] | slice) -> Dataset:
        """Returns the samples at ``idx`` (indices, boolean mask or slice) as a new Dataset."""
        if not isinstance(idx, slice):
            idx = np.asarray(idx)
            if idx.dtype.kind not in "iub":
                raise DatasetError(f"subset index must be integer or boolean, got {idx.dtype}")
        return Dataset(x=self.x[idx], y=self.y[idx], num_classes=self.num_classes, name=self.name)

    def class_counts(self) -> np.ndarray:
        """Returns the number of samples per class, shape ``(num_classes,)``."""
        return np.bincount(self.y, minlength=self.num_classes)


def load_digits() -> Dataset:
    """Returns scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), x in [0, 1].

    The images hold integers 0..16, so ``x = images / 16`` with shape ``(N, 1, 8, 8)``.
    """
    from sklearn.datasets import load_digits as _sk_load_digits  # heavy; only when asked for

    bunch = _sk_load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    return Dataset(x=x, y=bunch.target.astype(np.int64), num_classes=10, name="digits")


def synthetic(
    *, n: int, shape: tuple[int, ...], num_classes: int, seed: int, noise: float = 0.2
) -> Dataset:
    """Returns a learnable synthetic dataset: each class has its own mean image plus noise.

    Class means are drawn uniformly in [0.25, 0.75] per feature; samples add Gaussian noise of
    standard deviation ``noise`` and are clipped to [0, 1], like the image loaders. Labels cycle
    through the classes (then get shuffled), so every class appears when ``n >= num_classes``.

    Args:
        n: number of samples (>= 1).
        shape: per-sample shape, e.g. ``(1, 8, 8)``.
        num_classes: number of classes (>= 1).
        seed: seed of the generator; the same arguments always give the same data.
        noise: noise standard deviation (>= 0).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"synthetic n must be an int >= 1, got {n!r}")
    shape = tuple(shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ConfigError(f"synthetic shape must be a non-empty tuple of ints >= 1, got {shape}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"synthetic num_classes must be an int >= 1, got {num_classes!r}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ConfigError(f"synthetic noise must be finite and >= 0, got {noise}")
    rng = np.random.default_rng(seed)
    means = rng.uniform(0.25, 0.75, size=(num_classes, *shape))
    y = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    x = means[y] + noise * rng.standard_normal((n, *shape))
    x = np.clip(x, 0.0, 1.0).astype(np.float32)
    return Dataset(x=x, y=y, num_classes=num_classes, name=f"synthetic{n}")


def _read_idx(path: str | os.PathLike, *, role: str) -> np.ndarray:
    """Parses one IDX file (gzip detected by its magic bytes) into a native-endian array."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{role} file {path!r}: cannot read: {exc}") from exc
    if len(raw) < 4:
        raise DatasetError(f"{role} file {path!r}: header must be >= 4 bytes, got {len(raw)}")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0:
        raise DatasetError(
            f"{role} file {path!r}: magic must start with two zero bytes, got 0x{zero:04x}"
        )
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise DatasetError(
            f"{role} file {path!r}: magic type code must be one of {known}, got 0x{code:02X}"
        )
    if ndim < 1:
        raise DatasetError(f"{role} file {path!r}: magic ndim must be >= 1, got {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(
            f"{role} file {path!r}: header truncated, need {header} bytes for {ndim} dims, "
            f"got {len(raw)}"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    body = len(raw) - header
    if body != expected:
        problem = "truncated" if body < expected else "has trailing bytes"
        raise DatasetError(
            f"{role} file {path!r}: data {problem}: dims {dims} of {dtype.name} need "
            f"{expected} bytes, got {body}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def load_idx(
    images_path: str | os.PathLike,
    labels_path: str | os.PathLike,
    *,
    num_classes: int | None = None,
    name: str = "idx",
) -> Dataset:
    """Loads an MNIST-style pair of IDX files (optionally gzipped).

    Images must be 3-D ``(N, H, W)`` or 4-D ``(N, C, H, W)``; unsigned-byte images are scaled by
    1/255, float images must already lie in [0, 1]. Labels must be a 1-D integer IDX file with the
    same N and non-negative values.

    Args:
        images_path: IDX images file (e.g. ``train-images-idx3-ubyte[.gz]``).
        labels_path: IDX labels file (e.g. ``train-labels-idx1-ubyte[.gz]``).
        num_classes: number of classes; inferred as ``max(label) + 1`` when None.
        name: name given to the Dataset.

    Raises:
        DatasetError: naming the file, the field and the rule that was broken.
    """
    images = _read_idx(images_path, role="images")
    labels = _read_idx(labels_path, role="labels")
    ipath, lpath = os.fspath(images_path), os.fspath(labels_path)
    if images.ndim not in (3, 4):
        raise DatasetError(
            f"images file {ipath!r}: dims must be (N, H, W) or (N, C, H, W), got {images.shape}"
        )
    if labels.ndim != 1:
        raise DatasetError(f"labels file {lpath!r}: dims must be (N,), got {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise DatasetError(f"labels file {lpath!r}: type must be an integer, got {labels.dtype}")
    if labels.shape[0] != images.shape[0]:
        raise DatasetError(
            f"labels file {lpath!r}: label count must equal image count "
            f"{images.shape[0]} in {ipath!r}, got {labels.shape[0]}"
        )
    if labels.size and labels.min() < 0:
        raise DatasetError(f"labels file {lpath!r}: labels must be >= 0, got {labels.min()}")
    if images.dtype == np.uint8:
        x = images.astype(np.float32) / np.float32(255.0)
    elif images.dtype.kind == "f":
        if not np.all(np.isfinite(images)) or images.min() < 0 or images.max() > 1:
            raise DatasetError(f"images file {ipath!r}: float pixels must be finite and in [0, 1]")
        x = images.astype(np.float32)
    else:
        raise DatasetError(
            f"images file {ipath!r}: pixel type must be unsigned byte or float, got {images.dtype}"
        )
    if x.ndim == 3:
        x = x[:, None, :, :]
    inferred = int(labels.max()) + 1 if labels.size else 1
    if num_classes is None:
        num_classes = inferred
    elif num_classes < inferred:
        raise DatasetError(
            f"labels file {lpath!r}: labels must be < num_classes={num_classes}, got {inferred - 1}"
        )
    return Dataset(x=x, y=labels.astype(np.int64), num_classes=num_classes, name=name)


def load_npz(path: str | os.PathLike) -> Dataset:
    """Loads a Dataset from an ``.npz`` file.

    Keys: ``x`` (float, or uint8 scaled by 1/255; shape ``(N, ...)``, ``(N, H, W)`` gets a channel
    axis), ``y`` (integer, shape ``(N,)``), and optionally ``num_classes`` (scalar int; inferred as
    ``max(y) + 1`` when absent) and ``name`` (scalar string; defaults to the file's stem).

    Raises:
        DatasetError: naming the file, the field and the rule that was broken.
    """
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DatasetError(f"npz file {path!r}: cannot read: {exc}") from exc
    for key in ("x", "y"):
        if key not in arrays:
            raise DatasetError(
                f"npz file {path!r}: key {key!r} is required, found {sorted(arrays)}"
            )
    x, y = arrays["x"], arrays["y"]
    if x.ndim < 2:
        raise DatasetError(f"npz file {path!r}: x must have ndim >= 2 (N, ...), got {x.shape}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / np.float32(255.0)
    elif x.dtype.kind != "f":
        raise DatasetError(f"npz file {path!r}: x dtype must be float or uint8, got {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise DatasetError(f"npz file {path!r}: x must be finite, found NaN or Inf")
    if x.ndim == 3:
        x = x[:, None, :, :]
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DatasetError(
            f"npz file {path!r}: y shape must be ({x.shape[0]},) to match x, got {y.shape}"
        )
    if y.dtype.kind not in "iu":
        raise DatasetError(f"npz file {path!r}: y dtype must be integer, got {y.dtype}")
    if y.size and y.min() < 0:
        raise DatasetError(f"npz file {path!r}: y must be >= 0, got {y.min()}")
    inferred = int(y.max()) + 1 if y.size else 1
    if "num_classes" in arrays:
        nc = arrays["num_classes"]
        if nc.shape != () or nc.dtype.kind not in "iu":
            raise DatasetError(f"npz file {path!r}: num_classes must be a scalar int, got {nc!r}")
        num_classes = int(nc)
        if num_classes < inferred:
            raise DatasetError(
                f"npz file {path!r}: y must be < num_classes={num_classes}, got {inferred - 1}"
            )
    else:
        num_classes = inferred
    stem = os.path.splitext(os.path.basename(path))[0]
    name = str(arrays["name"]) if "name" in arrays else stem
    return Dataset(x=x, y=y.astype(np.int64), num_classes=num_classes, name=name)


def save_npz(ds: Dataset, path: str | os.PathLike) -> None:
    """Writes ``ds`` to ``path`` exactly (no suffix added) in the layout ``load_npz`` reads."""
    with open(os.fspath(path), "wb") as f:
        np.savez(f, x=ds.x, y=ds.y, num_classes=np.int64(ds.num_classes), name=np.str_(ds.name))


def train_test_split(ds: Dataset, *, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Splits ``ds`` into (train, test), stratified by label.

    Each class puts ``round(test_fraction * count)`` of its samples into test, but keeps at least
    one in train; both splits are shuffled with ``seed``.

    Raises:
        ConfigError: if test_fraction is not in (0, 1) or a split would be empty.
    """
    if not (isinstance(test_fraction, int | float) and 0 < test_fraction < 1):
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in range(ds.num_classes):
        idx = rng.permutation(np.flatnonzero(ds.y == c))
        n_test = min(int(round(test_fraction * idx.size)), max(idx.size - 1, 0))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train = rng.permutation(np.concatenate(train_idx))
    test = rng.permutation(np.concatenate(test_idx))
    if train.size == 0 or test.size == 0:
        raise ConfigError(
            f"test_fraction={test_fraction} leaves an empty split for {len(ds)} samples; "
            "use more samples or another fraction"
        )
    return ds.subset(train), ds.subset(test)


def _load_synthetic(param: str | None, seed: int) -> Dataset:
    n = 1000
    if param is not None:
        try:
            n = int(param)
        except ValueError:
            raise ConfigError(
                f"dataset='synthetic:{param}': N must be an int, got {param!r}"
            ) from None
    # Digits-like by default, so a synthetic run exercises the same models.
    return synthetic(n=n, shape=(1, 8, 8), num_classes=10, seed=seed)


def _load_digits_spec(param: str | None, seed: int) -> Dataset:
    if param is not None:
        raise ConfigError(f"dataset='digits:{param}': digits takes no parameter")
    return load_digits()


def _load_idx_spec(param: str | None, seed: int) -> Dataset:
    parts = (param or "").split(",")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"dataset='idx:{param}': expected 'idx:IMAGES,LABELS'")
    return load_idx(parts[0], parts[1])


# Named datasets; each loader takes (parameter after ':', seed).
DATASETS: dict[str, Callable[[str | None, int], Dataset]] = {
    "digits": _load_digits_spec,
    "idx": _load_idx_spec,
    "synthetic": _load_synthetic,
}


def load_dataset(spec: str, *, seed: int = 0) -> Dataset:
    """Loads a dataset by name or path.

    Args:
        spec: ``"digits"``; ``"synthetic"`` or ``"synthetic:N"`` (N samples, default 1000, shaped
            like digits); ``"idx:IMAGES,LABELS"`` (MNIST IDX pair); or a path ending in ``.npz``.
        seed: seed for generated datasets.

    Raises:
        ConfigError: (a ValueError) for an unknown spec, listing the known options.
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"dataset must be a non-empty string, got {spec!r}")
    if spec.lower().endswith(".npz"):
        return load_npz(spec)
    name, sep, param = spec.partition(":")
    if name in DATASETS:
        return DATASETS[name](param if sep else None, seed)
    options = ", ".join(sorted(DATASETS)) + ", a path ending in .npz"
    raise ConfigError(f"dataset={spec!r} unknown; valid options: {options}")
