"""Coordinate-wise median aggregation (Yin et al., ICML 2018), robust to a minority of outliers."""

from __future__ import annotations

import numpy as np

from cloud.strategies.base import ClientUpdate, Params, Strategy, cast_like, stack

__all__ = ["Median"]


class Median(Strategy):
    """New global = element-wise median over the clients' models (unweighted; even counts
    average the two middle values, as ``np.median`` does)."""

    name = "median"

    def _aggregate(self, global_params: Params, updates: list[ClientUpdate]) -> Params:
        return {
            k: cast_like(np.median(stack(updates, k), axis=0), ref)
            for k, ref in global_params.items()
        }
