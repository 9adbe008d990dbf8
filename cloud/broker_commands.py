"""CLI subcommands ``broker-config`` (write a Mosquitto config) and ``broker`` (run one)."""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path


def _dir_path(text: str) -> Path:
    if not text:  # Path("") is the working directory
        raise argparse.ArgumentTypeError(f"must be a non-empty path, got {text!r}")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"must be a directory, got {text!r} (a file)")
    return path


def register_broker_commands(subparsers) -> None:
    """Adds ``broker-config`` and ``broker`` to the ``edgesplit`` parser."""
    p = subparsers.add_parser(
        "broker-config",
        help="write mosquitto.conf, passwd, per-device ACL and credentials",
        description=(
            "Write a Mosquitto config with one user per device (random passwords) and an ACL that "
            "lets each device write only its own uplink and read only its own downlink and ctrl."
        ),
    )
    p.add_argument("--out", type=_dir_path, required=True, help="directory to write into")
    p.add_argument("--devices", required=True, help="comma-separated device ids, e.g. pi-01,pi-02")
    p.add_argument("--port", type=int, default=1883, help="listener port (default 1883)")
    p.add_argument("--bind", default="", help="listener address (default: all interfaces)")
    p.add_argument("--prefix", default="edgesplit", help="topic prefix (default edgesplit)")
    p.add_argument("--cloud-user", default="cloud", help="username of the cloud service")
    p.add_argument("--tls", action="store_true", help="serve TLS (needs the three files below)")
    p.add_argument("--cafile", help="CA certificate (PEM)")
    p.add_argument("--certfile", help="broker certificate (PEM)")
    p.add_argument("--keyfile", help="broker private key (PEM)")
    p.set_defaults(func=run_broker_config)

    q = subparsers.add_parser(
        "broker",
        help="run an MQTT broker in the foreground until Ctrl-C",
        description="Run Mosquitto (or the embedded amqtt broker) on 127.0.0.1 until Ctrl-C.",
    )
    q.add_argument("--port", type=int, default=1883, help="port (0 = any free port)")
    q.add_argument("--embedded", action="store_true", help="use the in-process amqtt broker")
    q.add_argument("--conf", type=Path, help="run this mosquitto.conf (from broker-config)")
    q.set_defaults(func=run_broker)


def run_broker_config(args: argparse.Namespace) -> int:
    """Writes the config files and prints where they are (never the passwords)."""
    from cloud.broker_config import write_mosquitto_config

    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    files = write_mosquitto_config(
        args.out,
        devices=devices,
        port=args.port,
        tls=args.tls,
        cafile=args.cafile,
        certfile=args.certfile,
        keyfile=args.keyfile,
        cloud_user=args.cloud_user,
        prefix=args.prefix,
        bind=args.bind,
    )
    shown = {k: v for k, v in files.items() if k != "credentials"}
    shown["users"] = sorted(files["credentials"])
    print(json.dumps(shown, indent=2))
    print(f"passwords are in {files['credentials_file']} (0600); run: mosquitto -c {files['conf']}")
    return 0


def run_broker(args: argparse.Namespace, *, stop: threading.Event | None = None) -> int:
    """Runs a broker until Ctrl-C (or until ``stop`` is set, for tests)."""
    from cloud.broker import EmbeddedBroker, MosquittoBroker, start_default_broker

    if args.conf is not None:
        if args.embedded:
            raise ValueError("--conf runs Mosquitto; it cannot be combined with --embedded")
        if not args.conf.is_file():
            raise ValueError(f"--conf must be an existing mosquitto.conf, got {str(args.conf)!r}")
        broker = MosquittoBroker(conf_path=args.conf).start()
    else:
        broker = start_default_broker(
            port=args.port, prefer="embedded" if args.embedded else "auto"
        )
    kind = "amqtt (MQTT 3.1.1)" if isinstance(broker, EmbeddedBroker) else "mosquitto"
    print(f"{kind} broker listening on {broker.url}; Ctrl-C to stop", flush=True)
    stop = stop or threading.Event()
    try:
        while not stop.wait(0.5):
            if isinstance(broker, MosquittoBroker) and not broker.running:
                raise RuntimeError(f"mosquitto exited with code {broker.proc.returncode}")
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
    return 0
