"""Dataset loaders: IDX bytes written per the spec with struct, npz files, splits, registry."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys

import numpy as np
import pytest

from converters.datasets import (
    Dataset,
    load_dataset,
    load_digits,
    load_idx,
    load_npz,
    save_npz,
    synthetic,
    train_test_split,
)
from converters.errors import ConfigError, DatasetError


def _idx_bytes(array: np.ndarray, type_code: int, fmt: str) -> bytes:
    """IDX per LeCun's spec: 0x00 0x00, type byte, ndim byte, big-endian uint32 dims, big-endian
    data; each value packed with struct so the reader is not checked against NumPy's own view."""
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    return header + b"".join(struct.pack(f">{fmt}", v) for v in array.ravel().tolist())


@pytest.fixture
def idx_pair(tmp_path, rng):
    images = rng.integers(0, 256, size=(7, 5, 4)).astype(np.uint8)
    labels = rng.integers(0, 10, size=7)
    labels[0] = 9  # so max(label) + 1 == 10
    ipath, lpath = tmp_path / "images-idx3-ubyte", tmp_path / "labels-idx1-ubyte"
    ipath.write_bytes(_idx_bytes(images, 0x08, "B"))
    lpath.write_bytes(_idx_bytes(labels, 0x08, "B"))
    return images, labels, ipath, lpath


def test_load_idx_matches_the_bytes_written(idx_pair):
    images, labels, ipath, lpath = idx_pair
    ds = load_idx(ipath, lpath)
    assert ds.x.shape == (7, 1, 5, 4) and ds.x.dtype == np.float32
    assert ds.y.dtype == np.int64 and ds.num_classes == 10
    np.testing.assert_allclose(ds.x[:, 0], images / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y, labels)


def test_load_idx_reads_gzip_and_wider_types(tmp_path, rng):
    images = rng.random((3, 2, 2))  # float64 pixels in [0, 1), type 0x0E
    labels = np.array([0, 300, 2])  # int32 labels, type 0x0C
    ipath, lpath = tmp_path / "i.idx.gz", tmp_path / "l.idx"
    ipath.write_bytes(gzip.compress(_idx_bytes(images, 0x0E, "d")))
    lpath.write_bytes(_idx_bytes(labels, 0x0C, "i"))
    ds = load_idx(ipath, lpath)
    np.testing.assert_allclose(ds.x[:, 0], images.astype(np.float32))
    np.testing.assert_array_equal(ds.y, labels)
    assert ds.num_classes == 301


def _corrupt(good_images: bytes, good_labels: bytes):
    """(description, images bytes, labels bytes, which file the message must name, rule words)."""
    yield "wrong magic", b"\x01" + good_images[1:], good_labels, "images", "magic"
    bad_type = good_images[:2] + b"\x0a" + good_images[3:]
    yield "unknown type", bad_type, good_labels, "images", "type code"
    yield "truncated data", good_images[:-3], good_labels, "images", "truncated"
    yield "trailing bytes", good_images + b"\x00", good_labels, "images", "trailing"
    yield "truncated header", good_images[:9], good_labels, "images", "header truncated"
    yield "empty file", b"", good_labels, "images", "header"
    yield "label count", good_images, _idx_bytes(np.arange(6) % 3, 0x08, "B"), "labels", "count"
    yield "labels 2-D", good_images, _idx_bytes(np.zeros((7, 1), int), 0x08, "B"), "labels", "dims"
    yield "images 1-D", _idx_bytes(np.zeros(7, int), 0x08, "B"), good_labels, "images", "dims"
    neg = _idx_bytes(np.array([0, -1, 2, 0, 0, 0, 0]), 0x09, "b")
    yield "negative label", good_images, neg, "labels", ">= 0"
    floats = _idx_bytes(np.full(7, 0.5), 0x0D, "f")
    yield "float labels", good_images, floats, "labels", "integer"


