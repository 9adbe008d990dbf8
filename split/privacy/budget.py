"""Privacy budgets: DP configuration, delta checks, noise calibration and a persistent ledger."""

from __future__ import annotations

import copy
import functools
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from split.errors import PrivacyConfigError

# Opacus' accountant package imports torch (through its optimizer hook), so every Opacus
# import below is lazy: DPConfig and the ledger's JSON state must load on torch-free hosts.


def _rdp() -> Any:
    from opacus.accountants import RDPAccountant

    return RDPAccountant()


def _prv() -> Any:
    from opacus.accountants import PRVAccountant

    return PRVAccountant()


# Name -> factory of an Opacus accountant. GDP is left out on purpose: it is only an
# asymptotic approximation and can under-report epsilon for few steps.
ACCOUNTANTS: dict[str, Callable[[], Any]] = {"rdp": _rdp, "prv": _prv}

MODES = ("sample", "user")

# Noise multipliers above this drown the signal for the model sizes edgesplit targets
# (Abadi et al. use 0.7-8; McMahan et al. 2018 use ~1), so a target needing more is
# reported as infeasible instead of silently training a useless model.
MAX_NOISE_MULTIPLIER = 20.0


def create_accountant(name: str) -> Any:
    """Return a fresh Opacus accountant registered under ``name``.

    Raises:
        ValueError: ``name`` is not registered; the message lists the known names.
    """
    if name not in ACCOUNTANTS:
        raise ValueError(
            f"accountant={name!r} is unknown; known accountants: {', '.join(ACCOUNTANTS)}"
        )
    return ACCOUNTANTS[name]()


def _check_nonneg(name: str, value: float) -> None:
    if not isinstance(value, numbers.Real) or math.isnan(value) or value < 0:
        raise PrivacyConfigError(f"{name} must be >= 0, got {value}")


def _check_pos(name: str, value: float) -> None:
    if not isinstance(value, numbers.Real) or math.isnan(value) or value <= 0:
        raise PrivacyConfigError(f"{name} must be > 0, got {value}")


def _check_unit(name: str, value: float) -> None:
    if not isinstance(value, numbers.Real) or math.isnan(value) or not 0 < value < 1:
        raise PrivacyConfigError(f"{name} must be in (0, 1), got {value}")


@dataclass(frozen=True)
class DPConfig:
    """Differential-privacy settings for one training run.

    Attributes:
        mode: ``"sample"`` (DP-SGD on a device, Abadi et al. 2016) or ``"user"`` (DP-FedAvg in
            the cloud, McMahan et al. 2018).
        noise_multiplier: Gaussian noise std divided by the clip norm. Exactly one of this and
            ``target_epsilon`` is set.
        target_epsilon: Budget to calibrate the noise for (and to stop at).
        delta: Target delta; must also be below 1/N for the protected population.
        max_grad_norm: Per-sample gradient clip (sample mode).
        clip_norm: Per-client update clip, initial value if adaptive (user mode).
        accountant: ``"rdp"`` or ``"prv"`` (Opacus accountants).
        adaptive_clip: User mode only: adapt ``clip_norm`` to a quantile of update norms
            (Andrew et al. 2021).
        target_quantile: Quantile of client update norms the adaptive clip tracks.
        clip_lr: Geometric learning rate of the adaptive clip.
    """

    mode: str
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    clip_norm: float = 1.0
    accountant: str = "rdp"
    adaptive_clip: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PrivacyConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise PrivacyConfigError(
                "exactly one of noise_multiplier / target_epsilon must be set, got "
                f"noise_multiplier={self.noise_multiplier}, target_epsilon={self.target_epsilon}"
            )
        if self.noise_multiplier is not None:
            _check_nonneg("noise_multiplier", self.noise_multiplier)
        if self.target_epsilon is not None:
            _check_pos("target_epsilon", self.target_epsilon)
        _check_unit("delta", self.delta)
        _check_pos("max_grad_norm", self.max_grad_norm)
        _check_pos("clip_norm", self.clip_norm)
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyConfigError(
                f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}"
            )
        if self.adaptive_clip and self.mode != "user":
            raise PrivacyConfigError(
                f"adaptive_clip is only supported in mode='user', got mode={self.mode!r}"
            )
        _check_unit("target_quantile", self.target_quantile)
        _check_pos("clip_lr", self.clip_lr)


