"""Split-learning step workers: several processes share the cloud half's work through the broker.

With ``split_workers`` set, a SplitFed V1 coordinator (:class:`cloud.split_trainer.SplitTrainer`)
keeps the rounds, the device halves and the averaging, and hands the per-step work to step
workers, any number of them, on any machine that reaches the broker:

1. A device sends the first step of its round to ``<prefix>/steps/<device>``. The workers
   subscribe to it through one shared subscription (``$share/<group>/<prefix>/steps/+``), so
   the broker gives that step to exactly one of them: the session's owner. A first step too
   big for one transport frame would have its frames spread over the workers, so the device
   first sends a one-frame STEP_CLAIM there; the worker that gets it answers STEP_CLAIM with
   its id, and the step goes to that worker's own topic (step 2) as a multi-frame stream.
2. The owner answers (GRADIENT, ``meta.worker`` = its id) and the device sends every further
   step of the round to ``<prefix>/steps/<device>/<worker>``, which only the owner reads:
   sticky routing, because the owner holds the device's cloud-half copy (V1).
3. The first step of a round it has not seen makes a worker ask the coordinator for that
   round's cloud half (HALF_REQUEST -> HALF, point to point on ``<prefix>/workers/<id>/...``).
   Steps name the coordinator's session (``meta.session``, from MODEL): a coordinator restarted
   with the same run id repeats round numbers, so halves and the step ledger are per session;
   HALF_REQUEST names the step's session; a HALF of another session (the old coordinator's
   late answer) is skipped while the worker waits for its own. Step replies echo the session.
4. After answering the step the device marks ``last``, the owner sends the device's trained
   copy to the coordinator (HALF_UPDATE), which averages the copies like the device halves.

A worker that dies takes its sessions with it: their devices get no reply, give up the round
after ``step_timeout`` and report an error, the round goes on without them and next round their
first step reaches a live worker. A step is never trained twice (:class:`StepLedger`); a device
that resends its first step to the shared topic may reach a second worker, but it keeps the
first answer's owner, ignores the other worker's reply and that copy is never sent (it has no
``last`` step). A resend reaching the owner after later steps (MQTT orders messages per topic
only) is stale: counted in ``duplicates``, neither trained nor answered.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import numpy as np

from cloud.errors import SplitProtocolError
from cloud.split_session import CloudHalf
from cloud.split_steps import StepLedger, decode_activation, grad_scale, session_of
from converters.errors import TransportError, WireError
from converters.mqtt import MqttConfig, MqttEndpoint
from converters.tensor_codec import decode_tensors, encode_tensors
from converters.topics import Topics, validate_device_id
from converters.wire import Envelope, MsgType, decode, encode

log = logging.getLogger(__name__)


HalfKey = tuple[str, int, str | None]  # (run, round, coordinator session; None: not named)


def _who(env: Envelope, device: str, session: str | None) -> tuple:
    """A device's identity in the step ledger: per run and, if the step names one, per
    coordinator session (whose rounds and steps count again from 1)."""
    return (env.run_id, device) if session is None else (env.run_id, session, device)


class _RoundHalf:
    """The cloud half of one (run, round) as the coordinator sent it, and the sessions on it."""

    def __init__(self, env: Envelope) -> None:
        import torch

        from split.graph import split_template

        meta = env.meta
        sm = split_template(meta["model"], meta["cut"])  # traced once per process
        own = sm.cloud.state_dict()
        params = decode_tensors(
            env.body, expect={k: (tuple(v.shape), v.numpy().dtype.name) for k, v in own.items()}
        )
        sm.cloud.load_state_dict({k: torch.from_numpy(params[k]) for k in own})
        self.activation_shape = sm.activation_shape
        self.batch_size = int(meta["batch_size"])
        self.codec = str(meta.get("act_codec", "float32"))
        self.step_qos = 0 if meta.get("step_qos") == 0 else 1
        self.half = CloudHalf(
            mode="splitfed-v1",
            module=sm.cloud,
            lr=float(meta["lr"]),
            momentum=float(meta["momentum"]),
            num_classes=int(meta["num_classes"]),
        )


class SplitStepWorker:
    """One step worker: serves the split steps of the sessions it picks up.

    Args:
        worker_id: MQTT-safe id, also the MQTT client id and the sticky topic's last level.
        group: shared-subscription group; the coordinator's workers all use the same one.
        mqtt: broker connection (client_id must equal ``worker_id``).
        prefix: topic prefix shared with the coordinator and devices.
        fetch_timeout: seconds to wait for the coordinator's cloud half of a new round.
        max_message_bytes: larger step messages are rejected before parsing.
    """

    def __init__(
        self,
        *,
        worker_id: str,
        group: str,
        mqtt: MqttConfig,
        prefix: str = "edgesplit",
        fetch_timeout: float = 30.0,
        max_message_bytes: int = 64 * 2**20,
    ) -> None:
        self.id = validate_device_id(worker_id)
        if mqtt.client_id != self.id:
            raise ValueError(f"mqtt.client_id must equal worker_id {self.id!r}")
        self.group = group
        self.topics = Topics(prefix=prefix)
        self.fetch_timeout = fetch_timeout
        self.max_message_bytes = max_message_bytes
        self.endpoint = MqttEndpoint(mqtt)
        self._ledger = StepLedger()
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._halves: dict[HalfKey, _RoundHalf] = {}  # in the order they were fetched
        self._fetched: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"steps-{self.id}", daemon=True)
        self._seq = 0
        self.steps_served = 0
        self.sessions: set[tuple[str, int, str]] = set()  # (run, round, device) owned
        # (run, round, session, device) -> [step bytes received, reply bytes sent], reported
        # with the copy
        self._traffic: dict[tuple[str, int, str | None, str], list[int]] = {}
        self.rejected = 0
        self.duplicates = 0  # repeated or stale step messages, never trained on twice
        self.reasons: list[str] = []
        self._qos = 1  # step replies: the latest round half's step_qos

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> SplitStepWorker:
        self.endpoint.connect()
        self.endpoint.subscribe(self.topics.worker(self.id, "down"), self._on_half)
        self.endpoint.subscribe(self.topics.worker_steps(self.id), self._on_step)
        self.endpoint.subscribe(self.topics.shared_steps(self.group), self._on_step)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._work.put(None)
        self._thread.join(timeout=5)
        self.endpoint.close()

    def _reject(self, reason: str) -> None:
        self.rejected += 1
        self.reasons.append(reason[:300])
        del self.reasons[:-50]
        log.warning("%s rejected: %s", self.id, reason)

    # -- incoming (MQTT dispatcher thread) ---------------------------------------------------

    def _on_step(self, topic: str, sender: str, payload: bytes) -> None:
        try:
            device, worker = self.topics.parse_steps(topic)
            env = decode(payload, max_bytes=self.max_message_bytes)
            if env.sender != device:
                raise WireError(f"sender {env.sender!r} does not match topic device {device!r}")
            if env.type == MsgType.STEP_CLAIM and worker is None:
                self._grant(device, env)
                return
            if env.type != MsgType.ACTIVATION:
                raise WireError(
                    f"step topics carry ACTIVATION (and STEP_CLAIM on the shared topic) only, "
                    f"got {env.type.name}"
                )
            step = env.meta.get("step")
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                raise WireError(f"meta.step must be an int >= 0, got {step!r}")
            session = session_of(env)
        except (WireError, SplitProtocolError) as exc:
            self._reject(f"{topic}: {exc}")
            return
        if worker is not None and worker != self.id:
            return  # not ours (an overlapping subscription)
        # Per run and session: a long-lived worker serves later runs, and a restarted
        # coordinator's session, whose rounds and steps count again.
        seen = self._ledger.admit(_who(env, device, session), (env.round, step, env.type))
        if not isinstance(seen, bytes) and seen == StepLedger.NEW:
            self._work.put((device, env, len(payload)))
            return
        # A repeat: a resend or redelivery of the step in hand gets the cached reply again; a
        # queued one or an older one (a resend of the first step on the shared topic arriving
        # after later steps on this worker's topic, since MQTT orders per topic only) none.
        self.duplicates += 1
        log.info("%s: ACTIVATION step %d from %s again (%s)", self.id, step, device,
                 "answered again" if isinstance(seen, bytes) else seen)  # fmt: skip
        if isinstance(seen, bytes):
            self._post(device, seen)

    def _grant(self, device: str, env: Envelope) -> None:
        """Answers a claim: the device then streams its multi-frame first step to this worker.

        Stateless: the session starts when that step arrives, as with a one-frame first step.
        """
        claim = env.meta.get("claim")
        if not isinstance(claim, str) or not 1 <= len(claim) <= 64:
            self._reject(f"STEP_CLAIM from {device}: meta.claim must be a str of 1-64 characters")
            return
        meta = {"claim": claim, "step": env.meta.get("step"), "worker": self.id}
        self._post(device, self._envelope(MsgType.STEP_CLAIM, env, meta))

    def _on_half(self, topic: str, sender: str, payload: bytes) -> None:
        try:
            env = decode(payload, max_bytes=self.max_message_bytes)
        except WireError as exc:
            self._reject(f"{topic}: {exc}")
            return
        if env.type in (MsgType.HALF, MsgType.ERROR):
            self._fetched.put(env)
        else:
            self._reject(f"{topic}: unexpected {env.type.name} from the coordinator")

    # -- the cloud half (worker thread) -----------------------------------------------------

    def _loop(self) -> None:
        while (item := self._work.get()) is not None:
            device, env, size = item
            session = session_of(env)  # checked on arrival
            traffic = self._traffic.setdefault((env.run_id, env.round, session, device), [0, 0])
            traffic[0] += size
            try:
                self._serve(device, env)
            except (WireError, SplitProtocolError, TransportError, ValueError, KeyError) as exc:
                reason = f"ACTIVATION from {device} step {env.meta.get('step')}: {exc}"
                self._reject(reason)
                meta = {"error": reason[:500], "step": env.meta.get("step")}
                error = self._envelope(MsgType.ERROR, env, meta)
                key = (env.round, env.meta["step"], env.type)
                self._ledger.answered(_who(env, device, session), key, error, refused=True)
                self._post(device, error)
            except Exception:  # a bug must not kill the worker's only compute thread
                log.exception("%s: step from %s failed", self.id, device)

    def _round_half(self, env: Envelope) -> _RoundHalf:
        """The cloud half the step's session sent for its round, asked for on first use."""
        session = session_of(env)
        key = (env.run_id, env.round, session)
        if key in self._halves:
            return self._halves[key]
        while not self._fetched.empty():  # answers to earlier, abandoned requests
            self._fetched.get_nowait()
        req = Envelope(type=MsgType.HALF_REQUEST, run_id=env.run_id, round=env.round,
                       sender=self.id, seq=self._next_seq(),
                       meta={} if session is None else {"session": session})  # fmt: skip
        self.endpoint.send(self.topics.worker(self.id, "up"), encode(req), timeout=10)
        deadline = time.monotonic() + self.fetch_timeout
        skipped = ""
        while True:
            try:
                got = self._fetched.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TransportError(
                    f"no cloud half for run {env.run_id} round {env.round} session {session!r} "
                    f"from the coordinator within {self.fetch_timeout} s{skipped}"
                ) from None
            if (got.run_id, got.round) != key[:2]:
                continue
            theirs = got.meta.get("session")
            # The coordinator's ERROR echoes the session asked for; one naming another
            # session answers an earlier request, like a HALF of another session: the old
            # coordinator's late answer, which must not cost the live session's step. The
            # live coordinator names ours in both; the wait stays bounded by fetch_timeout.
            named = got.type == MsgType.HALF or "session" in got.meta
            if session is not None and named and theirs != session:
                skipped = (
                    f"; skipped a {got.type.name}: meta.session must equal the step's "
                    f"session {session!r}, got {repr(theirs)[:80]}"
                )
                log.info("%s: %s", self.id, skipped[2:])
                continue
            if got.type == MsgType.ERROR:
                raise SplitProtocolError(f"coordinator refused: {got.meta.get('error')}")
            break
        # Only recent halves stay: the one fetched before this (the previous round for late
        # steps, or the other session of a restarted coordinator's repeated round).
        kept = [k for k in self._halves if k[0] == env.run_id][-1:]
        self._halves = {k: self._halves[k] for k in kept}
        self._halves[key] = _RoundHalf(got)
        self._qos = self._halves[key].step_qos
        return self._halves[key]

    def _serve(self, device: str, env: Envelope) -> None:
        rh = self._round_half(env)
        item = decode_activation(
            device, env, batch_size=rh.batch_size, activation_shape=rh.activation_shape,
            with_labels=True,
        )  # fmt: skip
        (grad,) = rh.half.train_step([item])
        self.sessions.add((env.run_id, env.round, device))
        self.steps_served += 1
        scale = grad_scale(grad, rh.codec)
        meta = {"step": item.step, "epoch": env.meta.get("epoch", 0), "scale": scale,
                "worker": self.id}  # fmt: skip
        session = session_of(env)
        body = encode_tensors(
            {"grad": grad * np.float32(scale) if scale != 1 else grad}, codec=rh.codec
        )
        reply = self._envelope(MsgType.GRADIENT, env, meta, body)
        self._ledger.answered(_who(env, device, session), (env.round, item.step, env.type), reply)
        self._post(device, reply)
        key = (env.run_id, env.round, session, device)
        self._traffic.setdefault(key, [0, 0])[1] += len(reply)
        if env.meta.get("last") is True:
            params = rh.half.copies()[device]
            up_bytes, down_bytes = self._traffic.pop(key)
            meta = {"device": device, "step_bytes_up": up_bytes, "step_bytes_down": down_bytes}
            up = self._envelope(MsgType.HALF_UPDATE, env, meta,
                                encode_tensors(params, codec="float32"))  # fmt: skip
            self.endpoint.send(self.topics.worker(self.id, "up"), up, timeout=60)

    # -- sending ----------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _envelope(self, msg_type: MsgType, env: Envelope, meta: dict, body: bytes = b"") -> bytes:
        """A message about the step ``env``; it names the step's session when the step did
        (devices take replies, and the coordinator takes copies, of their own session only)."""
        session = env.meta.get("session")
        if isinstance(session, str):
            meta = {**meta, "session": session}
        out = Envelope(type=msg_type, run_id=env.run_id, round=env.round, sender=self.id,
                       seq=self._next_seq(), meta=meta, body=body)  # fmt: skip
        return encode(out)

    def _post(self, device: str, payload: bytes) -> None:
        topic = self.topics.down(device)
        try:
            if self.endpoint.fits_one_frame(topic, len(payload)):
                self.endpoint.post(topic, payload, qos=self._qos)
            else:
                self.endpoint.send(topic, payload, timeout=30)
        except TransportError as exc:
            log.warning("%s: reply for %s not delivered: %s", self.id, device, exc)
