"""Split-inference service: shared-subscription workers that batch INFER_REQUESTs per forward."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from converters.activation_codec import get_codec, load_pca
from converters.errors import CodecError, ConfigError, TransportError, WireError
from converters.mqtt import MqttConfig, MqttEndpoint
from converters.tensor_codec import encode_tensors
from converters.topics import Topics, validate_device_id
from converters.wire import DEFAULT_MAX_BYTES, Envelope, MsgType, decode, encode

log = logging.getLogger(__name__)

_MAX_REQUEST_ID = 64


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    """One inference worker.

    Attributes:
        directory: Split directory (manifest.json, model.pt, cloud.pt [, pca.npz]).
        broker_url: ``mqtt://host:port`` (or mqtts://user:pass@host:port).
        worker_id: MQTT client id of this worker; unique per process.
        group: Shared-subscription group; workers in one group split the requests.
        prefix: Topic prefix shared with the devices.
        max_batch: Most requests merged into one cloud forward.
        max_delay_ms: Longest a request waits for others to join its batch.
        max_rows: Most samples one request may carry.
        dedupe: Answered (device, request id) pairs remembered to replay instead of recompute.
        dedupe_bytes: Most reply bytes kept for replays (large batches evict sooner).
        claim_timeout: Seconds a granted claim waits for its stream before it is forgotten.
        max_claims: Most granted claims held at once; the oldest is forgotten first.
        reply_threads: Threads publishing replies (each waits for its PUBACK).
        keepalive: MQTT keepalive in seconds.
        qos: MQTT QoS of the shared subscription, transport acks and replies. 0 saves three
            PUBACKs per request; delivery then rests on the transport's end-to-end acks (an
            unacked request is retransmitted) and on the device's timeout and retry.
    """

    directory: str
    broker_url: str
    worker_id: str = "infer-0"
    group: str = "infer"
    prefix: str = "edgesplit"
    max_batch: int = 32
    max_delay_ms: float = 2.0
    max_rows: int = 1024
    dedupe: int = 4096
    dedupe_bytes: int = 32 * 2**20
    claim_timeout: float = 10.0
    max_claims: int = 1024
    reply_threads: int = 4
    keepalive: int = 10
    qos: int = 1

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "max_batch",
            "max_rows",
            "dedupe",
            "dedupe_bytes",
            "max_claims",
            "reply_threads",
            "keepalive",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.qos not in (0, 1):
            problems.append(f"qos must be 0 or 1, got {self.qos}")
        if not 0 <= self.max_delay_ms <= 10_000:
            problems.append(f"max_delay_ms must be in [0, 10000], got {self.max_delay_ms}")
        if not 0 < self.claim_timeout <= 3600:
            problems.append(f"claim_timeout must be in (0, 3600] seconds, got {self.claim_timeout}")
        try:
            validate_device_id(self.worker_id)
            Topics(self.prefix).shared_up(self.group)
        except WireError as exc:
            problems.append(str(exc))
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass
class _Request:
    device: str
    request_id: str
    env: Envelope
    activation: np.ndarray
    received: float


@dataclass
class ServiceStats:
    """What a worker did; ``replayed`` counts retries answered from the dedupe cache.

    ``claims`` were granted, ``streams`` arrived for one, ``unclaimed`` streams had none (refused)
    and ``expired`` claims were forgotten without their stream.
    """

    requests: int = 0
    replies: int = 0
    errors: int = 0
    batches: int = 0
    rows: int = 0
    duplicates: int = 0
    replayed: int = 0
    ignored: int = 0
    claims: int = 0
    streams: int = 0
    unclaimed: int = 0
    expired: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class InferenceService:
    """Answers INFER_REQUESTs with the split's cloud half (torch), batching concurrent ones.

    Requests arrive through ``$share/<group>/<prefix>/up/+`` so N workers split the load.
    Mosquitto hands every *message* of a shared subscription to any member, so chunks of one
    stream would be spread over workers: a request must fit one frame there. A bigger one is
    claimed first: the device sends a one-frame INFER_CLAIM through the share, the worker that
    gets it answers with its id and then receives the whole request, as an ordinary multi-frame
    stream acked on the device's downlink, on ``<prefix>/infer/<device>/<worker>``, which only
    it reads. A claim lives ``claim_timeout`` seconds; a stream without one is refused. Replies
    go out with ``publish_small`` (one QoS 1 frame, no transport ack) because a device's ack
    would travel on its up topic, i.e. through the shared subscription to a random worker.
    A lost reply surfaces as a device timeout; the retry carries the same request id and is
    answered from the dedupe cache without a second forward.
    """

    def __init__(self, config: ServiceConfig) -> None:
        import torch

        from split.store import load_split

        self.config = config
        self.topics = Topics(config.prefix)
        sm, _, self.manifest = load_split(Path(config.directory))
        self._halves = [sm.cloud] + ([sm.head] if sm.head is not None else [])
        for half in self._halves:
            half.eval()
        self._torch = torch
        self.model_hash = self.manifest.digest()
        self.activation_shape = tuple(self.manifest.activation_shape)
        self._pca = load_pca(config.directory)
        self._codecs: dict[str, object] = {}
        self.stats = ServiceStats()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._seen: OrderedDict[tuple[str, str], bytes | None] = OrderedDict()
        self._seen_lock = threading.Lock()
        self._seen_bytes = 0
        self._claims: OrderedDict[tuple[str, str], float] = OrderedDict()  # -> deadline
        self._claims_lock = threading.Lock()
        self._seq = itertools.count(1)
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(config.reply_threads, thread_name_prefix="infer-reply")
        self._batcher = threading.Thread(target=self._run_batches, name="infer-batch", daemon=True)
        self.endpoint = MqttEndpoint(
            MqttConfig.from_url(
                config.broker_url,
                client_id=config.worker_id,
                keepalive=config.keepalive,
                qos=config.qos,
            )
        )

    def start(self) -> InferenceService:
        """Connects, subscribes to the shared uplink and starts batching; returns self."""
        self._batcher.start()
        self.endpoint.connect()
        # Streams first: a claim granted through the share must find its stream topic read.
        self.endpoint.subscribe(self.topics.worker_infer(self.config.worker_id), self._on_stream)
        self.endpoint.subscribe(self.topics.shared_up(self.config.group), self._on_uplink)
        return self

    def close(self) -> None:
        """Stops batching, waits for pending replies and disconnects."""
        self._stop.set()
        self._queue.put(None)
        self._batcher.join(timeout=5)
        self._pool.shutdown(wait=True)
        self.endpoint.close()

    def __enter__(self) -> InferenceService:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- receiving (MQTT dispatcher thread) -----------------------------------------------

    def _on_uplink(self, topic: str, sender: str, payload: bytearray) -> None:
        try:
            _, device = self.topics.parse_device(topic)
            env = decode(payload, sender=device)
        except WireError as exc:
            self.stats.add(ignored=1)
            log.warning("dropped uplink on %s: %s", topic, exc)
            return
        if env.type == MsgType.INFER_CLAIM:
            self._on_claim(env, device)
        elif env.type == MsgType.INFER_REQUEST:
            self._take(env, device)
        else:
            self.stats.add(ignored=1)  # another service's message on the shared uplink

    def _on_stream(self, topic: str, sender: str, payload: bytearray) -> None:
        """A request streamed to this worker only, after it granted the request's claim."""
        try:
            device, _ = self.topics.parse_infer(topic)
            env = decode(payload, sender=device)
        except WireError as exc:
            self.stats.add(ignored=1)
            log.warning("dropped stream on %s: %s", topic, exc)
            return
        rid = self._request_id(env, device)
        if rid is None:
            return
        if env.type != MsgType.INFER_REQUEST:
            msg = f"a worker's stream topic takes INFER_REQUEST only, got {env.type.name}"
            self._error(env, device, rid, "bad_request", msg)
            return
        with self._claims_lock:
            self._expire_claims()
            claimed = self._claims.pop((device, rid), None) is not None
        if not claimed:
            self.stats.add(unclaimed=1)
            self._error(env, device, rid, "unclaimed", (
                f"request_id {rid!r} has no open claim on worker {self.config.worker_id} (none "
                f"granted, or the stream came after claim_timeout={self.config.claim_timeout} s)"
                "; send INFER_CLAIM through the shared uplink first"
            ))  # fmt: skip
            return
        self.stats.add(streams=1)
        self._take(env, device)

    def _on_claim(self, env: Envelope, device: str) -> None:
        """Grants a claim (answers with this worker's id) unless the request is known here."""
        rid = self._request_id(env, device)
        if rid is None:
            return
        size = env.meta.get("bytes")
        limit = min(self.endpoint.config.max_payload, DEFAULT_MAX_BYTES)
        refusal = self._hash_refusal(env.meta.get("model_hash"))
        if refusal is None and (type(size) is not int or not 1 <= size <= limit):
            refusal = ("too_large", f"claimed request must be 1..{limit} bytes, got {size!r}")
        if refusal is not None:
            self._error(env, device, rid, *refusal)
            return
        if self._known(device, rid):
            return  # answered from the cache or still queued: the reply ends the claim
        with self._claims_lock:
            self._expire_claims()
            self._claims[(device, rid)] = time.monotonic() + self.config.claim_timeout
            self._claims.move_to_end((device, rid))
            while len(self._claims) > self.config.max_claims:
                self._claims.popitem(last=False)
                self.stats.add(expired=1)
        self.stats.add(claims=1)
        claim = env.meta.get("claim")
        grant = env.reply(
            type=MsgType.INFER_CLAIM,
            sender=self.config.worker_id,
            seq=next(self._seq),
            meta={"request_id": rid, "worker": self.config.worker_id,
                  "claim": claim if type(claim) is int else None},
        )  # fmt: skip
        self._send_reply(device, encode(grant))

    def _expire_claims(self) -> None:
        """Forgets claims whose stream did not come in time (claims lock held)."""
        now = time.monotonic()
        while self._claims and next(iter(self._claims.values())) < now:
            self._claims.popitem(last=False)
            self.stats.add(expired=1)

    @property
    def open_claims(self) -> int:
        """Claims granted and still waiting for their stream."""
        with self._claims_lock:
            self._expire_claims()
            return len(self._claims)

    def _request_id(self, env: Envelope, device: str) -> str | None:
        """The envelope's request id, or None after refusing a malformed one."""
        rid = env.meta.get("request_id")
        if isinstance(rid, str) and 1 <= len(rid) <= _MAX_REQUEST_ID:
            return rid
        self._error(
            env, device, None, "bad_request", f"request_id must be a 1-64 char str, got {rid!r}"
        )
        return None

    def _known(self, device: str, rid: str, *, mark: bool = False) -> bool:
        """True (after replaying a cached answer) if this worker has seen the request.

        With ``mark``, an unseen request is recorded as pending, so a retry arriving while it
        is queued is dropped instead of computed twice.
        """
        key = (device, rid)
        with self._seen_lock:
            known = key in self._seen
            cached = self._seen.get(key)
            if mark and not known:
                self._seen[key] = None
                self._trim_seen()
        if known:
            self.stats.add(duplicates=1)
            if cached is not None:
                self.stats.add(replayed=1)
                self._send_reply(device, cached)
        return known

    def _take(self, env: Envelope, device: str) -> None:
        """Checks a whole INFER_REQUEST and queues it for the batcher (or refuses it)."""
        self.stats.add(requests=1)
        rid = self._request_id(env, device)
        if rid is None or self._known(device, rid, mark=True):
            return
        key = (device, rid)
        try:
            activation = self._check(env)
        except CodecError as exc:
            refusal = ("bad_activation", str(exc))
        else:
            refusal = None if isinstance(activation, np.ndarray) else activation
        if refusal is not None:
            with self._seen_lock:
                self._seen.pop(key, None)  # pending, no bytes: a corrected retry is processed
            self._error(env, device, rid, *refusal)
            return
        self._queue.put(_Request(device, rid, env, activation, time.perf_counter()))

    def _check(self, env: Envelope) -> np.ndarray | tuple[str, str]:
        """The decoded activation, or ``(code, message)`` for a request the model cannot take.

        Raises:
            CodecError: Bad shape, codec name or payload (NaN/Inf, truncated).
        """
        meta = env.meta
        refusal = self._hash_refusal(meta.get("model_hash"))
        if refusal is not None:
            return refusal
        shape = meta.get("shape")
        ok = isinstance(shape, list) and all(type(d) is int for d in shape)
        if (
            not ok
            or tuple(shape[1:]) != self.activation_shape
            or not 1 <= shape[0] <= self.config.max_rows
        ):
            raise CodecError(
                f"activation shape must be (1..{self.config.max_rows}, "
                f"{', '.join(map(str, self.activation_shape))}), got {shape!r}"
            )
        spec = meta.get("codec")
        if not isinstance(spec, str):
            raise CodecError(f"codec must be a codec name, got {spec!r}")
        codec = self._codecs.get(spec)
        if codec is None:
            try:
                codec = self._codecs.setdefault(spec, get_codec(spec, pca=self._pca))
            except ConfigError as exc:
                return ("bad_codec", str(exc))
        return codec.decode(env.body, shape)

    def _hash_refusal(self, theirs) -> tuple[str, str] | None:
        """``("model_hash", message)`` if the device's model is not this worker's, else None."""
        if theirs == self.model_hash:
            return None
        return (
            "model_hash",
            f"model hash {str(theirs)[:8]}... != cloud's {self.model_hash[:8]}...; "
            "re-export or update the device",
        )

    def _trim_seen(self) -> None:
        """Evicts the oldest answers beyond ``dedupe`` entries or ``dedupe_bytes`` (lock held)."""
        cfg = self.config
        while len(self._seen) > cfg.dedupe or self._seen_bytes > cfg.dedupe_bytes:
            _, old = self._seen.popitem(last=False)
            self._seen_bytes -= len(old or b"")

    # -- batching (batcher thread) --------------------------------------------------------

    def _run_batches(self) -> None:
        delay = self.config.max_delay_ms / 1000
        while not self._stop.is_set():
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.perf_counter() + delay
            while len(batch) < self.config.max_batch:
                left = deadline - time.perf_counter()
                try:
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._stop.set()
                    break
                batch.append(item)
            try:
                self._answer(batch)
            except Exception:  # a bug must not kill the worker silently; devices then time out
                log.exception("cloud forward failed for a batch of %d requests", len(batch))
                with self._seen_lock:  # let the devices' retries be computed again
                    for r in batch:
                        old = self._seen.pop((r.device, r.request_id), None)
                        self._seen_bytes -= len(old or b"")

    def _answer(self, batch: list[_Request]) -> None:
        torch = self._torch
        acts = np.concatenate([r.activation for r in batch]).astype(np.float32, copy=False)
        with torch.inference_mode():
            out = torch.from_numpy(acts)
            for half in self._halves:
                out = half(out)
            probs = torch.softmax(out.to(torch.float64), dim=1).numpy()
        self.stats.add(batches=1, rows=len(acts))
        start = 0
        for r in batch:
            p = probs[start : start + len(r.activation)]
            start += len(r.activation)
            reply = r.env.reply(
                type=MsgType.INFER_REPLY,
                sender=self.config.worker_id,
                seq=next(self._seq),
                meta={
                    "request_id": r.request_id,
                    "classes": [int(c) for c in p.argmax(axis=1)],
                    "batch_requests": len(batch),
                    "queued_ms": round(1000 * (time.perf_counter() - r.received), 3),
                },
                body=encode_tensors({"probabilities": p.astype(np.float32)}),
            )
            data = encode(reply)
            limit = self.endpoint.chunk_limit(self.topics.down(r.device))
            if len(data) > limit:  # replies are single frames (see the class docstring)
                err = f"reply of {len(data)} bytes exceeds one frame ({limit}); send fewer rows"
                with self._seen_lock:
                    self._seen.pop((r.device, r.request_id), None)
                self._error(r.env, r.device, r.request_id, "reply_too_large", err)
                continue
            with self._seen_lock:
                if (r.device, r.request_id) in self._seen:
                    self._seen[(r.device, r.request_id)] = data
                    self._seen_bytes += len(data)
                    self._trim_seen()
            self.stats.add(replies=1)
            self._send_reply(r.device, data)

    # -- replying -------------------------------------------------------------------------

    def _send_reply(self, device: str, data: bytes) -> None:
        if self.config.qos == 0:
            self._publish(device, data)  # returns at once: nothing to wait for
        else:
            self._pool.submit(self._publish, device, data)  # each waits for its PUBACK

    def _publish(self, device: str, data: bytes) -> None:
        try:
            self.endpoint.publish_small(self.topics.down(device), data, qos=self.config.qos)
        except TransportError as exc:
            log.warning("reply to %s not published: %s", device, exc)

    def _error(self, env: Envelope, device: str, rid: str | None, code: str, message: str) -> None:
        self.stats.add(errors=1)
        log.info("refused request %s from %s: %s", rid, device, message)
        err = env.reply(
            type=MsgType.ERROR,
            sender=self.config.worker_id,
            seq=next(self._seq),
            meta={"request_id": rid, "code": code, "error": message},
        )
        self._send_reply(device, encode(err))
