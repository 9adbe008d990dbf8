"""Coordinate-wise trimmed mean (Yin et al., ICML 2018): drop the extremes, average the rest."""

from __future__ import annotations

import math

import numpy as np

from cloud.strategies.base import ClientUpdate, Params, Strategy, cast_like, check_number, stack

__all__ = ["TrimmedMean"]


class TrimmedMean(Strategy):
    """Per coordinate, sorts the n client values, drops ``floor(beta * n)`` from each end and
    averages the rest (unweighted), like ``scipy.stats.trim_mean(values, beta, axis=0)``.

    Args:
        beta: fraction trimmed from each side, in [0, 0.5); 0 is the plain unweighted mean.
    """

    name = "trimmed-mean"

    def __init__(self, *, beta: float = 0.1) -> None:
        self.beta = check_number(self.name, "beta", beta, low=0.0, high=0.5, high_open=True)

    def _aggregate(self, global_params: Params, updates: list[ClientUpdate]) -> Params:
        n = len(updates)
        cut = math.floor(self.beta * n)  # beta < 0.5 keeps n - 2 * cut >= 1 values
        out: Params = {}
        for k, ref in global_params.items():
            values = np.sort(stack(updates, k), axis=0)
            out[k] = cast_like(values[cut : n - cut].mean(axis=0), ref)
        return out

    def __repr__(self) -> str:
        return f"TrimmedMean(beta={self.beta})"
