"""A device's MQTT presence: connection with a last will, HELLO, cloud sessions, rejections.

Both kinds of device (the federated :class:`edge.agent.DeviceAgent` and the split-learning
:class:`edge.split_client.SplitClient`) are a ``DeviceLink`` plus their own downlink handling.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading

from converters.errors import TransportError, WireError
from converters.mqtt import MqttConfig, MqttEndpoint
from converters.topics import Topics
from converters.wire import Envelope, MsgType, decode, encode

log = logging.getLogger(__name__)


def presence_payload(device_id: str, status: str) -> bytes:
    """Retained presence document; the will carries the same with status "offline"."""
    return json.dumps({"device": device_id, "status": status}).encode()


class DeviceLink:
    """What every device does on the broker, whatever it trains.

    It subscribes to ``down/<id>`` (handled by the subclass's ``_on_down``), ``ctrl`` and its own
    retained presence; announces itself (retained "online" presence + HELLO) after every
    (re)connect and whenever a new cloud session appears on ``ctrl``; leaves a last will
    ("offline") so the cloud drops it from a round the moment it vanishes.

    Args:
        device_id: the device's id, equal to the MQTT client id.
        prefix: topic prefix shared with the cloud.
        mqtt: broker connection settings.
    """

    # Re-announce when our own late last will lands after a reconnect (split devices, whose
    # rounds are long sessions, need it; the embedded amqtt broker mis-delivers retained
    # presence to such subscriptions, so federated devices leave it off).
    watch_own_presence = False

    def __init__(self, *, device_id: str, prefix: str, mqtt: MqttConfig) -> None:
        if mqtt.client_id != device_id:
            raise ValueError(
                f"mqtt.client_id must equal device_id {device_id!r}, got {mqtt.client_id!r}"
            )
        self.id = device_id
        self.topics = Topics(prefix=prefix)
        self._lock = threading.Lock()
        self._seq = 0
        self._session: str | None = None
        self._stopping = False
        self.finished = threading.Event()
        self.rejected = 0
        self.reasons: list[str] = []
        self.endpoint = MqttEndpoint(
            mqtt,
            will=(self.topics.presence(self.id), presence_payload(self.id, "offline")),
            on_connect=self._on_connect,
        )

    # -- hooks -----------------------------------------------------------------------------

    def _hello_meta(self) -> dict:
        """What HELLO tells the cloud about this device (e.g. its number of samples)."""
        return {}

    def _on_down(self, topic: str, sender: str, payload: bytes) -> None:
        raise NotImplementedError

    def _on_stop(self) -> None:
        """Releases what the subclass holds (executors, crypto sessions)."""

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, *, timeout: float = 10.0) -> None:
        self.endpoint.connect(timeout=timeout)
        self.endpoint.subscribe(self.topics.down(self.id), self._on_down)
        self.endpoint.subscribe(self.topics.ctrl(), self._on_ctrl)
        if self.watch_own_presence:
            self.endpoint.subscribe(self.topics.presence(self.id), self._on_own_presence)
        self._announce()

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(TransportError):
            self.endpoint.publish_small(
                self.topics.presence(self.id), presence_payload(self.id, "offline"), retain=True
            )
        self.endpoint.close()
        self._on_stop()

    def _on_connect(self) -> None:
        # Runs after every (re)connect: the broker may have restarted or we may have crashed.
        try:
            self._announce()
        except TransportError as exc:
            log.warning("%s: could not announce after connect: %s", self.id, exc)

    def _on_own_presence(self, topic: str, sender: str, payload: bytes) -> None:
        # After a crash our last will ("offline") can reach the broker after the reconnect's
        # "online"; seeing it while connected, we say "online" again or the cloud forgets us.
        if not self._stopping and b'"offline"' in bytes(payload) and self.endpoint.connected:
            with contextlib.suppress(TransportError):
                self._announce()

    def _announce(self) -> None:
        if not self.endpoint.connected:
            return
        self.endpoint.publish_small(
            self.topics.presence(self.id), presence_payload(self.id, "online"), retain=True
        )
        hello = Envelope(
            type=MsgType.HELLO,
            run_id="",
            round=0,
            sender=self.id,
            seq=self._next_seq(),
            meta=self._hello_meta(),
        )
        self.endpoint.publish_small(self.topics.up(self.id), encode(hello))

    def _next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    # -- incoming (MQTT dispatcher thread) -------------------------------------------------

    def _reject(self, reason: str) -> None:
        self.rejected += 1
        self.reasons.append(reason)
        log.warning("%s: rejected: %s", self.id, reason)

    def _on_ctrl(self, topic: str, sender: str, payload: bytes) -> None:
        try:
            env = decode(payload, max_bytes=64 * 1024)
        except WireError as exc:
            self._reject(f"{topic}: {exc}")
            return
        session = env.meta.get("session")
        if env.type == MsgType.BYE:
            self.finished.set()
        elif env.type == MsgType.ROUND_START and session and session != self._session:
            # A new cloud session (first start or restart): (re)register with it.
            self._session = session
            self._announce()
