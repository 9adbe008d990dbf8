"""FedAvg (McMahan et al., 2017): the sample-weighted mean of the clients' local models."""

from __future__ import annotations

from cloud.strategies.base import ClientUpdate, Params, Strategy, cast_like, weighted_mean

__all__ = ["FedAvg"]


class FedAvg(Strategy):
    """New global = sum_k (n_k / n) * w_k, accumulated in float64, returned in global dtypes."""

    name = "fedavg"

    def _aggregate(self, global_params: Params, updates: list[ClientUpdate]) -> Params:
        return {k: cast_like(weighted_mean(updates, k), ref) for k, ref in global_params.items()}
