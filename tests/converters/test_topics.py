"""Tests for the topic layout: names, parsing, wildcard coverage and the broker-enforced ACL."""

from __future__ import annotations

import os
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converters.errors import WireError
from converters.topics import TOPIC_RULES, Topics, validate_device_id

IDS = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
LEVEL = st.from_regex(r"[A-Za-z0-9_.-]{1,10}", fullmatch=True)
PREFIXES = st.lists(LEVEL, min_size=1, max_size=3).map("/".join)


def mqtt_match(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 section 4.7 matching, written from the spec as an oracle."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    f, t = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


@settings(max_examples=200, deadline=None)
@given(PREFIXES, IDS, IDS)
def test_topics_parse_back_and_wildcards_cover_exactly_their_kind(prefix, dev, other):
    t = Topics(prefix=prefix)
    for kind in ("up", "down", "presence"):
        topic = getattr(t, kind)(dev)
        assert t.parse_device(topic) == (kind, dev)
        assert mqtt_match(t.up_wildcard(), topic) == (kind == "up")
        assert mqtt_match(t.shared_up("workers"), topic) == (kind == "up")
        assert mqtt_match(t.presence_wildcard(), topic) == (kind == "presence")
    assert not mqtt_match(t.up_wildcard(), t.ctrl())
    acl = t.device_acl(dev)
    if other != dev:
        # No topic of another device is readable or writable under this device's ACL.
        theirs = [t.up(other), t.down(other), t.presence(other), t.steps(other),
                  t.steps(other, "w1"), t.infer_stream(other, "w1")]  # fmt: skip
        assert not any(mqtt_match(f, x) for f in acl["read"] + acl["write"] for x in theirs)


def test_layout_strings():
    t = Topics()
    assert t.ctrl() == "edgesplit/ctrl"
    assert t.down("pi-1") == "edgesplit/down/pi-1"
    assert t.up("pi-1") == "edgesplit/up/pi-1"
    assert t.presence("pi-1") == "edgesplit/presence/pi-1"
    assert t.up_wildcard() == "edgesplit/up/+"
    assert t.presence_wildcard() == "edgesplit/presence/+"
    assert t.shared_up("g") == "$share/g/edgesplit/up/+"
    assert {k for k, r in TOPIC_RULES.items() if r.retain} == {"ctrl", "presence"}


@pytest.mark.parametrize(
    "prefix", ["", "a/+", "#", "a/#/b", "$SYS", "/a", "a/", "a//b", "a\x00b", 5]
)
def test_bad_prefix_rejected(prefix):
    with pytest.raises(WireError, match="prefix"):
        Topics(prefix=prefix)


@pytest.mark.parametrize(
    "device_id", ["", "a/b", "+", "#", "$x", "x" * 65, "é", "a b", "a\x00", None, "pi+1"]
)
def test_bad_device_id_rejected(device_id):
    with pytest.raises(WireError, match=r"device_id must be 1-64 characters"):
        validate_device_id(device_id)
    with pytest.raises(WireError):
        Topics().up(device_id)


@pytest.mark.parametrize(
    "topic",
    [
        "other/up/pi",
        "edgesplit/ctrl",
        "edgesplit/up/pi/extra",
        "edgesplit/side/pi",
        "edgesplit/up/",
        "edgesplit/up/p+",
        "edgesplitx/up/pi",
    ],
)
def test_parse_device_rejects_non_device_topics(topic):
    with pytest.raises(WireError):
        Topics().parse_device(topic)


@pytest.mark.parametrize("group", ["", "a/b", "+", "g#"])
def test_bad_share_group_rejected(group):
    with pytest.raises(WireError, match="group"):
        Topics().shared_up(group)


def _client(mqtt, broker, user: str, received: list, lock: threading.Lock):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{user}")
    # Anonymous broker: the username is unauthenticated but still what %u in the ACL matches.
    c.username_pw_set(user)

    def on_message(_c, _u, msg):
        with lock:
            received.append((msg.topic, msg.payload))

    c.on_message = on_message
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


@pytest.fixture
def acl_broker(tmp_path):
    """Mosquitto running the cloud's production ACL text under prefix ``es``."""
    broker_mod = pytest.importorskip("cloud.broker")
    acl_text = pytest.importorskip("cloud.broker_config").acl_text
    if broker_mod.mosquitto_binary() is None:
        pytest.skip("mosquitto not installed (apt-get install -y mosquitto)")
    acl = tmp_path / "acl"
    acl.write_text(acl_text(cloud_user="cloud", prefix="es"))
    # Started as root, Mosquitto drops to user "mosquitto", who cannot read pytest's tmp dirs.
    extra = f"acl_file {acl}\n" + ("user root\n" if os.geteuid() == 0 else "")
    broker = broker_mod.MosquittoBroker(extra_conf=extra).start()
    yield broker
    broker.close()


@pytest.mark.integration
def test_broker_enforces_the_device_acl(acl_broker):
    """With the cloud's ACL, a device gets exactly what ``Topics.device_acl`` promises."""
    mqtt = pytest.importorskip("paho.mqtt.client")
    t = Topics(prefix="es")
    lock = threading.Lock()
    dev_seen: list[tuple[str, bytes]] = []
    cloud_seen: list[tuple[str, bytes]] = []
    dev = _client(mqtt, acl_broker, "pi-01", dev_seen, lock)
    cloud = _client(mqtt, acl_broker, "cloud", cloud_seen, lock)
    try:
        # The device tries to listen to everything under the prefix; the broker filters.
        dev.subscribe(f"{t.prefix}/#", qos=1)
        cloud.subscribe(t.up_wildcard(), qos=1)
        cloud.subscribe(t.presence_wildcard(), qos=1)
        cloud.subscribe(f"{t.prefix}/steps/#", qos=1)
        cloud.subscribe(f"{t.prefix}/infer/#", qos=1)
        time.sleep(0.3)
        for topic in [t.ctrl(), t.down("pi-01"), t.down("pi-02"), t.up("pi-02")]:
            cloud.publish(topic, b"x", qos=1).wait_for_publish(5)
        mine = [t.up("pi-01"), t.presence("pi-01"), t.steps("pi-01"), t.steps("pi-01", "w1"),
                t.infer_stream("pi-01", "w1")]  # fmt: skip
        theirs = [t.up("pi-02"), t.presence("pi-02"), t.steps("pi-02"), t.steps("pi-02", "w1"),
                  t.infer_stream("pi-02", "w1")]  # fmt: skip
        for topic in mine + theirs:
            dev.publish(topic, b"y", qos=1).wait_for_publish(5)
        allowed = t.device_acl("pi-01")
        assert all(any(mqtt_match(f, x) for f in allowed["write"]) for x in mine)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            with lock:
                if len(cloud_seen) >= 6 and len(dev_seen) >= 2:
                    break
            time.sleep(0.05)
        time.sleep(0.3)  # give any forbidden delivery the chance to show up
        with lock:
            # Only the cloud's publications (b"x") count for the device: reading back its own
            # presence is an extra the cloud's ACL grants, and it reveals nothing.
            got_down = {topic for topic, body in dev_seen if body == b"x"}
            got_up = {topic for topic, body in cloud_seen if body == b"y"}
            assert got_down == set(allowed["read"])
            assert got_up == set(mine)
    finally:
        for c in (dev, cloud):
            c.loop_stop()
            c.disconnect()
