"""The cloud's messages in split learning: step replies, uplink validation, presence.

:class:`SplitMessaging` is the MQTT half of :class:`cloud.split_trainer.SplitTrainer`: every
uplink message is decoded and checked here (run, sender, session, round, step id, tensor
shapes, NaN), rejected with a one-line reason or queued for the cloud half; replies go out
through a send pool so one slow device never stalls the others.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cloud.config import FederatedConfig
from cloud.devices import DeviceRegistry
from cloud.errors import SplitProtocolError
from cloud.round_state import RoundState
from cloud.split_session import CloudHalf
from cloud.split_steps import (
    StepKey,
    StepLedger,
    StepQueue,
    decode_activation,
    decode_logit_gradient,
    grad_scale,
    step_of,
)
from cloud.strategies import ClientUpdate, validate_update
from converters.errors import TransportError, WireError
from converters.mqtt import MqttEndpoint
from converters.tensor_codec import decode_tensors, encode_tensors
from converters.topics import Topics
from converters.wire import Envelope, MsgType, decode, encode

log = logging.getLogger(__name__)
CLOUD_ID = "cloud"


def _session(env: Envelope) -> str | None:
    """The session a step or HALF_REQUEST names, echoed in its reply (None: it names none)."""
    session = env.meta.get("session")
    return session if isinstance(session, str) else None


def _count(value) -> int:
    """A byte count a worker reported, or 0 if it is not a non-negative int."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return value if ok else 0


