"""The ``split-worker`` subcommand: a step worker for SplitFed V1 runs with ``split_workers``."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import threading

READY = "ready"  # first word of the line the worker prints once it is subscribed


def register_split_worker_commands(subparsers) -> None:
    """Adds ``split-worker`` to the ``edgesplit`` parser."""
    p = subparsers.add_parser(
        "split-worker",
        help="serve split-learning steps for a SplitFed V1 coordinator (--split-workers)",
        description=(
            "Serves the cloud half's steps of the devices whose sessions it picks up from "
            "$share/GROUP/PREFIX/steps/+; the device then stays with it for the round. Start "
            "any number, on any machine reaching the broker, with the same --group; the "
            "coordinator is `edgesplit cloud --mode splitfed-v1 --split-workers N`."
        ),
    )
    p.add_argument("--broker", required=True, help="broker URL mqtt://host:port")
    p.add_argument("--id", dest="worker_id", required=True, help="worker id (MQTT client id)")
    p.add_argument("--group", default="steps", help="shared-subscription group (default steps)")
    p.add_argument("--prefix", default="edgesplit", help="topic prefix (default edgesplit)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--max-seconds", type=float, default=0.0, help="stop after this (0: never)")
    p.set_defaults(func=run_split_worker)


def run_split_worker(args: argparse.Namespace) -> int:
    import torch

    from cloud.split_worker import SplitStepWorker
    from converters.mqtt import MqttConfig

    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if not (math.isfinite(args.max_seconds) and args.max_seconds >= 0):
        raise ValueError(f"--max-seconds must be a finite number >= 0, got {args.max_seconds}")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    worker = SplitStepWorker(
        worker_id=args.worker_id,
        group=args.group,
        mqtt=MqttConfig.from_url(args.broker, client_id=args.worker_id),
        prefix=args.prefix,
    ).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"{READY} {args.worker_id}", flush=True)
    try:
        stop.wait(args.max_seconds or None)
    except KeyboardInterrupt:
        pass
    finally:
        worker.stop()
    print(f"{args.worker_id}: {worker.steps_served} steps, {len(worker.sessions)} sessions, "
          f"{worker.rejected} rejected", flush=True)  # fmt: skip
    return 0
