"""Federated partitioners: disjoint covering splits, label skew measured against alpha, shards."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from converters.datasets import load_digits
from converters.errors import ConfigError
from converters.partitioners import PARTITIONERS, parse_scheme, partition


@pytest.fixture(scope="module")
def digits_y() -> np.ndarray:
    return load_digits().y


def _entropy(labels: np.ndarray, num_classes: int) -> float:
    p = np.bincount(labels, minlength=num_classes) / labels.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _check_partition(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    assert all(p.dtype == np.int64 and p.size > 0 for p in parts)
    joined = np.concatenate(parts)
    assert joined.size == n  # disjoint: no index twice ...
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))  # ... and covering


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 6), min_size=1, max_size=300),
    scheme=st.sampled_from(["iid", "dirichlet:0.01", "dirichlet:0.5", "dirichlet:50", "shards:2"]),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_every_scheme_is_disjoint_covering_and_nonempty(labels, scheme, seed, data):
    y = np.array(labels, dtype=np.int64)
    low, high = 1, min(y.size, 40)
    if scheme.startswith("shards"):  # 2 single-label shards per client: labels <= 2 * clients
        low, high = (np.unique(y).size + 1) // 2, min(y.size // 2, 40)
        assume(low <= high)
    num_clients = data.draw(st.integers(low, high), label="num_clients")
    parts = partition(y, num_clients=num_clients, scheme=scheme, seed=seed)
    _check_partition(parts, y.size, num_clients)


def test_iid_label_histograms_match_global(digits_y):
    parts = partition(digits_y, num_clients=5, scheme="iid", seed=0)
    glob = np.bincount(digits_y, minlength=10) / digits_y.size
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    for p in parts:
        local = np.bincount(digits_y[p], minlength=10) / p.size
        # ~360 samples per client: a proportion's std is ~0.016, so 0.08 is a 5-sigma bound.
        assert np.max(np.abs(local - glob)) < 0.08
    skewed = partition(digits_y, num_clients=5, scheme="dirichlet:0.05", seed=0)
    worst = max(
        np.max(np.abs(np.bincount(digits_y[p], minlength=10) / p.size - glob)) for p in skewed
    )
    assert worst > 0.2  # the same bound would catch a skewed split


def test_dirichlet_skew_decreases_monotonically_with_alpha(digits_y):
    alphas = [0.05, 0.3, 2.0, 100.0]
    mean_entropy = []
    for alpha in alphas:
        per_seed = []
        for seed in range(3):
            parts = partition(digits_y, num_clients=10, scheme=f"dirichlet:{alpha}", seed=seed)
            _check_partition(parts, digits_y.size, 10)
            per_seed.append(np.mean([_entropy(digits_y[p], 10) for p in parts]))
        mean_entropy.append(float(np.mean(per_seed)))
    assert all(a < b for a, b in zip(mean_entropy, mean_entropy[1:], strict=False)), mean_entropy
    assert mean_entropy[0] < 0.5 * np.log(10)  # strongly skewed
    assert mean_entropy[-1] > 0.97 * np.log(10)  # near uniform, like IID


def test_dirichlet_fills_every_client_even_when_clients_outnumber_classes():
    y = np.repeat(np.arange(3), 40)
    parts = partition(y, num_clients=30, scheme="dirichlet:0.001", seed=5)
    _check_partition(parts, y.size, 30)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_give_each_client_at_most_k_labels(digits_y, k):
    parts = partition(digits_y, num_clients=20, scheme=f"shards:{k}", seed=1)
    _check_partition(parts, digits_y.size, 20)
    labels_per_client = [np.unique(digits_y[p]).size for p in parts]
    assert max(labels_per_client) <= k
    # Shards are about N / (clients * K) each, so clients are roughly balanced.
    sizes = np.array([p.size for p in parts])
    assert sizes.max() <= 1.5 * sizes.min()
    if k == 2:  # McMahan's default: most clients really do see two labels
        assert np.mean(np.array(labels_per_client) == 2) > 0.5


def test_shards_default_is_two_and_needs_enough_shards(digits_y):
    assert parse_scheme("shards") == ("shards", 2)
    a = partition(digits_y, num_clients=10, scheme="shards", seed=3)
    b = partition(digits_y, num_clients=10, scheme="shards:2", seed=3)
    for p, q in zip(a, b, strict=True):
        np.testing.assert_array_equal(p, q)
    with pytest.raises(ConfigError, match="num_clients \\* K = 4 must be >= the number of labels"):
        partition(digits_y, num_clients=2, scheme="shards:2", seed=0)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.5", "shards:2"])
def test_seeds_are_reproducible(digits_y, scheme):
    a = partition(digits_y, num_clients=8, scheme=scheme, seed=11)
    b = partition(digits_y, num_clients=8, scheme=scheme, seed=11)
    c = partition(digits_y, num_clients=8, scheme=scheme, seed=12)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


@pytest.mark.parametrize(
    "scheme,message",
    [
        ("dirichlet:-1", "partition='dirichlet:-1': alpha must be > 0, got -1"),
        ("dirichlet:nan", "alpha must be > 0, got nan"),
        ("dirichlet:abc", "alpha must be a number, got 'abc'"),
        ("dirichlet", "dirichlet needs alpha"),
        ("shards:0", "K must be >= 1, got 0"),
        ("shards:1.5", "K must be an int, got '1.5'"),
        ("iid:2", "iid takes no parameter"),
        ("pathological", "unknown; valid schemes: dirichlet, iid, shards"),
    ],
)
def test_parse_scheme_errors(scheme, message):
    with pytest.raises(ConfigError) as info:
        parse_scheme(scheme)
    assert message in str(info.value)


def test_parse_scheme_values_and_input_checks():
    assert parse_scheme("iid") == ("iid", None)
    assert parse_scheme("dirichlet:0.5") == ("dirichlet", 0.5)
    assert parse_scheme("shards:3") == ("shards", 3)
    assert sorted(PARTITIONERS) == ["dirichlet", "iid", "shards"]
    with pytest.raises(ConfigError, match="num_clients must be in \\[1, 3\\].*got 4"):
        partition(np.array([0, 1, 2]), num_clients=4, scheme="iid", seed=0)
    with pytest.raises(ConfigError, match="1-D integer"):
        partition(np.array([0.0, 1.0]), num_clients=1, scheme="iid", seed=0)
