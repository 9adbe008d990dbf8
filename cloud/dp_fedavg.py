"""User-level DP-FedAvg: clip each client's update, average, add Gaussian noise, account."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from cloud.errors import PrivacyBudgetExceededError, UpdateRejectedError
from split.errors import PrivacyConfigError
from split.privacy.budget import DPConfig, PrivacyLedger, check_delta, noise_for_target

Params = dict[str, np.ndarray]


def _is_float(a: np.ndarray) -> bool:
    return np.asarray(a).dtype.kind == "f"


def global_norm(delta: Params) -> float:
    """L2 norm over all tensors of ``delta`` taken as one vector, safe from overflow."""
    arrays = [np.asarray(v, dtype=np.float64).ravel() for v in delta.values()]
    if not arrays:
        return 0.0
    scale = max((float(np.max(np.abs(a))) for a in arrays if a.size), default=0.0)
    if scale == 0.0:
        return 0.0
    # Scaling by the largest entry keeps huge updates (1e30 in float32) from overflowing.
    return scale * math.sqrt(sum(float(np.sum((a / scale) ** 2)) for a in arrays))


def clip_delta(delta: Params, clip_norm: float) -> tuple[Params, float]:
    """Scale ``delta`` so its global L2 norm is at most ``clip_norm``.

    Returns:
        ``(clipped float64 arrays, norm before clipping)``.
    """
    norm = global_norm(delta)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: np.asarray(v, dtype=np.float64) * factor for k, v in delta.items()}, norm


def _unpack(index: int, update: Any) -> tuple[str, Params]:
    # Accepts (params, num_samples) tuples and objects with ``params`` (and ``client_id``),
    # like cloud.strategies.ClientUpdate; the sample count is unused (equal weights).
    if isinstance(update, tuple):
        return f"update {index}", update[0]
    who = getattr(update, "client_id", None)
    return (f"update {index}" if who is None else f"client {who!r}"), update.params


class DPFedAvg:
    """User-level differentially private FedAvg (McMahan et al. 2018, ICLR'18).

    Each round: ``delta_i = local_i - global`` over the floating tensors; each delta is clipped
    to global L2 norm ``C``; the clipped deltas are summed and divided by the *expected*
    number of clients ``m = clients_per_round`` (the fixed-denominator estimator, whose
    sensitivity to one user is ``C / m`` however many clients answer); Gaussian noise with std
    ``z * C / m`` is added per coordinate. Integer buffers keep the global value. The Opacus
    accountant is stepped once per round with sample rate ``m / population``, which assumes
    clients are Poisson-sampled with that rate (McMahan et al.'s analysis); a round that really
    sampled at a higher rate passes it to :meth:`aggregate` and is accounted with it.

    With ``adaptive=True`` the clip follows the ``target_quantile`` of update norms (Andrew et
    al. 2021, "Differentially private learning with adaptive clipping"): the noisy fraction of
    clients with norm <= C moves C geometrically. The count gets noise ``count_noise`` and the
    update noise is raised to ``z_delta = (z^-2 - (2 count_noise)^-2)^-1/2`` so that the pair
    is as private as one Gaussian mechanism with multiplier ``z`` (their Theorem 1), which is
    what the ledger records.

    Args:
        clip_norm: Clip C (initial value if adaptive), > 0.
        noise_multiplier: z >= 0 (0 disables privacy; epsilon is then inf).
        clients_per_round: Expected clients per round m.
        population: Number of clients N (delta must be < 1/N).
        delta: Target delta.
        seed: Seeds the noise.
        adaptive: Adapt the clip to a quantile of update norms.
        target_quantile: Quantile the adaptive clip tracks, in (0, 1).
        clip_lr: Geometric learning rate of the adaptive clip.
        accountant: ``"rdp"`` or ``"prv"``.
        count_noise: Std of the noise on the clipped-client count (default m / 20, as in
            Andrew et al.); must exceed z / 2 when adaptive with z > 0.
        target_epsilon: If set, ``aggregate`` raises before a round that would exceed it.
    """

    def __init__(
        self,
        *,
        clip_norm: float,
        noise_multiplier: float,
        clients_per_round: int,
        population: int,
        delta: float,
        seed: int,
        adaptive: bool = False,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        accountant: str = "rdp",
        count_noise: float | None = None,
        target_epsilon: float | None = None,
    ) -> None:
        # DPConfig holds the range checks; reuse them instead of repeating them here.
        DPConfig(
            mode="user",
            noise_multiplier=noise_multiplier,
            delta=delta,
            clip_norm=clip_norm,
            accountant=accountant,
            adaptive_clip=adaptive,
            target_quantile=target_quantile,
            clip_lr=clip_lr,
        )
        if not isinstance(population, int) or population < 1:
            raise PrivacyConfigError(f"population must be a positive int, got {population}")
        if not isinstance(clients_per_round, int) or not 1 <= clients_per_round <= population:
            raise PrivacyConfigError(
                f"clients_per_round must be an int in [1, population={population}], "
                f"got {clients_per_round}"
            )
        check_delta(delta, population)
        if target_epsilon is not None and not target_epsilon > 0:
            raise PrivacyConfigError(f"target_epsilon must be > 0, got {target_epsilon}")
        self.noise_multiplier = float(noise_multiplier)
        self.clients_per_round = clients_per_round
        self.population = population
        self.sample_rate = clients_per_round / population
        self.clip_norm = float(clip_norm)
        self.adaptive = adaptive
        self.target_quantile = target_quantile
        self.clip_lr = clip_lr
        self.target_epsilon = target_epsilon
        self.count_noise = clients_per_round / 20 if count_noise is None else float(count_noise)
        self.update_noise = self._update_noise()
        self.ledger = PrivacyLedger(accountant=accountant, delta=delta)
        self.rounds = 0
        self._rng = np.random.default_rng(seed)

    def _update_noise(self) -> float:
        z = self.noise_multiplier
        if not self.adaptive or z == 0:
            return z
        if not self.count_noise > z / 2:
            raise PrivacyConfigError(
                f"count_noise must be > noise_multiplier / 2 = {z / 2:.4g} with adaptive "
                f"clipping, got {self.count_noise}"
            )
        return (z**-2 - (2 * self.count_noise) ** -2) ** -0.5

    @classmethod
    def from_config(
        cls, config: DPConfig, *, clients_per_round: int, population: int, rounds: int, seed: int
    ) -> DPFedAvg:
        """Build from a ``DPConfig(mode="user")``; a target epsilon is met after ``rounds``."""
        if config.mode != "user":
            raise PrivacyConfigError(f"DPFedAvg needs config.mode='user', got {config.mode!r}")
        noise = config.noise_multiplier
        if config.target_epsilon is not None:
            noise = noise_for_target(
                target_epsilon=config.target_epsilon,
                delta=config.delta,
                sample_rate=clients_per_round / population,
                steps=rounds,
                accountant=config.accountant,
            )
        return cls(
            clip_norm=config.clip_norm,
            noise_multiplier=noise,
            clients_per_round=clients_per_round,
            population=population,
            delta=config.delta,
            seed=seed,
            adaptive=config.adaptive_clip,
            target_quantile=config.target_quantile,
            clip_lr=config.clip_lr,
            accountant=config.accountant,
            target_epsilon=config.target_epsilon,
        )

    def epsilon(self) -> float:
        """User-level epsilon spent so far, from the Opacus accountant."""
        return self.ledger.epsilon()

    def aggregate(
        self, global_params: Params, updates: list, *, sample_rate: float | None = None
    ) -> Params:
        """Run one DP-FedAvg round and return the new global parameters.

        Args:
            global_params: Current global model, name -> array.
            updates: ``(local_params, num_samples)`` pairs (or ``ClientUpdate``s); local
                params are full models keyed like ``global_params``. Sample counts are
                ignored: every client weighs 1/m so one user's influence is bounded. An
                empty list still publishes a noise-only step, and it is accounted.
            sample_rate: The rate at which this round really sampled clients, in (0, 1], when
                it is not the planned ``clients_per_round / population`` (e.g. m clients were
                drawn from fewer online ones). The budget check and the ledger use it; the
                noise stays ``z * C / m`` (the sensitivity does not depend on the rate).

        Raises:
            PrivacyBudgetExceededError: ``target_epsilon`` would be exceeded by this round
                (checked before anything changes).
            PrivacyConfigError: ``sample_rate`` is not in (0, 1].
            UpdateRejectedError: An update has other keys or shapes, or non-finite values.
        """
        rate = self.sample_rate if sample_rate is None else sample_rate
        if not isinstance(rate, numbers.Real) or not 0 < rate <= 1:
            raise PrivacyConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if self.target_epsilon is not None:
            after = self.ledger.epsilon_after(
                noise_multiplier=self.noise_multiplier, sample_rate=rate
            )
            if after > self.target_epsilon:
                raise PrivacyBudgetExceededError(
                    f"epsilon would reach {after:.4g} > target_epsilon={self.target_epsilon} "
                    f"in round {self.rounds + 1} at sample_rate={rate:.4g} "
                    f"(now {self.epsilon():.4g}); stop training"
                )
        keys = [k for k, v in global_params.items() if _is_float(v)]
        total = {k: np.zeros(np.shape(global_params[k]), dtype=np.float64) for k in keys}
        below = 0
        for i, update in enumerate(updates):
            who, params = _unpack(i, update)
            delta = {}
            for k in keys:
                if k not in params or np.shape(params[k]) != np.shape(global_params[k]):
                    got = np.shape(params[k]) if k in params else "missing"
                    raise UpdateRejectedError(
                        f"{who} key {k!r} must have shape {np.shape(global_params[k])}, got {got}"
                    )
                value = np.asarray(params[k], dtype=np.float64)
                if not np.all(np.isfinite(value)):
                    raise UpdateRejectedError(f"{who} key {k!r} has non-finite values")
                delta[k] = value - np.asarray(global_params[k], dtype=np.float64)
            clipped, norm = clip_delta(delta, self.clip_norm)
            below += norm <= self.clip_norm
            for k in keys:
                total[k] += clipped[k]
        m = self.clients_per_round
        std = self.update_noise * self.clip_norm
        new = {}
        for k, ref in global_params.items():
            if k not in total:
                new[k] = np.array(ref, copy=True)
                continue
            noise = self._rng.normal(0.0, std, size=total[k].shape) if std > 0 else 0.0
            avg = (total[k] + noise) / m
            new[k] = (np.asarray(ref, dtype=np.float64) + avg).astype(np.asarray(ref).dtype)
        self.ledger.step(noise_multiplier=self.noise_multiplier, sample_rate=float(rate))
        if self.adaptive:
            noisy = below + (self._rng.normal(0.0, self.count_noise) if self.count_noise else 0.0)
            self.clip_norm *= math.exp(-self.clip_lr * (noisy / m - self.target_quantile))
        self.rounds += 1
        return new

    def state_dict(self) -> dict:
        """JSON-able state (ledger, current clip, RNG, round count) for an exact resume."""
        return {
            "ledger": self.ledger.state_dict(),
            "clip_norm": self.clip_norm,
            "rng": self._rng.bit_generator.state,
            "rounds": self.rounds,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``; later rounds match an uninterrupted run exactly.

        Raises:
            PrivacyConfigError: The state lacks a key or does not fit this accountant.
        """
        for key in ("ledger", "clip_norm", "rng", "rounds"):
            if key not in state:
                raise PrivacyConfigError(
                    f"DPFedAvg state must have key {key!r}, got {sorted(state)}"
                )
        self.ledger.load_state_dict(state["ledger"])
        self.clip_norm = float(state["clip_norm"])
        self._rng.bit_generator.state = state["rng"]
        self.rounds = int(state["rounds"])
