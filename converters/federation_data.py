"""The data layout of a simulated federation: a held-out test set and one shard per device.

The cloud and every simulated device compute the same layout from the same (spec, seed), so
no sample ever travels: the cloud keeps only the test set, each device only its own shard.
"""

from __future__ import annotations

from converters.datasets import Dataset, load_dataset, train_test_split
from converters.partitioners import partition


def device_ids(clients: int) -> list[str]:
    """The ids of a simulation's devices: ``dev-0000``, ``dev-0001``, ..."""
    return [f"dev-{i:04d}" for i in range(clients)]


def federated_split(
    spec: str, *, clients: int, scheme: str, seed: int, test_fraction: float
) -> tuple[list[Dataset], Dataset]:
    """Returns (per-device training shards, held-out test set) for a dataset spec.

    Args:
        spec: a :func:`converters.datasets.load_dataset` spec, e.g. ``"digits"``.
        clients: number of devices.
        scheme: a :func:`converters.partitioners.partition` scheme, e.g. ``"dirichlet:0.5"``.
        seed: seeds the train/test split and the partition.
        test_fraction: share of samples held out for the cloud's evaluation.
    """
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    data = load_dataset(spec, seed=seed)
    train, test = train_test_split(data, test_fraction=test_fraction, seed=seed)
    shards = partition(train.y, num_clients=clients, scheme=scheme, seed=seed)
    return [train.subset(idx) for idx in shards], test
