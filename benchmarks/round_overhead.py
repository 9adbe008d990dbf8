"""Federated round overhead: round wall time minus the slowest device's local compute.

Devices are real MQTT clients (one connection each) spread over worker processes, as in
``edgesplit simulate``; their "training" echoes the global model plus a small perturbation, so
what is timed is the protocol (broadcast, uplink, validation, aggregation, evaluation,
checkpoint), not SGD. Prints, per broker and device count, the median overhead per round and
the bytes on the wire relative to the raw float32 tensor bytes.

    python benchmarks/round_overhead.py            # 10 / 50 / 100 devices, Mosquitto + embedded
    python benchmarks/round_overhead.py --smoke    # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MODEL = f"{HERE / 'models' / 'mlp100k.py'}:factory"


class EchoTrainer:
    """Returns the global parameters shifted by a device-specific constant."""

    def __init__(self, seed: int) -> None:
        self.step = np.float32(1e-4 * (seed + 1))

    def fit(self, params, config):
        # A cheap deterministic change: the benchmark times the protocol, not the "training".
        t0 = time.perf_counter()
        out = {k: v + self.step if v.dtype.kind == "f" else v for k, v in params.items()}
        return out, {"loss": 0.0, "compute_seconds": time.perf_counter() - t0}


def _device_worker(url: str, ids: list[str], stop_after: float, ready) -> None:
    from converters.mqtt import MqttConfig
    from edge.agent import AgentOptions, DeviceAgent

    executor = ThreadPoolExecutor(max_workers=1)
    x = np.zeros((10, 1, 8, 8), np.float32)
    y = np.zeros(10, np.int64)
    agents = []
    for i, dev in enumerate(ids):
        agent = DeviceAgent(
            options=AgentOptions(device_id=dev),
            mqtt=MqttConfig.from_url(url, client_id=dev),
            x=x,
            y=y,
            executor=executor,
            trainer_factory=lambda ref, i=i: EchoTrainer(i),
        )
        agent.start()
        agents.append(agent)
    ready.set()
    deadline = time.monotonic() + stop_after
    while time.monotonic() < deadline and not all(a.finished.is_set() for a in agents):
        time.sleep(0.1)
    for a in agents:
        a.stop()


def run_case(broker_kind: str, devices: int, rounds: int, codec: str, workers: int) -> dict:
    from cloud.broker import start_default_broker
    from cloud.config import FederatedConfig
    from cloud.server import FederatedServer
    from converters.datasets import load_digits
    from converters.mqtt import MqttConfig

    broker = start_default_broker(prefer=broker_kind)
    ctx = mp.get_context("spawn")
    ids = [f"dev-{i:04d}" for i in range(devices)]
    procs, events = [], []
    try:
        for w in range(workers):
            ev = ctx.Event()
            p = ctx.Process(target=_device_worker, args=(broker.url, ids[w::workers], 600, ev))
            p.start()
            procs.append(p)
            events.append(ev)
        for ev in events:
            ev.wait(120)
        with tempfile.TemporaryDirectory() as out:
            config = FederatedConfig(
                run_id="overhead",
                model=MODEL,
                rounds=rounds,
                min_clients=devices,
                round_timeout=120,
                register_timeout=60,
                codec=codec,
                out_dir=out,
            )
            test = load_digits()
            server = FederatedServer(
                config,
                mqtt=MqttConfig.from_url(broker.url, client_id="cloud"),
                test_set=test.subset(np.arange(360)),
                expected_devices=devices,
            )
            raw = sum(v.nbytes for v in server.params.values())
            n_params = sum(v.size for v in server.params.values())
            server.run()
            rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        broker.stop()
    if not all(r.get("status") == "ok" for r in rows):
        return {
            "broker": broker_kind,
            "devices": devices,
            "codec": codec,
            "params": n_params,
            "ok": False,
            "overhead_s_median": float("nan"),
            "round_s_median": float("nan"),
            "first_round_s": float("nan"),
            "up_vs_raw": float("nan"),
            "down_vs_raw": float("nan"),
            "rows": rows,
        }
    steady = rows[1:] or rows  # round 1 includes connection warm-up
    overhead = [r["seconds"] - r["slowest_train_seconds"] for r in steady]
    return {
        "broker": broker_kind,
        "devices": devices,
        "codec": codec,
        "params": n_params,
        "overhead_s_median": statistics.median(overhead),
        "round_s_median": statistics.median(r["seconds"] for r in steady),
        "first_round_s": rows[0]["seconds"],
        "up_vs_raw": statistics.median(r["bytes_up"] / (devices * raw) for r in steady),
        "down_vs_raw": statistics.median(r["bytes_down"] / (devices * raw) for r in steady),
        "ok": all(r["status"] == "ok" and r["clients_ok"] == devices for r in rows),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny run for CI")
    p.add_argument("--devices", default="10,50,100")
    p.add_argument("--brokers", default="mosquitto,embedded")
    p.add_argument("--codecs", default="float32,fp16,int8")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", help="also write results here")
    args = p.parse_args(argv)
    if args.smoke:
        args.devices, args.codecs, args.rounds = "5", "float32", 2
    results = []
    print(
        f"{'broker':<10} {'devices':>7} {'codec':<8} {'overhead s':>10} {'round s':>8} "
        f"{'up/raw':>7} {'down/raw':>8}  ok"
    )
    for broker in args.brokers.split(","):
        for n in map(int, args.devices.split(",")):
            for codec in args.codecs.split(","):
                if codec != "float32" and n != max(map(int, args.devices.split(","))):
                    continue  # codecs only change bytes: measure them at the largest size
                r = run_case(broker, n, args.rounds, codec, args.workers)
                results.append(r)
                print(
                    f"{r['broker']:<10} {n:>7} {codec:<8} {r['overhead_s_median']:>10.3f} "
                    f"{r['round_s_median']:>8.3f} {r['up_vs_raw']:>7.3f} "
                    f"{r['down_vs_raw']:>8.3f}  {r['ok']}",
                    flush=True,
                )
    print(
        f"model: {results[0]['params']:,} parameters; goal: overhead < 0.5 s at 100 devices, "
        "float32 bytes within 5% of raw"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
