"""Reliable MQTT endpoint (paho-mqtt 2.x): chunked, windowed, acknowledged transfers; torch-free."""

from __future__ import annotations

import contextlib
import logging
import queue
import secrets
import socket
import threading
import time
import zlib
from collections.abc import Callable

import paho.mqtt.client as mqtt

from converters.chunking import (
    Frame,
    Kind,
    Reassembler,
    abort_frame,
    ack_frame,
    data_frame,
    data_header_len,
    n_chunks,
    parse_frame,
)
from converters.errors import ChunkError, ConfigError, TransportError
from converters.mqtt_config import PROTOCOLS, MqttConfig, TransportStats

log = logging.getLogger(__name__)

# MQTT fixed header (<=5) + topic length (2) + packet id (2) + v5 property length (<=4) + slack.
_PUBLISH_OVERHEAD = 16
# Topics whose handlers (and chunk limits) are remembered; past this the memo starts over.
_MEMO_TOPICS = 4096

Handler = Callable[[str, str, bytearray], None]


class _Outgoing:
    """Sender-side state of one stream, updated by acks on paho's network thread."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.upto = 0
        self.sacked: set[int] = set()
        self.progress = False
        self.poke = False  # a PUBACK refusal arrived: re-check before waiting out ack_timeout
        self.abort: str | None = None


def reverse_topic(topic: str) -> str:
    """Swaps the last ``up``/``down`` level: ``p/down/pi-01`` -> ``p/up/pi-01`` (ACL-permitted)."""
    levels = topic.split("/")
    for i in range(len(levels) - 1, -1, -1):
        if levels[i] in ("up", "down"):
            levels[i] = "down" if levels[i] == "up" else "up"
            return "/".join(levels)
    raise ConfigError(
        f"ack_topic_for_peer is required for topic {topic!r}: it has no 'up' or 'down' level"
    )


def _filter_matches(topic_filter: str, topic: str) -> bool:
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    return mqtt.topic_matches_sub(topic_filter, topic)


class MqttEndpoint:
    """One MQTT connection used by a device agent or the cloud.

    Whole payloads go through ``send`` (chunked, at most ``window`` frames in flight, acked and
    retransmitted) because QoS 1 alone silently loses bursts at a slow receiver: Mosquitto drops
    what exceeds its per-client queue although every publish was acknowledged. Receivers ack
    on the topic the sender names in each frame (``reply_to``); by default the reverse
    ``up``/``down`` topic of the same device, which the per-device ACL permits both ways.
    Frames are parsed and acked on paho's network thread; handlers run on one dispatcher thread,
    so a slow handler never delays acks. Never call ``send`` from paho's own callbacks.

    Args:
        config: connection and transfer settings.
        will: ``(topic, payload)`` published retained by the broker if this client dies.
        on_connect: called (on the dispatcher thread) after every successful (re)connect.
    """

    def __init__(
        self,
        config: MqttConfig,
        *,
        will: tuple[str, bytes] | None = None,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.stats = TransportStats()
        self._will, self._user_on_connect = will, on_connect
        self._lock = threading.RLock()
        self._subs: dict[str, list[Handler]] = {}
        self._ack_filters: set[str] = set()
        # topic -> its handlers, so a message does not match every filter again (paho's
        # topic_matches_sub builds a matcher per call); cleared whenever subscriptions change.
        self._routes: dict[str, list[Handler]] = {}
        self._covered: set[str] = set()  # ack topics some subscription already matches
        self._limits: dict[tuple[str, str, int | None], int] = {}  # chunk_limit memo
        self._outgoing: dict[int, _Outgoing] = {}
        self._suback: dict[int, threading.Event] = {}
        self._early_suback: set[int] = set()
        self._suback_lock = threading.Lock()
        self._refused_mids: dict[int, str] = {}
        self._last_info: mqtt.MQTTMessageInfo | None = None
        self._reasm = Reassembler(
            max_bytes=config.max_payload,
            max_streams=config.max_streams,
            timeout=config.stream_timeout,
        )
        self._reasm_lock = threading.Lock()
        self._last_expire = time.monotonic()
        self._connected = threading.Event()
        self._refused: str | None = None
        self.max_packet: int | None = None
        self.protocol = config.protocol
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._dispatcher = threading.Thread(
            target=self._dispatch, name=f"mqtt-dispatch-{config.client_id}", daemon=True
        )
        self._dispatcher.start()
        self._client = self._make_client(PROTOCOLS[config.protocol])

    # -- connection ---------------------------------------------------------------------------

    def _make_client(self, protocol: int) -> mqtt.Client:
        cfg = self.config
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=cfg.client_id, protocol=protocol
        )
        if cfg.username is not None:
            c.username_pw_set(cfg.username, cfg.password)
        if cfg.use_tls:
            try:
                c.tls_set(ca_certs=cfg.tls_ca, certfile=cfg.tls_cert, keyfile=cfg.tls_key)
            except OSError as exc:  # ssl.SSLError: not PEM, key does not match the certificate
                files = {"tls_ca": cfg.tls_ca, "tls_cert": cfg.tls_cert, "tls_key": cfg.tls_key}
                given = ", ".join(f"{k}={v!r}" for k, v in files.items() if v is not None)
                raise ConfigError(f"TLS files must be loadable PEM, got {given}: {exc}") from None
        self._arm_will(c)
        c.max_inflight_messages_set(max(20, 4 * cfg.window))
        c.reconnect_delay_set(cfg.reconnect_min, cfg.reconnect_max)
        c.on_socket_open = self._on_socket_open
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        return c

    def _arm_will(self, client: mqtt.Client) -> None:
        if self._will is not None:
            # Retained so a late subscriber to presence still learns the device went away; a
            # fresh stream id per connection so receivers' dedup never swallows a second will.
            frame = self._encode_small(self._will[1])
            client.will_set(self._will[0], frame, qos=1, retain=True)

    def connect(self, *, timeout: float = 10.0) -> None:
        """Connects and starts paho's network thread; falls back from v5 to 3.1.1 if refused.

        Raises:
            TransportError: if no connection is accepted within ``timeout`` seconds.
        """
        reason = self._try_connect(timeout)
        # Only a protocol refusal (amqtt answers "Unsupported protocol version") or a hang-up
        # before CONNACK is worth a 3.1.1 retry; bad credentials would fail again.
        if (
            reason is not None
            and self.protocol == "v5"
            and ("protocol" in reason.lower() or "before CONNACK" in reason)
        ):
            log.info("broker refused MQTT v5 (%s); retrying with 3.1.1", reason)
            self._client = self._make_client(mqtt.MQTTv311)
            self.protocol = "v311"
            reason = self._try_connect(timeout)
        if reason is not None:
            raise TransportError(
                f"connect to {self.config.host}:{self.config.port} as "
                f"{self.config.client_id!r} failed: {reason}"
            )

    def _try_connect(self, timeout: float) -> str | None:
        self._refused = None
        try:
            self._client.connect(self.config.host, self.config.port, self.config.keepalive)
        except OSError as e:
            return f"{type(e).__name__}: {e}"
        self._client.loop_start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._connected.wait(0.05):
                return None
            if self._refused is not None:
                break
        self._client.loop_stop()
        self._client.disconnect()
        return self._refused or f"no CONNACK within {timeout} s"

    @property
    def pending_bytes(self) -> int:
        """Bytes held for half-received streams (freed on completion, abort or expiry)."""
        with self._reasm_lock:
            return self._reasm.open_bytes

    @property
    def connected(self) -> bool:
        """True while the broker connection is up."""
        return self._connected.is_set()

    def _on_socket_open(self, client, userdata, sock) -> None:
        if self.config.tcp_nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = f"CONNACK {reason_code}"
            return
        mps = getattr(properties, "MaximumPacketSize", None) if properties else None
        self.max_packet = int(mps) if mps else None
        with self._lock:
            filters = list(self._subs) + sorted(self._ack_filters - set(self._subs))
        for f in filters:  # a clean session forgot them; paho does not resubscribe for us
            client.subscribe(f, qos=self.config.qos)
        self._arm_will(client)  # used by the next CONNECT, after a drop
        self._connected.set()
        if self._user_on_connect is not None:
            self._queue.put((lambda *_: self._user_on_connect(), "", "", bytearray()))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if not self._connected.is_set() and self._refused is None:
            self._refused = f"disconnected before CONNACK ({reason_code})"
        self._connected.clear()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for rc in reason_codes:
            if rc.is_failure:
                log.warning("subscription refused by the broker: %s", rc)
        with self._suback_lock:
            ev = self._suback.pop(mid, None)
            if ev is None:  # SUBACK overtook the registration in _subscribe_now
                self._early_suback.add(mid)
        if ev is not None:
            ev.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        # MQTT v5 PUBACK carries the ACL verdict (0x87); v3.1.1 brokers just drop silently.
        if reason_code.is_failure:
            with self._suback_lock:
                self._refused_mids[mid] = str(reason_code)
                while len(self._refused_mids) > 1024:
                    self._refused_mids.pop(next(iter(self._refused_mids)))
            for out in list(self._outgoing.values()):
                with out.cond:
                    out.poke = True
                    out.cond.notify_all()

    def _take_refused(self, mids: set[int]) -> str | None:
        if not self._refused_mids:
            return None
        with self._suback_lock:
            hits = [self._refused_mids.pop(m) for m in mids & self._refused_mids.keys()]
        return hits[0] if hits else None

    def close(self, *, flush_timeout: float = 2.0) -> None:
        """Flushes queued frames (e.g. the final ack), disconnects, stops both threads."""
        last = self._last_info
        if last is not None and self._connected.is_set():
            # Messages leave in order, so the last one published means all of them went out.
            with contextlib.suppress(RuntimeError, ValueError):  # paho raises if it was dropped
                if not last.is_published():
                    last.wait_for_publish(flush_timeout)
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()
        self._queue.put(None)
        if threading.current_thread() is not self._dispatcher:
            self._dispatcher.join(timeout=5)

    def drop_connection(self) -> None:
        """Cuts the TCP connection without an MQTT DISCONNECT, as a crash or lost network would.

        The broker then publishes this client's will at once; paho reconnects with backoff and
        ``on_connect`` runs again. Simulations and fault-injection tests use it.
        """
        sock = self._client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> MqttEndpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- subscriptions ------------------------------------------------------------------------

    def _subscribe_now(self, topic_filter: str, timeout: float) -> None:
        if not self._connected.is_set():
            return  # on_connect subscribes everything recorded
        ev = threading.Event()
        rc, mid = self._client.subscribe(topic_filter, qos=self.config.qos)
        with self._suback_lock:
            if mid in self._early_suback:
                self._early_suback.discard(mid)
                ev.set()
            elif rc == mqtt.MQTT_ERR_SUCCESS:
                self._suback[mid] = ev
        # Waiting for SUBACK means acks/data published right after this returns are not lost.
        if rc == mqtt.MQTT_ERR_SUCCESS and not ev.wait(timeout):
            raise TransportError(f"subscribe {topic_filter!r}: no SUBACK within {timeout} s")

    def subscribe(self, topic_filter: str, handler: Handler, *, timeout: float = 10.0) -> None:
        """Delivers whole payloads on topics matching ``topic_filter`` to ``handler``.

        ``handler(topic, sender_id, payload)`` runs on the dispatcher thread; ``sender_id`` is the
        publisher's client id from the frame header (the topic is what the broker's ACL
        authenticates, so trust decisions should use the topic). Survives reconnects.
        """
        with self._lock:
            new = topic_filter not in self._subs and topic_filter not in self._ack_filters
            self._subs.setdefault(topic_filter, []).append(handler)
            self._routes.clear()
        if new:
            self._subscribe_now(topic_filter, timeout)

    def _ensure_ack_subscription(self, topic: str) -> None:
        with self._lock:
            if topic in self._covered:
                return
            if any(_filter_matches(f, topic) for f in [*self._subs, *self._ack_filters]):
                if len(self._covered) >= _MEMO_TOPICS:
                    self._covered.clear()
                self._covered.add(topic)  # filters are only ever added, so it stays covered
                return
            self._ack_filters.add(topic)
        self._subscribe_now(topic, self.config.ack_timeout)

    # -- receiving (paho network thread) ------------------------------------------------------

    def _on_message(self, client, userdata, msg) -> None:
        data, topic = msg.payload, msg.topic
        self.stats.add(messages_received=1, bytes_received=len(data))
        try:
            f = parse_frame(data)
        except ChunkError as e:
            self.stats.add(rejected=1)
            log.warning("rejected message on %s: %s", topic, e)
            return
        if f.sender == self.config.client_id:
            return  # our own frame echoed by an overlapping subscription
        if f.kind == Kind.DATA:
            self._on_data(topic, f)
        else:
            out = self._outgoing.get(f.stream_id)
            if out is None:
                if f.kind == Kind.ABORT:  # the sender gave up: free the half stream now
                    with self._reasm_lock:
                        self._reasm.drop(f.sender, f.stream_id)
                return
            with out.cond:
                if f.kind == Kind.ACK:
                    before = (out.upto, len(out.sacked))
                    out.upto = max(out.upto, f.upto)
                    out.sacked |= f.acked()
                    # Only new information counts, so duplicate acks cannot stall a send forever.
                    out.progress = out.progress or (out.upto, len(out.sacked)) != before
                else:
                    out.abort = f.reason
                    out.progress = True
                out.cond.notify_all()

    def _on_data(self, topic: str, f: Frame) -> None:
        sender = f.sender or topic.rsplit("/", 1)[-1]
        with self._lock:
            handlers = self._routes.get(topic)
            if handlers is None:
                handlers = [
                    h for flt, hs in self._subs.items() if _filter_matches(flt, topic) for h in hs
                ]
                if len(self._routes) >= _MEMO_TOPICS:
                    self._routes.clear()
                self._routes[topic] = handlers
        if not handlers:
            # Not acked, so the sender fails loudly instead of "delivering" to nobody (e.g. data
            # on a topic this endpoint only subscribed to for acks).
            self.stats.add(rejected=1)
            if f.seq == 0:
                log.warning(
                    "no handler for %s; stream 0x%016x from %s not acked",
                    topic,
                    f.stream_id,
                    sender,
                )
            return
        with self._reasm_lock:
            try:
                whole = self._reasm.feed(sender, f)
            except ChunkError as e:
                self.stats.add(rejected=1)
                log.warning("rejected frame on %s: %s", topic, e)
                # A stream that failed for good is aborted; a busy receiver lets it retransmit.
                if f.reply_to and self._reasm.failed(sender, f.stream_id):
                    reason = str(e)
                    self._publish(
                        f.reply_to, abort_frame(f.stream_id, reason=reason, sender=self._id)
                    )
                return
            upto, sack = self._reasm.progress(sender, f.stream_id)
        if f.reply_to:
            self._publish(f.reply_to, ack_frame(f.stream_id, upto=upto, sack=sack, sender=self._id))
        if whole is not None:
            for h in handlers:
                self._queue.put((h, topic, sender, whole))

    def _expire(self) -> None:
        self._last_expire = time.monotonic()
        with self._reasm_lock:
            dead = self._reasm.expire()
        for sender, sid in dead:
            log.warning(
                "stream 0x%016x from %s expired after %.1f s idle; its memory is freed",
                sid,
                sender,
                self.config.stream_timeout,
            )

    def _dispatch(self) -> None:
        # Also the housekeeper: half-received streams are expired here even when traffic stops.
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                item = ()
            if time.monotonic() - self._last_expire > 1.0:
                self._expire()
            if item is None:
                return
            if not item:
                continue
            handler, topic, sender, payload = item
            try:
                handler(topic, sender, payload)
            except Exception:
                log.exception("handler for %s raised; message from %s dropped", topic, sender)

    # -- sending ------------------------------------------------------------------------------

    @property
    def _id(self) -> str:
        return self.config.client_id

    def _publish(self, topic: str, frame: bytes, *, retain: bool = False, qos: int | None = None):
        info = self._client.publish(
            topic, frame, qos=self.config.qos if qos is None else qos, retain=retain
        )
        self.stats.add(messages_sent=1, bytes_sent=len(frame))
        self._last_info = info
        return info

    def chunk_limit(self, topic: str, reply_to: str = "") -> int:
        """Largest chunk for ``topic``: ``max_chunk`` capped by the broker's Maximum Packet Size.

        paho ignores the broker's limit and Mosquitto disconnects clients that exceed it.
        """
        key = (topic, reply_to, self.max_packet)
        limit = self._limits.get(key)
        if limit is not None:
            return limit
        limit = self.config.max_chunk
        if self.max_packet:
            overhead = (
                _PUBLISH_OVERHEAD
                + len(topic.encode())
                + data_header_len(sender=self._id, reply_to=reply_to)
            )
            limit = min(limit, self.max_packet - overhead)
        if limit < 1:
            raise TransportError(
                f"broker maximum packet size {self.max_packet} leaves no room "
                f"for a chunk on {topic!r}"
            )
        if len(self._limits) >= _MEMO_TOPICS:
            self._limits.clear()
        self._limits[key] = limit
        return limit

    def _encode_small(self, payload: bytes, topic: str = "") -> bytes:
        crc = zlib.crc32(payload)
        return data_frame(
            payload,
            stream_id=secrets.randbits(64),
            seq=0,
            total=1,
            chunk_size=max(1, len(payload)),
            crc=crc,
            sender=self._id,
        )

    def publish_small(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        qos: int = 1,
        timeout: float = 10.0,
    ) -> None:
        """Publishes one unacknowledged single-frame message (presence, retained ctrl).

        Raises:
            TransportError: if the payload exceeds one chunk or the broker does not take it.
        """
        if len(payload) > self.chunk_limit(topic):
            raise TransportError(
                f"publish_small to {topic!r}: payload of {len(payload)} bytes "
                f"exceeds one chunk ({self.chunk_limit(topic)}); use send()"
            )
        info = self._publish(topic, self._encode_small(payload), retain=retain, qos=qos)
        if qos > 0:
            try:
                info.wait_for_publish(timeout)
                published = info.is_published()
            except (RuntimeError, ValueError) as e:
                raise TransportError(f"publish_small to {topic!r} failed: {e}") from None
            if not published:
                raise TransportError(f"publish_small to {topic!r}: no PUBACK within {timeout} s")
            refused = self._take_refused({info.mid})
            if refused:
                raise TransportError(
                    f"publish_small to {topic!r}: broker refused it ({refused}); "
                    "check this client's ACL"
                )

    def fits_one_frame(self, topic: str, payload_len: int) -> bool:
        """True if a payload of this size goes out as one frame (see :meth:`post`)."""
        return payload_len <= self.chunk_limit(topic)

    def post(self, topic: str, payload: bytes, *, qos: int | None = None) -> None:
        """Hands one single-frame message to the client and returns at once (no ack awaited).

        For request/reply traffic whose reply is the end-to-end acknowledgement (split-learning
        steps): one MQTT PUBLISH each way instead of the data frame, its transport ack and their
        PUBACKs. At QoS 1 (default) paho redelivers while connected; a message lost with the
        connection is recovered by the requester resending after its reply timeout, so the
        receiver must treat repeats as idempotent.

        Raises:
            TransportError: the payload exceeds one chunk (use :meth:`send`) or paho refuses it
                (queue full); while disconnected paho queues QoS > 0 messages itself.
        """
        limit = self.chunk_limit(topic)
        if len(payload) > limit:
            raise TransportError(
                f"post to {topic!r}: payload of {len(payload)} bytes exceeds one chunk "
                f"({limit}); use send()"
            )
        info = self._publish(topic, self._encode_small(payload), qos=qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
            raise TransportError(f"post to {topic!r} failed: {mqtt.error_string(info.rc)}")

    def send(
        self,
        topic: str,
        payload: bytes | bytearray | memoryview,
        *,
        ack_topic_for_peer: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Delivers ``payload`` whole to the subscriber(s) of ``topic``, or raises.

        Args:
            topic: destination topic (e.g. ``p/down/pi-01`` or ``p/up/pi-01``).
            payload: opaque bytes.
            ack_topic_for_peer: where the receiver publishes acks; defaults to the reverse
                ``up``/``down`` topic. This endpoint subscribes to it if no filter covers it.
            timeout: overall deadline in seconds (None: only the retry budget bounds it).

        Raises:
            TransportError: after ``retries`` rounds of ``ack_timeout`` without progress, on the
                deadline, or if the receiver aborted the stream (corrupt, too large).
        """
        cfg = self.config
        reply = ack_topic_for_peer or reverse_topic(topic)
        self._ensure_ack_subscription(reply)
        chunk = self.chunk_limit(topic, reply)
        total = n_chunks(len(payload), chunk)
        crc = zlib.crc32(payload)
        sid = secrets.randbits(64)
        out = _Outgoing()
        self._outgoing[sid] = out
        deadline = None if timeout is None else time.monotonic() + timeout
        name = f"send to {topic!r} (stream 0x{sid:016x}, {len(payload)} bytes, {total} chunks)"

        def frame(seq: int) -> bytes:
            return data_frame(
                payload,
                stream_id=sid,
                seq=seq,
                total=total,
                chunk_size=chunk,
                crc=crc,
                sender=self._id,
                reply_to=reply,
            )

        def qos(seq: int) -> int:
            return cfg.qos if seq == 0 else cfg.data_qos

        mids: set[int] = set()
        try:
            nxt, stalls = 0, 0
            while True:
                refused = self._take_refused(mids)
                if refused:
                    raise TransportError(
                        f"{name}: broker refused a frame ({refused}); "
                        "check this client's ACL for the topic"
                    )
                with out.cond:
                    if out.abort is not None:
                        raise TransportError(f"{name}: receiver aborted: {out.abort}")
                    if out.upto >= total:
                        return
                    todo = list(range(nxt, min(total, out.upto + cfg.window)))
                    nxt = max(nxt, todo[-1] + 1) if todo else nxt
                for seq in todo:
                    mids.add(self._publish(topic, frame(seq), qos=qos(seq)).mid)
                with out.cond:
                    wait = cfg.ack_timeout
                    if deadline is not None:
                        wait = min(wait, deadline - time.monotonic())
                    woke = out.cond.wait_for(lambda: out.progress or out.poke, max(wait, 0))
                    out.poke = False
                    if out.progress:
                        out.progress, stalls = False, 0
                        continue
                    if woke:
                        continue  # poked by a refusal: the top of the loop checks whose
                    upto, missing = (
                        out.upto,
                        [s for s in range(out.upto, nxt) if s not in out.sacked],
                    )
                if deadline is not None and time.monotonic() >= deadline:
                    raise TransportError(
                        f"{name}: deadline of {timeout} s passed with "
                        f"{upto}/{total} chunks acknowledged"
                    )
                stalls += 1
                if stalls > cfg.retries:
                    raise TransportError(
                        f"{name}: no acknowledgement progress after {cfg.retries} retransmission"
                        f" rounds of {cfg.ack_timeout} s ({upto}/{total} chunks acknowledged)"
                    )
                if self._connected.is_set():  # paho queues QoS>0 itself while disconnected
                    for seq in missing:
                        mids.add(self._publish(topic, frame(seq), qos=qos(seq)).mid)
                    self.stats.add(retransmits=len(missing))
        except TransportError as e:
            if self._connected.is_set():  # best effort: let the receiver free the half stream
                self._publish(topic, abort_frame(sid, reason=str(e)[:200], sender=self._id))
            raise
        finally:
            self._outgoing.pop(sid, None)


def probe_broker(config: MqttConfig) -> None:
    """Connects once and disconnects, for commands that check the broker before they start
    worker processes (one error instead of one traceback per worker).

    Raises:
        TransportError: the broker cannot be reached or refuses this client.
    """
    endpoint = MqttEndpoint(config)
    try:
        endpoint.connect()
    finally:
        endpoint.close()
