"""Differential privacy as the federated server sees it: none, sample-level (devices) or user-level.

* ``sample``: each device runs Opacus DP-SGD with its own persistent accountant and reports its
  epsilon with every update; the run's epsilon is the largest any device has reported.
* ``user``: the cloud runs DP-FedAvg (McMahan et al. 2018): it clips each device's update,
  averages, adds Gaussian noise, and steps an Opacus accountant with the client sampling rate:
  the planned ``m / population``, or the round's real rate when fewer devices were online.
"""

from __future__ import annotations

import logging
import math

from cloud.config import FederatedConfig
from cloud.errors import UpdateRejectedError
from cloud.strategies import ClientUpdate, Strategy
from converters.errors import ConfigError

log = logging.getLogger(__name__)


class RoundPrivacy:
    """Applies the configured DP mode to model preparation, round config and aggregation."""

    def __init__(self, config: FederatedConfig) -> None:
        self.config = config
        self.mode = config.dp
        self.dp_fedavg = None  # cloud.dp_fedavg.DPFedAvg, built when the population is known
        self._pending_state: dict | None = None
        self.device_epsilon: dict[str, float] = {}
        self.fix_report: list[str] = []
        self.stopped: str | None = None
        # User-level DP: (devices sampled, devices online) of the coming round, from before_round.
        self._sampling: tuple[int, int] | None = None
        # Population the resumed run's accountant planned with (from the checkpoint).
        self._planned_population: int | None = None

    def prepare_model(self, model):
        """Sample-level DP needs Opacus-compatible layers on the cloud's copy too (same keys)."""
        if self.mode != "sample":
            return model
        from split.privacy.dpsgd import fix_model

        model, self.fix_report = fix_model(model)
        for line in self.fix_report:
            log.info("opacus fix: %s", line)
        return model

    def client_config(self) -> dict:
        cfg = self.config
        if self.mode != "sample":
            return {}
        return {
            "dp": "sample",
            "noise_multiplier": cfg.noise_multiplier,
            "target_epsilon": cfg.target_epsilon,
            "delta": cfg.delta,
            "clip": cfg.clip,
        }

    def _clients_for(self, online: int) -> int:
        """How many devices the server samples from ``online`` (cloud.server ``_select``)."""
        cfg = self.config
        return min(cfg.clients_per_round or math.ceil(cfg.fraction * online), online)

    def before_round(self, *, num_selected: int, population: int) -> None:
        """Builds DP-FedAvg on the first round and notes what the coming round samples from.

        Args:
            num_selected: Devices the round samples; 0 before the selection (budget_exhausted
                then predicts the next round at the planned rate).
            population: Devices online, i.e. the ones the round samples from.
        """
        if self.mode != "user":
            return
        if self.dp_fedavg is None:
            self._build(population)
        # Before the selection the count online may be a momentary dip (the server waits for
        # min_clients): predict with the planned rate, which is the floor; the round's real
        # rate is checked again once its devices are drawn.
        self._sampling = (num_selected, population) if num_selected else None

    def _build(self, population: int) -> None:
        from cloud.dp_fedavg import DPFedAvg
        from split.privacy.budget import DPConfig

        cfg = self.config
        if cfg.population > population:
            # The accountant's sampling rate m / population would understate the real one.
            raise ConfigError(
                f"population={cfg.population} exceeds the {population} device(s) online; "
                "user-level epsilon would be under-reported (use population=0 to count them)"
            )
        # A resumed run keeps its plan (rate, calibrated noise) whoever is online now; a round
        # with fewer devices online is accounted with its real rate anyway.
        population = cfg.population or self._planned_population or population
        dp_config = DPConfig(
            mode="user",
            noise_multiplier=cfg.noise_multiplier,
            target_epsilon=cfg.target_epsilon,
            delta=cfg.delta,
            clip_norm=cfg.clip,
        )
        self.dp_fedavg = DPFedAvg.from_config(
            dp_config,
            clients_per_round=self._clients_for(population),
            population=population,
            rounds=cfg.rounds,
            seed=cfg.seed,
        )
        if self._pending_state is not None:
            self.dp_fedavg.load_state_dict(self._pending_state)
            self._pending_state = None
        log.info(
            "user-level DP-FedAvg: noise_multiplier=%.4g clip=%.3g m=%d population=%d",
            self.dp_fedavg.noise_multiplier,
            cfg.clip,
            self.dp_fedavg.clients_per_round,
            population,
        )

    def round_sample_rate(self) -> float:
        """The sampling rate the coming user-level round is accounted with.

        The accountant plans ``m / population``, but the server draws the round's devices from
        those online: with fewer online, each takes part with probability ``k / online`` >
        planned, and accounting the planned rate would under-report epsilon. The planned rate
        stays the floor: the noise was calibrated for it, and more devices online only makes
        the accounted epsilon conservative.
        """
        dp = self.dp_fedavg
        if self._sampling is None or self._sampling[1] < 1:
            return dp.sample_rate
        k, online = self._sampling
        return max(dp.sample_rate, min(1.0, k / online))

    def check_update(self, update: ClientUpdate) -> None:
        """Rejects a sample-level DP update whose reported epsilon cannot be right.

        A device's privacy ledger only grows, and never past the run's target: a lower epsilon
        than the device reported before means its ledger was reset (e.g. a restart without its
        state), a higher one than the target means it overspent.

        Raises:
            UpdateRejectedError: naming the device, the rule and the value.
        """
        if self.mode != "sample":
            return
        self._check_epsilon(update.client_id, update.metrics)

    def _check_epsilon(self, dev: str, metrics: dict) -> None:
        eps = metrics.get("epsilon")
        if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise UpdateRejectedError(f"device {dev}: metrics.epsilon must be >= 0, got {eps!r}")
        before = self.device_epsilon.get(dev, 0.0)
        if eps < before - 1e-9:
            raise UpdateRejectedError(
                f"device {dev}: epsilon {eps:.4g} < {before:.4g} it reported before; "
                "a privacy ledger never goes down (was the device reset without its state?)"
            )
        target = self.config.target_epsilon
        if target is not None and eps > target * (1 + 1e-6):
            # The device released that update to the cloud all the same: the run's epsilon
            # must show what it spent, although its update is refused.
            self._record(dev, metrics)
            raise UpdateRejectedError(
                f"device {dev}: epsilon {eps:.4g} exceeds target_epsilon={target}"
            )

    def _record(self, dev: str, metrics: dict) -> None:
        eps = metrics.get("epsilon")
        if isinstance(eps, (int, float)) and math.isfinite(eps):
            # max: a device's ledger only grows, so its largest report is its spending.
            self.device_epsilon[dev] = max(float(eps), self.device_epsilon.get(dev, 0.0))

    def aggregate(self, strategy: Strategy, params: dict, updates: list[ClientUpdate]) -> dict:
        if self.mode == "user":
            dp = self.dp_fedavg
            rate = self.round_sample_rate()
            if rate > dp.sample_rate:
                k, online = self._sampling
                log.info(
                    "user-level DP: round accounted with sampling rate %.4g (%d of %d device(s) "
                    "online) > planned %.4g (m=%d of population=%d)",
                    rate, k, online, dp.sample_rate, dp.clients_per_round, dp.population,
                )  # fmt: skip
            return dp.aggregate(params, updates, sample_rate=rate)
        if self.mode == "sample":
            for u in updates:
                self._record(u.client_id, u.metrics)
        return strategy.aggregate(params, updates)

    def admit_secure(self, metrics: dict[str, dict]) -> list[str]:
        """Secure rounds: checks every contributor's reported epsilon, records the valid ones.

        The rules are :meth:`check_update`'s. The cloud holds only the sum of the inputs, so
        it cannot drop one device's input as the plain path drops one update: the caller
        fails the round (the model stays) when this returns reasons. The valid epsilons, and
        one above the target, are recorded even then, since the cloud has already learned the
        sum.

        Args:
            metrics: contributor -> the metrics it reported alongside its protected input.

        Returns:
            One reason per device whose epsilon breaks a rule; empty when all are fine.
        """
        if self.mode != "sample":
            return []
        reasons = []
        for dev in sorted(metrics):
            try:
                self._check_epsilon(dev, metrics[dev])
            except UpdateRejectedError as exc:
                reasons.append(str(exc))
            else:
                self._record(dev, metrics[dev])
        return reasons

    def epsilon(self, updates: list[ClientUpdate]) -> float | None:
        """The run's epsilon so far (None without DP)."""
        if self.mode == "user":
            return self.dp_fedavg.epsilon() if self.dp_fedavg is not None else 0.0
        if self.mode == "sample":
            return max(self.device_epsilon.values(), default=0.0)
        return None

    def budget_exhausted(self) -> str | None:
        """A reason to stop before the next round, or None."""
        cfg = self.config
        if self.mode != "user" or self.dp_fedavg is None or cfg.target_epsilon is None:
            return None
        dp = self.dp_fedavg
        rate = self.round_sample_rate()
        after = dp.ledger.epsilon_after(noise_multiplier=dp.noise_multiplier, sample_rate=rate)
        if after > cfg.target_epsilon:
            at = ""
            if rate > dp.sample_rate:
                k, online = self._sampling
                at = f" at sampling rate {rate:.3g} ({k} of {online} device(s) online)"
            return (
                f"privacy budget: another round would reach epsilon {after:.3g}{at} > "
                f"target_epsilon={cfg.target_epsilon} (now {dp.epsilon():.3g})"
            )
        return None

    def state_dict(self) -> dict:
        return {
            "mode": self.mode,
            "dp_fedavg": self.dp_fedavg.state_dict() if self.dp_fedavg is not None else None,
            "population": (
                self.dp_fedavg.population
                if self.dp_fedavg is not None
                else self._planned_population
            ),
            "device_epsilon": dict(self.device_epsilon),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(
                f"--resume: checkpoint has dp={state.get('mode')!r}, this run has dp={self.mode!r}"
            )
        self.device_epsilon = dict(state.get("device_epsilon") or {})
        # The aggregator is rebuilt on the first resumed round; its ledger then continues.
        self._pending_state = state.get("dp_fedavg")
        population = state.get("population")  # absent in older checkpoints
        self._planned_population = population if isinstance(population, int) else None
