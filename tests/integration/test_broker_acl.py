"""Generated Mosquitto config: passwords and per-device ACLs hold against a real broker."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from converters.errors import TransportError
from converters.mqtt import MqttConfig, MqttEndpoint

pytestmark = pytest.mark.integration


class Inbox:
    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()

    def __call__(self, topic, sender, payload) -> None:
        with self.cond:
            self.items.append((topic, bytes(payload)))
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.items) >= n, timeout=timeout)
            return list(self.items)


def _ep(b, user, password=None, **kw) -> MqttEndpoint:
    cfg = MqttConfig(
        host=b.host,
        port=b.port,
        client_id=user,
        username=user,
        password=b.credentials[user] if password is None else password,
        **kw,
    )
    ep = MqttEndpoint(cfg)
    ep.connect(timeout=5)
    return ep


@pytest.fixture
def sides(mosquitto_acl):
    eps = {
        u: _ep(mosquitto_acl, u, ack_timeout=0.3, retries=1) for u in ("cloud", "pi-01", "pi-02")
    }
    yield mosquitto_acl, eps
    for ep in eps.values():
        ep.close()


def test_wrong_password_and_anonymous_are_refused(mosquitto_acl):
    with pytest.raises(TransportError, match="Not authorized"):
        _ep(mosquitto_acl, "pi-01", password="guess")
    anon = MqttEndpoint(MqttConfig(host=mosquitto_acl.host, port=mosquitto_acl.port, client_id="x"))
    with pytest.raises(TransportError, match="Not authorized"):
        anon.connect(timeout=3)
    anon.close()


def test_device_cannot_publish_into_another_devices_uplink(sides):
    b, eps = sides
    up = Inbox()
    eps["cloud"].subscribe("es/up/+", up)

    # Raw MQTT v5 publish: the broker answers PUBACK 0x87 (not authorized).
    codes = []
    raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pi-01-raw", protocol=mqtt.MQTTv5)
    raw.username_pw_set("pi-01", b.credentials["pi-01"])
    raw.on_publish = lambda c, u, mid, rc, props: codes.append(rc.value)
    raw.connect(b.host, b.port)
    raw.loop_start()
    raw.publish("es/up/pi-02", b"forged", qos=1).wait_for_publish(5)
    raw.loop_stop()
    raw.disconnect()
    assert codes == [0x87]

    # Through the transport: nothing is delivered, the send fails loudly.
    with pytest.raises(TransportError, match=r"broker refused a frame \(Not authorized\)"):
        eps["pi-01"].send("es/up/pi-02", b"forged too", ack_topic_for_peer="es/down/pi-01")
    # The same device's own uplink works, so the silence above is the ACL, not a dead cloud.
    eps["pi-01"].send("es/up/pi-01", b"legit")
    assert up.wait(1) == [("es/up/pi-01", b"legit")]
    time.sleep(0.2)
    assert up.items == [("es/up/pi-01", b"legit")]


def test_device_reads_nothing_from_another_devices_downlink(sides):
    b, eps = sides
    spy, own = Inbox(), Inbox()
    eps["pi-01"].subscribe("es/down/pi-02", spy)
    eps["pi-01"].subscribe("es/down/+", spy)
    eps["pi-02"].subscribe("es/down/pi-02", own)
    eps["cloud"].send("es/down/pi-02", b"model for pi-02")  # acked by pi-02 over es/up/pi-02
    assert own.wait(1) == [("es/down/pi-02", b"model for pi-02")]
    time.sleep(0.2)
    assert spy.items == []


def test_presence_is_private_but_ctrl_is_shared(sides):
    b, eps = sides
    eps["pi-02"].publish_small("es/presence/pi-02", b"online", retain=True)
    eps["cloud"].publish_small("es/ctrl", b"round 1", retain=True)
    spy, ctrl, cloud_presence = Inbox(), Inbox(), Inbox()
    eps["pi-01"].subscribe("es/presence/+", spy)
    eps["pi-01"].subscribe("es/ctrl", ctrl)
    eps["cloud"].subscribe("es/presence/+", cloud_presence)
    assert ctrl.wait(1) == [("es/ctrl", b"round 1")]
    assert cloud_presence.wait(1) == [("es/presence/pi-02", b"online")]
    time.sleep(0.2)
    assert spy.items == []
    # ...and a device may not broadcast on ctrl.
    with pytest.raises(TransportError, match="broker refused it"):
        eps["pi-01"].publish_small("es/ctrl", b"fake round")


def test_cloud_reaches_every_device_and_hears_every_device(sides):
    b, eps = sides
    up, downs = Inbox(), {d: Inbox() for d in ("pi-01", "pi-02")}
    eps["cloud"].subscribe("es/up/+", up)
    for d, inbox in downs.items():
        eps[d].subscribe(f"es/down/{d}", inbox)
    for d in downs:
        eps["cloud"].send(f"es/down/{d}", f"to {d}".encode() * 1000)
        eps[d].send(f"es/up/{d}", f"from {d}".encode())
    for d, inbox in downs.items():
        assert inbox.wait(1) == [(f"es/down/{d}", f"to {d}".encode() * 1000)]
    assert sorted(up.wait(2)) == [("es/up/pi-01", b"from pi-01"), ("es/up/pi-02", b"from pi-02")]


def _make_tls_files(out: Path) -> dict[str, str]:
    """A throw-away CA and a server certificate for 127.0.0.1 (files readable by the broker)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, srv_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("edgesplit test CA"))
        .issuer_name(name("edgesplit test CA"))
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    srv = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(srv_key.public_key())
        .serial_number(2)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    files = {
        "cafile": ca.public_bytes(pem),
        "certfile": srv.public_bytes(pem),
        "keyfile": srv_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    }
    for k, data in files.items():
        (out / k).write_bytes(data)
        (out / k).chmod(0o644)  # test-only: the dropped-privilege broker must read the key
    return {k: str(out / k) for k in files}


