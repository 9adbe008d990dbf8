"""Split a labelled dataset's indices among federated clients: IID, Dirichlet label skew, shards."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from converters.errors import ConfigError

__all__ = ["PARTITIONERS", "parse_scheme", "partition"]

# How many fresh Dirichlet draws to try before repairing empty clients by donation.
_DIRICHLET_TRIES = 10


def _iid(y: np.ndarray, num_clients: int, param: float | None, rng: np.random.Generator):
    """Shuffles and deals out near-equal parts (sizes differ by at most one)."""
    return np.array_split(rng.permutation(y.size), num_clients)


def _dirichlet(y: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator):
    """Label skew: each class is spread over clients by proportions drawn from Dir(alpha).

    This is the per-class form of the Dir(alpha) label skew of Hsu et al. (2019) used by
    FedMA / NIID-Bench: small alpha puts each class on few clients, large alpha tends to IID.
    Every client must get a sample, so the draw is repeated up to ``_DIRICHLET_TRIES`` times;
    if clients are still empty (e.g. more clients than classes at tiny alpha) each empty client
    receives one random sample taken from the currently largest client.
    """
    classes = np.unique(y)
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    for _ in range(_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            p = rng.dirichlet(np.full(num_clients, alpha))
            cuts = np.floor(np.cumsum(p)[:-1] * idx.size).astype(np.int64)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        clients = [np.concatenate(chunks) for chunks in parts]
        if all(c.size for c in clients):
            return clients
    for i in range(num_clients):
        if clients[i].size == 0:
            donor = int(np.argmax([c.size for c in clients]))
            take = int(rng.integers(clients[donor].size))
            clients[i] = clients[donor][take : take + 1]
            clients[donor] = np.delete(clients[donor], take)
    return clients


def _shard_counts(class_sizes: np.ndarray, total: int) -> np.ndarray:
    """Shards per class: proportional to class size, >= 1 each, never more than the class size."""
    counts = np.clip(np.floor(total * class_sizes / class_sizes.sum()), 1, class_sizes)
    counts = counts.astype(np.int64)
    while counts.sum() < total:
        # Give the next shard to the class whose shards are currently largest.
        load = np.where(counts < class_sizes, class_sizes / counts, -1.0)
        counts[int(np.argmax(load))] += 1
    while counts.sum() > total:
        load = np.where(counts > 1, class_sizes / counts, np.inf)
        counts[int(np.argmin(load))] -= 1
    return counts


def _shards(y: np.ndarray, num_clients: int, k: int, rng: np.random.Generator):
    """Pathological non-IID of McMahan et al. (2017): sort by label, deal K shards per client.

    Shards never straddle two labels (each class is cut into its own shards, their number
    proportional to the class size), so a client holds at most K distinct labels.
    """
    classes, class_sizes = np.unique(y, return_counts=True)
    total = num_clients * k
    if total < classes.size:
        raise ConfigError(
            f"partition='shards:{k}': num_clients * K = {total} must be >= the number of "
            f"labels ({classes.size}) so each shard holds one label; raise K or use dirichlet"
        )
    if total > y.size:
        raise ConfigError(
            f"partition='shards:{k}': num_clients * K = {total} must be <= the number of "
            f"samples ({y.size}) so no shard is empty"
        )
    shards: list[np.ndarray] = []
    for c, n_shards in zip(classes, _shard_counts(class_sizes, total), strict=True):
        shards.extend(np.array_split(rng.permutation(np.flatnonzero(y == c)), n_shards))
    order = rng.permutation(total)
    return [
        np.concatenate([shards[s] for s in order[i * k : (i + 1) * k]]) for i in range(num_clients)
    ]


def _parse_none(spec: str, text: str | None) -> None:
    if text is not None:
        raise ConfigError(f"partition={spec!r}: iid takes no parameter, got {text!r}")
    return None


def _parse_alpha(spec: str, text: str | None) -> float:
    if text is None:
        raise ConfigError(f"partition={spec!r}: dirichlet needs alpha, e.g. 'dirichlet:0.5'")
    try:
        alpha = float(text)
    except ValueError:
        raise ConfigError(f"partition={spec!r}: alpha must be a number, got {text!r}") from None
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"partition={spec!r}: alpha must be > 0, got {text}")
    return alpha


def _parse_k(spec: str, text: str | None) -> int:
    if text is None:
        return 2  # McMahan et al.'s two shards per client
    try:
        k = int(text)
    except ValueError:
        raise ConfigError(f"partition={spec!r}: K must be an int, got {text!r}") from None
    if k < 1:
        raise ConfigError(f"partition={spec!r}: K must be >= 1, got {k}")
    return k


# name -> (parse the text after ':', split function(y, num_clients, param, rng)).
PARTITIONERS: dict[str, tuple[Callable, Callable]] = {
    "dirichlet": (_parse_alpha, _dirichlet),
    "iid": (_parse_none, _iid),
    "shards": (_parse_k, _shards),
}


def parse_scheme(scheme: str) -> tuple[str, float | int | None]:
    """Parses ``"iid"``, ``"dirichlet:ALPHA"`` or ``"shards[:K]"`` (K defaults to 2).

    Returns:
        ``(name, param)``: param is None for iid, float alpha > 0, or int K >= 1.

    Raises:
        ConfigError: (a ValueError) naming the scheme, the rule and the value.
    """
    if not isinstance(scheme, str):
        raise ConfigError(f"partition must be a string, got {scheme!r}")
    name, sep, text = scheme.strip().partition(":")
    if name not in PARTITIONERS:
        known = ", ".join(sorted(PARTITIONERS))
        raise ConfigError(f"partition={scheme!r} unknown; valid schemes: {known}")
    parse, _ = PARTITIONERS[name]
    return name, parse(scheme, text if sep else None)


def partition(y: np.ndarray, *, num_clients: int, scheme: str, seed: int) -> list[np.ndarray]:
    """Splits sample indices among clients.

    Args:
        y: integer labels, shape ``(N,)``.
        num_clients: number of clients (1 <= num_clients <= N).
        scheme: ``"iid"``, ``"dirichlet:ALPHA"`` or ``"shards[:K]"`` (see ``parse_scheme``).
        seed: seed; the same arguments always give the same partition.

    Returns:
        One sorted int64 index array per client; the arrays are disjoint, cover ``range(N)``
        and are all non-empty.

    Raises:
        ConfigError: for a bad scheme, label array or client count.
    """
    name, param = parse_scheme(scheme)
    y = np.asarray(y)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ConfigError(f"y must be a 1-D integer label array, got {y.dtype} {y.shape}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, int | np.integer):
        raise ConfigError(f"num_clients must be an int, got {num_clients!r}")
    if not 1 <= num_clients <= y.size:
        raise ConfigError(
            f"num_clients must be in [1, {y.size}] (one sample per client at least), "
            f"got {num_clients}"
        )
    rng = np.random.default_rng(seed)
    _, split = PARTITIONERS[name]
    return [np.sort(part).astype(np.int64) for part in split(y, int(num_clients), param, rng)]
