"""Device side of split inference: edge half in onnxruntime, cloud half over MQTT (no torch)."""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converters.activation_codec import PCA_ONNX_FILE, PcaCodec, default_codec, get_codec, load_pca
from converters.errors import TransportError, WireError
from converters.mqtt import MqttConfig, MqttEndpoint
from converters.tensor_codec import decode_tensors
from converters.topics import Topics
from converters.wire import Envelope, MsgType, decode, encode
from edge.errors import ArtifactMissingError, EdgeInputError, ModelMismatchError
from split.manifest import Manifest, sha256_file

__all__ = ["RemoteInferer", "infer_remote"]

RUN_ID = "infer"
PCA_VARIANT = "pca"


class _UnacknowledgedError(Exception):
    """Internal: no worker acknowledged a request frame before the deadline."""


@dataclass
class _Waiter:
    event: threading.Event = field(default_factory=threading.Event)
    reply: Envelope | None = None


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
            ``edge.commands.infer``. A batch too big for one transport frame goes out as
            several requests (``requests`` > 1, ids ``<request_id>.<i>``), one after another.

        Raises:
            EdgeInputError: ``x`` does not fit the model.
            ModelMismatchError: The cloud runs another model (hash mismatch).
            TimeoutError: No worker acknowledged the request, or no reply came in time (after
                ``retries`` resends with the same id).
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
        """One request if the rows fit one frame and ``max_rows``, else slices ``rid.0``, ``rid.1``.

        Shared subscriptions hand each frame to any worker, so a multi-frame request would be
        split between workers: every request must be one frame.
        """
        rid = request_id or secrets.token_hex(8)
        if not isinstance(rid, str) or not 1 <= len(rid) <= 56:
            raise ValueError(f"request_id must be a str of 1-56 characters, got {rid!r}")
        self.connect()
        limit = self.endpoint.chunk_limit(self._up, self._down)
        n, step = len(out), self.max_rows
        if n <= step:
            whole = self._envelope(pack(out), n, rid)
            if len(whole) <= limit:
                return self._request(whole, rid, timeout, retries)
            todo = [(0, n // 2), (n // 2, n)] if n > 1 else [(0, 1)]
        else:
            todo = [(a, min(a + step, n)) for a in range(0, n, step)]
        pieces = []
        while todo:  # halve until each slice fits; sized with the longest sub-id possible
            a, b = todo.pop(0)
            size = len(self._envelope(pack(out[a:b]), b - a, f"{rid}.{len(out)}"))
            if size <= limit:
                pieces.append((a, b))
            elif b - a > 1:
                todo[:0] = [(a, (a + b) // 2), ((a + b) // 2, b)]
            else:
                raise EdgeInputError(
                    f"one sample's request is {size} bytes, more than one transport frame "
                    f"({limit} bytes); use a smaller codec or raise max_chunk"
                )
        parts = []
        for i, (a, b) in enumerate(pieces):
            sub = f"{rid}.{i}"
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
        timeout = self.timeout if timeout is None else timeout
        waiter = _Waiter()
        with self._lock:
            self._waiters[rid] = waiter
        t0 = time.perf_counter()
        try:
            for attempt in range(retries + 1):
                try:
                    if self._attempt(data, waiter, timeout):
                        break
                    problem = (
                        f"no INFER_REPLY for request_id={rid!r} within {timeout} s "
                        f"({attempt + 1} attempt(s)); the worker may have died: retry with "
                        "the same request_id"
                    )
                except _UnacknowledgedError:
                    problem = (
                        f"no inference worker acknowledged request_id={rid!r} within {timeout} s"
                        f" ({attempt + 1} attempt(s)); is `edgesplit serve` running with prefix "
                        f"{self.topics.prefix!r}?"
                    )
                if attempt == retries:
                    raise TimeoutError(problem)
        finally:
            with self._lock:
                self._waiters.pop(rid, None)
        return self._result(waiter.reply, rid, len(data), time.perf_counter() - t0)

    def _attempt(self, data: bytes, waiter: _Waiter, timeout: float) -> bool:
        """Sends once and waits; True if a reply came, raises _UnacknowledgedError if none acked."""
        deadline = time.perf_counter() + timeout
        try:
            self.endpoint.send(self._up, data, timeout=timeout)
        except TransportError as exc:
            if "refused" in str(exc) or "aborted" in str(exc):
                raise  # the broker's ACL or the worker said no: waiting will not help
            if waiter.event.is_set():
                return True  # acks were lost but the reply made it
            raise _UnacknowledgedError from None
        return waiter.event.wait(max(0.0, deadline - time.perf_counter()))

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
        if env.type not in (MsgType.INFER_REPLY, MsgType.ERROR):
            return
        rid = env.meta.get("request_id")
        with self._lock:
            waiter = self._waiters.get(rid) if isinstance(rid, str) else None
            if waiter is None:
                self.stale += 1
                return
            if waiter.event.is_set():
                self.duplicates += 1
                return
            waiter.reply = env
            waiter.event.set()


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
