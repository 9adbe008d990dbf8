"""Differential privacy as the federated server sees it: none, sample-level (devices) or user-level.

* ``sample``: each device runs Opacus DP-SGD with its own persistent accountant and reports its
  epsilon with every update; the run's epsilon is the largest any device has reported.
* ``user``: the cloud runs DP-FedAvg (McMahan et al. 2018): it clips each device's update,
  averages, adds Gaussian noise, and steps an Opacus accountant with the client sampling rate.
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

    def before_round(self, *, num_selected: int, population: int) -> None:
        """Builds the DP-FedAvg aggregator on the first round, sized by the real population."""
        if self.mode != "user" or self.dp_fedavg is not None:
            return
        from cloud.dp_fedavg import DPFedAvg
        from split.privacy.budget import DPConfig

        cfg = self.config
        if cfg.population > population:
            # The accountant's sampling rate m / population would understate the real one.
            raise ConfigError(
                f"population={cfg.population} exceeds the {population} device(s) online; "
                "user-level epsilon would be under-reported (use population=0 to count them)"
            )
        population = cfg.population or population
        planned = cfg.clients_per_round or math.ceil(cfg.fraction * population)
        dp_config = DPConfig(
            mode="user",
            noise_multiplier=cfg.noise_multiplier,
            target_epsilon=cfg.target_epsilon,
            delta=cfg.delta,
            clip_norm=cfg.clip,
        )
        self.dp_fedavg = DPFedAvg.from_config(
            dp_config,
            clients_per_round=min(planned, population),
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
        eps = update.metrics.get("epsilon")
        dev = update.client_id
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
            raise UpdateRejectedError(
                f"device {dev}: epsilon {eps:.4g} exceeds target_epsilon={target}"
            )

    def aggregate(self, strategy: Strategy, params: dict, updates: list[ClientUpdate]) -> dict:
        if self.mode == "user":
            return self.dp_fedavg.aggregate(params, updates)
        if self.mode == "sample":
            for u in updates:
                eps = u.metrics.get("epsilon")
                if isinstance(eps, (int, float)) and math.isfinite(eps):
                    self.device_epsilon[u.client_id] = float(eps)
        return strategy.aggregate(params, updates)

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
        after = dp.ledger.epsilon_after(
            noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate
        )
        if after > cfg.target_epsilon:
            return (
                f"privacy budget: another round would reach epsilon {after:.3g} > "
                f"target_epsilon={cfg.target_epsilon} (now {dp.epsilon():.3g})"
            )
        return None

    def state_dict(self) -> dict:
        return {
            "mode": self.mode,
            "dp_fedavg": self.dp_fedavg.state_dict() if self.dp_fedavg is not None else None,
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
