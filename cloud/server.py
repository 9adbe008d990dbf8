"""The cloud trainer: coordinates federated rounds with devices over MQTT.

Each round: select online devices, send each the global model on its own downlink, collect
updates on ``up/+`` until every selected device answered, vanished (last will) or the deadline
passed, aggregate if at least ``min_clients`` answered, evaluate on the held-out set, checkpoint.
Every bad message (malformed, wrong run, wrong shapes, NaN/Inf, unregistered sender, late or
duplicate) is rejected with a logged one-line reason and counted; the global model never
absorbs it and the round goes on.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

from cloud.checkpoint import load_checkpoint, save_checkpoint
from cloud.config import FederatedConfig
from cloud.devices import DeviceRegistry
from cloud.errors import RoundFailedError, UpdateRejectedError
from cloud.privacy_round import RoundPrivacy
from cloud.report import RunReport
from cloud.round_state import RoundState
from cloud.secure import get_secure
from cloud.strategies import ClientUpdate, get_strategy, validate_update
from cloud.strategies.base import cast_like
from converters.datasets import Dataset
from converters.errors import TransportError, WireError
from converters.mqtt import MqttConfig, MqttEndpoint
from converters.secagg_protocol import unflatten_params
from converters.tensor_codec import decode_tensors, encode_tensors
from converters.topics import Topics
from converters.wire import Envelope, MsgType, decode, encode
from split.errors import PrivacyBudgetExceededError

log = logging.getLogger(__name__)
CLOUD_ID = "cloud"


class FederatedServer:
    """Runs a federated training session against devices reachable through one broker.

    Args:
        config: the run's settings.
        mqtt: connection to the broker (client id defaults to ``cloud``).
        test_set: held-out data the cloud evaluates the global model on each round.
        expected_devices: devices to wait for before round 1 (default ``min_clients``).
        on_round: called with each round's metrics row (progress displays).
    """

    def __init__(
        self,
        config: FederatedConfig,
        *,
        mqtt: MqttConfig,
        test_set: Dataset,
        expected_devices: int | None = None,
        on_round: Callable[[dict], None] | None = None,
    ) -> None:
        import torch

        from split.zoo import build_model

        self.config = config
        self.topics = Topics(prefix=config.prefix)
        self.test = test_set
        self.expected = expected_devices or config.min_clients
        self.on_round = on_round
        self.registry = DeviceRegistry()
        self.model, self.spec = build_model(config.model, seed=config.seed)
        self.privacy = RoundPrivacy(config)
        self.model = self.privacy.prepare_model(self.model)
        self.params = {k: v.detach().numpy().copy() for k, v in self.model.state_dict().items()}
        self._expect = {k: (v.shape, str(v.dtype)) for k, v in self.params.items()}
        self.strategy = get_strategy(config.strategy, **config.strategy_args)
        self.rng = np.random.default_rng(config.seed)
        self.round = 0
        self.session = secrets.token_hex(8)
        self.report = RunReport(config.out_dir)
        self.ckpt_path = Path(config.out_dir) / "checkpoint.npz"
        self._state: RoundState | None = None
        self._state_lock = threading.Lock()
        self._seq = 0
        self.stray_rejected = 0
        self._torch = torch
        self.endpoint = MqttEndpoint(mqtt)
        self._samples: dict[str, int] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.secure = None
        if config.secure != "none":
            self.secure = get_secure(
                config.secure,
                config=config,
                broadcast=self._secure_broadcast,
                num_samples=lambda d: self._samples.get(d, 0),
            )

    # -- messages --------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _reject(self, reason: str) -> None:
        log.warning("rejected: %s", reason)
        with self._state_lock:
            state = self._state
        if state is not None:
            state.reject(reason)
        else:
            self.stray_rejected += 1

    def _on_up(self, topic: str, sender: str, payload: bytes) -> None:
        try:
            kind, device = self.topics.parse_device(topic)
            env = decode(payload, max_bytes=self.config.max_update_bytes, run_id=self.config.run_id)
        except WireError as exc:
            self._reject(f"{topic}: {exc}")
            return
        if env.sender != device:
            # The topic is what the broker's ACL authenticates; the envelope must agree.
            self._reject(f"{topic}: sender {env.sender!r} does not match topic device {device!r}")
            return
        if env.type == MsgType.HELLO:
            num = env.meta.get("num_samples", 0)
            if not isinstance(num, int) or num < 0:
                self._reject(f"{device}: HELLO num_samples must be an int >= 0, got {num!r}")
                return
            self._samples[device] = num
            if self.registry.register(device, num_samples=num):
                log.debug("device %s registered (%d samples)", device, num)
        elif env.type == MsgType.UPDATE:
            self._on_update(device, env)
        elif self.secure is not None and env.type in self.secure.handles:
            self._on_secure(device, env)
        elif env.type == MsgType.ERROR:
            log.warning("device %s reports: %s", device, env.meta.get("error"))
            with self._state_lock:
                state = self._state
            if state is not None and env.round == state.round:
                state.drop(device)
        else:
            self._reject(f"{device}: unexpected message type {env.type.name} on the uplink")

    def _on_update(self, device: str, env: Envelope) -> None:
        with self._state_lock:
            state = self._state
        if not self.registry.is_registered(device):
            self._reject(f"update from unregistered device {device!r}")
            return
        if state is None or env.round != state.round:
            log.info("late update from %s for round %d ignored", device, env.round)
            if state is not None:
                with state.cond:
                    state.late += 1
            return
        num = env.meta.get("num_samples")
        try:
            if not isinstance(num, int) or num <= 0:
                raise UpdateRejectedError(f"num_samples must be an int > 0, got {num!r}")
            params = decode_tensors(env.body, expect=self._expect)
            update = ClientUpdate(
                client_id=device,
                params=params,
                num_samples=num,
                metrics=env.meta.get("metrics") or {},
            )
            validate_update(self.params, update)
            self.privacy.check_update(update)
        except (WireError, ValueError) as exc:
            self._reject(f"update from {device} for round {env.round}: {exc}")
            return
        reason = state.add_update(update)
        if reason is not None:
            log.info("update ignored: %s", reason)

    def _on_secure(self, device: str, env: Envelope) -> None:
        with self._state_lock:
            state = self._state
        if not self.registry.is_registered(device):
            self._reject(f"{env.type.name} from unregistered device {device!r}")
        elif state is None or env.round != state.round:
            log.info("late %s from %s for round %d ignored", env.type.name, device, env.round)
            if state is not None:
                with state.cond:
                    state.late += 1
        else:
            self.secure.on_message(device, env, state)

    def _secure_broadcast(self, messages: list[tuple[str, MsgType, dict, bytes]]) -> set[str]:
        """Sends secure-protocol messages in parallel; returns the devices not reached."""

        def one(device: str, msg_type: MsgType, meta: dict, body: bytes) -> str | None:
            env = Envelope(
                type=msg_type, run_id=self.config.run_id, round=self.round, sender=CLOUD_ID,
                seq=self._next_seq(), meta=meta, body=body,
            )  # fmt: skip
            try:
                self.endpoint.send(
                    self.topics.down(device), encode(env), timeout=self.config.round_timeout
                )
            except TransportError as exc:
                log.warning("%s for %s not delivered: %s", msg_type.name, device, exc)
                return device
            return None

        futures = [self._pool.submit(one, *m) for m in messages]
        wait(futures)
        return {f.result() for f in futures} - {None}

    def _on_presence(self, topic: str, sender: str, payload: bytes) -> None:
        try:
            _, device = self.topics.parse_device(topic)
            doc = json.loads(bytes(payload))
            online = doc["status"] == "online"
        except (WireError, ValueError, KeyError, TypeError) as exc:
            self._reject(f"{topic}: bad presence message: {exc}")
            return
        self.registry.set_presence(device, online)
        if not online:
            with self._state_lock:
                state = self._state
            if state is not None and state.drop(device):
                log.info("device %s vanished during round %d", device, state.round)

    def _announce(self, msg_type: MsgType, status: str) -> None:
        env = Envelope(
            type=msg_type,
            run_id=self.config.run_id,
            round=self.round,
            sender=CLOUD_ID,
            seq=self._next_seq(),
            meta={"session": self.session, "status": status, "rounds": self.config.rounds},
        )
        # Retained: a device that (re)connects learns the run's state at once.
        self.endpoint.publish_small(self.topics.ctrl(), encode(env), retain=True)

    # -- rounds ----------------------------------------------------------------------------

    def _select(self) -> tuple[list[str], int]:
        """The round's devices, sampled from those online, and how many were online."""
        online = self.registry.online()
        if len(online) < self.config.min_clients:
            self.registry.wait_for(self.config.min_clients, timeout=self.config.register_timeout)
            online = self.registry.online()
        cfg = self.config
        k = cfg.clients_per_round or math.ceil(cfg.fraction * len(online))
        k = min(k, len(online))
        if k < cfg.min_clients:
            raise RoundFailedError(
                f"round {self.round}: only {len(online)} device(s) online, "
                f"min_clients is {cfg.min_clients}"
            )
        return sorted(self.rng.choice(online, size=k, replace=False).tolist()), len(online)

    def _round_config(self, selected: list[str]) -> dict:
        cfg = self.config
        return {
            **(self.secure.client_config(selected) if self.secure is not None else {}),
            "epochs": cfg.local_epochs,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "momentum": cfg.momentum,
            "codec": cfg.codec,
            "compress": cfg.compress,
            "rounds": cfg.rounds,
            **self.strategy.client_config(),
            **self.privacy.client_config(),
        }

    def _model_message(self, meta: dict, state: RoundState) -> bytes:
        """The round's MODEL message, encoded once: every selected device gets the same bytes
        (one copy and one CRC per round instead of per device)."""
        env = Envelope(
            type=MsgType.MODEL,
            run_id=self.config.run_id,
            round=state.round,
            sender=CLOUD_ID,
            seq=self._next_seq(),
            meta=meta,
            body=encode_tensors(self.params, codec="float32"),
        )
        return encode(env)

    def _send_model(self, device: str, message: bytes, state: RoundState) -> None:
        try:
            self.endpoint.send(self.topics.down(device), message, timeout=self.config.round_timeout)
        except TransportError as exc:
            log.warning("model for %s not delivered: %s", device, exc)
            state.drop(device)

    def _evaluate(self) -> tuple[float, float]:
        from split.train import evaluate

        torch = self._torch
        self.model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in self.params.items()})
        return evaluate(self.model, self.test.x, self.test.y)

    def _run_round(self, pool: ThreadPoolExecutor) -> dict:
        cfg = self.config
        t0 = time.monotonic()
        sent0, recv0 = self.endpoint.stats.bytes_sent, self.endpoint.stats.bytes_received
        selected, online = self._select()
        # The devices really sampled from: user-level DP accounts m / online when that exceeds
        # the planned m / population.
        self.privacy.before_round(num_selected=len(selected), population=online)
        budget = self.privacy.budget_exhausted()  # at the rate of the devices really drawn
        if budget:
            raise PrivacyBudgetExceededError(budget.removeprefix("privacy budget: "))
        state = RoundState(round=self.round, selected=frozenset(selected))
        with self._state_lock:
            self._state = state
        self._announce(MsgType.ROUND_START, "running")
        if self.secure is not None:
            try:
                self.secure.prepare(selected, state, self.params, t0 + cfg.round_timeout)
            except RoundFailedError:
                with self._state_lock:
                    self._state = None
                raise
        meta = {"model": cfg.model, "session": self.session, "config": self._round_config(selected)}
        message = self._model_message(meta, state)
        for device in selected:
            pool.submit(self._send_model, device, message, state)
        if self.secure is not None:
            return self._finish_secure_round(state, t0, sent0, recv0)
        state.wait(deadline=t0 + cfg.round_timeout)
        with self._state_lock:
            self._state = None
        with state.cond:
            # Arrival order varies; a fixed order makes float sums (and resumed runs) reproducible.
            updates = sorted(state.updates.values(), key=lambda u: u.client_id)
            row = {
                "round": self.round,
                "clients_selected": len(selected),
                "clients_ok": len(updates),
                "clients_dropped": len(state.dropped),
                "clients_timed_out": len(state.pending()),
                "rejected": state.rejected,
                "late": state.late,
                "duplicates": state.duplicates,
            }
        if len(updates) >= cfg.min_clients:
            self.params = self.privacy.aggregate(self.strategy, self.params, updates)
            acc, loss = self._evaluate()
            row.update(status="ok", accuracy=acc, loss=loss)
        else:
            log.warning(
                "round %d failed: %d of %d selected devices answered, min_clients is %d; "
                "the previous model stays",
                self.round,
                len(updates),
                len(selected),
                cfg.min_clients,
            )
            row.update(status="failed", accuracy=None, loss=None)
        train_s = [float(u.metrics.get("train_seconds", 0.0)) for u in updates]
        row.update(
            epsilon=self.privacy.epsilon(updates),
            bytes_up=self.endpoint.stats.bytes_received - recv0,
            bytes_down=self.endpoint.stats.bytes_sent - sent0,
            seconds=time.monotonic() - t0,
            slowest_train_seconds=max(train_s, default=0.0),
        )
        return row

    def _finish_secure_round(self, state: RoundState, t0: float, sent0: int, recv0: int) -> dict:
        """Secure modes: the aggregate comes from cloud.secure; single updates are never seen."""
        try:
            outcome = self.secure.run(state, self.params, t0 + self.config.round_timeout)
        finally:
            with self._state_lock:
                self._state = None
        reason = outcome.reason
        if outcome.delta is not None:
            # Sample-level DP: devices report their epsilon with the protected input, so it is
            # known before the aggregate is applied. One bad report cannot be taken out of the
            # sum, so it fails the whole round and the model stays.
            metrics = {d: outcome.metrics.get(d, {}) for d in outcome.contributors}
            rejected = self.privacy.admit_secure(metrics)
            for why in rejected:
                log.warning("rejected: %s", why)
                state.reject(why)
            if rejected:
                n = len(outcome.contributors)
                reason = (
                    f"round {self.round}: {'; '.join(rejected)}; the aggregate of {n} device(s) "
                    "is not applied, the previous model stays"
                )
        row = {"round": self.round, **outcome.counts(state)}
        if outcome.delta is not None and reason is None:
            delta = unflatten_params(outcome.delta, self.params)
            self.params = {k: cast_like(v + delta[k], v) for k, v in self.params.items()}
            acc, loss = self._evaluate()
            row.update(status="ok", accuracy=acc, loss=loss)
        else:
            log.warning("%s", reason)
            row.update(status="failed", accuracy=None, loss=None, error=reason)
        train_s = [float(m.get("train_seconds", 0.0)) for m in outcome.metrics.values()]
        row.update(
            epsilon=self.privacy.epsilon([]),  # the run's: largest any device has reported
            bytes_up=self.endpoint.stats.bytes_received - recv0,
            bytes_down=self.endpoint.stats.bytes_sent - sent0,
            seconds=time.monotonic() - t0,
            slowest_train_seconds=max(train_s, default=0.0),
        )
        return row

    def _population(self) -> int:
        """Devices the next round could sample from: the online ones (RoundPrivacy checks the
        configured population against this and predicts the round's sampling rate)."""
        return len(self.registry.online())

    # -- checkpoint ------------------------------------------------------------------------

    def _checkpoint(self) -> None:
        save_checkpoint(
            self.ckpt_path,
            {
                "round": self.round,
                "run_id": self.config.run_id,
                "model": self.config.model,
                "params": self.params,
                "strategy": self.strategy.state_dict(),
                "rng": self.rng.bit_generator.state,
                "privacy": self.privacy.state_dict(),
            },
        )

    def _resume(self) -> None:
        state = load_checkpoint(self.ckpt_path)
        for key in ("run_id", "model"):
            if state[key] != getattr(self.config, key):
                raise ValueError(
                    f"--resume: checkpoint {self.ckpt_path} is for {key}={state[key]!r}, "
                    f"this run has {key}={getattr(self.config, key)!r}"
                )
        self.round = int(state["round"])
        self.params = state["params"]
        self.strategy.load_state_dict(state["strategy"])
        self.rng.bit_generator.state = state["rng"]
        self.privacy.load_state_dict(state["privacy"])
        self.report.load_existing(upto_round=self.round)
        log.info("resumed %s after round %d", self.config.run_id, self.round)

    # -- main loop -------------------------------------------------------------------------

    def run(self, *, resume: bool = False) -> dict:
        """Runs the remaining rounds; returns the summary (also written to summary.json)."""
        cfg = self.config
        resumed = resume and self.ckpt_path.exists()
        if resumed:
            self._resume()
        elif resume:
            log.info("--resume: no checkpoint at %s; starting at round 1", self.ckpt_path)
        self.endpoint.connect()
        if not resumed:
            # A new run in an old folder must not inherit its rows; only once connected, so an
            # unreachable broker does not cost the old run's outputs.
            self.report.start_fresh()
        self.endpoint.subscribe(self.topics.presence_wildcard(), self._on_presence)
        self.endpoint.subscribe(self.topics.up_wildcard(), self._on_up)
        stop_reason = None
        try:
            self._announce(MsgType.ROUND_START, "registering")
            n = self.registry.wait_for(self.expected, timeout=cfg.register_timeout)
            log.info("%d device(s) online, %d expected", n, self.expected)
            with ThreadPoolExecutor(max_workers=32, thread_name_prefix="send") as pool:
                self._pool = pool
                while self.round < cfg.rounds:
                    # Builds (or, after --resume, restores) the DP aggregator before the check.
                    self.privacy.before_round(num_selected=0, population=self._population())
                    budget = self.privacy.budget_exhausted()
                    if budget:
                        stop_reason = budget
                        log.warning("stopping: %s", budget)
                        break
                    self.round += 1
                    try:
                        row = self._run_round(pool)
                    except PrivacyBudgetExceededError as exc:
                        stop_reason = f"privacy budget: {exc}"
                        log.warning("stopping: %s", stop_reason)
                        self.round -= 1  # the round did not complete; the model is unchanged
                        break
                    except RoundFailedError as exc:
                        log.warning("%s", exc)
                        row = {"round": self.round, "status": "failed", "error": str(exc)}
                    # Row first, then checkpoint: a crash in between re-runs the round and
                    # --resume drops the orphan row, so no completed round is lost or doubled.
                    self.report.add(row)
                    self._checkpoint()
                    if self.on_round is not None:
                        self.on_round(row)
            self._announce(MsgType.BYE, "finished")
        finally:
            self.endpoint.close()
        self.report.plot()
        return self.report.summary(
            {
                "run_id": cfg.run_id,
                "model": cfg.model,
                "dp": cfg.dp,
                "delta": cfg.delta if cfg.dp != "none" else None,
                "strategy": cfg.strategy,
                "stopped": stop_reason,
                "stray_rejected": self.stray_rejected,
            }
        )
