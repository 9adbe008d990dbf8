"""MqttEndpoint over a real Mosquitto (and the embedded amqtt broker): delivery, loss, limits."""

from __future__ import annotations

import os
import random
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from converters.errors import ConfigError, TransportError
from converters.mqtt import MqttConfig, MqttEndpoint, reverse_topic


class Inbox:
    """Collects delivered payloads; ``wait(n)`` blocks until n arrived."""

    def __init__(self, delay: float = 0.0) -> None:
        self.items: list[tuple[str, str, bytes]] = []
        self.cond = threading.Condition()
        self.delay = delay

    def __call__(self, topic: str, sender: str, payload) -> None:
        if self.delay:
            time.sleep(self.delay)
        with self.cond:
            self.items.append((topic, sender, bytes(payload)))
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 10.0) -> list[tuple[str, str, bytes]]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.items) >= n, timeout=timeout)
            return list(self.items)


def _ep(broker, client_id, **kw) -> MqttEndpoint:
    ep = MqttEndpoint(MqttConfig.from_url(broker.url, client_id=client_id, **kw))
    ep.connect(timeout=5)
    return ep


@pytest.fixture
def pair(mosquitto):
    cloud = _ep(mosquitto, "cloud", max_chunk=64 * 1024)
    dev = _ep(mosquitto, "pi-01", max_chunk=64 * 1024)
    yield cloud, dev
    cloud.close()
    dev.close()


def test_config_validation_and_url():
    with pytest.raises(ConfigError, match="window must be >= 1, got 0"):
        MqttConfig(client_id="x", window=0)
    with pytest.raises(ConfigError, match="protocol must be one of"):
        MqttConfig(client_id="x", protocol="v4")
    c = MqttConfig.from_url("mqtts://pi-01:s%40cret@broker.lan:8884", client_id="pi-01")
    assert (c.host, c.port, c.username, c.password, c.use_tls) == (
        "broker.lan",
        8884,
        "pi-01",
        "s@cret",
        True,
    )
    assert MqttConfig.from_url("mqtt://h", client_id="x").port == 1883
    assert reverse_topic("es/down/pi-01") == "es/up/pi-01"
    assert reverse_topic("es/up/pi-01") == "es/down/pi-01"
    with pytest.raises(ConfigError, match="ack_topic_for_peer is required"):
        reverse_topic("es/ctrl")


def test_3mib_both_directions_through_64kib_chunks(pair, rng):
    cloud, dev = pair
    up, down = Inbox(), Inbox()
    cloud.subscribe("es/up/+", up)
    dev.subscribe("es/down/pi-01", down)
    a = rng.bytes(3 << 20)
    b = rng.bytes((3 << 20) + 17)
    dev.send("es/up/pi-01", a)
    cloud.send("es/down/pi-01", b)
    assert up.wait(1) == [("es/up/pi-01", "pi-01", a)]
    assert down.wait(1) == [("es/down/pi-01", "cloud", b)]
    assert dev.stats.messages_sent >= 48  # really chunked
    assert dev.stats.retransmits == 0


class SlowNetworkEndpoint(MqttEndpoint):
    """Reads its socket slowly, like an overloaded Pi: without a window the broker would drop."""

    def _on_message(self, client, userdata, msg) -> None:
        time.sleep(0.0005)
        super()._on_message(client, userdata, msg)


