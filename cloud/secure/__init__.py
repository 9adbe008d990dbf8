"""Secure aggregation modes of federated rounds: a registry plus the phase-collecting base."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from converters.errors import ConfigError
from converters.wire import Envelope, MsgType

log = logging.getLogger(__name__)

# secure= name -> (module, class); imported on first use (cryptography, gmpy2 load lazily).
_REGISTRY = {
    "secagg": ("cloud.secure.secagg_server", "SecAggAggregator"),
    "he-paillier": ("cloud.secure.he_server", "HeAggregator"),
}

__all__ = ["SECURE_AGGREGATORS", "SecureAggregator", "SecureOutcome", "get_secure"]

SECURE_AGGREGATORS = tuple(sorted(_REGISTRY))

# broadcast([(device, type, meta, body), ...]) -> devices it could not deliver to
Broadcast = Callable[[list[tuple[str, MsgType, dict, bytes]]], set[str]]


@dataclass
class SecureOutcome:
    """What a secure round produced: the averaged update delta, or why there is none.

    Attributes:
        delta: flat float64 average of the contributors' (clipped) deltas, sorted-key order.
        contributors: devices whose input is inside the aggregate.
        reason: one line saying why the round failed (None if it did not).
        metrics: per-device metrics reported alongside the protected input.
    """

    delta: np.ndarray | None
    contributors: list[str] = field(default_factory=list)
    reason: str | None = None
    metrics: dict[str, dict] = field(default_factory=dict)

    def counts(self, state) -> dict:
        """The round's client and rejection counters for the metrics row."""
        with state.cond:
            return {
                "clients_selected": len(state.selected),
                "clients_ok": len(self.contributors),
                "clients_dropped": len(state.dropped),
                "clients_timed_out": len(state.selected - set(self.contributors) - state.dropped),
                "rejected": state.rejected,
                "late": state.late,
                "duplicates": state.duplicates,
            }


def get_secure(name: str, **kwargs) -> SecureAggregator:
    """Builds the aggregator for ``secure=name``.

    Raises:
        ValueError: unknown name, listing the known ones.
    """
    if name not in _REGISTRY:
        raise ValueError(f"secure={name!r} unknown; known: {', '.join(SECURE_AGGREGATORS)}")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)(**kwargs)


def _reject(state, reason: str) -> None:
    log.warning("rejected: %s", reason)
    state.reject(reason)


class SecureAggregator:
    """Base of the cloud side of a secure mode: collects one message per device per phase.

    The MQTT dispatcher thread hands messages to :meth:`on_message`; the round thread opens a
    phase, sends requests and waits in :meth:`_collect` until every expected device answered,
    vanished (last will, recorded in the round state) or the deadline passed. A message for
    another phase is counted late, a second one from a device a duplicate, a malformed one
    rejected with its reason; none of them reaches the aggregate.

    Args:
        config: the run's :class:`cloud.config.FederatedConfig`.
        broadcast: sends messages to devices (in parallel); returns the undelivered devices.
        num_samples: a registered device's training set size (its FedAvg weight).
    """

    handles: frozenset[MsgType] = frozenset()

    def __init__(self, *, config, broadcast: Broadcast, num_samples: Callable[[str], int]) -> None:
        if config.dp == "user":
            raise ConfigError(
                f"secure={config.secure!r} cannot be combined with dp='user': the cloud never sees "
                "single updates to clip; use dp='sample' (DP-SGD on devices) instead"
            )
        self.config = config
        self._broadcast = broadcast
        self._num_samples = num_samples
        self._phase: str | None = None
        self._expected: set[str] = set()
        self._got: dict[str, object] = {}
        # Devices whose message was accepted in an already-closed phase of this round: a copy
        # arriving after the phase closed is a duplicate, not a late message.
        self._closed: dict[tuple[int, str], set[str]] = {}
        self._parsers: dict[str, Callable[[str, Envelope], object]] = {}

    # -- hooks the server calls --------------------------------------------------------------

    def client_config(self, selected: list[str]) -> dict:
        """Settings added to the round config sent with MODEL."""
        total = sum(self._num_samples(d) for d in selected)
        return {"secure": self.config.secure, "secure_total_samples": max(1, total)}

    def prepare(self, selected: list[str], state, params: dict, deadline: float) -> None:
        """Runs before :meth:`client_config` and MODEL (key setup, opening the first phase)."""

    def run(self, state, params: dict[str, np.ndarray], deadline: float) -> SecureOutcome:
        raise NotImplementedError

    def on_message(self, device: str, env: Envelope, state) -> None:
        """Called on the dispatcher thread for every message type in :attr:`handles`."""
        phase = env.meta.get("phase")
        with state.cond:
            if phase != self._phase:
                if device in self._closed.get((state.round, phase), ()):
                    state.duplicates += 1
                    log.warning("rejected: duplicate %s phase=%s from %s (phase closed)",
                                env.type.name, phase, device)  # fmt: skip
                    return
                state.late += 1
                log.info("%s %s phase=%r outside its phase (now %r): ignored",
                         device, env.type.name, phase, self._phase)  # fmt: skip
                return
            if device not in self._expected:
                _reject(state, f"{device}: {env.type.name} phase={phase} but not expected in it")
                return
            if device in self._got:
                state.duplicates += 1
                log.warning("rejected: duplicate %s phase=%s from %s", env.type.name, phase, device)
                return
            parse = self._parsers[phase]
        try:
            value = parse(device, env)
        except (ValueError, KeyError, TypeError) as exc:  # WireError/KernelInputError too
            _reject(state, f"{env.type.name} phase={phase} from {device} round {env.round}: {exc}")
            with state.cond:
                # The topic authenticates the device (broker ACL): it is out of this phase,
                # so the round goes on without waiting for the deadline.
                if self._phase == phase:
                    self._expected.discard(device)
                state.cond.notify_all()
            return
        with state.cond:
            if self._phase != phase or device in self._got:
                state.duplicates += 1
                return
            self._got[device] = value
            state.cond.notify_all()

    # -- helpers ----------------------------------------------------------------------------

    def _open(self, state, phase: str, expected, parse: Callable[[str, Envelope], object]) -> None:
        with state.cond:
            self._closed = {k: v for k, v in self._closed.items() if k[0] == state.round}
            self._phase, self._expected, self._got = phase, set(expected), {}
            self._parsers[phase] = parse

    def _collect(self, state, deadline: float) -> dict[str, object]:
        with state.cond:
            while self._expected - set(self._got) - state.dropped:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                state.cond.wait(min(left, 0.5))
            got = dict(self._got)
            self._closed[(state.round, self._phase)] = set(got)
            self._phase = None
        return got

    def _send(self, messages: list[tuple[str, MsgType, dict, bytes]], state) -> None:
        for device in self._broadcast(messages):
            state.drop(device)

    def _weight(self, devices, total: int) -> float:
        return sum(self._num_samples(d) for d in devices) / total
