"""Broker lifecycle, config generation, password hashing and the broker CLI commands."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from cloud import broker as broker_mod
from cloud.broker import EmbeddedBroker, MosquittoBroker, free_port, start_default_broker
from cloud.broker_commands import register_broker_commands, run_broker
from cloud.broker_config import acl_text, mosquitto_hash, write_mosquitto_config
from cloud.errors import BrokerError
from converters.errors import TransportError
from converters.mqtt import MqttConfig, MqttEndpoint

needs_mosquitto = pytest.mark.skipif(
    broker_mod.mosquitto_binary() is None, reason="mosquitto not installed"
)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


@needs_mosquitto
def test_mosquitto_lifecycle_and_restart_on_same_port():
    b = MosquittoBroker()
    with b:
        assert b.url == f"mqtt://127.0.0.1:{b.port}" and _accepts(b.host, b.port)
        port = b.port
        b.stop()
        assert not _accepts(b.host, port)
        b.start(port=port)
        assert b.port == port and _accepts(b.host, port)
    assert not b.running
    b.close()


@needs_mosquitto
def test_mosquitto_bad_config_reports_its_log():
    with pytest.raises(BrokerError, match="mosquitto exited with .*no_such_option"):
        MosquittoBroker(extra_conf="no_such_option 1").start()


def test_embedded_broker_lifecycle():
    with EmbeddedBroker() as b:
        assert _accepts(b.host, b.port)
        port = b.port
    assert not _accepts("127.0.0.1", port)


def test_default_broker_choice(monkeypatch):
    with pytest.raises(ValueError, match="known: auto, embedded, mosquitto"):
        start_default_broker(prefer="rabbit")
    monkeypatch.setattr(broker_mod, "mosquitto_binary", lambda: None)
    b = start_default_broker()
    try:
        assert isinstance(b, EmbeddedBroker)
    finally:
        b.stop()


@needs_mosquitto
def test_default_broker_prefers_mosquitto():
    b = start_default_broker()
    try:
        assert isinstance(b, MosquittoBroker)
    finally:
        b.close()


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd")
def test_python_hash_matches_mosquitto_passwd(tmp_path):
    f = tmp_path / "pw"
    f.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(f), "pi-01", "s3cret!"], check=True)
    user, line = f.read_text().strip().split(":", 1)
    _, seven, iters, salt_b64, _ = line.split("$")
    import base64

    ours = mosquitto_hash("s3cret!", salt=base64.b64decode(salt_b64), iterations=int(iters))
    assert (user, seven) == ("pi-01", "7")
    assert ours == line
    assert mosquitto_hash("other", salt=base64.b64decode(salt_b64)) != line


def test_write_config_files_and_permissions(tmp_path):
    files = write_mosquitto_config(
        tmp_path / "b",
        devices=["pi-01", "pi-02"],
        port=1884,
        use_mosquitto_passwd=False,
        prefix="fleet",
    )
    creds = files["credentials"]
    assert sorted(creds) == ["cloud", "pi-01", "pi-02"]
    assert len(set(creds.values())) == 3 and all(len(p) >= 20 for p in creds.values())
    for key in ("conf", "passwd", "acl", "credentials_file"):
        assert stat.S_IMODE(os.stat(files[key]).st_mode) == 0o600
    conf = Path(files["conf"]).read_text()
    assert "listener 1884\n" in conf and "allow_anonymous false" in conf
    assert f"password_file {files['passwd']}" in conf and f"acl_file {files['acl']}" in conf
    acl = Path(files["acl"]).read_text()
    assert acl == acl_text(prefix="fleet")
    assert "pattern write fleet/up/%u" in acl and "pattern read fleet/down/%u" in acl
    assert "presence/+" not in acl  # devices never see each other's presence
    text = Path(files["passwd"]).read_text()
    assert all(f"{u}:$7$101$" in text for u in creds)
    assert all(p not in text for p in creds.values())


def test_write_config_reports_all_problems(tmp_path):
    with pytest.raises(ValueError) as e:
        write_mosquitto_config(tmp_path, devices=["ok", "bad/id", "ok", "cloud"], tls=True)
    msg = str(e.value)
    for part in (
        "'bad/id' must match",
        "must be unique",
        "must not also be a device id",
        "tls=True needs cafile",
    ):
        assert part in msg


@needs_mosquitto
@pytest.mark.parametrize("use_tool", [False, True])
def test_generated_passwords_are_accepted_by_mosquitto(use_tool):
    if use_tool and shutil.which("mosquitto_passwd") is None:
        pytest.skip("needs mosquitto_passwd")
    out = tempfile.mkdtemp(prefix="edgesplit-cfg-")  # traversable by the mosquitto user
    try:
        files = write_mosquitto_config(
            out,
            devices=["pi-01"],
            port=free_port(),
            bind="127.0.0.1",
            use_mosquitto_passwd=use_tool,
        )
        with MosquittoBroker(conf_path=files["conf"]) as b:
            cfg = dict(host=b.host, port=b.port, client_id="pi-01", username="pi-01")
            ep = MqttEndpoint(MqttConfig(**cfg, password=files["credentials"]["pi-01"]))
            ep.connect(timeout=5)
            assert ep.connected
            ep.close()
            bad = MqttEndpoint(MqttConfig(**cfg, password=files["credentials"]["cloud"]))
            with pytest.raises(TransportError, match="Not authorized"):
                bad.connect(timeout=5)
            bad.close()
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _parser():
    p = argparse.ArgumentParser(prog="edgesplit")
    register_broker_commands(p.add_subparsers(dest="command"))
    return p


def test_cli_broker_config(tmp_path, capsys):
    args = _parser().parse_args(
        [
            "broker-config",
            "--out",
            str(tmp_path / "cfg"),
            "--devices",
            "pi-01, pi-02",
            "--port",
            "1999",
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert '"users": [' in out and "pi-02" in out
    creds = (tmp_path / "cfg" / "credentials").read_text()
    assert all(line.split(":")[1] not in out for line in creds.splitlines())  # no secrets printed
    assert "listener 1999" in (tmp_path / "cfg" / "mosquitto.conf").read_text()


def test_cli_broker_runs_until_stopped(capsys):
    args = _parser().parse_args(["broker", "--port", "0", "--embedded"])
    stop = threading.Event()
    t = threading.Thread(target=run_broker, args=(args,), kwargs={"stop": stop})
    t.start()
    try:
        deadline = time.monotonic() + 10
        while (
            "listening on" not in (out := capsys.readouterr().out) and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        port = int(out.rsplit(":", 1)[1].split(";")[0])
        assert "amqtt" in out and _accepts("127.0.0.1", port)
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()