def test_slow_receiver_under_burst_loses_nothing(mosquitto):
    # Mosquitto's per-client queue is 1000 here; 2 senders x 400 messages would overflow it
    # without the application window.
    cloud = SlowNetworkEndpoint(MqttConfig.from_url(mosquitto.url, client_id="cloud"))
    cloud.connect()
    devs = [_ep(mosquitto, f"pi-0{i}", max_chunk=512, window=8) for i in (1, 2)]
    inbox = Inbox(delay=0.001)  # slow handler too
    cloud.subscribe("es/up/+", inbox)
    n = 400

    def burst(dev):
        for i in range(n):
            dev.send(f"es/up/{dev.config.client_id}", i.to_bytes(4, "big") * 300)

    threads = [threading.Thread(target=burst, args=(d,)) for d in devs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    got = inbox.wait(2 * n, timeout=30)
    try:
        assert len(got) == 2 * n
        for dev in ("pi-01", "pi-02"):
            seqs = [int.from_bytes(p[:4], "big") for t, s, p in got if s == dev]
            assert sorted(seqs) == list(range(n))  # each exactly once
            assert all(p == p[:4] * 300 for _, _, p in got)
    finally:
        cloud.close()
        for d in devs:
            d.close()


def test_receiver_that_never_acks_raises_in_bounded_time(mosquitto):
    dev = _ep(mosquitto, "pi-01", ack_timeout=0.2, retries=2, max_chunk=1000, window=4)
    try:
        t0 = time.monotonic()
        with pytest.raises(TransportError, match=r"no acknowledgement progress after 2 .*0/10"):
            dev.send("es/up/pi-01", os.urandom(10_000))
        elapsed = time.monotonic() - t0
        assert 0.5 < elapsed < 3.0
        assert dev.stats.retransmits == 2 * 4
        with pytest.raises(TransportError, match="deadline of 0.3 s"):
            dev.send("es/up/pi-01", b"x", timeout=0.3)
    finally:
        dev.close()


def test_receiver_abort_reaches_sender(mosquitto):
    cloud = _ep(mosquitto, "cloud", max_payload=1000)
    dev = _ep(mosquitto, "pi-01", ack_timeout=5.0)
    cloud.subscribe("es/up/+", Inbox())
    try:
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="receiver aborted.*max_bytes=1000, got 5000"):
            dev.send("es/up/pi-01", bytes(5000))
        assert time.monotonic() - t0 < 2.0  # aborted, not timed out
    finally:
        cloud.close()
        dev.close()


def test_garbage_is_counted_and_dispatcher_survives(pair):
    cloud, dev = pair
    inbox = Inbox()
    cloud.subscribe("es/up/+", inbox)
    raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw")
    raw.connect(cloud.config.host, cloud.config.port)
    raw.loop_start()
    raw.publish("es/up/pi-09", b"not a frame", qos=1).wait_for_publish(5)
    raw.loop_stop()
    raw.disconnect()
    dev.send("es/up/pi-01", b"after garbage")
    assert inbox.wait(1)[0][2] == b"after garbage"
    assert cloud.stats.rejected == 1


def test_publish_small_retained_reaches_late_subscriber(pair):
    cloud, dev = pair
    cloud.publish_small("es/ctrl", b"round 3", retain=True)
    inbox = Inbox()
    dev.subscribe("es/ctrl", inbox)
    assert inbox.wait(1)[0][1:] == ("cloud", b"round 3")
    with pytest.raises(TransportError, match="exceeds one chunk"):
        cloud.publish_small("es/ctrl", bytes(65 * 1024))


def test_broker_max_packet_size_caps_chunks(rng):
    from cloud.broker import MosquittoBroker, mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("mosquitto not installed")
    payload = rng.bytes(1 << 20)
    with MosquittoBroker(extra_conf="max_packet_size 65536") as broker:
        cloud, dev = _ep(broker, "cloud"), _ep(broker, "pi-01", ack_timeout=0.5, retries=2)
        try:
            assert dev.max_packet == 65536
            assert dev.chunk_limit("es/up/pi-01", "es/down/pi-01") < 65536
            inbox = Inbox()
            cloud.subscribe("es/up/+", inbox)
            dev.send("es/up/pi-01", payload)
            assert inbox.wait(1)[0][2] == payload
            # Control: ignoring the advertised limit (what plain paho does) gets us disconnected.
            dev.max_packet = None
            with pytest.raises(TransportError):
                dev.send("es/up/pi-01", payload)
        finally:
            cloud.close()
            dev.close()


