"""A simulation worker process: hosts many devices, each a real MQTT client with its own data.

``edgesplit simulate`` starts about one of these per core. The devices in one worker share a
single training thread (they take turns on the core), but each keeps its own connection,
client id, presence and last will, and talks to the cloud only through the broker.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from converters.federation_data import device_ids, federated_split
from converters.mqtt import MqttConfig
from edge.agent import AgentOptions, DeviceAgent

log = logging.getLogger("edgesplit.simworker")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edge.simworker")
    p.add_argument("--broker", required=True, help="mqtt://host:port")
    p.add_argument("--prefix", default="edgesplit")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--clients", type=int, required=True, help="devices in the whole federation")
    p.add_argument("--partition", default="iid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--first", type=int, required=True, help="index of this worker's first device")
    p.add_argument("--count", type=int, required=True, help="devices hosted by this worker")
    p.add_argument("--dropout", type=float, default=0.0, help="chance a device crashes per round")
    p.add_argument("--max-seconds", type=float, default=3600.0)
    p.add_argument("--mode", default="fedavg", help="fedavg or a split-learning mode")
    p.add_argument("--state-dir", help="where devices keep restart-surviving state (DP ledgers)")
    return p


def run(args: argparse.Namespace) -> int:
    # One training thread per worker: torch must not spawn a thread per core in each process.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
        import split.train  # noqa: F401  (warm up now, not inside the first round's deadline)
        import split.zoo  # noqa: F401
    except ImportError:
        pass
    shards, _ = federated_split(
        args.dataset,
        clients=args.clients,
        scheme=args.partition,
        seed=args.seed,
        test_fraction=args.test_fraction,
    )
    ids = device_ids(args.clients)[args.first : args.first + args.count]
    split = args.mode != "fedavg"
    # A split device blocks on the cloud every step, so each needs its own thread.
    executor = ThreadPoolExecutor(
        max_workers=args.count if split else 1, thread_name_prefix="train"
    )
    agents = []
    for i, dev in zip(range(args.first, args.first + args.count), ids, strict=True):
        cfg = MqttConfig.from_url(args.broker, client_id=dev)
        if split:
            agent = _split_client(args, dev, cfg, shards[i], executor)
            agent.start()
            agents.append(agent)
            continue
        agent = DeviceAgent(
            options=AgentOptions(
                device_id=dev,
                prefix=args.prefix,
                vanish_prob=args.dropout,
                seed=args.seed,
                state_dir=args.state_dir,
            ),
            mqtt=cfg,
            x=shards[i].x,
            y=shards[i].y,
            executor=executor,
        )
        agent.start()
        agents.append(agent)
    log.info("worker hosts %d devices (%s..%s)", len(agents), ids[0], ids[-1])
    deadline = time.monotonic() + args.max_seconds
    try:
        while time.monotonic() < deadline and not all(a.finished.is_set() for a in agents):
            time.sleep(0.2)
    finally:
        for a in agents:
            a.stop()
        executor.shutdown(wait=False, cancel_futures=True)
    return 0


def _split_client(args, dev, cfg, shard, executor):
    from edge.split_client import SplitClient, SplitClientOptions

    # The state folder keeps split-DP state (the ledger, the labels randomized once per run)
    # across a ``simulate --resume``: drawn again, label_epsilon would be spent uncounted.
    options = SplitClientOptions(
        device_id=dev,
        prefix=args.prefix,
        vanish_prob=args.dropout,
        seed=args.seed,
        state_dir=args.state_dir,
    )
    return SplitClient(options=options, mqtt=cfg, x=shard.x, y=shard.y, executor=executor)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