def test_tls_listener_with_generated_config(rng):
    from cloud.broker import MosquittoBroker, free_port, mosquitto_binary
    from cloud.broker_config import write_mosquitto_config

    if mosquitto_binary() is None:
        pytest.skip("mosquitto not installed")
    out = Path(tempfile.mkdtemp(prefix="edgesplit-tls-"))
    out.chmod(0o755)
    try:
        tls = _make_tls_files(out)
        files = write_mosquitto_config(
            out / "broker", devices=["pi-01"], port=free_port(), bind="127.0.0.1", tls=True, **tls
        )
        with MosquittoBroker(conf_path=files["conf"]) as b:
            creds = files["credentials"]
            url = f"mqtts://{{u}}:{{p}}@127.0.0.1:{b.port}"
            cloud = MqttEndpoint(
                MqttConfig.from_url(
                    url.format(u="cloud", p=creds["cloud"]), client_id="cloud", tls_ca=tls["cafile"]
                )
            )
            dev = MqttEndpoint(
                MqttConfig.from_url(
                    url.format(u="pi-01", p=creds["pi-01"]), client_id="pi-01", tls_ca=tls["cafile"]
                )
            )
            cloud.connect(timeout=5)
            dev.connect(timeout=5)
            try:
                inbox = Inbox()
                cloud.subscribe("edgesplit/up/+", inbox)
                payload = rng.bytes(600_000)
                dev.send("edgesplit/up/pi-01", payload)
                assert inbox.wait(1) == [("edgesplit/up/pi-01", payload)]
            finally:
                cloud.close()
                dev.close()
            # Control: a client that does not trust the CA is refused.
            plain = MqttEndpoint(
                MqttConfig(
                    host="127.0.0.1",
                    port=b.port,
                    client_id="pi-01",
                    username="pi-01",
                    password=creds["pi-01"],
                    tls=True,
                )
            )
            with pytest.raises(TransportError, match="SSL|CERTIFICATE|certificate"):
                plain.connect(timeout=3)
            plain.close()
    finally:
        shutil.rmtree(out, ignore_errors=True)
