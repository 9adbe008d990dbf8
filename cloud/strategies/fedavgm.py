"""FedAvgM: federated averaging with server momentum (Hsu, Qi & Brown 2019, arXiv 1909.06335)."""

from __future__ import annotations

import numpy as np

from cloud.errors import StrategyError
from cloud.strategies.base import (
    ClientUpdate,
    Params,
    Strategy,
    cast_like,
    check_number,
    weighted_mean,
)

__all__ = ["FedAvgM"]


class FedAvgM(Strategy):
    """FedAvg whose averaged change drives a server-side momentum step.

    Each round: ``delta = sum_i p_i (x_i - x)`` with ``p_i`` the sample share, then
    ``v = momentum * v + delta`` and ``x <- x + server_lr * v``. With ``momentum=0`` and
    ``server_lr=1`` this is exactly FedAvg. Hsu et al. introduced it for label-skewed
    (Dirichlet) client data, where it damps the oscillation of plain FedAvg. Integer entries
    take the weighted mean rounded, as in FedAvg. The velocity is float64 and checkpointed.

    Args:
        server_lr: server learning rate (> 0).
        momentum: server momentum, in [0, 1).
    """

    name = "fedavgm"

    def __init__(self, *, server_lr: float = 1.0, momentum: float = 0.5) -> None:
        self.server_lr = check_number(self.name, "server_lr", server_lr, low=0.0, low_open=True)
        self.momentum = check_number(
            self.name, "momentum", momentum, low=0.0, high=1.0, high_open=True
        )
        self._v: dict[str, np.ndarray] = {}

    def _aggregate(self, global_params: Params, updates: list[ClientUpdate]) -> Params:
        out: Params = {}
        for k, ref in global_params.items():
            mean = weighted_mean(updates, k)
            if ref.dtype.kind != "f":
                out[k] = cast_like(mean, ref)
                continue
            x = ref.astype(np.float64)
            v = self._v.get(k)
            if v is not None and v.shape != x.shape:
                raise StrategyError(
                    f"fedavgm velocity {k!r} has shape {v.shape}, the model has {x.shape}"
                )
            v = (mean - x) if v is None else self.momentum * v + (mean - x)
            self._v[k] = v
            out[k] = cast_like(x + self.server_lr * v, ref)
        return out

    def state_dict(self) -> dict:
        return {"v": {k: a.copy() for k, a in self._v.items()}}

    def load_state_dict(self, state: dict) -> None:
        v = state.get("v") if isinstance(state, dict) else None
        if not isinstance(v, dict):
            raise StrategyError(f"fedavgm state must be {{'v': {{name: array}}}}, got {state!r}")
        for k, a in v.items():
            if not np.all(np.isfinite(np.asarray(a))):
                raise StrategyError(f"fedavgm state key {k!r}: velocity must be finite")
        self._v = {k: np.array(a, dtype=np.float64) for k, a in v.items()}

    def __repr__(self) -> str:
        return f"FedAvgM(server_lr={self.server_lr}, momentum={self.momentum})"