@pytest.mark.parametrize("case", range(11))
def test_load_idx_rejects_bad_files_naming_file_and_rule(idx_pair, tmp_path, case):
    _, _, ipath, lpath = idx_pair
    label, ibytes, lbytes, which, rule = list(_corrupt(ipath.read_bytes(), lpath.read_bytes()))[
        case
    ]
    bad_i, bad_l = tmp_path / "bad-images", tmp_path / "bad-labels"
    bad_i.write_bytes(ibytes)
    bad_l.write_bytes(lbytes)
    with pytest.raises(DatasetError) as info:
        load_idx(bad_i, bad_l)
    msg = str(info.value)
    path = bad_i if which == "images" else bad_l
    assert f"{which} file" in msg and str(path) in msg and rule in msg, (label, msg)
    assert "\n" not in msg


def test_load_digits_equals_sklearn():
    from sklearn.datasets import load_digits as sk

    ds, ref = load_digits(), sk()
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == np.float32 and ds.num_classes == 10
    np.testing.assert_allclose(ds.x[:, 0], ref.images / 16.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y, ref.target)
    assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0


def _nearest_centroid_accuracy(train: Dataset, test: Dataset) -> float:
    xtr, xte = train.x.reshape(len(train), -1), test.x.reshape(len(test), -1)
    cents = np.stack([xtr[train.y == c].mean(axis=0) for c in range(train.num_classes)])
    pred = np.argmin(((xte[:, None, :] - cents[None]) ** 2).sum(-1), axis=1)
    return float(np.mean(pred == test.y))


def test_synthetic_is_seeded_learnable_and_in_range():
    a = synthetic(n=600, shape=(1, 8, 8), num_classes=10, seed=3)
    b = synthetic(n=600, shape=(1, 8, 8), num_classes=10, seed=3)
    c = synthetic(n=600, shape=(1, 8, 8), num_classes=10, seed=4)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)
    assert a.x.shape == (600, 1, 8, 8) and a.x.dtype == np.float32
    assert a.x.min() >= 0.0 and a.x.max() <= 1.0
    np.testing.assert_array_equal(a.class_counts(), np.full(10, 60))
    train, test = train_test_split(a, test_fraction=0.3, seed=0)
    assert _nearest_centroid_accuracy(train, test) > 0.9  # chance is 0.1
    # Shuffled labels make it unlearnable: the oracle above is not trivially passing.
    shuffled = Dataset(x=a.x, y=np.random.default_rng(0).permutation(a.y), num_classes=10, name="s")
    tr, te = train_test_split(shuffled, test_fraction=0.3, seed=0)
    assert _nearest_centroid_accuracy(tr, te) < 0.3


def test_train_test_split_is_stratified_disjoint_and_seeded():
    ds = load_digits()
    ds = Dataset(x=ds.x, y=ds.y, num_classes=10, name="d")
    train, test = train_test_split(ds, test_fraction=0.25, seed=7)
    assert len(train) + len(test) == len(ds)

    # Identify samples by their pixels: the union must be the original multiset.
    def rows(d: Dataset) -> list[bytes]:
        return [r.tobytes() + bytes([c]) for r, c in zip(d.x.reshape(len(d), -1), d.y, strict=True)]

    assert sorted(rows(train) + rows(test)) == sorted(rows(ds))
    for c, count in enumerate(ds.class_counts()):
        assert test.class_counts()[c] == round(0.25 * count)
    again, _ = train_test_split(ds, test_fraction=0.25, seed=7)
    other, _ = train_test_split(ds, test_fraction=0.25, seed=8)
    np.testing.assert_array_equal(train.y, again.y)
    assert not np.array_equal(train.x, other.x)
    with pytest.raises(ConfigError, match="test_fraction must be in \\(0, 1\\), got 1.5"):
        train_test_split(ds, test_fraction=1.5, seed=0)


