"""Registry of aggregation strategies, chosen by name in the run configuration."""

from __future__ import annotations

import inspect

from cloud.errors import StrategyError
from cloud.strategies.base import Strategy
from cloud.strategies.fedavg import FedAvg
from cloud.strategies.fedavgm import FedAvgM
from cloud.strategies.fedopt import FedAdam, FedYogi
from cloud.strategies.fedprox import FedProx
from cloud.strategies.median import Median
from cloud.strategies.trimmed_mean import TrimmedMean

__all__ = ["STRATEGIES", "get_strategy", "register_strategy"]

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, Median, TrimmedMean)
}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Adds a Strategy subclass under ``cls.name`` (usable as a class decorator).

    Raises:
        StrategyError: if the name is empty or already taken by another class.
    """
    if not cls.name:
        raise StrategyError(f"{cls.__name__}.name must be a non-empty string")
    if STRATEGIES.get(cls.name, cls) is not cls:
        raise StrategyError(f"strategy name {cls.name!r} is already registered")
    STRATEGIES[cls.name] = cls
    return cls


def _settings(cls: type[Strategy]) -> list[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def get_strategy(name: str, **kwargs) -> Strategy:
    """Builds the strategy registered as ``name`` with keyword settings.

    Known names: fedavg, fedavgm (server_lr, momentum), fedprox (mu), fedadam / fedyogi (eta,
    beta1, beta2, tau, weighted), median, trimmed-mean (beta).

    Raises:
        ValueError: for an unknown name, listing the known ones.
        StrategyError: (a ValueError) for an unknown setting or a value breaking its rule.
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"strategy={name!r} unknown; valid strategies: {', '.join(sorted(STRATEGIES))}"
        )
    cls = STRATEGIES[name]
    allowed = _settings(cls)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        valid = ", ".join(allowed) if allowed else "none"
        raise StrategyError(
            f"strategy {name!r} got unknown settings {unknown}; valid settings: {valid}"
        )
    return cls(**kwargs)