def check_delta(delta: float, n: int) -> None:
    """Reject a delta that is not below 1/N (it would allow leaking a whole record).

    Args:
        delta: Target delta.
        n: Size of the protected population (samples on a device, or clients).

    Raises:
        PrivacyConfigError: ``delta >= 1/n`` or either value is out of range.
    """
    _check_unit("delta", delta)
    if not isinstance(n, int) or n < 1:
        raise PrivacyConfigError(f"population size must be a positive int, got {n}")
    if delta >= 1.0 / n:
        raise PrivacyConfigError(
            f"delta must be < 1/N = {1.0 / n:.3g} for N={n} records, got delta={delta}; "
            f"use delta <= {0.1 / n:.1g}"
        )


def _epsilon_of(accountant: str, history: list[tuple[float, float, int]], delta: float) -> float:
    acc = create_accountant(accountant)
    acc.history = list(history)
    # Probing extreme settings triggers Opacus' "largest alpha" hint, which is noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return _safe_epsilon(acc, delta)


@functools.lru_cache(maxsize=256)
def _cached_epsilon(accountant: str, history: tuple, delta: float) -> float:
    # A round asks for the same history twice (budget check before, report after) and Opacus
    # RDP/PRV conversions cost 20-400 ms, so identical questions are answered once.
    return _epsilon_of(accountant, list(history), delta)


def _safe_epsilon(acc: Any, delta: float) -> float:
    if not acc.history or all(steps == 0 or q == 0 for _, q, steps in acc.history):
        return 0.0
    # Opacus divides by sigma; zero noise on sampled data simply means no privacy.
    if any(sigma == 0 and q > 0 for sigma, q, _ in acc.history):
        return math.inf
    return float(acc.get_epsilon(delta))


def _epsilon_by_steps(accountant: str, sigma: float, q: float, delta: float):
    """Return ``n -> epsilon after n steps of (sigma, q)``, computed by Opacus."""
    if accountant != "rdp":
        return lambda n: _epsilon_of(accountant, [(sigma, q, n)], delta)
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    # Opacus' RDP of n identical steps is n times one step's RDP (compute_rdp multiplies by
    # steps), so one compute_rdp call serves a whole search; the conversion to epsilon is the
    # one RDPAccountant.get_epsilon runs.
    orders = RDPAccountant.DEFAULT_ALPHAS
    one = analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)

    def epsilon_at(n: int) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return float(analysis.get_privacy_spent(orders=orders, rdp=one * n, delta=delta)[0])

    return epsilon_at


def _max_steps(
    *, accountant: str, target_epsilon: float, delta: float, sigma: float, q: float, above: int
) -> int:
    """Largest step count whose epsilon stays <= target at noise ``sigma`` (binary search).

    ``above`` is a step count known to exceed the target, so the answer is below it.
    """
    epsilon_at = _epsilon_by_steps(accountant, sigma, q, delta)
    lo, hi = 0, above
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if epsilon_at(mid) <= target_epsilon:
            lo = mid
        else:
            hi = mid
    return lo


def noise_for_target(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
) -> float:
    """Smallest noise multiplier whose epsilon after ``steps`` steps is <= ``target_epsilon``.

    Uses Opacus' ``get_noise_multiplier`` (binary search, tolerance 0.01 in epsilon; the
    returned sigma is on the safe side).

    Args:
        target_epsilon: Budget to reach at the end of the run.
        delta: Target delta.
        sample_rate: Poisson sampling rate per step (batch/N, or clients/population).
        steps: Planned number of steps (optimizer steps, or federated rounds).
        accountant: Accountant name in ``ACCOUNTANTS``.
        max_noise_multiplier: Largest sigma considered sane.

    Raises:
        PrivacyConfigError: A parameter is out of range, or the target needs more noise than
            ``max_noise_multiplier``; the message gives the epsilon reachable at that noise and
            the largest step count that fits the target.
    """
    _check_pos("target_epsilon", target_epsilon)
    _check_unit("delta", delta)
    if not 0 < sample_rate <= 1:
        raise PrivacyConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not isinstance(steps, int) or steps < 1:
        raise PrivacyConfigError(f"steps must be a positive int, got {steps}")
    create_accountant(accountant)
    from opacus.accountants.utils import get_noise_multiplier

    reachable = _epsilon_of(accountant, [(max_noise_multiplier, sample_rate, steps)], delta)
    if reachable <= target_epsilon:
        with warnings.catch_warnings():
            # Large trial sigmas trigger Opacus' "largest alpha" hint; it does not apply here.
            warnings.simplefilter("ignore", UserWarning)
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        # Opacus' search stops within its tolerance, possibly above a cap that already fits.
        return float(min(sigma, max_noise_multiplier))
    fit = _max_steps(
        accountant=accountant,
        target_epsilon=target_epsilon,
        delta=delta,
        sigma=max_noise_multiplier,
        q=sample_rate,
        above=steps,
    )
    if fit > 0:
        fewer = f"or at most steps={fit} at target_epsilon={target_epsilon}"
    else:
        one = _epsilon_of(accountant, [(max_noise_multiplier, sample_rate, 1)], delta)
        fewer = f"even steps=1 reaches epsilon={one:.3g}"
    raise PrivacyConfigError(
        f"target_epsilon={target_epsilon} is infeasible for steps={steps} at "
        f"sample_rate={sample_rate:.4g}: it needs noise_multiplier > {max_noise_multiplier}; "
        f"closest feasible: epsilon={reachable:.3g} with noise_multiplier="
        f"{max_noise_multiplier}, {fewer}"
    )


