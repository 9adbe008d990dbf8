"""FedAdam and FedYogi: the adaptive server optimizers of Reddi et al. (ICLR 2021)."""

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

__all__ = ["FedAdam", "FedOpt", "FedYogi"]


class FedOpt(Strategy):
    """Server-side adaptive step on the averaged client change (Reddi et al., ICLR 2021, Alg. 2).

    With ``x`` the global model and ``x_i`` client i's model, each round computes
    ``delta = sum_i p_i (x_i - x)`` (``p_i`` = sample share, or 1/n when ``weighted=False`` as in
    the paper), then ``m = beta1 m + (1 - beta1) delta``, the second moment ``v`` by the
    subclass's rule, and ``x <- x + eta * m / (sqrt(v) + tau)``. ``m`` starts at 0 and ``v`` at
    ``tau**2`` (the paper's ``v_{-1} >= tau^2``); there is no bias correction, as in the paper.
    Integer entries are not optimized: they take the weighted mean rounded. Moments are float64.

    Args:
        eta: server learning rate (> 0).
        beta1: first-moment decay, in [0, 1).
        beta2: second-moment decay, in [0, 1).
        tau: adaptivity / stability constant (> 0).
        weighted: weight client changes by num_samples (True) or equally (False).
    """

    name = ""

    def __init__(
        self,
        *,
        eta: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        weighted: bool = True,
    ) -> None:
        self.eta = check_number(self.name, "eta", eta, low=0.0, low_open=True)
        self.beta1 = check_number(self.name, "beta1", beta1, low=0.0, high=1.0, high_open=True)
        self.beta2 = check_number(self.name, "beta2", beta2, low=0.0, high=1.0, high_open=True)
        self.tau = check_number(self.name, "tau", tau, low=0.0, low_open=True)
        if not isinstance(weighted, bool):
            raise StrategyError(f"{self.name} weighted must be a bool, got {weighted!r}")
        self.weighted = weighted
        self._m: dict[str, np.ndarray] = {}
        self._v: dict[str, np.ndarray] = {}
        self._round = 0

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _mean(self, updates: list[ClientUpdate], key: str) -> np.ndarray:
        if self.weighted:
            return weighted_mean(updates, key)
        total = np.zeros(np.shape(updates[0].params[key]), dtype=np.float64)
        for u in updates:
            total += np.asarray(u.params[key], dtype=np.float64)
        return total / len(updates)

    def _aggregate(self, global_params: Params, updates: list[ClientUpdate]) -> Params:
        float_keys = [k for k, ref in global_params.items() if ref.dtype.kind == "f"]
        if self._m and set(self._m) != set(float_keys):
            raise StrategyError(
                f"{self.name} state keys {sorted(self._m)} != global float keys "
                f"{sorted(float_keys)}; the model changed since the moments were created"
            )
        for k in self._m:
            if self._m[k].shape != global_params[k].shape:
                raise StrategyError(
                    f"{self.name} state key {k!r} shape {self._m[k].shape} != global shape "
                    f"{global_params[k].shape}"
                )
        out: Params = {}
        for k, ref in global_params.items():
            if ref.dtype.kind != "f":
                out[k] = cast_like(weighted_mean(updates, k), ref)
                continue
            x = ref.astype(np.float64)
            delta = self._mean(updates, k) - x
            m = self._m.get(k, np.zeros_like(x))
            v = self._v.get(k, np.full_like(x, self.tau**2))
            m = self.beta1 * m + (1.0 - self.beta1) * delta
            v = self._second_moment(v, delta * delta)
            self._m[k], self._v[k] = m, v
            out[k] = cast_like(x + self.eta * m / (np.sqrt(v) + self.tau), ref)
        self._round += 1
        return out

    def state_dict(self) -> dict:
        """Returns ``{"round", "m", "v"}`` (copies; moments keyed like the float parameters)."""
        return {
            "round": self._round,
            "m": {k: a.copy() for k, a in self._m.items()},
            "v": {k: a.copy() for k, a in self._v.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores moments saved by ``state_dict`` for an exact resume."""
        if not isinstance(state, dict) or set(state) != {"round", "m", "v"}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise StrategyError(f"{self.name} state must have keys m, round, v, got {got}")
        m, v, rnd = state["m"], state["v"], state["round"]
        if isinstance(rnd, np.ndarray) and rnd.shape == ():  # e.g. after a trip through npz
            rnd = rnd.item()
        if not isinstance(m, dict) or not isinstance(v, dict) or set(m) != set(v):
            raise StrategyError(f"{self.name} state m and v must be dicts with the same keys")
        if isinstance(rnd, bool) or not isinstance(rnd, int | np.integer) or rnd < 0:
            raise StrategyError(f"{self.name} state round must be an int >= 0, got {rnd!r}")
        for k in m:
            a, b = np.asarray(m[k]), np.asarray(v[k])
            if a.shape != b.shape or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
                raise StrategyError(
                    f"{self.name} state key {k!r}: m and v must be finite with equal shapes"
                )
            if np.any(b < 0):
                raise StrategyError(f"{self.name} state key {k!r}: v must be >= 0")
        self._m = {k: np.array(a, dtype=np.float64) for k, a in m.items()}
        self._v = {k: np.array(a, dtype=np.float64) for k, a in v.items()}
        self._round = int(rnd)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(eta={self.eta}, beta1={self.beta1}, beta2={self.beta2}, "
            f"tau={self.tau}, weighted={self.weighted})"
        )


class FedAdam(FedOpt):
    """FedOpt with Adam's second moment: ``v = beta2 v + (1 - beta2) delta^2``."""

    name = "fedadam"

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1.0 - self.beta2) * delta_sq


class FedYogi(FedOpt):
    """FedOpt with Yogi's second moment: ``v = v - (1 - beta2) delta^2 sign(v - delta^2)``.

    Yogi grows ``v`` additively rather than multiplicatively, so a burst of large changes
    does not shrink the effective step as abruptly as Adam (Zaheer et al., NeurIPS 2018).
    """

    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.beta2) * delta_sq * np.sign(v - delta_sq)
