"""Shared fixtures: seeded RNGs and a real Mosquitto broker on a free loopback port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class BrokerInfo:
    host: str
    port: int
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def _mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
    )


def start_mosquitto(tmp_path, extra_conf: str = "") -> BrokerInfo:
    binary = _mosquitto_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("mosquitto is not installed; CI must apt-get install -y mosquitto")
        pytest.skip("mosquitto not installed (apt-get install -y mosquitto)")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"max_queued_messages 100000\n{extra_conf}"
    )
    proc = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return BrokerInfo("127.0.0.1", port, proc)
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {proc.stderr.read().decode()}") from None
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("mosquitto did not start within 10 s")


@pytest.fixture
def mosquitto(tmp_path):
    """A real Mosquitto on 127.0.0.1 at a free port, stopped after the test."""
    broker = start_mosquitto(tmp_path)
    yield broker
    broker.proc.terminate()
    try:
        broker.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        broker.proc.kill()