def test_npz_round_trip_and_plain_files(tmp_path, rng):
    ds = synthetic(n=20, shape=(3, 4, 4), num_classes=5, seed=1)
    path = tmp_path / "data.npz"
    save_npz(ds, path)
    back = load_npz(path)
    np.testing.assert_array_equal(back.x, ds.x)
    np.testing.assert_array_equal(back.y, ds.y)
    assert (back.num_classes, back.name) == (5, ds.name)
    # A user's file with just uint8 (N, H, W) x and y: scaled and given a channel axis.
    raw = rng.integers(0, 256, (6, 4, 4)).astype(np.uint8)
    plain = tmp_path / "mine.npz"
    np.savez(plain, x=raw, y=np.array([0, 1, 2, 0, 1, 2]))
    got = load_npz(plain)
    np.testing.assert_allclose(got.x[:, 0], raw / 255.0, rtol=1e-6)
    assert (got.num_classes, got.name) == (3, "mine")


@pytest.mark.parametrize(
    "arrays,rule",
    [
        ({"x": np.full((2, 3), np.nan), "y": np.zeros(2, int)}, "x must be finite"),
        ({"x": np.zeros((2, 3)), "y": np.array([0, 4]), "num_classes": 3}, "y must be < num"),
        ({"x": np.zeros((2, 3))}, "key 'y' is required"),
        ({"x": np.zeros((2, 3)), "y": np.zeros(3, int)}, "y shape must be (2,)"),
        ({"x": np.zeros((2, 3)), "y": np.zeros(2)}, "y dtype must be integer"),
        ({"x": np.zeros(3), "y": np.zeros(3, int)}, "x must have ndim >= 2"),
        ({"x": np.zeros((2, 3), int), "y": np.zeros(2, int)}, "x dtype must be float or uint8"),
        ({"x": np.zeros((2, 3)), "y": np.array([0, -1])}, "y must be >= 0"),
    ],
)
def test_load_npz_rejects_bad_files(tmp_path, arrays, rule):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError) as info:
        load_npz(path)
    assert str(path) in str(info.value) and rule in str(info.value)


def test_dataset_validates_and_subsets():
    with pytest.raises(DatasetError, match="y must be in \\[0, 3\\)"):
        Dataset(x=np.zeros((2, 1)), y=np.array([0, 3]), num_classes=3, name="t")
    with pytest.raises(DatasetError, match="x must be finite"):
        Dataset(x=np.array([[np.inf]]), y=np.array([0]), num_classes=1, name="t")
    ds = Dataset(x=np.arange(8.0).reshape(4, 2), y=[0, 1, 1, 0], num_classes=2, name="t")
    sub = ds.subset([3, 1])
    np.testing.assert_array_equal(sub.x, [[6, 7], [2, 3]])
    np.testing.assert_array_equal(sub.y, [0, 1])
    assert len(sub) == 2 and sub.x.dtype == np.float32 and sub.y.dtype == np.int64


def test_load_dataset_registry(tmp_path, idx_pair):
    assert len(load_dataset("digits")) == 1797
    syn = load_dataset("synthetic:50", seed=2)
    np.testing.assert_array_equal(syn.x, synthetic(n=50, shape=(1, 8, 8), num_classes=10, seed=2).x)
    assert len(load_dataset("synthetic")) == 1000
    save_npz(syn, tmp_path / "s.npz")
    np.testing.assert_array_equal(load_dataset(str(tmp_path / "s.npz")).y, syn.y)
    _, labels, ipath, lpath = idx_pair
    np.testing.assert_array_equal(load_dataset(f"idx:{ipath},{lpath}").y, labels)
    with pytest.raises(ValueError) as info:
        load_dataset("cifar10")
    for option in ("digits", "synthetic", "idx", ".npz"):
        assert option in str(info.value)
    with pytest.raises(ConfigError, match="N must be an int"):
        load_dataset("synthetic:many")
    with pytest.raises(ConfigError, match="IMAGES,LABELS"):
        load_dataset("idx:only-one")


def test_datasets_import_without_torch_or_sklearn():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['sklearn'] = None; "
        "import converters.datasets, converters.partitioners"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
