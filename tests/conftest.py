"""Shared fixtures: seeded RNGs and a real Mosquitto broker on a free loopback port."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from dataclasses import dataclass

import numpy as np
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _require_mosquitto() -> None:
    # Imported here so collecting unrelated tests never imports the cloud package.
    from cloud.broker import mosquitto_binary

    if mosquitto_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("mosquitto is not installed; CI must apt-get install -y mosquitto")
        pytest.skip("mosquitto not installed (apt-get install -y mosquitto)")


def start_mosquitto(tmp_path=None, extra_conf: str = ""):
    """Starts an anonymous loopback Mosquitto (``.host .port .url .proc``); caller stops it."""
    from cloud.broker import MosquittoBroker

    _require_mosquitto()
    return MosquittoBroker(extra_conf=extra_conf).start()


@pytest.fixture
def mosquitto():
    """A real Mosquitto on 127.0.0.1 at a free port, stopped after the test."""
    broker = start_mosquitto()
    yield broker
    broker.close()


@dataclass
class AclBroker:
    """A Mosquitto running a generated password + per-device ACL config."""

    broker: object  # cloud.broker.MosquittoBroker
    credentials: dict[str, str]
    prefix: str
    files: dict

    @property
    def host(self) -> str:
        return self.broker.host

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def url(self) -> str:
        return self.broker.url


@pytest.fixture
def mosquitto_acl():
    """Mosquitto with users cloud, pi-01, pi-02 and the generated ACL (topic prefix ``es``)."""
    from cloud.broker import MosquittoBroker
    from cloud.broker_config import write_mosquitto_config

    _require_mosquitto()
    # Not tmp_path: as root, Mosquitto reads passwd/acl as user mosquitto, which cannot
    # traverse pytest's 0700 temp root.
    out = tempfile.mkdtemp(prefix="edgesplit-acl-")
    files = write_mosquitto_config(
        out,
        devices=["pi-01", "pi-02"],
        port=free_port(),
        bind="127.0.0.1",
        prefix="es",
    )
    broker = MosquittoBroker(conf_path=files["conf"]).start()
    yield AclBroker(broker, files["credentials"], "es", files)
    broker.close()
    shutil.rmtree(out, ignore_errors=True)