class PrivacyLedger:
    """A persistent, checkpointable Opacus accountant with a fixed delta.

    The ledger never computes epsilon itself: it keeps an Opacus accountant's ``history``
    (``[(noise_multiplier, sample_rate, steps), ...]``) and asks Opacus. The accountant object
    is exposed as ``accountant`` so a ``PrivacyEngine`` can step it through its optimizer hook.

    Args:
        accountant: Name in ``ACCOUNTANTS``.
        delta: Delta at which epsilon is reported.
    """

    def __init__(self, *, accountant: str = "rdp", delta: float) -> None:
        _check_unit("delta", delta)
        self.accountant = create_accountant(accountant)
        self.mechanism = accountant
        self.delta = float(delta)

    @property
    def steps(self) -> int:
        """Total number of steps recorded so far."""
        return sum(int(s) for _, _, s in self.accountant.history)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` steps of the sampled Gaussian mechanism.

        The history ends up exactly as after ``steps`` calls of Opacus' ``accountant.step``
        (a run of equal parameters is merged into one entry), so epsilon matches Opacus.

        Raises:
            PrivacyConfigError: A parameter is out of range.
        """
        _check_nonneg("noise_multiplier", noise_multiplier)
        if not 0 <= sample_rate <= 1 or math.isnan(sample_rate):
            raise PrivacyConfigError(f"sample_rate must be in [0, 1], got {sample_rate}")
        if not isinstance(steps, int) or steps < 0:
            raise PrivacyConfigError(f"steps must be a non-negative int, got {steps}")
        if steps == 0:
            return
        hist = self.accountant.history
        if hist and hist[-1][0] == noise_multiplier and hist[-1][1] == sample_rate:
            sigma, q, n = hist[-1]
            hist[-1] = (sigma, q, n + steps)
        else:
            hist.append((noise_multiplier, sample_rate, steps))

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (0.0 before any step, inf with zero noise)."""
        history = tuple(tuple(entry) for entry in self.accountant.history)
        return _cached_epsilon(self.mechanism, history, self.delta)

    def epsilon_after(
        self, *, noise_multiplier: float, sample_rate: float, steps: int = 1
    ) -> float:
        """Epsilon the ledger would report after ``steps`` more steps (computed on a copy)."""
        trial = copy.deepcopy(self)
        trial.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return trial.epsilon()

    def would_exceed(
        self, *, target_epsilon: float, noise_multiplier: float, sample_rate: float, steps: int = 1
    ) -> bool:
        """Whether ``steps`` more steps would push epsilon above ``target_epsilon``."""
        after = self.epsilon_after(
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps
        )
        return after > target_epsilon

    def state_dict(self) -> dict:
        """JSON-able state: accountant name, delta and history as lists."""
        return {
            "mechanism": self.mechanism,
            "delta": self.delta,
            "history": [[float(s), float(q), int(n)] for s, q, n in self.accountant.history],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``; the same accountant object is kept (hooks stay attached).

        Raises:
            PrivacyConfigError: The state is malformed or from another accountant or delta.
        """
        for key in ("mechanism", "delta", "history"):
            if key not in state:
                raise PrivacyConfigError(f"ledger state must have key {key!r}, got {sorted(state)}")
        if state["mechanism"] != self.mechanism:
            raise PrivacyConfigError(
                f"ledger state mechanism must be {self.mechanism!r}, got {state['mechanism']!r}"
            )
        if state["delta"] != self.delta:
            raise PrivacyConfigError(
                f"ledger state delta must be {self.delta}, got {state['delta']}"
            )
        history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        self.accountant.load_state_dict({"history": history, "mechanism": self.mechanism})
