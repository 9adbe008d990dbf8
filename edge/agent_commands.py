"""The ``edgesplit edge`` subcommand: run one device agent against a broker."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from dataclasses import replace
from pathlib import Path

log = logging.getLogger(__name__)


def register_agent_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "edge",
        help="run a device agent (joins federated rounds over MQTT)",
        description="Connects to the broker as device ID, waits for rounds, trains on its own "
        "data and sends updates. Data stays on the device.",
    )
    p.add_argument("--broker", required=True, help="mqtt://host:port or mqtts://user:pass@host")
    p.add_argument("--id", dest="device_id", required=True, help="device id (MQTT client id)")
    p.add_argument("--data", required=True, help="local data: file.npz | idx:IMG,LBL | digits")
    p.add_argument("--prefix", default="edgesplit", help="topic prefix shared with the cloud")
    p.add_argument("--username", help="broker username (default: the device id)")
    p.add_argument("--password", help="broker password")
    p.add_argument("--cafile", help="CA bundle to verify the broker (TLS)")
    p.add_argument(
        "--split",
        action="store_true",
        help="take part in split-learning runs (cloud started with --mode vanilla|ushaped|"
        "splitfed-v1|splitfed-v2) instead of federated averaging",
    )
    p.add_argument(
        "--state-dir",
        default=str(Path.home() / ".edgesplit" / "state"),
        help="where the device keeps state that must survive restarts (its DP-SGD privacy "
        "ledger; in split runs also its randomized labels); default ~/.edgesplit/state",
    )
    p.add_argument("--once", action="store_true", help="exit when the run finishes")
    p.set_defaults(func=run_edge)


def run_edge(args: argparse.Namespace) -> int:
    from converters.datasets import load_dataset
    from converters.mqtt import MqttConfig
    from edge.agent import AgentOptions, DeviceAgent

    state = Path(args.state_dir)
    if not args.state_dir or (state.exists() and not state.is_dir()):
        # Checked now: the DP ledger is first written mid-round.
        raise ValueError(f"--state-dir must be a directory path, got {args.state_dir!r}")
    data = load_dataset(args.data)
    extra = {"tls": True, "tls_ca": args.cafile} if args.cafile else {}
    mqtt = MqttConfig.from_url(args.broker, client_id=args.device_id, **extra)
    if args.password is not None:
        mqtt = replace(mqtt, username=args.username or args.device_id, password=args.password)
    elif args.username is not None and args.username != mqtt.username:
        # MQTT allows a username alone; a password in the URL belongs to the URL's user.
        mqtt = replace(mqtt, username=args.username, password=None)
    if args.split:
        from edge.split_client import SplitClient, SplitClientOptions

        agent = SplitClient(
            options=SplitClientOptions(
                device_id=args.device_id, prefix=args.prefix, state_dir=args.state_dir
            ),
            mqtt=mqtt,
            x=data.x,
            y=data.y,
        )
    else:
        agent = DeviceAgent(
            options=AgentOptions(
                device_id=args.device_id, prefix=args.prefix, state_dir=args.state_dir
            ),
            mqtt=mqtt,
            x=data.x,
            y=data.y,
        )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    agent.start()
    print(f"device {args.device_id}: connected to {args.broker}, {len(data)} local samples")
    try:
        while not stop.is_set():
            if args.once and agent.finished.is_set():
                break
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        agent.stop()
    print(f"device {args.device_id}: trained {agent.rounds_trained} round(s)")
    return 0
