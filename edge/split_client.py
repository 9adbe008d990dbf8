"""The device side of split learning over MQTT: trains its half step by step with the cloud.

Per batch the device runs its edge half to the cut and sends the activation (ACTIVATION, with
the labels only in vanilla / SplitFed); the cloud answers with the gradient at the cut
(GRADIENT) for the same step id. U-shaped, the device also holds the head: the cloud answers
the activation with its middle output (LOGITS), the device computes the loss itself and sends
the gradient of that output (LOGIT_GRADIENT), so labels and predictions never leave it. When the
round config turns activation noise on, each sample's activation is clipped and noised before it
is encoded (:mod:`split.privacy.activation_noise`) and the device reports its per-sample epsilon
(``act_epsilon``). Torch is imported only when the first round starts, so
``import edge.split_client`` stays torch-free.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import secrets
import time
import zlib
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.errors import TransportError, WireError
from converters.mqtt import MqttConfig
from converters.tensor_codec import decode_tensors, encode_tensors
from converters.topics import validate_device_id
from converters.wire import Envelope, MsgType, decode, encode
from edge.device_link import DeviceLink
from edge.errors import SplitProtocolError

log = logging.getLogger(__name__)

_STEP_REPLIES = (MsgType.GRADIENT, MsgType.LOGITS, MsgType.ERROR)


def _grad_scale(grad: np.ndarray, codec: str) -> float:
    """Power-of-two scale keeping fp16 gradients out of fp16's subnormal range (the cloud's
    ``cloud.split_steps.grad_scale``; edge must not import cloud)."""
    peak = float(np.abs(grad).max(initial=0.0))
    if codec != "fp16" or not 0 < peak < math.inf:
        return 1.0
    return float(2.0 ** min(40, max(-40, math.floor(math.log2(2.0**14 / peak)))))


def _parse_model_meta(meta: dict) -> tuple[dict, str, str, str | None]:
    """(config, mode, cut, head_cut) of a MODEL message, or SplitProtocolError naming the field."""
    cfg, mode, cut, head_cut = (meta.get(k) for k in ("config", "mode", "cut", "head_cut"))
    if (
        not isinstance(cfg, dict)
        or not isinstance(cut, str)
        or not isinstance(meta.get("model"), str)
    ):
        raise SplitProtocolError("MODEL needs meta.model, meta.cut (str) and meta.config (object)")
    if mode not in ("vanilla", "ushaped", "splitfed-v1", "splitfed-v2"):
        raise SplitProtocolError(f"MODEL meta.mode must be a split mode, got {mode!r}")
    if (mode == "ushaped") != (head_cut is not None):
        raise SplitProtocolError(
            f"MODEL meta.head_cut must be set in mode 'ushaped' only, got {head_cut!r}"
        )
    return cfg, mode, cut, head_cut


def _check_scale(scale, what: str) -> float:
    ok = isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 < scale < math.inf
    if not ok or math.frexp(scale)[0] != 0.5 or not 2.0**-40 <= scale <= 2.0**40:
        raise SplitProtocolError(
            f"{what} meta.scale must be a power of two in [2**-40, 2**40], got {scale!r}"
        )
    return float(scale)


def _session_meta(model: Envelope) -> dict:
    """``{"session": ...}`` of the MODEL's cloud session (empty if it named none): every message
    of the round carries it, so a cloud restarted with the same run id, whose new session may
    repeat the round number, never takes it for one of its own."""
    session = model.meta.get("session")
    return {"session": session} if isinstance(session, str) else {}


def device_seed(device_id: str) -> int:
    """The device's base seed (process-independent, unlike Python's salted ``hash``)."""
    return zlib.crc32(device_id.encode()) % 2**31


def round_seed(device_id: str, round_: int) -> int:
    """Seeds the batch order of one round, as :class:`edge.local_train.LocalTrainer` does."""
    return device_seed(device_id) * 100_003 + round_


@dataclass(frozen=True, kw_only=True)
class SplitClientOptions:
    """How a device takes part in split learning.

    Attributes:
        device_id: MQTT-safe id, also the MQTT client id.
        prefix: topic prefix shared with the cloud.
        send_timeout: seconds to deliver one message.
        step_timeout: seconds to wait for the cloud's reply to one step before giving up the round.
        step_resend: seconds without a reply after which a single-frame step message is sent
            again (the cloud answers repeats from its reply cache).
        max_message_bytes: larger downlink messages are rejected before parsing.
        vanish_prob: simulation only; chance per round that the device crashes mid-epoch.
        seed: seeds the simulated crashes.
        state_dir: where sample-level DP state survives a restart (per run: the ledger and the
            randomized labels, which must not be drawn again); None keeps it in memory only.
    """

    device_id: str
    prefix: str = "edgesplit"
    send_timeout: float = 60.0
    step_timeout: float = 30.0
    step_resend: float = 5.0
    max_message_bytes: int = 256 * 2**20
    vanish_prob: float = 0.0
    seed: int = 0
    state_dir: str | None = None

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)
        if not 0 <= self.vanish_prob <= 1:
            raise ValueError(f"vanish_prob must be in [0, 1], got {self.vanish_prob}")
        for name in ("send_timeout", "step_timeout", "step_resend"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class _CrashedError(Exception):
    """Simulation: the device vanished mid-epoch."""


class SplitClient(DeviceLink):
    """One device in split learning: an MQTT connection, local data and its model half(s).

    Args:
        options: identity and behaviour.
        mqtt: broker connection (client_id must equal the device id).
        x: local inputs; y: local labels. Neither ever leaves the device in U-shaped mode.
        executor: where rounds run; each device needs its own thread while it waits for the
            cloud, so the default is a private one.
    """

    watch_own_presence = True

    def __init__(
        self,
        *,
        options: SplitClientOptions,
        mqtt: MqttConfig,
        x: np.ndarray,
        y: np.ndarray,
        executor: Executor | None = None,
    ) -> None:
        super().__init__(device_id=options.device_id, prefix=options.prefix, mqtt=mqtt)
        self.options = options
        self.x, self.y = x, y
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1)
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        self._grants: queue.SimpleQueue = queue.SimpleQueue()  # STEP_CLAIM answers
        self._claim: str | None = None  # the open claim's token
        # (run_id, round, step, reply type) awaited; ERROR for that step is accepted too.
        self._pending: tuple[str, int, int, MsgType] | None = None
        self._pending_session: str | None = None  # the MODEL session of the step in hand
        self._done: set[tuple] = set()
        self._rng = np.random.default_rng([options.seed, device_seed(self.id)])
        self._halves = None  # (model_ref, cut, head_cut) -> torch modules, built lazily
        # Step workers (cloud.split_worker): steps go to <prefix>/steps/<id>, then to the
        # worker that answered the first one.
        self._via_workers = False
        self._worker: str | None = None
        self._codec = "float32"
        self._step_qos = 1  # MQTT QoS of one-frame step messages (the round config's step_qos)
        # Activation noise (split.privacy.activation_noise): the layer keeps its OS-seeded
        # generator across rounds; one per-sample ledger per run counts the noised releases.
        self._noise = None
        self._act_ledgers: dict = {}
        # Sample-level DP in U-shaped mode (split.privacy.split_dp): one trainer per run and
        # model halves, kept across rounds (its ledger and Opacus hooks must not restart).
        self._dp = None
        self._dp_key = None
        self.rounds_trained = 0
        self.steps = 0
        self.crashes = 0

    # -- DeviceLink hooks ------------------------------------------------------------------

    def _hello_meta(self) -> dict:
        return {"num_samples": len(self.y), "train": True, "split": True}

    def _on_stop(self) -> None:
        self._replies.put(None)
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- incoming (MQTT dispatcher thread) -------------------------------------------------

    def _on_down(self, topic: str, sender: str, payload: bytes) -> None:
        try:
            env = decode(payload, max_bytes=self.options.max_message_bytes)
        except WireError as exc:
            self._reject(f"{topic}: {exc}")
            return
        if env.type == MsgType.MODEL:
            key = (env.run_id, env.round, env.meta.get("session"))
            with self._lock:
                if key in self._done:
                    self._reject(f"duplicate MODEL for run {env.run_id} round {env.round}")
                    return
                self._done.add(key)
            self._executor.submit(self._round, env)
        elif env.type in _STEP_REPLIES:
            self._on_step_reply(env)
        elif env.type == MsgType.STEP_CLAIM:
            with self._lock:
                mine = self._claim is not None and env.meta.get("claim") == self._claim
                if mine:
                    self._claim = None  # the first grant wins; another worker's is ignored
            if mine:
                self._grants.put(env)
            else:
                self._reject(f"STEP_CLAIM answer for no open claim (worker {env.sender!r})")
        elif env.type == MsgType.BYE:
            self.finished.set()
        else:
            self._reject(f"unexpected message type {env.type.name} on the downlink")

    def _on_step_reply(self, env: Envelope) -> None:
        """Hands the reply to the step in hand to the training thread; any other is ignored
        (counted with its reason, logged at INFO): a repeat, a stale reply to an earlier step,
        or, with step workers, a reply from a worker that does not own the session (a resent
        first step may reach a second worker), or a reply naming another cloud session than
        the round's (a restarted cloud repeats run, round and step numbers; a reply naming no
        session is an older cloud's and taken). None of them is ever taken as the answer."""
        step = env.meta.get("step")
        key = (env.run_id, env.round, step)
        theirs = env.meta.get("session")
        with self._lock:
            pending, owner = self._pending, self._worker if self._via_workers else None
            mine = self._pending_session
            answerer = env.meta.get("worker", env.sender)
            foreign = owner is not None and answerer != owner
            other = theirs is not None and theirs != mine
            taken = (
                pending is not None
                and key == pending[:3]
                and env.type in (pending[3], MsgType.ERROR)
                and not foreign
                and not other
            )
            if taken:  # one reply per step: a repeat that follows is refused
                self._pending = None
        if taken:
            self._replies.put(env)
            return
        want = (
            "none"
            if pending is None
            else f"{pending[3].name} for run {pending[0]} round {pending[1]} step {pending[2]}"
        )
        where = f"(run {env.run_id} round {env.round})"
        if pending is not None and key == pending[:3] and other:
            reason = (
                f"{env.type.name} for step {step!r} {where} of session {repr(theirs)[:80]}, "
                f"but the round's session is {mine!r}: ignored"
            )
        elif pending is not None and key == pending[:3] and foreign:
            reason = (
                f"{env.type.name} for step {step!r} {where} from step worker {answerer!r}, but "
                f"{owner!r} owns this session: ignored"
            )
        elif pending is not None and key == pending[:3]:
            reason = (
                f"{env.type.name} for step {step!r} {where}, which awaits {pending[3].name}: "
                f"a repeated reply, ignored"
            )
        else:
            reason = f"{env.type.name} for unknown step {step!r} {where}; pending: {want}"
        if env.type == MsgType.ERROR:  # repr: one line whatever the text
            reason += f"; error {str(env.meta.get('error'))[:200]!r}"
        self._ignore(reason)

    def _ignore(self, reason: str) -> None:
        """Counts a stray step reply like a rejected message; expected traffic, so INFO."""
        self.rejected += 1
        self.reasons.append(reason)
        log.info("%s: %s", self.id, reason)

    # -- one round (executor thread) -------------------------------------------------------

    def _round(self, env: Envelope) -> None:
        try:
            self._train(env)
        except _CrashedError:
            log.info("%s: simulated crash in round %d", self.id, env.round)
        except (WireError, SplitProtocolError, ValueError, TimeoutError) as exc:
            self._reject(f"round {env.round}: {exc}")
            self._send_error(env, str(exc))
        except TransportError as exc:
            log.warning("%s: round %d aborted: %s", self.id, env.round, exc)
        except Exception:  # a bug in training must not kill the device's worker
            log.exception("%s: round %d failed", self.id, env.round)
        finally:
            with self._lock:
                self._pending = None

    def _exchange(
        self, env: Envelope, step: int, kind: MsgType, meta: dict, tensors: dict, want: MsgType
    ) -> Envelope:
        """Sends one step message and returns the cloud's ``want`` (or ERROR) reply to it."""
        with self._lock:
            self._pending = (env.run_id, env.round, step, want)
            self._pending_session = _session_meta(env).get("session")
        # Drop stale replies of a previous step (e.g. one that timed out).
        with contextlib.suppress(queue.Empty):
            while True:
                self._replies.get_nowait()
        msg = env.reply(
            type=kind,
            sender=self.id,
            seq=self._next_seq(),
            meta={"step": step, **meta, **_session_meta(env)},
            body=encode_tensors(tensors, codec=self._codec),
        )
        payload, topic = encode(msg), self._step_topic()
        opts = self.options
        deadline = time.monotonic() + opts.step_timeout
        if not self.endpoint.fits_one_frame(topic, len(payload)):
            if self._via_workers and self._worker is None:
                # A shared subscription may hand each frame of a stream to another worker:
                # claim an owner with one frame first, then stream to it alone.
                self._claim_worker(env, step, deadline)
                topic = self._step_topic()
            # Multi-frame: the transport's acks deliver it; the cloud's reply is then awaited.
            self.endpoint.send(
                topic, payload, timeout=opts.send_timeout,
                ack_topic_for_peer=self.topics.down(self.id),
            )  # fmt: skip
            resend = math.inf
        else:
            # One frame, no transport ack: the reply acknowledges it. If none comes within
            # step_resend the same message goes again; the cloud answers a repeated step from
            # its reply cache instead of training on it twice.
            self.endpoint.post(topic, payload, qos=self._step_qos)
            resend = opts.step_resend
        while True:
            left = deadline - time.monotonic()
            try:
                reply = self._replies.get(timeout=max(0.0, min(left, resend)))
                break
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"step {step}: no reply from the cloud within {opts.step_timeout} s"
                    ) from None
                log.info("%s: no reply to step %d yet; sending it again", self.id, step)
                self.endpoint.post(self._step_topic(), payload, qos=self._step_qos)
        if reply is None:
            raise TransportError("device stopped")
        self._pin_worker(reply)
        if reply.type == MsgType.ERROR:
            raise SplitProtocolError(f"cloud refused step {step}: {reply.meta.get('error')}")
        return reply

    def _claim_worker(self, env: Envelope, step: int, deadline: float) -> None:
        """Pins the step worker that answers a one-frame STEP_CLAIM (sent again every
        ``step_resend`` seconds until the step's deadline)."""
        token = secrets.token_hex(8)
        with self._lock:
            self._claim = token
        with contextlib.suppress(queue.Empty):
            while True:
                self._grants.get_nowait()
        claim = env.reply(
            type=MsgType.STEP_CLAIM, sender=self.id, seq=self._next_seq(),
            meta={"step": step, "claim": token, **_session_meta(env)},
        )  # fmt: skip
        payload = encode(claim)
        while True:
            self.endpoint.post(self.topics.steps(self.id), payload, qos=self._step_qos)
            left = deadline - time.monotonic()
            try:
                grant = self._grants.get(timeout=max(0.0, min(left, self.options.step_resend)))
                break
            except queue.Empty:
                if time.monotonic() >= deadline:
                    with self._lock:
                        self._claim = None
                    raise TimeoutError(
                        f"step {step}: no step worker answered the claim within "
                        f"{self.options.step_timeout} s"
                    ) from None
        try:
            self._worker = validate_device_id(grant.meta.get("worker"))
        except (WireError, ValueError, TypeError):
            raise SplitProtocolError(
                f"STEP_CLAIM answer needs meta.worker (an id), got {grant.meta.get('worker')!r}"
            ) from None

    def _step_topic(self) -> str:
        if not self._via_workers:
            return self.topics.up(self.id)
        return self.topics.steps(self.id, self._worker)

    def _pin_worker(self, reply: Envelope) -> None:
        """Sticky routing: the worker that answered the session's first step owns it."""
        if not self._via_workers or reply.type == MsgType.ERROR:
            return
        if self._worker is not None:
            return  # _on_step_reply takes replies from the owner only
        worker = reply.meta.get("worker")
        try:
            owner = validate_device_id(worker)
        except (WireError, ValueError, TypeError):
            raise SplitProtocolError(
                f"step reply from a step worker needs meta.worker (an id), got {worker!r}"
            ) from None
        with self._lock:
            self._worker = owner

    def _reply_tensor(self, reply: Envelope, want: MsgType, name: str, shape) -> np.ndarray:
        if reply.type != want:
            raise SplitProtocolError(f"expected {want.name} for the step, got {reply.type.name}")
        t = decode_tensors(reply.body, expect={name: (tuple(shape), "float32")})[name]
        scale = _check_scale(reply.meta.get("scale", 1.0), want.name)
        return t / np.float32(scale) if scale != 1 else t

    def _build(self, model_ref: str, cut: str, head_cut: str | None):
        from split.graph import split_template  # traced once per process, then copied

        key = (model_ref, cut, head_cut)
        if self._halves is None or self._halves[0] != key:
            self._halves = (key, split_template(model_ref, cut, head_cut))
        return self._halves[1]

    def _train(self, env: Envelope) -> None:
        import torch

        meta = env.meta
        cfg, mode, cut, head_cut = _parse_model_meta(meta)
        sm = self._build(meta["model"], cut, head_cut)
        mods = [sm.edge] + ([sm.head] if sm.head is not None else [])
        expect = {
            k: (tuple(v.shape), v.numpy().dtype.name)
            for m in mods
            for k, v in m.state_dict().items()
        }
        params = decode_tensors(env.body, expect=expect)
        for m in mods:
            own = m.state_dict()
            m.load_state_dict({k: torch.from_numpy(params[k]) for k in own})
        self._codec = str(cfg.get("act_codec", "float32"))
        qos = cfg.get("step_qos", 1)
        if qos not in (0, 1) or isinstance(qos, bool):
            raise SplitProtocolError(f"MODEL meta.config.step_qos must be 0 or 1, got {qos!r}")
        self._step_qos = qos
        self._via_workers, self._worker = meta.get("steps") == "workers", None
        ledger, sigma = self._setup_noise(env.run_id, cfg)
        epochs, bs = int(cfg["epochs"]), int(cfg["batch_size"])
        lr, momentum = float(cfg["lr"]), float(cfg.get("momentum", 0.0))
        dp = self._setup_dp(env.run_id, cfg, mode, sm)
        if dp is not None:  # one DP optimizer over both halves: per-sample clip across them
            opts = [dp.optimizer(lr=lr, momentum=momentum, batch_size=min(bs, len(self.y)))]
        else:
            opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum) for m in mods]
        n = len(self.y)
        steps_per_epoch = -(-n // bs)
        crash_at = None
        if self.options.vanish_prob and self._rng.random() < self.options.vanish_prob:
            crash_at = int(self._rng.integers(1, steps_per_epoch + 1))  # mid first epoch
        order_rng = np.random.default_rng(round_seed(self.id, env.round))
        xt = torch.as_tensor(np.asarray(self.x), dtype=torch.float32)
        t0, step, losses = time.perf_counter(), 0, []
        for m in mods:
            m.train()
        for epoch in range(epochs):
            order = order_rng.permutation(n)
            losses = []
            if ledger is not None:  # each epoch releases every sample's activation once
                ledger.step(noise_multiplier=sigma, sample_rate=1.0)
            if dp is not None:  # each epoch puts every sample in exactly one step
                dp.begin_epoch()
                self._save_dp(env.run_id)
            for start in range(0, n, bs):
                idx = order[start : start + bs]
                step += 1
                if step == crash_at:
                    self.crashes += 1
                    self.endpoint.drop_connection()  # the broker fires our last will
                    raise _CrashedError
                yb = np.asarray(self.y[idx], dtype=np.int64)
                if dp is not None and sm.head is None:  # labels travel: randomized, once
                    yb = dp.released_labels(self.y)[idx]
                for o in opts:
                    o.zero_grad(set_to_none=True)
                meta = {"epoch": epoch, "batch": len(idx)}
                if self._via_workers and step == epochs * steps_per_epoch:
                    meta["last"] = True  # the worker then sends our cloud-half copy on
                loss = self._step(env, step, meta, sm, xt[idx], yb)
                if loss is not None:
                    losses.append(loss * len(idx))
                for o in opts:
                    o.step()
                self.steps += 1
        metrics = {"steps": step, "train_seconds": time.perf_counter() - t0, "samples": n}
        if losses:
            metrics["loss"] = sum(losses) / n
        if ledger is not None:
            metrics.update(act_epsilon=ledger.epsilon(), act_releases=ledger.steps)
        if dp is not None:
            # The mean loss on private samples is not covered by the ledger: never sent.
            metrics.pop("loss", None)
            metrics.update(epsilon=dp.epsilon(), releases=dp.releases)
        new = {k: v.detach().numpy().copy() for m in mods for k, v in m.state_dict().items()}
        update = env.reply(
            type=MsgType.UPDATE,
            sender=self.id,
            seq=self._next_seq(),
            meta={"num_samples": n, "metrics": metrics, **_session_meta(env)},
            body=encode_tensors(new, codec="float32"),
        )
        self.endpoint.send(
            self.topics.up(self.id), encode(update), timeout=self.options.send_timeout
        )
        self.rounds_trained += 1

    def _setup_noise(self, run_id: str, cfg: dict):
        """(ledger, effective sigma) of the round's activation noise, or (None, 0.0) if off."""
        from split.privacy.activation_noise import ActivationNoise
        from split.privacy.budget import PrivacyLedger

        noise = ActivationNoise(
            clip=cfg.get("act_noise_clip", 0.0),
            noise_multiplier=cfg.get("act_noise_multiplier", 0.0),
        )
        if not noise.enabled:
            self._noise = None
            return None, 0.0
        if self._noise is None or self._noise.noise != noise:
            self._noise = noise.layer()
        if run_id not in self._act_ledgers:
            delta = cfg.get("act_noise_delta", 1e-5)
            self._act_ledgers[run_id] = PrivacyLedger(accountant="rdp", delta=delta)
        return self._act_ledgers[run_id], noise.effective_noise_multiplier

    def _setup_dp(self, run_id: str, cfg: dict, mode: str, sm):
        """The run's :class:`split.privacy.split_dp.SplitDPTrainer`, or None without DP."""
        if "dp" not in cfg:
            self._close_dp()
            return None
        from split.errors import PrivacyConfigError
        from split.privacy.split_dp import SplitDP, SplitDPTrainer

        try:
            settings = SplitDP.from_meta(cfg["dp"])
        except (PrivacyConfigError, TypeError) as exc:
            raise SplitProtocolError(f"MODEL meta.config.dp: {exc}") from None
        key = (run_id, id(sm), settings)
        if self._dp is None or self._dp_key != key:
            self._close_dp()
            try:
                self._dp = SplitDPTrainer(sm.edge, sm.head, settings, num_samples=len(self.y))
                path = self._dp_state_path(run_id)
                if path is not None and path.exists():  # a restart goes on with the same ledger
                    self._dp.load_state_dict(json.loads(path.read_text()))
            except (PrivacyConfigError, ValueError) as exc:
                self._close_dp()
                raise SplitProtocolError(f"MODEL meta.config.dp: {exc}") from None
            self._dp_key = key
        try:
            if sm.head is None:
                self._dp.released_labels(self.y)  # checks the labels before any step
        except PrivacyConfigError as exc:
            raise SplitProtocolError(f"MODEL meta.config.dp: {exc}") from None
        self._save_dp(run_id)
        return self._dp

    def _dp_state_path(self, run_id: str) -> Path | None:
        state = self.options.state_dir
        if state is None:
            return None
        if run_id in (".", ".."):  # the run id pattern allows them; as a folder they escape
            raise SplitProtocolError(f"run_id must name a folder, got {run_id!r}")
        return Path(state) / run_id / f"{self.id}.split-dp.json"

    def _save_dp(self, run_id: str) -> None:
        """Writes the DP state atomically (before the epoch it counts releases anything)."""
        path = self._dp_state_path(run_id)
        if path is None or self._dp is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self._dp.state_dict()))
        os.replace(tmp, path)

    def _close_dp(self) -> None:
        if self._dp is not None:
            self._dp.close()
        self._dp, self._dp_key = None, None

    def _step(self, env: Envelope, step: int, meta: dict, sm, xb, yb: np.ndarray):
        """One batch through the protocol; leaves the gradients in the device's halves.

        Returns:
            U-shaped: the batch's mean loss (computed here); otherwise None (the cloud has it).
        """
        import torch

        dp = self._dp
        if dp is not None:
            # Opacus' per-sample hooks are full backward hooks: the first layer's input must
            # need a gradient or torch warns on every step (warning filters are process-wide
            # and not thread-safe, so the cause is removed instead of the message).
            xb = xb.detach().requires_grad_(True)
        act = sm.edge(xb)
        if dp is not None:
            act = dp.noise_activation(act)
        elif self._noise is not None:  # clip + noise before encoding: codecs post-process it
            act = self._noise(act)
        a_np = act.detach().numpy()
        loss_value = None
        if sm.head is not None:
            tensors = {"activation": a_np}
            reply = self._exchange(env, step, MsgType.ACTIVATION, meta, tensors, MsgType.LOGITS)
            shape = (len(yb), *sm.head_activation_shape)
            mid = torch.from_numpy(self._reply_tensor(reply, MsgType.LOGITS, "logits", shape))
            mid.requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(sm.head(mid), torch.from_numpy(yb))
            loss.backward()
            loss_value = float(loss.detach())
            g = (dp.noise_loss_gradient(mid.grad) if dp is not None else mid.grad).numpy()
            scale = _grad_scale(g, self._codec)
            tensors = {"grad": g * np.float32(scale) if scale != 1 else g}
            meta = {**meta, "scale": scale}
            reply = self._exchange(
                env, step, MsgType.LOGIT_GRADIENT, meta, tensors, MsgType.GRADIENT
            )
        else:
            tensors = {"activation": a_np, "labels": yb}
            reply = self._exchange(env, step, MsgType.ACTIVATION, meta, tensors, MsgType.GRADIENT)
        act.backward(
            torch.from_numpy(self._reply_tensor(reply, MsgType.GRADIENT, "grad", a_np.shape))
        )
        return loss_value

    def _send_error(self, env: Envelope, reason: str) -> None:
        with contextlib.suppress(TransportError, WireError):
            err = env.reply(
                type=MsgType.ERROR,
                sender=self.id,
                seq=self._next_seq(),
                meta={"error": reason[:500], **_session_meta(env)},
            )
            self.endpoint.publish_small(self.topics.up(self.id), encode(err))