class SplitMessaging:
    """Message handling shared by the split trainer; the subclass sets these attributes."""

    config: FederatedConfig
    topics: Topics
    registry: DeviceRegistry
    half: CloudHalf
    split: object  # split.graph.SplitModel
    device_params: dict
    endpoint: MqttEndpoint
    stray_rejected: int
    round: int
    session: str
    _expect: dict
    _work: StepQueue
    _ledger: StepLedger
    _pool: ThreadPoolExecutor | None
    _state: RoundState | None
    _state_lock: threading.Lock
    _seq: int
    _seq_lock: threading.Lock
    cut: str
    spec: object  # split.zoo.ModelSpec
    workers_mode: bool
    _half_updates: dict
    _half_workers: dict
    _half_body: bytes
    _cloud_expect: dict
    _step_bytes: list

    # -- sending ---------------------------------------------------------------------------

    def _next_seq(self) -> int:
        with self._seq_lock:
            self._seq += 1
            return self._seq

    def _envelope(self, msg_type: MsgType, round_: int, meta: dict, body: bytes = b"") -> bytes:
        env = Envelope(
            type=msg_type,
            run_id=self.config.run_id,
            round=round_,
            sender=CLOUD_ID,
            seq=self._next_seq(),
            meta=meta,
            body=body,
        )
        return encode(env)

    def _send(self, device: str, payload: bytes) -> None:
        try:
            self.endpoint.send(self.topics.down(device), payload, timeout=self.config.round_timeout)
        except TransportError as exc:
            log.warning("message for %s not delivered: %s", device, exc)
            self._drop(device)

    def _post(
        self,
        device: str,
        msg_type: MsgType,
        round_: int,
        meta: dict,
        tensors=None,
        *,
        answers: StepKey | None = None,
        session: str | None = None,
    ) -> None:
        """Sends a step reply; one frame goes out at once, unacked (the device resends the
        step if it is lost, and the ledger answers the repeat with this same payload).
        ``session`` is the step's: echoed, so a device takes replies of its own session only."""
        if session is not None:
            meta = {**meta, "session": session}
        body = b""
        if tensors is not None:
            body = encode_tensors(tensors, codec=self.config.act_codec)
        payload = self._envelope(msg_type, round_, meta, body)
        if answers is not None:
            refused = msg_type == MsgType.ERROR
            self._ledger.answered(device, answers, payload, refused=refused)
        self._deliver(device, payload)

    def _deliver(self, device: str, payload: bytes) -> None:
        """A step reply (new or repeated) to ``device``: one frame at once, else acked frames."""
        topic = self.topics.down(device)
        if self.endpoint.fits_one_frame(topic, len(payload)):
            try:
                self.endpoint.post(topic, payload, qos=self.config.step_qos)
            except TransportError as exc:
                log.warning("reply for %s not sent: %s", device, exc)
            return
        pool = self._pool
        if pool is None:
            return  # the run is over: nobody waits for this reply any more
        # Sends wait for the device's ack; a pool keeps one slow device from stalling the rest.
        pool.submit(self._send, device, payload)

    def _announce(self, msg_type: MsgType, status: str) -> None:
        meta = {"session": self.session, "status": status, "rounds": self.config.rounds}
        self.endpoint.publish_small(
            self.topics.ctrl(), self._envelope(msg_type, self.round, meta), retain=True
        )

    # -- receiving (MQTT dispatcher thread) ------------------------------------------------

    def _current(self) -> RoundState | None:
        with self._state_lock:
            return self._state

    def _reject(
        self,
        reason: str,
        *,
        device: str | None = None,
        step=None,
        round_=0,
        answers: StepKey | None = None,
        session: str | None = None,
    ) -> None:
        log.warning("rejected: %s", reason)
        state = self._current()
        if state is not None:
            state.reject(reason)
        else:
            self.stray_rejected += 1
        if device is not None and isinstance(step, int):
            # The device is waiting on this step: tell it, so it does not wait out its timeout.
            meta = {"error": reason[:500], "step": step}
            self._post(device, MsgType.ERROR, round_, meta, answers=answers, session=session)

    def _drop(self, device: str) -> None:
        self.half.drop(device)
        self._ledger.forget(device)
        state = self._current()
        if state is not None and state.drop(device):
            log.info("device %s dropped from round %d", device, state.round)

    def _on_presence(self, topic: str, sender: str, payload: bytes) -> None:
        try:
            _, device = self.topics.parse_device(topic)
            online = json.loads(bytes(payload))["status"] == "online"
        except (WireError, ValueError, KeyError, TypeError) as exc:
            self._reject(f"{topic}: bad presence message: {exc}")
            return
        self.registry.set_presence(device, online)
        if not online:
            self._drop(device)

    def _on_up(self, topic: str, sender: str, payload: bytes) -> None:
        try:
            _, device = self.topics.parse_device(topic)
            env = decode(payload, max_bytes=self.config.max_update_bytes, run_id=self.config.run_id)
            if env.sender != device:
                raise WireError(f"sender {env.sender!r} does not match topic device {device!r}")
        except WireError as exc:
            self._reject(f"{topic}: {exc}")
            return
        if env.type == MsgType.HELLO:
            num = env.meta.get("num_samples", 0)
            if (
                isinstance(num, int)
                and num >= 0
                and self.registry.register(device, num_samples=num)
            ):
                log.info("device %s registered (%d samples)", device, num)
            return
        if env.meta.get("session", self.session) != self.session:
            self._other_session(device, env)
            return
        if env.type == MsgType.ERROR:
            log.warning("device %s reports: %s", device, env.meta.get("error"))
            self._drop(device)
            return
        state = self._current()
        if state is None or env.round != state.round or device not in state.selected:
            log.info(
                "%s from %s for round %d outside its round; ignored",
                env.type.name,
                device,
                env.round,
            )
            if state is not None:
                with state.cond:
                    state.late += 1
            return
        if env.type in (MsgType.ACTIVATION, MsgType.LOGIT_GRADIENT) and not self._admit_step(
            device, env, state
        ):
            return
        handler = {
            MsgType.UPDATE: self._on_update,
            MsgType.ACTIVATION: self._on_activation,
            MsgType.LOGIT_GRADIENT: self._on_logit_gradient,
        }.get(env.type)
        if handler is None:
            self._reject(f"{device}: unexpected message type {env.type.name} on the uplink")
            return
        handler(device, env, state)

    def _other_session(self, device: str, env: Envelope) -> None:
        """A message sent for another session of this run (a coordinator restarted with the
        same run id repeats round numbers): counted like an out-of-round one and never used;
        a step is answered with an ERROR so that its device stops waiting."""
        theirs = repr(env.meta.get("session"))[:80]
        reason = (
            f"{env.type.name} from {device} round {env.round}: meta.session must be this "
            f"cloud's session {self.session!r}, got {theirs}"
        )
        log.info("%s; ignored", reason)
        state = self._current()
        if state is not None:
            with state.cond:
                state.late += 1
        step = env.meta.get("step")
        is_step = env.type in (MsgType.ACTIVATION, MsgType.LOGIT_GRADIENT)
        if is_step and isinstance(step, int) and not isinstance(step, bool):
            # Not recorded in the ledger: this session's own step of that number stays new.
            meta = {"error": reason[:500], "step": step}
            self._post(device, MsgType.ERROR, env.round, meta, session=_session(env))

    def _admit_step(self, device: str, env: Envelope, state: RoundState) -> bool:
        """True for a new step message; a repeat is counted and never trained on twice: the
        last answered step is answered again with the same reply, an older one (stale: the
        device has moved on) and a queued one are not answered."""
        step = env.meta.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            return True  # the handler rejects it with the reason
        seen = self._ledger.admit(device, (env.round, step, env.type))
        if not isinstance(seen, bytes) and seen == StepLedger.NEW:
            return True
        with state.cond:
            state.duplicates += 1
        how = "answered again" if isinstance(seen, bytes) else seen  # "queued" or "stale"
        log.info("%s step %d from %s again (%s)", env.type.name, step, device, how)
        if isinstance(seen, bytes):
            self._deliver(device, seen)
        return False

    def _on_activation(self, device: str, env: Envelope, state: RoundState) -> None:
        try:
            item = decode_activation(
                device,
                env,
                batch_size=self.config.batch_size,
                activation_shape=self.split.activation_shape,
                with_labels=self.config.mode != "ushaped",
            )
        except (WireError, SplitProtocolError) as exc:
            self._reject_step(device, env, f"ACTIVATION from {device}: {exc}")
            return
        self._work.put((MsgType.ACTIVATION, item, env))

    def _on_logit_gradient(self, device: str, env: Envelope, state: RoundState) -> None:
        try:
            if self.config.mode != "ushaped":
                raise SplitProtocolError("LOGIT_GRADIENT is only used in mode 'ushaped'")
            shape = self.half.u_output_shape(device, step_of(device, env))
            item = decode_logit_gradient(device, env, shape)
        except (WireError, SplitProtocolError) as exc:
            self._reject_step(device, env, f"LOGIT_GRADIENT from {device}: {exc}")
            return
        self._work.put((MsgType.LOGIT_GRADIENT, item, env))

    def _reject_step(self, device: str, env: Envelope, reason: str) -> None:
        step = env.meta.get("step")
        step = step if isinstance(step, int) and not isinstance(step, bool) else None
        key = None if step is None else (env.round, step, env.type)
        self._reject(
            reason, device=device, step=step, round_=env.round, answers=key, session=_session(env)
        )

    def _on_update(self, device: str, env: Envelope, state: RoundState) -> None:
        num = env.meta.get("num_samples")
        try:
            if not isinstance(num, int) or num <= 0:
                raise SplitProtocolError(f"num_samples must be an int > 0, got {num!r}")
            params = decode_tensors(env.body, expect=self._expect)
            update = ClientUpdate(device, params, num, env.meta.get("metrics") or {})
            validate_update(self.device_params, update)
        except (WireError, ValueError) as exc:
            self._reject(f"update from {device} for round {env.round}: {exc}")
            return
        reason = state.add_update(update)
        if reason is not None:
            log.info("update ignored: %s", reason)

    # -- step workers (cloud.split_worker) -----------------------------------------------------

    def _send_worker(self, worker: str, payload: bytes) -> None:
        try:
            self.endpoint.send(self.topics.worker(worker, "down"), payload, timeout=30)
        except TransportError as exc:
            log.warning("message for step worker %s not delivered: %s", worker, exc)

    def _on_worker(self, topic: str, sender: str, payload: bytes) -> None:
        """HALF_REQUEST: the round's cloud half; HALF_UPDATE: one device's trained copy."""
        try:
            worker = self.topics.parse_worker(topic)
            env = decode(payload, max_bytes=self.config.max_update_bytes, run_id=self.config.run_id)
            if env.sender != worker:
                raise WireError(f"sender {env.sender!r} does not match topic worker {worker!r}")
        except WireError as exc:
            self._reject(f"{topic}: {exc}")
            return
        state = self._current()
        asked = env.meta.get("session", self.session)
        if env.type == MsgType.HALF_REQUEST and asked != self.session:
            # A worker serving a step of another session (a coordinator restarted with the
            # same run id repeats round numbers): that session's half is not this one.
            reason = (
                f"HALF_REQUEST from worker {worker} round {env.round}: meta.session must be "
                f"this cloud's session {self.session!r}, got {repr(asked)[:80]}"
            )
            self._refuse_half(worker, env, reason)
            return
        if state is None or env.round != state.round:
            log.info("%s from worker %s for round %d outside its round; ignored",
                     env.type.name, worker, env.round)  # fmt: skip
            if env.type == MsgType.HALF_REQUEST:
                self._refuse_half(worker, env, f"round {env.round} is not running")
            return
        if env.type == MsgType.HALF_REQUEST:
            cfg = self.config
            meta = {"model": cfg.model, "cut": self.cut, "session": self.session,
                    "batch_size": cfg.batch_size, "lr": cfg.lr, "momentum": cfg.momentum,
                    "act_codec": cfg.act_codec, "num_classes": self.spec.num_classes,
                    "step_qos": cfg.step_qos}  # fmt: skip
            reply = self._envelope(MsgType.HALF, state.round, meta, self._half_body)
            if (pool := self._pool) is not None:
                pool.submit(self._send_worker, worker, reply)
            return
        if env.type != MsgType.HALF_UPDATE:
            self._reject(f"worker {worker}: unexpected message type {env.type.name}")
            return
        device = env.meta.get("device")
        if env.meta.get("session", self.session) != self.session:
            log.info("HALF_UPDATE from worker %s for %r of session %r, not %r; ignored",
                     worker, device, env.meta.get("session"), self.session)  # fmt: skip
            with state.cond:
                state.late += 1
            return
        try:
            if device not in state.selected:
                raise SplitProtocolError(f"meta.device {device!r} is not selected this round")
            params = decode_tensors(env.body, expect=self._cloud_expect)
        except (WireError, SplitProtocolError) as exc:
            self._reject(f"HALF_UPDATE from worker {worker} round {env.round}: {exc}")
            return
        with state.cond:
            if device in self._half_updates:
                state.duplicates += 1
                return
            self._half_updates[device] = params
            self._half_workers[device] = worker
            self._step_bytes[0] += _count(env.meta.get("step_bytes_up"))
            self._step_bytes[1] += _count(env.meta.get("step_bytes_down"))
            state.cond.notify_all()

    def _refuse_half(self, worker: str, env: Envelope, reason: str) -> None:
        """Answers a HALF_REQUEST with an ERROR echoing the session it asked for: the worker
        tells this answer from a late one to an earlier request of another session."""
        log.info("%s; refused", reason)
        pool = self._pool
        if pool is None:
            return  # the run is over: nobody waits for this answer any more
        err = {"error": reason[:500]}
        if (session := _session(env)) is not None:
            err["session"] = session
        pool.submit(self._send_worker, worker, self._envelope(MsgType.ERROR, env.round, err))

    # -- the cloud half (compute thread) ---------------------------------------------------

    def _compute_loop(self) -> None:
        for batch in self._work.batches():
            state = self._current()
            if state is None:
                continue
            pending = state.pending()  # a fresh set: once per batch, not once per device
            live = [b for b in batch if b[2].round == state.round and b[1].device in pending]
            if live:
                self._serve(live)

    def _serve(self, batch: list) -> None:
        kind, items, envs = batch[0][0], [b[1] for b in batch], [b[2] for b in batch]
        try:
            if kind == MsgType.LOGIT_GRADIENT:
                grads = [self.half.u_backward(items[0].device, items[0].step, items[0].activation)]
                reply, names = MsgType.GRADIENT, "grad"
            elif self.config.mode == "ushaped":
                grads = [self.half.u_forward(items[0])]
                reply, names = MsgType.LOGITS, "logits"
            else:
                grads = self.half.train_step(items)
                reply, names = MsgType.GRADIENT, "grad"
        except (SplitProtocolError, RuntimeError, ValueError) as exc:
            for it, env in zip(items, envs, strict=True):
                self._reject(
                    f"{kind.name} from {it.device}: {exc}",
                    device=it.device,
                    step=it.step,
                    round_=env.round,
                    answers=(env.round, it.step, kind),
                    session=_session(env),
                )
            return
        for it, env, g in zip(items, envs, grads, strict=True):
            meta = {"step": it.step, "epoch": env.meta.get("epoch", 0)}
            if reply == MsgType.GRADIENT:
                meta["scale"] = scale = grad_scale(g, self.config.act_codec)
                g = g * np.float32(scale) if scale != 1 else g
            self._post(
                it.device, reply, env.round, meta, {names: g},
                answers=(env.round, it.step, kind), session=_session(env),
            )  # fmt: skip