def test_reconnects_and_resubscribes_after_broker_restart(mosquitto, rng):
    cloud = _ep(mosquitto, "cloud")
    dev = _ep(mosquitto, "pi-01", ack_timeout=1.0, retries=10)
    inbox = Inbox()
    cloud.subscribe("es/up/+", inbox)
    try:
        dev.send("es/up/pi-01", b"before")
        port = mosquitto.port
        mosquitto.stop()
        deadline = time.monotonic() + 5
        while (cloud.connected or dev.connected) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not cloud.connected and not dev.connected
        mosquitto.start(port=port)
        payload = rng.bytes(300_000)
        dev.send("es/up/pi-01", payload, timeout=20)
        got = inbox.wait(2)
        assert [p for _, _, p in got] == [b"before", payload]
    finally:
        cloud.close()
        dev.close()


def test_embedded_amqtt_falls_back_to_mqtt311():
    from cloud.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        cloud, dev = _ep(broker, "cloud"), _ep(broker, "pi-01")
        try:
            assert (cloud.protocol, dev.protocol) == ("v311", "v311")
            inbox = Inbox()
            cloud.subscribe("es/up/+", inbox)
            payload = os.urandom(700_000)
            dev.send("es/up/pi-01", payload)
            assert inbox.wait(1) == [("es/up/pi-01", "pi-01", payload)]
        finally:
            cloud.close()
            dev.close()


def test_concurrent_sends_to_different_devices(mosquitto, rng):
    cloud = _ep(mosquitto, "cloud", max_chunk=8192)
    devs = {d: _ep(mosquitto, d) for d in ("pi-01", "pi-02", "pi-03")}
    inboxes = {d: Inbox() for d in devs}
    for d, ep in devs.items():
        ep.subscribe(f"es/down/{d}", inboxes[d])
    payloads = {d: rng.bytes(200_000 + i) for i, d in enumerate(devs)}
    errors = []

    def push(d):
        try:
            for _ in range(3):
                cloud.send(f"es/down/{d}", payloads[d])
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=push, args=(d,)) for d in devs]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        for d in devs:
            assert [p for _, _, p in inboxes[d].wait(3)] == [payloads[d]] * 3
    finally:
        cloud.close()
        for ep in devs.values():
            ep.close()


def test_data_without_a_handler_is_not_acked(pair):
    cloud, dev = pair
    # pi-01 holds es/down/pi-01 only for acks (no handler): a transfer there must fail loudly.
    cloud.subscribe("es/up/+", Inbox())
    dev.send("es/up/pi-01", b"subscribes pi-01 to its ack topic")
    quick = _ep_like(cloud, ack_timeout=0.2, retries=1)
    try:
        with pytest.raises(TransportError, match="no acknowledgement progress"):
            quick.send("es/down/pi-01", b"model")
        assert dev.stats.rejected >= 1
    finally:
        quick.close()


def _ep_like(ep: MqttEndpoint, **kw) -> MqttEndpoint:
    from dataclasses import replace

    other = MqttEndpoint(replace(ep.config, client_id=ep.config.client_id + "-2", **kw))
    other.connect(timeout=5)
    return other


def test_will_fires_on_every_abrupt_drop_and_on_connect_reannounces(mosquitto):
    cloud = _ep(mosquitto, "cloud")
    presence = Inbox()
    cloud.subscribe("es/presence/+", presence)
    cfg = MqttConfig.from_url(mosquitto.url, client_id="pi-01", reconnect_min=0.1)
    dev = MqttEndpoint(
        cfg,
        will=("es/presence/pi-01", b"offline"),
        on_connect=lambda: dev.publish_small("es/presence/pi-01", b"online", retain=True),
    )
    dev.connect()
    try:
        for k in (1, 2):
            assert presence.wait(2 * k - 1)[-1][2] == b"online"
            # An abrupt drop (no DISCONNECT packet): the broker publishes the will.
            dev.drop_connection()
            assert presence.wait(2 * k)[2 * k - 1][2] == b"offline"
        assert presence.wait(5)[-1][2] == b"online"  # reconnected and re-announced
    finally:
        dev.close()
        cloud.close()


