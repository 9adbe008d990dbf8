"""Shared types of aggregation strategies: client updates, update validation, the Strategy base."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from cloud.errors import RoundFailedError, StrategyError, UpdateRejectedError

__all__ = ["ClientUpdate", "Params", "Strategy", "validate_update", "validate_updates"]

Params = dict[str, np.ndarray]


@dataclass(frozen=True)
class ClientUpdate:
    """One device's answer to a round.

    Attributes:
        client_id: the device's id, used in every rejection message.
        params: the device's full local model after training (not a delta), keyed like the
            global parameters.
        num_samples: number of training samples behind the update (> 0); the FedAvg weight.
        metrics: whatever the device reported (loss, accuracy, ...); not used to aggregate.
    """

    client_id: str
    params: Params
    num_samples: int
    metrics: dict = field(default_factory=dict)


def _problems(global_params: Params, update: ClientUpdate) -> list[str]:
    """Returns every rule the update breaks, as short phrases naming the key."""
    problems: list[str] = []
    n = update.num_samples
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
        problems.append(f"num_samples must be an int > 0, got {n!r}")
    params = update.params
    if not isinstance(params, dict):
        return [*problems, f"params must be a dict of arrays, got {type(params).__name__}"]
    missing = sorted(set(global_params) - set(params))
    extra = sorted(set(params) - set(global_params), key=str)
    if missing:
        problems.append(f"missing keys {missing}")
    if extra:
        problems.append(f"unexpected keys {extra}")
    for key, ref in global_params.items():
        if key not in params:
            continue
        value = params[key]
        # NumPy scalars count as 0-d arrays: indexing or .astype on a 0-d array yields them.
        if not isinstance(value, np.ndarray | np.generic):
            problems.append(f"key {key!r} must be a numpy array, got {type(value).__name__}")
            continue
        if value.shape != ref.shape:
            problems.append(f"key {key!r} shape {value.shape} != global shape {ref.shape}")
            continue
        if ref.dtype.kind == "f" and value.dtype.kind != "f":
            problems.append(f"key {key!r} dtype must be floating, got {value.dtype}")
            continue
        if ref.dtype.kind in "iu" and value.dtype.kind not in "iu":
            problems.append(f"key {key!r} dtype must be integer like the global, got {value.dtype}")
            continue
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            problems.append(f"key {key!r} has {bad} non-finite values (NaN/Inf)")
    return problems


def validate_update(global_params: Params, update: ClientUpdate) -> None:
    """Checks one update against the global parameters.

    Rules: same keys, same shapes, floating dtype where the global is floating (integer where
    it is integer), finite values, ``num_samples`` an int > 0. The trainer can call this per
    update to drop a bad device and aggregate the rest.

    Raises:
        UpdateRejectedError: one line naming the client and every broken rule with its key.
    """
    problems = _problems(global_params, update)
    if problems:
        raise UpdateRejectedError(
            f"update from client {update.client_id!r} rejected: {'; '.join(problems)}"
        )


def validate_updates(global_params: Params, updates: list[ClientUpdate]) -> None:
    """Validates a round: at least one update, unique client ids, each update valid.

    Raises:
        RoundFailedError: if ``updates`` is empty.
        UpdateRejectedError: for a duplicate client id or the first invalid update.
    """
    for key, ref in global_params.items():
        if not isinstance(ref, np.ndarray | np.generic) or ref.dtype.kind not in "fiu":
            kind = getattr(ref, "dtype", type(ref).__name__)
            raise StrategyError(f"global key {key!r} must be a float or int array, got {kind}")
    if not updates:
        raise RoundFailedError("aggregate needs at least 1 client update, got 0")
    seen: set[str] = set()
    for update in updates:
        if update.client_id in seen:
            raise UpdateRejectedError(
                f"update from client {update.client_id!r} rejected: duplicate client id in round"
            )
        seen.add(update.client_id)
        validate_update(global_params, update)


def stack(updates: list[ClientUpdate], key: str) -> np.ndarray:
    """Returns the updates' values for ``key`` stacked on a new axis 0, in float64."""
    return np.stack([np.asarray(u.params[key], dtype=np.float64) for u in updates])


def weights(updates: list[ClientUpdate]) -> np.ndarray:
    """Returns each update's share of the total samples (float64, sums to 1)."""
    n = np.array([float(u.num_samples) for u in updates], dtype=np.float64)
    return n / n.sum()


def weighted_mean(updates: list[ClientUpdate], key: str) -> np.ndarray:
    """Returns the sample-weighted mean of ``key`` in float64, accumulated one update at a time."""
    w = weights(updates)
    total = np.zeros(np.shape(updates[0].params[key]), dtype=np.float64)
    for share, u in zip(w, updates, strict=True):
        total += share * np.asarray(u.params[key], dtype=np.float64)
    return total


def cast_like(value: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Casts a float64 aggregate to the global's dtype; integer entries round to nearest even."""
    if ref.dtype.kind in "iu":
        info = np.iinfo(ref.dtype)
        return np.clip(np.rint(value), info.min, info.max).astype(ref.dtype)
    return value.astype(ref.dtype)


def check_number(
    owner: str,
    name: str,
    value,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Returns ``value`` as a float if it lies in the interval, else raises StrategyError."""
    ok = isinstance(value, int | float | np.floating | np.integer) and not isinstance(value, bool)
    ok = ok and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        if math.isinf(high):
            rule = f"must be a finite number {'>' if low_open else '>='} {low:g}"
        else:
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            rule = f"must be a finite number in {lo}{low:g}, {high:g}{hi}"
        raise StrategyError(f"{owner} {name} {rule}, got {value!r}")
    return float(value)


class Strategy(ABC):
    """An aggregation rule run by the cloud at the end of each federated round.

    Subclasses implement ``_aggregate`` on already-validated updates; ``aggregate`` validates
    first. Integer entries (e.g. BatchNorm ``num_batches_tracked``) go through the strategy's
    own estimator in float64 and are rounded to the nearest integer (ties to even), so a
    counter ends up as a typical client's count rather than a sum.
    """

    name: str = ""

    def aggregate(self, global_params: Params, updates: list[ClientUpdate]) -> Params:
        """Returns the new global parameters (global dtypes) from full local models.

        Raises:
            RoundFailedError: if ``updates`` is empty.
            UpdateRejectedError: naming the client and key of the first invalid update.
        """
        validate_updates(global_params, updates)
        return self._aggregate(global_params, updates)

    @abstractmethod
    def _aggregate(self, global_params: Params, updates: list[ClientUpdate]) -> Params:
        """Combines validated updates into the new global parameters."""

    def client_config(self) -> dict:
        """Returns extra settings sent to devices with the round (empty by default)."""
        return {}

    def state_dict(self) -> dict:
        """Returns the server-side state (NumPy arrays and plain types) for checkpointing."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restores the state returned by ``state_dict``; stateless strategies accept ``{}``."""
        if state:
            raise StrategyError(f"{self.name} has no state to load, got keys {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
