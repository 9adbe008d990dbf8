"""MQTT brokers the cloud can run: a Mosquitto subprocess or an embedded amqtt broker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Protocol

from cloud.errors import BrokerError

log = logging.getLogger(__name__)


class Broker(Protocol):
    """What every broker offers: start/stop, context manager, ``host``/``port``/``url``."""

    host: str
    port: int

    @property
    def url(self) -> str: ...

    def start(self, *, port: int = 0) -> Broker: ...

    def stop(self) -> None: ...


def free_port(host: str = "127.0.0.1") -> int:
    """Returns a TCP port that was free on ``host`` a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str | None:
    """Path of the mosquitto executable (PATH, then /usr/sbin), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def _wait_listening(host: str, port: int, timeout: float, alive) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if not alive():
                return
            time.sleep(0.02)
    raise BrokerError(f"broker on {host}:{port} did not accept connections within {timeout} s")


class _Base:
    host: str = "127.0.0.1"
    port: int = 0

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of the running broker."""
        return f"mqtt://{self.host}:{self.port}"

    def close(self) -> None:
        """Stops the broker and frees what it holds."""
        self.stop()

    def __enter__(self):
        if not self.running:
            self.start(port=self.port)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class MosquittoBroker(_Base):
    """Mosquitto as a subprocess.

    Without ``conf_path`` it writes a throw-away loopback config (anonymous, no persistence) plus
    ``extra_conf``; with ``conf_path`` (e.g. from ``write_mosquitto_config``) it runs that file
    and reads the port from its ``listener`` line.

    Args:
        conf_path: a complete mosquitto.conf to run instead of the generated one.
        extra_conf: lines appended to the generated config (e.g. ``max_packet_size 65536``).
        host: loopback address for the generated config.
        binary: mosquitto executable; found on PATH or /usr/sbin if None.
    """

    def __init__(
        self,
        *,
        conf_path: str | os.PathLike | None = None,
        extra_conf: str = "",
        host: str = "127.0.0.1",
        binary: str | None = None,
    ) -> None:
        self.binary = binary or mosquitto_binary()
        if self.binary is None:
            raise BrokerError(
                "mosquitto binary not found on PATH or in /usr/sbin; "
                "install it (apt-get install -y mosquitto) or use EmbeddedBroker"
            )
        self.conf_path = Path(conf_path) if conf_path else None
        self.extra_conf, self.host = extra_conf, host
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def running(self) -> bool:
        """True while the subprocess is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, *, port: int = 0, timeout: float = 10.0) -> MosquittoBroker:
        """Starts Mosquitto (``port=0``: a free loopback port) and waits until it listens."""
        if self.running:
            raise BrokerError(f"mosquitto already running on port {self.port}")
        if self.conf_path is not None:
            m = re.search(r"^\s*listener\s+(\d+)(?:\s+(\S+))?", self.conf_path.read_text(), re.M)
            if m is None:
                raise BrokerError(f"{self.conf_path}: no 'listener PORT' line")
            self.port = int(m.group(1))
            self.host = m.group(2) if m.group(2) not in (None, "0.0.0.0", "::") else "127.0.0.1"
            conf = self.conf_path
        else:
            self.port = port or free_port(self.host)
            self._tmp = self._tmp or tempfile.TemporaryDirectory(prefix="edgesplit-mosq-")
            conf = Path(self._tmp.name) / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n"
                # Without it Mosquitto's PUBACK + forwarded PUBLISH meet Nagle and delayed ACK:
                # 44 ms instead of <1 ms per QoS 1 round trip.
                f"max_queued_messages 1000\nset_tcp_nodelay true\n{self.extra_conf}\n"
            )
        # A file, not a pipe: an unread pipe fills up and then blocks the broker's logging.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the broker
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=self._log
        )
        _wait_listening(self.host, self.port, timeout, lambda: self.proc.poll() is None)
        if self.proc.poll() is not None:
            raise BrokerError(f"mosquitto exited with {self.proc.returncode}: {self.log_tail()}")
        return self

    def log_tail(self, n: int = 5) -> str:
        """The last ``n`` lines Mosquitto logged (for error messages)."""
        if self._log is None:
            return ""
        self._log.seek(0)
        lines = self._log.read().decode(errors="replace").strip().splitlines()
        return " | ".join(lines[-n:])

    def stop(self) -> None:
        """Terminates the subprocess (kills it after 5 s)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stops the broker and removes the generated config."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class EmbeddedBroker(_Base):
    """amqtt in-process, on its own thread and event loop; MQTT 3.1.1 only, anonymous.

    Needs no system package, but is several times slower than Mosquitto (see
    ``start_default_broker``) and has no per-device ACL here: use it for tests and demos.
    """

    def __init__(self, *, host: str = "127.0.0.1") -> None:
        self.host = host
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker = None

    @property
    def running(self) -> bool:
        """True while the broker thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, *, port: int = 0, timeout: float = 10.0) -> EmbeddedBroker:
        """Starts amqtt on ``host:port`` (``port=0``: a free port) and waits until it listens."""
        from amqtt.broker import Broker as AmqttBroker

        if self.running:
            raise BrokerError(f"embedded broker already running on port {self.port}")
        self.port = port or free_port(self.host)
        # Every v5 client's first attempt is refused by design; amqtt would log each as a warning.
        amqtt_log = logging.getLogger("amqtt")
        if amqtt_log.level == logging.NOTSET:
            amqtt_log.setLevel(logging.ERROR)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        ready, failure = threading.Event(), []
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._broker = AmqttBroker(config, loop=self._loop)
                self._loop.run_until_complete(self._broker.start())
            except Exception as e:  # reported to the starting thread below
                failure.append(e)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="amqtt-broker", daemon=True)
        self._thread.start()
        ready.wait(timeout)
        if failure:
            raise BrokerError(f"embedded amqtt broker failed to start: {failure[0]}")
        _wait_listening(self.host, self.port, timeout, self._thread.is_alive)
        return self

    def stop(self) -> None:
        """Shuts the broker down and joins its thread."""
        if self._loop is None or self._broker is None:
            return
        with contextlib.suppress(Exception):
            fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
            fut.result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._loop.close()
        self._loop = self._broker = self._thread = None


BROKERS = {"mosquitto": MosquittoBroker, "embedded": EmbeddedBroker}


def start_default_broker(
    *, port: int = 0, prefer: str = "auto"
) -> MosquittoBroker | EmbeddedBroker:
    """Starts the best available broker on 127.0.0.1.

    ``"auto"`` picks Mosquitto when its binary exists, else the embedded amqtt broker. Measured
    with benchmarks/transport.py on a shared 2-core box (loopback): Mosquitto 0.5-0.8 ms median
    control round trip and 270-410 MB/s (best run) for a 10 MiB acked transfer, against amqtt's
    1.0-1.4 ms and 45-90 MB/s, which also burns ~5x the CPU inside our own process. Mosquitto
    also speaks MQTT v5 (so its maximum packet size is known) and enforces per-device ACLs;
    amqtt needs no system package, which makes it the fallback.

    Args:
        port: TCP port; 0 picks a free one.
        prefer: "auto", "mosquitto" or "embedded".

    Raises:
        ValueError: for an unknown ``prefer``.
        BrokerError: if the chosen broker cannot start.
    """
    if prefer == "auto":
        prefer = "mosquitto" if mosquitto_binary() else "embedded"
    if prefer not in BROKERS:
        raise ValueError(f"prefer={prefer!r} unknown; known: auto, {', '.join(sorted(BROKERS))}")
    return BROKERS[prefer]().start(port=port)