class LossyEndpoint(MqttEndpoint):
    """Drops a seeded 15% of incoming frames, as a flaky link or an overflowing broker would."""

    def __init__(self, *a, seed: int, **kw) -> None:
        super().__init__(*a, **kw)
        self._rnd = random.Random(seed)
        self.dropped = 0

    def _on_message(self, client, userdata, msg) -> None:
        if self._rnd.random() < 0.15:
            self.dropped += 1
            return
        super()._on_message(client, userdata, msg)


@pytest.mark.parametrize("seed", [1, 2])
def test_lost_frames_and_acks_are_retransmitted(mosquitto, rng, seed):
    url = mosquitto.url
    cfg = dict(max_chunk=4096, window=8, ack_timeout=0.15, retries=20)
    cloud = LossyEndpoint(MqttConfig.from_url(url, client_id="cloud", **cfg), seed=seed)
    dev = LossyEndpoint(MqttConfig.from_url(url, client_id="pi-01", **cfg), seed=seed + 100)
    cloud.connect()
    dev.connect()
    up, down = Inbox(), Inbox()
    cloud.subscribe("es/up/+", up)
    dev.subscribe("es/down/pi-01", down)
    a, b = rng.bytes(150_000), rng.bytes(120_000)
    try:
        dev.send("es/up/pi-01", a, timeout=30)
        cloud.send("es/down/pi-01", b, timeout=30)
        assert [p for _, _, p in up.wait(1)] == [a]
        assert [p for _, _, p in down.wait(1)] == [b]
        assert cloud.dropped > 0 and dev.dropped > 0
        assert dev.stats.retransmits > 0 and cloud.stats.retransmits > 0
        time.sleep(0.3)  # retransmitted duplicates must not be delivered again
        assert len(up.items) == 1 and len(down.items) == 1
    finally:
        cloud.close()
        dev.close()


class DeafEndpoint(MqttEndpoint):
    """Never hears anything: its sends get no acks."""

    def _on_message(self, client, userdata, msg) -> None:
        pass


def _wait_until(pred, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.05)
    return pred()


def test_half_streams_are_freed_on_sender_abort_and_on_expiry(mosquitto):
    cloud = _ep(mosquitto, "cloud", stream_timeout=1.5)
    cloud.subscribe("es/up/+", Inbox())
    cfg = MqttConfig.from_url(
        mosquitto.url, client_id="pi-01", max_chunk=1000, window=2, ack_timeout=0.2, retries=1
    )
    deaf = DeafEndpoint(cfg)
    deaf.connect()
    try:
        # The sender gives up after its retries and tells the receiver to drop the stream.
        with pytest.raises(TransportError):
            deaf.send("es/up/pi-01", bytes(100_000))
        # Well before the 1.5 s expiry could free it:
        assert _wait_until(lambda: cloud.pending_bytes == 0, timeout=0.8)
        # Frames of a stream whose sender vanished without a word: freed after stream_timeout.
        from converters.chunking import split_frames

        raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw")
        raw.connect(cloud.config.host, cloud.config.port)
        raw.loop_start()
        frames = split_frames(bytes(50_000), stream_id=99, max_chunk=1000, sender="pi-02")
        raw.publish("es/up/pi-02", frames[0], qos=1).wait_for_publish(5)
        assert _wait_until(lambda: cloud.pending_bytes == 50_000)
        assert not _wait_until(lambda: cloud.pending_bytes == 0, timeout=1.0)
        assert _wait_until(lambda: cloud.pending_bytes == 0, timeout=4)
        raw.loop_stop()
        raw.disconnect()
    finally:
        deaf.close()
        cloud.close()
