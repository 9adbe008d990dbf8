"""The device agent: joins federated rounds over MQTT, trains locally, sends its update.

A device talks only through the broker: it reads the round announcement on ``ctrl`` and its own
``down/<id>`` topic, and writes ``up/<id>`` and its retained ``presence/<id>``. Its data never
leaves it; only parameters travel. Malformed or foreign messages are logged with a one-line
reason, counted, and dropped; the agent keeps running.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from converters.errors import TransportError, WireError
from converters.mqtt import MqttConfig
from converters.tensor_codec import decode_tensors, encode_tensors
from converters.topics import validate_device_id
from converters.wire import Envelope, MsgType, decode, encode
from edge.device_link import DeviceLink
from split.errors import PrivacyBudgetExceededError

log = logging.getLogger(__name__)

# Secure-aggregation messages the cloud relays on the downlink (edge.secure handles them).
_SECURE_TYPES = frozenset(
    {
        MsgType.KEY_ADVERTISE,
        MsgType.KEY_SHARE,
        MsgType.UNMASK_REQUEST,
        MsgType.CIPHERTEXT,
        MsgType.HE_PUBLIC_CONTEXT,
    }
)

# The trainer factory builds a device's trainer lazily (torch loads on the first round only).
TrainerFactory = Callable[[str], "object"]


@dataclass(frozen=True, kw_only=True)
class AgentOptions:
    """How a device takes part in rounds.

    Attributes:
        device_id: MQTT-safe id, also the MQTT client id and (with ACLs) the username.
        prefix: topic prefix shared with the cloud.
        send_timeout: deadline in seconds for delivering one update.
        max_message_bytes: larger downlink messages are rejected before parsing.
        vanish_prob: simulation only; chance per round that the device crashes mid-round.
        seed: seeds the simulated crashes.
        state_dir: where the device keeps state that must survive a restart (its DP-SGD
            privacy ledger); None keeps it in memory only.
    """

    device_id: str
    prefix: str = "edgesplit"
    send_timeout: float = 60.0
    max_message_bytes: int = 256 * 2**20
    vanish_prob: float = 0.0
    seed: int = 0
    state_dir: str | None = None

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)
        if not 0 <= self.vanish_prob <= 1:
            raise ValueError(f"vanish_prob must be in [0, 1], got {self.vanish_prob}")
        if self.send_timeout <= 0:
            raise ValueError(f"send_timeout must be > 0, got {self.send_timeout}")


class DeviceAgent(DeviceLink):
    """One device: an MQTT connection, its local data and a lazily built local trainer.

    Args:
        options: identity and behaviour.
        mqtt: broker connection settings (client_id must equal the device id).
        x: local inputs; y: local labels. They stay on the device.
        trainer_factory: ``f(model_ref) -> trainer`` with ``fit(params, config)``; defaults to
            :class:`edge.local_train.LocalTrainer` (torch).
        executor: where training runs; devices of one simulation worker share one, so they
            take turns on the core instead of thrashing it.
    """

    def __init__(
        self,
        *,
        options: AgentOptions,
        mqtt: MqttConfig,
        x: np.ndarray,
        y: np.ndarray,
        trainer_factory: TrainerFactory | None = None,
        executor: Executor | None = None,
    ) -> None:
        super().__init__(device_id=options.device_id, prefix=options.prefix, mqtt=mqtt)
        self.options = options
        self.x, self.y = x, y
        self._factory = trainer_factory or self._default_factory
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1)
        self._trainer = None
        self._trainer_ref: tuple[str, str] | None = None  # (model, run) it was built for
        self._run_id = ""
        self._done_rounds: set[tuple[str, int]] = set()
        self._rng = np.random.default_rng([options.seed, _stable_hash(self.id)])
        self.secure_sessions: dict[str, object] = {}  # secure mode -> edge.secure session
        self.rounds_trained = 0
        self.crashes = 0

    def _default_factory(self, model_ref: str):
        from edge.local_train import LocalTrainer

        state = self.options.state_dir
        # Per run: a run's epsilon accounts that run's releases of this device's data.
        if state is not None and self._run_id in (".", ".."):  # allowed ids, escaping folders
            raise ValueError(f"run_id must name a folder, got {self._run_id!r}")
        ledger = None if state is None else f"{state}/{self._run_id}/{self.id}.dp-ledger.json"
        return LocalTrainer(
            model_ref=model_ref,
            x=self.x,
            y=self.y,
            seed=_stable_hash(self.id) % 2**31,
            ledger_path=ledger,
        )

    # -- DeviceLink hooks ------------------------------------------------------------------

    def _hello_meta(self) -> dict:
        return {"num_samples": len(self.y), "train": True}

    def _on_stop(self) -> None:
        for session in self.secure_sessions.values():
            close = getattr(session, "close", None)
            if close is not None:
                close()
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- incoming --------------------------------------------------------------------------

    def _on_down(self, topic: str, sender: str, payload: bytes) -> None:
        try:
            env = decode(payload, max_bytes=self.options.max_message_bytes)
        except WireError as exc:
            self._reject(f"{topic}: {exc}")
            return
        if env.type == MsgType.MODEL:
            # A resumed cloud re-sends its round under a new session; that is not a duplicate.
            key = (env.run_id, env.round, env.meta.get("session"))
            with self._lock:
                if key in self._done_rounds:
                    self._reject(f"{topic}: duplicate MODEL for run {env.run_id} round {env.round}")
                    return
                self._done_rounds.add(key)
            if self.options.vanish_prob and self._rng.random() < self.options.vanish_prob:
                self._crash(env.round)
                return
            secure = (env.meta.get("config") or {}).get("secure", "none")
            if secure != "none":
                self._on_secure(topic, env, secure)  # e.g. secagg advertises keys at once
            self._executor.submit(self._train_and_reply, env)
        elif env.type in _SECURE_TYPES:
            he = env.type in (MsgType.CIPHERTEXT, MsgType.HE_PUBLIC_CONTEXT)
            he = he or str(env.meta.get("phase", "")).startswith("he-")
            self._on_secure(topic, env, "he-paillier" if he else "secagg")
        elif env.type == MsgType.ERROR:
            log.warning("%s: cloud refused our message: %s", self.id, env.meta.get("error"))
        elif env.type == MsgType.BYE:
            self.finished.set()
        else:
            self._reject(f"{topic}: unexpected message type {env.type.name} on the downlink")

    def secure_session(self, mode: str):
        """This device's session for a secure mode (edge.secure), built on first use."""
        with self._lock:
            if mode not in self.secure_sessions:
                from edge.secure import make_session

                self.secure_sessions[mode] = make_session(
                    mode, device_id=self.id, num_samples=len(self.y), reply=self._secure_reply
                )
            return self.secure_sessions[mode]

    def _on_secure(self, topic: str, env: Envelope, mode: str) -> None:
        try:
            session = self.secure_session(mode)
            if env.type == MsgType.MODEL:
                session.on_model(env)
            else:
                session.on_message(env)
        except (WireError, ValueError) as exc:
            self._reject(f"{topic}: {mode} {env.type.name} round {env.round}: {exc}")
        except TransportError as exc:
            log.warning("%s: %s reply not delivered: %s", self.id, env.type.name, exc)

    def _secure_reply(self, request: Envelope, msg_type: MsgType, meta: dict, body: bytes) -> None:
        reply = request.reply(
            type=msg_type, sender=self.id, seq=self._next_seq(), meta=meta, body=body
        )
        self.endpoint.send(
            self.topics.up(self.id), encode(reply), timeout=self.options.send_timeout
        )

    def _crash(self, round_: int) -> None:
        """Simulation: vanish mid-round as a crashed device would (the broker fires our will)."""
        self.crashes += 1
        log.info("%s: simulated crash in round %d", self.id, round_)
        self.endpoint.drop_connection()

    # -- training --------------------------------------------------------------------------

    def _train_and_reply(self, env: Envelope) -> None:
        try:
            self._train_and_send(env)
        except (WireError, ValueError) as exc:
            self._reject(f"round {env.round} model: {exc}")
            self._send_error(env, str(exc))
        except TransportError as exc:
            log.warning("%s: round %d update not delivered: %s", self.id, env.round, exc)
        except PrivacyBudgetExceededError as exc:
            # Tell the cloud at once, so it drops us from the round instead of waiting.
            log.warning("%s: %s", self.id, exc)
            self._send_error(env, f"privacy budget: {exc}")
        except Exception as exc:  # a bug in training must not kill the device's worker
            log.exception("%s: round %d training failed", self.id, env.round)
            self._send_error(env, f"training failed: {type(exc).__name__}: {exc}")

    def _train_and_send(self, env: Envelope) -> None:
        meta = env.meta
        model_ref = meta.get("model")
        config = meta.get("config")
        if not isinstance(model_ref, str) or not isinstance(config, dict):
            raise ValueError("MODEL message needs meta.model (str) and meta.config (object)")
        params = decode_tensors(env.body)
        if self._trainer is None or self._trainer_ref != (model_ref, env.run_id):
            self._run_id = env.run_id
            self._trainer = self._factory(model_ref)
            self._trainer_ref = (model_ref, env.run_id)
        t0 = time.perf_counter()
        new_params, metrics = self._trainer.fit(params, {**config, "round": env.round})
        metrics["train_seconds"] = time.perf_counter() - t0
        secure = config.get("secure", "none")
        if secure != "none":  # only the masked or encrypted delta leaves the device
            self.secure_session(secure).submit_update(env, params, new_params, metrics)
            self.rounds_trained += 1
            return
        body = encode_tensors(
            new_params, codec=config.get("codec", "float32"), compress=config.get("compress")
        )
        reply = env.reply(
            type=MsgType.UPDATE,
            sender=self.id,
            seq=self._next_seq(),
            meta={"num_samples": len(self.y), "metrics": metrics},
            body=body,
        )
        self.endpoint.send(
            self.topics.up(self.id), encode(reply), timeout=self.options.send_timeout
        )
        self.rounds_trained += 1

    def _send_error(self, env: Envelope, reason: str) -> None:
        try:
            err = env.reply(
                type=MsgType.ERROR, sender=self.id, seq=self._next_seq(), meta={"error": reason}
            )
            self.endpoint.publish_small(self.topics.up(self.id), encode(err))
        except (TransportError, WireError):
            pass


def _stable_hash(text: str) -> int:
    """A process-independent hash (Python's ``hash`` is salted per process)."""
    import zlib

    return zlib.crc32(text.encode())
