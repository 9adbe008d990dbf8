"""Device side of split inference: edge half in onnxruntime, cloud half over MQTT (no torch)."""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.activation_codec import PCA_ONNX_FILE, PcaCodec, default_codec, get_codec, load_pca
from converters.errors import TransportError, WireError
from converters.mqtt import MqttConfig, MqttEndpoint
from converters.tensor_codec import decode_tensors
from converters.topics import Topics, validate_device_id
from converters.wire import Envelope, MsgType, decode, encode
from edge.errors import ArtifactMissingError, EdgeInputError, ModelMismatchError
from split.manifest import Manifest, sha256_file

__all__ = ["RemoteInferer", "infer_remote"]

RUN_ID = "infer"
PCA_VARIANT = "pca"


class _AttemptError(Exception):
    """Internal: one attempt failed before its reply could come (reason, then a hint)."""

    def __init__(self, reason: str, hint: str) -> None:
        super().__init__(reason)
        self.reason, self.hint = reason, hint


@dataclass
class _Waiter:
    """One request in flight. Changed under ``RemoteInferer._lock``, which ``cond`` shares."""

    cond: threading.Condition
    reply: Envelope | None = None  # INFER_REPLY or ERROR
    claim: int | None = None  # token of the current claim (requests bigger than one frame)
    worker: str | None = None  # the worker that granted it
    lost: str | None = None  # that worker's refusal of the stream: it no longer had the claim


