"""The ``serve`` subcommand: run N split-inference workers sharing one broker subscription."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

READY = "ready"  # first word of the line a worker prints once it is subscribed
_MIN_UPTIME = 5.0  # seconds a supervised worker must live to be restarted when it dies


def _add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", metavar="DIR", help="split directory (manifest.json, cloud.pt)")
    p.add_argument("--broker", required=True, help="broker URL mqtt://host:port")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--max-batch", type=int, default=32, help="requests per cloud forward")
    p.add_argument("--max-delay-ms", type=float, default=2.0, help="longest wait to fill a batch")
    p.add_argument("--group", default="infer", help="shared-subscription group (default infer)")
    p.add_argument("--prefix", default="edgesplit", help="topic prefix (default edgesplit)")
    p.add_argument("--id", dest="worker_id", default="infer", help="worker id (base) for MQTT")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument(
        "--claim-timeout", type=float, default=10.0,
        help="seconds a worker keeps a granted claim for a multi-frame request (default 10)",
    )  # fmt: skip
    p.add_argument(
        "--qos", type=int, choices=[0, 1], default=1,
        help="QoS of requests, acks and replies (0: fewer packets, relies on device retries)",
    )  # fmt: skip


def register_serve_commands(subparsers) -> None:
    """Adds ``serve`` to the ``edgesplit`` parser."""
    p = subparsers.add_parser(
        "serve",
        help="answer split-inference requests from devices (cloud half, dynamic batching)",
        description=(
            "Runs the cloud half of a split model for devices that send INFER_REQUESTs. Workers "
            "subscribe to $share/GROUP/PREFIX/up/+ so the broker spreads requests over them; "
            "a request bigger than one frame is claimed there first, then streamed to "
            "PREFIX/infer/DEVICE/WORKER of the worker that took the claim. Start more workers "
            "with --workers or on other machines with the same --group."
        ),
    )
    _add_flags(p)
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """Runs one worker in this process, or supervises ``--workers`` worker processes.

    A supervised worker that dies after running for a while (killed, out of memory) is started
    again; one that dies within ``_MIN_UPTIME`` seconds of its start (bad split directory,
    unreachable broker) stops the whole command with its exit code.
    """
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.workers == 1:
        return _run_worker(args, args.worker_id)
    ids = [f"{args.worker_id}-{i}" for i in range(args.workers)]
    _check_start(args, ids[0])
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    procs = {wid: _spawn(args, wid) for wid in ids}
    code = 0
    try:
        while not stop.wait(0.2):
            for wid, (proc, started) in list(procs.items()):
                if proc.poll() is None:
                    continue
                if time.monotonic() - started < _MIN_UPTIME:
                    print(f"worker {wid} exited with {proc.returncode} at start", flush=True)
                    code = proc.returncode or 1
                    stop.set()
                    break
                print(f"worker {wid} exited with {proc.returncode}; restarting it", flush=True)
                procs[wid] = _spawn(args, wid)
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in procs.values():
            proc.wait(timeout=10)
    return code


def _check_start(args: argparse.Namespace, worker_id: str) -> None:
    """What would stop every worker at start (bad settings or split directory, unreachable
    broker), found once here: one error instead of one traceback per worker."""
    from converters.mqtt import MqttConfig, probe_broker
    from split.store import load_split

    _service_config(args, worker_id)
    load_split(args.directory)
    probe_broker(MqttConfig.from_url(args.broker, client_id=worker_id))


def _service_config(args: argparse.Namespace, worker_id: str):
    from cloud.inference_service import ServiceConfig

    return ServiceConfig(
        directory=args.directory,
        broker_url=args.broker,
        worker_id=worker_id,
        group=args.group,
        prefix=args.prefix,
        max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms,
        qos=args.qos,
        claim_timeout=args.claim_timeout,
    )


def _spawn(args: argparse.Namespace, worker_id: str) -> tuple[subprocess.Popen, float]:
    argv = [
        args.directory,
        "--broker", args.broker,
        "--max-batch", str(args.max_batch),
        "--max-delay-ms", str(args.max_delay_ms),
        "--group", args.group,
        "--prefix", args.prefix,
        "--id", worker_id,
        "--threads", str(args.threads),
        "--qos", str(args.qos),
        "--claim-timeout", str(args.claim_timeout),
    ]  # fmt: skip
    code = "import sys; from cloud.serve_commands import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *argv]), time.monotonic()


def _run_worker(args: argparse.Namespace, worker_id: str) -> int:
    import torch

    from cloud.inference_service import InferenceService

    torch.set_num_threads(args.threads)
    config = _service_config(args, worker_id)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with InferenceService(config) as service:
        print(
            f"{READY} worker {worker_id} pid {os.getpid()} model {service.model_hash[:16]} "
            f"group {args.group} topic {service.topics.shared_up(args.group)}",
            flush=True,
        )
        stop.wait()
    print(json.dumps({"worker": worker_id, **service.stats.as_dict()}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -c 'from cloud.serve_commands import main; main()'``)."""
    parser = argparse.ArgumentParser(prog="edgesplit serve")
    _add_flags(parser)
    return run_serve(parser.parse_args(argv))
