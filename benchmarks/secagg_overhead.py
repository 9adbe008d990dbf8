"""Secure aggregation overhead: round time and bytes of secagg / he-paillier vs plain FedAvg.

Devices are in-process MQTT clients (one connection each) on a real broker, sharing a
two-thread executor; their "training" echoes the global digits-mlp model plus a small
perturbation, so the round time is the protocol's: key agreement, Shamir shares, masking and
unmasking (secagg) or packing, Paillier encryption, the homomorphic sum and one decryption
(he-paillier). Also prints the per-device crypto compute, which on real hardware runs in
parallel across devices (here the simulated devices take turns on two shared cores).
secagg runs as SecAgg+ (Bell et al., CCS'20) with the default O(log n) neighbours per device;
``--neighbours N`` sets k, and any N >= devices - 1 measures plain SecAgg (every pair).

    python benchmarks/secagg_overhead.py            # 10 devices, 4 rounds per mode
    python benchmarks/secagg_overhead.py --devices 100 --neighbours 99   # plain SecAgg
    python benchmarks/secagg_overhead.py --smoke    # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


class EchoTrainer:
    """Returns the global parameters slightly perturbed (what is timed is the protocol)."""

    def __init__(self, seed: int, train_seconds: float) -> None:
        self.rng = np.random.default_rng(seed)
        self.train_seconds = train_seconds

    def fit(self, params, config):
        time.sleep(self.train_seconds)  # stands in for local SGD without using the CPU
        out = {
            k: (v + self.rng.normal(0, 1e-2, v.shape)).astype(v.dtype) for k, v in params.items()
        }
        return out, {"loss": 0.0}


def run_mode(
    secure: str,
    devices: int,
    rounds: int,
    train_seconds: float,
    dropout: float = 0.0,
    neighbours: int = 0,
) -> dict:
    from cloud.broker import start_default_broker
    from cloud.config import FederatedConfig
    from cloud.server import FederatedServer
    from converters.datasets import load_digits
    from converters.mqtt import MqttConfig
    from edge.agent import AgentOptions, DeviceAgent

    broker = start_default_broker(prefer="mosquitto")
    # With simulated training every device trains at once, as real devices do.
    executor = ThreadPoolExecutor(max_workers=devices if train_seconds else 2)
    x, y = np.zeros((50, 1, 8, 8), np.float32), np.zeros(50, np.int64)
    agents = []
    try:
        for i in range(devices):
            dev = f"dev-{i:04d}"
            agent = DeviceAgent(
                # dropout: the device crashes mid-round (last will) with this probability.
                options=AgentOptions(device_id=dev, vanish_prob=dropout, seed=7),
                mqtt=MqttConfig.from_url(broker.url, client_id=dev),
                x=x,
                y=y,
                executor=executor,
                trainer_factory=lambda ref, i=i: EchoTrainer(i, train_seconds),
            )
            agent.start()
            agents.append(agent)
        with tempfile.TemporaryDirectory() as out:
            config = FederatedConfig(
                run_id="secbench",
                model="digits-mlp",
                rounds=rounds,
                min_clients=max(2, int(devices * (1 - 2 * dropout))),
                round_timeout=120,
                register_timeout=60,
                secure=secure,
                secagg_neighbours=neighbours,
                out_dir=out,
            )
            server = FederatedServer(
                config,
                mqtt=MqttConfig.from_url(broker.url, client_id="cloud"),
                test_set=load_digits().subset(np.arange(360)),
                expected_devices=devices,
            )
            raw = sum(v.nbytes for v in server.params.values())
            server.run()
            rows = [json.loads(r) for r in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    finally:
        for a in agents:
            a.stop()
        executor.shutdown(wait=True)
        broker.stop()
    steady = rows[1:] or rows  # round 1: connection warm-up (and the HE key setup)
    return {
        "secure": secure,
        "devices": devices,
        "dropout": dropout,
        "dropped_per_round": statistics.mean(r.get("clients_dropped", 0) for r in rows),
        "params": raw // 4,
        "round_s_median": statistics.median(r["seconds"] for r in steady),
        "overhead_s_median": statistics.median(
            r["seconds"] - r["slowest_train_seconds"] for r in steady
        ),
        "first_round_s": rows[0]["seconds"],
        "up_vs_raw": statistics.median(r["bytes_up"] / (devices * raw) for r in steady),
        "down_vs_raw": statistics.median(r["bytes_down"] / (devices * raw) for r in steady),
        "ok": all(
            r["status"] == "ok" and r["clients_ok"] + r["clients_dropped"] == r["clients_selected"]
            for r in rows
        ),
    }


def device_compute(devices: int, n_values: int, neighbours: int = 0) -> dict:
    """Per-device crypto seconds for one round, measured without the network."""
    from converters import secagg_protocol as sp
    from edge.secure.secagg_client import SecAggClient
    from kernels import (
        PackingSpec,
        PaillierKeyPair,
        RandomnessPool,
        decrypt_batch,
        encode_pack,
        encrypt_batch,
        sum_ciphertexts,
    )
    from kernels.masking import quantize_fixed

    rng = np.random.default_rng(0)
    ids = [f"dev-{i:04d}" for i in range(devices)]
    k = sp.neighbour_count(devices, neighbours)
    t0 = time.perf_counter()
    clients = {
        d: SecAggClient(
            device_id=d, run_id="b", round_=1, threshold=sp.threshold_for(k + 1), neighbours=k
        )
        for d in ids
    }
    adv = {d: c.advertise() for d, c in clients.items()}
    shares = {d: c.share_keys(adv) for d, c in clients.items()}
    for v in ids:
        clients[v].receive_shares({u: shares[u][v] for u in ids if v in shares[u]})
    plan = sp.FixedPointPlan.for_devices(devices, clip=4.0)
    for c in clients.values():
        c.masked_input(
            quantize_fixed(rng.normal(0, 0.1, n_values), frac_bits=plan.frac_bits, clip=4.0)
        )
    secagg = (time.perf_counter() - t0) / devices
    keypair = PaillierKeyPair.generate(2048)
    spec = PackingSpec.for_key(keypair.public, value_bits=28, frac_bits=24, max_summands=devices)
    pts = encode_pack(rng.normal(0, 0.1, n_values), spec)
    t0 = time.perf_counter()
    cts = encrypt_batch(keypair, pts)
    enc = time.perf_counter() - t0
    with RandomnessPool(keypair, capacity=len(pts), background=False) as pool:
        pool.fill()  # what a device precomputes while it trains
        t0 = time.perf_counter()
        encrypt_batch(keypair, pts, randomness_pool=pool)
        enc_pooled = time.perf_counter() - t0
    t0 = time.perf_counter()
    total = sum_ciphertexts(keypair.public, [cts] * devices)
    add = time.perf_counter() - t0
    t0 = time.perf_counter()
    decrypt_batch(keypair, total)
    dec = time.perf_counter() - t0
    return {
        "secagg_device_s": secagg,
        "he_encrypt_device_s": enc,
        "he_encrypt_pooled_device_s": enc_pooled,
        "he_sum_cloud_s": add,
        "he_decrypt_s": dec,
        "he_ciphertexts": len(cts),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny run for CI")
    p.add_argument("--devices", default="10", help="comma-separated device counts")
    p.add_argument("--dropouts", default="0", help="comma-separated crash probabilities")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument(
        "--train-seconds",
        type=float,
        default=0.0,
        help="simulated local training per round (lets devices precompute HE randomness)",
    )
    p.add_argument("--modes", default="none,secagg,he-paillier")
    p.add_argument(
        "--neighbours",
        type=int,
        default=0,
        help="secagg neighbours per device (SecAgg+); 0 = 2*ceil(log2 n)+1, >= n-1 = plain SecAgg",
    )
    p.add_argument("--json", help="also write results here")
    args = p.parse_args(argv)
    if args.smoke:
        args.devices, args.rounds, args.dropouts = "4", 2, "0"
    import torch

    torch.set_num_threads(1)
    results = []
    print(
        f"{'secure':<12} {'devices':>7} {'dropout':>7} {'round s':>8} {'overhead s':>10} "
        f"{'vs plain':>8} {'round 1 s':>9} {'up/raw':>7} {'down/raw':>8}  ok"
    )
    for n in map(int, args.devices.split(",")):
        for dropout in map(float, args.dropouts.split(",")):
            plain = None
            for mode in args.modes.split(","):
                r = run_mode(mode, n, args.rounds, args.train_seconds, dropout, args.neighbours)
                plain = r["round_s_median"] if mode == "none" else plain
                r["vs_plain"] = r["round_s_median"] / plain if plain else float("nan")
                results.append(r)
                print(
                    f"{mode:<12} {n:>7} {dropout:>7.2f} {r['round_s_median']:>8.3f} "
                    f"{r['overhead_s_median']:>10.3f} {r['vs_plain']:>8.2f} "
                    f"{r['first_round_s']:>9.3f} {r['up_vs_raw']:>7.2f} {r['down_vs_raw']:>8.2f}"
                    f"  {r['ok']}",
                    flush=True,
                )
    n0 = int(args.devices.split(",")[0])
    compute = device_compute(n0, results[0]["params"], args.neighbours)
    from converters.secagg_protocol import neighbour_count

    print(
        f"per device: secagg (k={neighbour_count(n0, args.neighbours)} of {n0}) "
        f"{compute['secagg_device_s'] * 1e3:.1f} ms; HE encrypt "
        f"{compute['he_encrypt_device_s'] * 1e3:.0f} ms ({compute['he_ciphertexts']} ciphertexts), "
        f"{compute['he_encrypt_pooled_device_s'] * 1e3:.1f} ms with randomness precomputed;"
        f" cloud HE sum {compute['he_sum_cloud_s'] * 1e3:.1f} ms; decrypt "
        f"{compute['he_decrypt_s'] * 1e3:.0f} ms; model {results[0]['params']:,} parameters"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": results, "compute": compute}, indent=2))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