class RemoteInferer:
    """Runs the edge half locally and asks the cloud's inference service for the rest.

    One MQTT connection, reused for every request; ``infer`` may be called from several
    threads at once (each request waits on its own id).

    Args:
        directory: Split directory holding at least manifest.json and the edge variant.
        broker_url: ``mqtt://host:port`` of the broker the inference workers listen on.
        device_id: This device's id (MQTT client id and topic level).
        variant: Edge ONNX variant: ``fp32``, ``int8``, ``fp16`` or ``pca`` (edge.pca.onnx,
            which outputs PCA codes directly).
        codec: Activation codec name; default ``pca:D+int8`` if the split has a PCA, else int8.
        prefix: Topic prefix of the service.
        timeout: Default seconds to wait for a reply (delivery included).
        max_rows: Most samples per request (the service's ``max_rows``, default 1024); bigger
            batches go out as several requests.
        threads: onnxruntime intra-op threads.
        mqtt_options: Extra :class:`MqttConfig` fields (e.g. ``ack_timeout``).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        broker_url: str,
        device_id: str,
        variant: str = "fp32",
        codec: str | None = None,
        prefix: str = "edgesplit",
        timeout: float = 10.0,
        threads: int | None = None,
        max_rows: int = 1024,
        mqtt_options: dict | None = None,
    ) -> None:
        from edge.runtime import EdgeModel

        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        directory = Path(directory)
        self.manifest = Manifest.load(directory)
        self.model_hash = self.manifest.digest()
        self.activation_shape = tuple(self.manifest.activation_shape)
        pca = load_pca(directory)
        self.variant, self.timeout = variant, timeout
        if variant == PCA_VARIANT:
            if pca is None:
                raise ArtifactMissingError(f"{directory} has no PCA; run attach_pca first")
            path = directory / PCA_ONNX_FILE
            if sha256_file(path) != self.manifest.artifacts.get(PCA_ONNX_FILE):
                raise ModelMismatchError(f"{path} does not match its manifest sha256")
            self.edge = EdgeModel(path, threads=threads)  # outputs codes, not the activation
        else:
            self.edge = EdgeModel.from_dir(directory, variant=variant, threads=threads)
        self.codec = get_codec(codec or default_codec(pca), pca=pca)
        if variant == PCA_VARIANT and not isinstance(self.codec, PcaCodec):
            raise ValueError(
                f"variant 'pca' outputs PCA codes; codec must be pca:..., got {codec!r}"
            )
        self.topics = Topics(prefix)
        self.device_id = device_id
        self._up, self._down = self.topics.up(device_id), self.topics.down(device_id)
        self._seq = itertools.count(1)
        self._waiters: dict[str, _Waiter] = {}
        self._lock = threading.Lock()
        self.duplicates = 0  # replies for a request already answered (should stay 0)
        self.stale = 0  # replies that came after their request timed out
        self.endpoint = MqttEndpoint(
            MqttConfig.from_url(broker_url, client_id=device_id, **(mqtt_options or {}))
        )
        self._connected = False
        self._connect_lock = threading.Lock()

    def connect(self) -> RemoteInferer:
        """Connects and subscribes to this device's downlink; returns self."""
        with self._connect_lock:  # infer() connects lazily, possibly from several threads
            if not self._connected:
                self.endpoint.connect()
                self.endpoint.subscribe(self._down, self._on_down)
                self._connected = True
        return self

    def close(self) -> None:
        """Disconnects."""
        self.endpoint.close()
        self._connected = False

    def __enter__(self) -> RemoteInferer:
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    def infer(
        self,
        x: np.ndarray,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
    ) -> dict[str, Any]:
        """Predicts classes for a batch ``(N, *input_shape)`` or one sample.

        Returns:
            ``{"variant", "codec", "model_hash", "request_id", "worker", "requests",
            "bytes_sent", "latency_ms", "rows": [{"row", "class", "probabilities"}]}`` like
            ``edge.commands.infer``. A batch of more than ``max_rows`` samples goes out as
            several requests (``requests`` > 1, ids ``<request_id>.<i>``), one after another.
            A request too big for one transport frame is claimed first (INFER_CLAIM through
            the shared uplink), then streamed to the one worker that took the claim.

        Raises:
            EdgeInputError: ``x`` does not fit the model.
            ModelMismatchError: The cloud runs another model (hash mismatch).
            TimeoutError: No worker acknowledged (or claimed) the request, or no reply came in
                time (after ``retries`` resends with the same id).
            TransportError: The broker refused the request (ACL) or is unreachable.
        """
        out = self.edge.run(x)
        single = out.ndim == 1 or out.shape == self.activation_shape
        out = out[None] if single else out
        pack = self.codec.encode_codes if self.variant == PCA_VARIANT else self.codec.encode
        return self._send_rows(out, pack, request_id, timeout, retries)

    def infer_activation(
        self,
        activation: np.ndarray,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
    ) -> dict[str, Any]:
        """Like :meth:`infer` for an activation ``(N, *activation_shape)`` computed elsewhere."""
        if activation.shape[1:] != self.activation_shape:
            raise EdgeInputError(
                f"activation shape must be (N, {', '.join(map(str, self.activation_shape))}), "
                f"got {activation.shape}"
            )
        return self._send_rows(activation, self.codec.encode, request_id, timeout, retries)

    def _send_rows(self, out, pack, request_id, timeout, retries) -> dict[str, Any]:
        """One request for up to ``max_rows`` rows, else slices ``rid.0``, ``rid.1``, ..."""
        rid = request_id or secrets.token_hex(8)
        if not isinstance(rid, str) or not 1 <= len(rid) <= 56:
            raise ValueError(f"request_id must be a str of 1-56 characters, got {rid!r}")
        self.connect()
        n, step = len(out), self.max_rows
        if n <= step:
            return self._request(self._envelope(pack(out), n, rid), rid, timeout, retries)
        parts = []
        for i, a in enumerate(range(0, n, step)):
            b, sub = min(a + step, n), f"{rid}.{i}"
            data = self._envelope(pack(out[a:b]), b - a, sub)
            parts.append(self._request(data, sub, timeout, retries))
        rows = [r for part in parts for r in part["rows"]]
        for i, row in enumerate(rows):
            row["row"] = i
        return {
            **parts[0],
            "request_id": rid,
            "worker": ",".join(sorted({p["worker"] for p in parts})),
            "requests": len(parts),
            "bytes_sent": sum(p["bytes_sent"] for p in parts),
            "latency_ms": sum(p["latency_ms"] for p in parts),
            "rows": rows,
        }

    def _envelope(self, body: bytes, rows: int, rid: str) -> bytes:
        env = Envelope(
            type=MsgType.INFER_REQUEST,
            run_id=RUN_ID,
            round=0,
            sender=self.device_id,
            seq=next(self._seq),
            meta={
                "request_id": rid,
                "model_hash": self.model_hash,
                "codec": self.codec.name,
                "shape": [rows, *self.activation_shape],
            },
            body=body,
        )
        return encode(env)

    def _request(self, data: bytes, rid: str, timeout, retries) -> dict[str, Any]:
        """Sends one request (through the share if it fits one frame, else claimed) and waits."""
        timeout = self.timeout if timeout is None else timeout
        claimed = len(data) > self.endpoint.chunk_limit(self._up, self._down)
        attempt_once = self._claimed_attempt if claimed else self._attempt
        waiter = _Waiter(threading.Condition(self._lock))
        with self._lock:
            self._waiters[rid] = waiter
        t0 = time.perf_counter()
        try:
            for attempt in range(retries + 1):
                try:
                    if attempt_once(data, rid, waiter, timeout):
                        break
                    exc = _AttemptError(
                        f"no INFER_REPLY for request_id={rid!r} within {timeout} s",
                        "the worker may have died: retry with the same request_id",
                    )
                except _AttemptError as failed:
                    exc = failed
                if attempt == retries:
                    raise TimeoutError(f"{exc.reason} ({attempt + 1} attempt(s)); {exc.hint}")
        finally:
            with self._lock:
                self._waiters.pop(rid, None)
        return self._result(waiter.reply, rid, len(data), time.perf_counter() - t0)

    def _no_worker(self, what: str, rid: str, timeout: float) -> _AttemptError:
        return _AttemptError(
            f"no inference worker {what} request_id={rid!r} within {timeout} s",
            f"is `edgesplit serve` running with prefix {self.topics.prefix!r}?",
        )

    def _wait(self, waiter: _Waiter, until, deadline: float) -> bool:
        """Waits until ``until()`` holds (checked under the lock) or the deadline passes."""
        with self._lock:
            return waiter.cond.wait_for(until, max(0.0, deadline - time.perf_counter()))

    def _attempt(self, data: bytes, rid: str, waiter: _Waiter, timeout: float) -> bool:
        """Sends once through the shared uplink and waits; True if a reply came."""
        deadline = time.perf_counter() + timeout
        try:
            self.endpoint.send(self._up, data, timeout=timeout)
        except TransportError as exc:
            if "refused" in str(exc) or "aborted" in str(exc):
                raise  # the broker's ACL or the worker said no: waiting will not help
            if waiter.reply is not None:
                return True  # acks were lost but the reply made it
            raise self._no_worker("acknowledged", rid, timeout) from None
        return self._wait(waiter, lambda: waiter.reply is not None, deadline)

    def _claimed_attempt(self, data: bytes, rid: str, waiter: _Waiter, timeout: float) -> bool:
        """Claims a worker through the shared uplink, then streams ``data`` to it alone; True
        if the reply came.

        A shared subscription hands every frame to any worker, so a multi-frame request would
        be split between them. The one-frame claim reaches one worker, which answers with its
        id (or with the reply itself if it has already answered this request id); the request
        then goes as an ordinary acknowledged stream to that worker's own topic.
        """
        deadline = time.perf_counter() + timeout
        with self._lock:
            if waiter.reply is not None:
                return True  # a late reply to an earlier attempt
            waiter.claim, waiter.worker, waiter.lost = secrets.randbits(31), None, None
            claim = self._claim_envelope(rid, len(data), waiter.claim)
        limit = self.endpoint.chunk_limit(self._up)
        if len(claim) > limit:
            raise EdgeInputError(
                f"the claim for request_id={rid!r} is {len(claim)} bytes, more than one "
                f"transport frame ({limit} bytes); raise max_chunk"
            )
        self.endpoint.post(self._up, claim)  # the grant (or the reply) acknowledges it
        if not self._wait(waiter, lambda: waiter.worker or waiter.reply, deadline):
            raise self._no_worker("granted a claim for", rid, timeout)
        if waiter.reply is not None:
            return True  # answered from a worker's cache: nothing to stream
        worker = waiter.worker
        try:
            left = deadline - time.perf_counter()
            if left > 0:
                topic = self.topics.infer_stream(self.device_id, worker)
                self.endpoint.send(topic, data, ack_topic_for_peer=self._down, timeout=left)
        except TransportError as exc:
            if "refused" in str(exc) or "aborted" in str(exc):
                raise
            if waiter.reply is not None:
                return True
            raise _AttemptError(
                f"worker {worker!r} granted request_id={rid!r} but took no stream ({exc})",
                "it may have died: retry with the same request_id (a new claim)",
            ) from None
        if not self._wait(waiter, lambda: waiter.reply or waiter.lost, deadline):
            return False
        if waiter.reply is not None:
            return True
        raise _AttemptError(
            f"worker {worker!r} refused the stream of request_id={rid!r}: {waiter.lost}",
            "it may have restarted: retry with the same request_id (a new claim)",
        )

    def _claim_envelope(self, rid: str, size: int, token: int) -> bytes:
        env = Envelope(
            type=MsgType.INFER_CLAIM,
            run_id=RUN_ID,
            round=0,
            sender=self.device_id,
            seq=next(self._seq),
            meta={"request_id": rid, "model_hash": self.model_hash, "bytes": size, "claim": token},
        )
        return encode(env)

    def _result(self, reply: Envelope, rid: str, sent: int, seconds: float) -> dict[str, Any]:
        meta = reply.meta
        if reply.type == MsgType.ERROR:
            message = str(meta.get("error"))
            if meta.get("code") == "model_hash":
                raise ModelMismatchError(message)
            raise EdgeInputError(f"cloud refused request {rid}: {message}")
        probs = decode_tensors(reply.body)["probabilities"]
        classes = meta.get("classes", [])
        if len(classes) != len(probs):
            raise WireError(f"reply has {len(classes)} classes for {len(probs)} rows")
        return {
            "variant": self.variant,
            "codec": self.codec.name,
            "model_hash": self.model_hash,
            "request_id": rid,
            "worker": reply.sender,
            "requests": 1,
            "bytes_sent": sent,
            "latency_ms": 1000 * seconds,
            "rows": [
                {"row": i, "class": int(c), "probabilities": [float(v) for v in p]}
                for i, (c, p) in enumerate(zip(classes, probs, strict=True))
            ],
        }

    def _on_down(self, topic: str, sender: str, payload: bytearray) -> None:
        try:
            env = decode(payload)
        except WireError:
            return
        if env.type not in (MsgType.INFER_REPLY, MsgType.ERROR, MsgType.INFER_CLAIM):
            return
        meta = env.meta
        rid = meta.get("request_id")
        with self._lock:
            waiter = self._waiters.get(rid) if isinstance(rid, str) else None
            if env.type == MsgType.INFER_CLAIM:
                # Only the first grant of the current claim counts; a late grant of an earlier
                # attempt is left to expire on its worker.
                current = waiter and waiter.claim is not None and waiter.worker is None
                if current and meta.get("claim") == waiter.claim and _is_id(meta.get("worker")):
                    waiter.worker = meta["worker"]
                    waiter.cond.notify_all()
                return
            if waiter is None:
                self.stale += 1
                return
            if waiter.reply is not None:
                self.duplicates += 1
                return
            if meta.get("code") == "unclaimed" and env.sender == waiter.worker:
                waiter.lost = str(meta.get("error"))  # not an answer: the device claims again
            else:
                waiter.reply = env
            waiter.cond.notify_all()


def _is_id(value) -> bool:
    try:
        validate_device_id(value)
    except WireError:
        return False
    return True


def infer_remote(
    directory: str | Path,
    x: np.ndarray,
    *,
    broker_url: str,
    device_id: str,
    variant: str = "fp32",
    timeout: float = 10.0,
    prefix: str = "edgesplit",
    codec: str | None = None,
) -> dict[str, Any]:
    """One-shot split inference: edge half here, cloud half by the service on ``broker_url``.

    See :meth:`RemoteInferer.infer` for the result and the errors; a TransportError means the
    broker could not be reached or nobody acknowledged the request.
    """
    with RemoteInferer(
        directory,
        broker_url=broker_url,
        device_id=device_id,
        variant=variant,
        codec=codec,
        prefix=prefix,
        timeout=timeout,
    ) as client:
        return client.infer(x)
