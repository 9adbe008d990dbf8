"""What the SplitFed cloud sustains: samples/s at 1, 10, 50 devices, batched vs one at a time.

Used by ``benchmarks/split_throughput.py``. For each device count the same
:class:`cloud.split_trainer.SplitTrainer` runs SplitFed V2 twice on a fresh Mosquitto: once
serving one device's step per cloud call (``batch_window=0``, the baseline) and once batching
every device's pending step into one forward/backward. The devices replay fixed activations
(``_splitfed_devices.py``, spread over two processes so that one GIL does not cap them) so that
the cloud, not the simulated phones, is the bottleneck as far as the machine allows; round 1
warms up, rounds 2.. are timed.

Run alone: ``python benchmarks/_splitfed_cloud.py [--levels 1,10,50] [--repeat 2] [--only
splitfed]``; ``--json PATH`` keeps every run's figures.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _thread_cpu() -> dict[str, float]:
    """CPU seconds so far of this process's threads, summed by role (Linux /proc)."""
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        name = names.get(int(tid), "")
        role = next((r for prefix, r in _ROLES if name.startswith(prefix)), "other")
        out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / _TICK
    return out


# Thread name prefix -> role in the cloud process (converters.mqtt, cloud.split_trainer).
_ROLES = (("paho-mqtt-client", "network"), ("mqtt-dispatch", "dispatch"),
          ("split-cloud", "compute"), ("MainThread", "main"))  # fmt: skip


def _start_devices(url: str, model: str, count: int, samples: int, procs: int, mqtt_kw: dict):
    out = []
    for p in range(procs):
        first = p * count // procs
        n = (p + 1) * count // procs - first
        if n == 0:
            continue
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "_splitfed_devices.py"), "--broker", url,
             "--model", model, "--count", str(n), "--first", str(first),
             "--samples", str(samples), "--max-seconds", "600",
             "--qos", str(mqtt_kw.get("qos", 1)), "--protocol", mqtt_kw.get("protocol", "v5")],
            stdout=subprocess.PIPE, text=True,  # stderr shows: a failing device must be seen
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        out.append(proc)
    for proc in out:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 0.5)[0]:
                line = proc.stdout.readline()
                if line.startswith("ready") or not line:
                    break
        if proc.poll() is not None:
            raise RuntimeError(f"device process exited with {proc.returncode}")
    return out


def _start_step_workers(url: str, n: int) -> list[subprocess.Popen]:
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "converters.cli",
                "split-worker",
                "--broker",
                url,
                "--id",
                f"steps-{i}",
                "--threads",
                "1",
                "--max-seconds",
                "600",
            ],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        for i in range(n)
    ]
    for p in procs:
        if not p.stdout.readline().startswith("ready"):
            raise RuntimeError(f"step worker exited with {p.poll()}")
    return procs


def run_once(
    *, model: str, devices: int, batched: bool, samples: int, batch_size: int, rounds: int,
    device_procs: int, mqtt_kw: dict | None = None, step_workers: int = 0, step_qos: int = 1,
) -> dict:  # fmt: skip
    """One SplitFed V2 run (V1 served by ``step_workers`` processes if > 0); cloud samples/s
    over rounds 2.. and cloud calls per round."""
    from cloud.broker import MosquittoBroker
    from cloud.config import FederatedConfig
    from cloud.split_trainer import SplitTrainer
    from converters.datasets import load_dataset, synthetic, train_test_split
    from converters.mqtt import MqttConfig
    from split.zoo import build_model

    spec = build_model(model, seed=0)[1]
    data = (
        load_dataset("digits")
        if tuple(spec.input_shape) == (1, 8, 8)
        else synthetic(n=512, shape=tuple(spec.input_shape), num_classes=spec.num_classes, seed=0)
    )  # the same choice as the load generator's
    _, test = train_test_split(data, test_fraction=0.2, seed=0)
    broker = MosquittoBroker(extra_conf="max_connections -1\n").start()
    procs, workers = [], []
    try:
        with tempfile.TemporaryDirectory(prefix="splitfed-bench-") as tmp:
            cfg = FederatedConfig(
                run_id="bench", model=model, rounds=rounds, min_clients=devices,
                local_epochs=1, batch_size=batch_size, lr=0.05, momentum=0.9,
                mode="splitfed-v1" if step_workers else "splitfed-v2", out_dir=tmp,
                round_timeout=300, register_timeout=120, split_workers=step_workers,
                step_qos=step_qos,
            )  # fmt: skip
            workers = _start_step_workers(broker.url, step_workers)
            marks = []  # CPU seconds (cloud, devices, broker) after each round
            threads = []  # the cloud's CPU seconds by thread role after each round

            def on_round(row):
                threads.append(_thread_cpu())
                marks.append((
                    time.process_time(),
                    sum(_cpu_seconds(p.pid) for p in procs),
                    _cpu_seconds(broker.proc.pid),
                    sum(_cpu_seconds(w.pid) for w in workers),
                ))  # fmt: skip

            trainer = SplitTrainer(
                cfg,
                mqtt=MqttConfig.from_url(broker.url, client_id="cloud", **(mqtt_kw or {})),
                test_set=test,
                expected_devices=devices,
                on_round=on_round,
                batch_window=0.005 if batched else 0.0,
                max_batch_devices=64,
            )
            procs = _start_devices(broker.url, model, devices, samples, device_procs, mqtt_kw or {})
            trainer.run()
            rows = trainer.report.rows[1:]
            cpu = [b - a for a, b in zip(marks[0], marks[-1], strict=True)]
    finally:
        procs += workers
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.close()
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        raise RuntimeError(f"no timed round finished: {rows}")
    samples_done = sum(r["samples"] for r in ok)
    steps = samples_done / batch_size
    roles = {
        role: 1e6 * (cpu_s - threads[0].get(role, 0.0)) / steps
        for role, cpu_s in threads[-1].items()
    }
    seconds = sum(r["seconds"] for r in ok)
    compute = sum(r["cloud_compute_seconds"] for r in ok)
    return {
        "samples_per_s": samples_done / seconds,
        # CPU seconds per 1,000 samples of each party over the timed rounds (evaluation of the
        # merged model included in the cloud's): what the cloud needs regardless of how much
        # of the 2 cores the simulated devices and the broker take.
        "cloud_cpu_ms_per_1k": 1000 * cpu[0] / samples_done * 1000,
        "devices_cpu_ms_per_1k": 1000 * cpu[1] / samples_done * 1000,
        "broker_cpu_ms_per_1k": 1000 * cpu[2] / samples_done * 1000,
        "workers_cpu_ms_per_1k": 1000 * cpu[3] / samples_done * 1000,
        # The cloud's CPU microseconds per device step by thread: paho's network thread (with
        # frame parsing and acks), the endpoint's dispatcher (envelope and activation decode),
        # the compute thread (cloud half, replies' encoding and publish).
        "cloud_us_per_step_by_thread": roles,
        "cloud_calls_per_round": sum(r["cloud_calls"] for r in ok) / len(ok),
        "compute_share": compute / seconds,
        "compute_samples_per_s": samples_done / compute if compute else 0.0,
        "rounds": len(ok),
    }


def bench_splitfed(
    *,
    smoke: bool,
    model: str = "digits-cnn",
    device_procs: int = 2,
    mqtt_kw: dict | None = None,
    levels: tuple[int, ...] | None = None,
    rounds: int | None = None,
    step_qos: int = 1,
) -> dict:
    levels = levels or ((1, 10) if smoke else (1, 10, 50))
    rounds = rounds or (2 if smoke else 3)
    out = {}
    for n in levels:
        for batched in (False, True):
            key = f"devices={n} {'batched' if batched else 'one-at-a-time'}"
            out[key] = run_once(
                model=model, devices=n, batched=batched, samples=64 if smoke else 256,
                batch_size=16, rounds=rounds, device_procs=min(device_procs, n),
                mqtt_kw=mqtt_kw, step_qos=step_qos,
            )  # fmt: skip
            print(f"  {key:<32} {out[key]['samples_per_s']:>8.0f} samples/s  "
                  f"{out[key]['cloud_calls_per_round']:>6.0f} cloud calls/round  "
                  f"compute {100 * out[key]['compute_share']:.0f}% of wall; CPU ms per 1k "
                  f"samples: cloud {out[key]['cloud_cpu_ms_per_1k']:.0f} devices "
                  f"{out[key]['devices_cpu_ms_per_1k']:.0f} broker "
                  f"{out[key]['broker_cpu_ms_per_1k']:.0f}", flush=True)  # fmt: skip
            by = out[key]["cloud_us_per_step_by_thread"]
            print("    cloud CPU us per device step by thread: " + ", ".join(
                f"{k} {by[k]:.0f}" for k in ("network", "dispatch", "compute", "main", "other")
                if k in by), flush=True)  # fmt: skip
    return out


def bench_step_workers(*, smoke: bool, model: str = "digits-cnn") -> dict:
    """SplitFed V1 at 50 devices (10 in smoke): in the trainer's process vs 1 and 2 step
    worker processes (each device's steps on the worker that picked up its session)."""
    n = 10 if smoke else 50
    out = {}
    for workers in (0, 1, 2):
        key = f"V1 devices={n} " + (f"step workers={workers}" if workers else "in-process")
        out[key] = run_once(
            model=model, devices=n, batched=False, samples=64 if smoke else 256,
            batch_size=16, rounds=2 if smoke else 3, device_procs=1, step_workers=workers,
        )  # fmt: skip
        r = out[key]
        cloud = r["cloud_cpu_ms_per_1k"] + r["workers_cpu_ms_per_1k"]
        print(f"  {key:<32} {r['samples_per_s']:>8.0f} samples/s  cloud CPU (coordinator + "
              f"workers) {cloud:.0f} ms per 1k samples", flush=True)  # fmt: skip
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    import argparse
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--model", default="digits-cnn")
    ap.add_argument("--qos", type=int, default=1)
    ap.add_argument("--protocol", default="v5")
    ap.add_argument("--step-qos", type=int, default=1, choices=(0, 1), help="step message QoS")
    ap.add_argument("--levels", help="device counts, e.g. 1,10,50 (default: 1,10,50; smoke 1,10)")
    ap.add_argument("--rounds", type=int, help="rounds per run; round 1 is not timed")
    ap.add_argument("--device-procs", type=int, default=2, help="load generator processes")
    ap.add_argument("--repeat", type=int, default=1, help="run the SplitFed sweep this often")
    ap.add_argument("--only", choices=("splitfed", "workers"), help="skip the other benchmark")
    ap.add_argument("--json", type=Path, help="write every run's figures here")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # as split_throughput.py: the devices and broker share the 2 cores
    results: dict = {"splitfed": [], "step_workers": None}
    if a.only != "workers":
        levels = tuple(int(v) for v in a.levels.split(",")) if a.levels else None
        for _ in range(a.repeat):
            results["splitfed"].append(
                bench_splitfed(
                    smoke=a.smoke,
                    model=a.model,
                    device_procs=a.device_procs,
                    levels=levels,
                    rounds=a.rounds,
                    mqtt_kw={"qos": a.qos, "protocol": a.protocol},
                    step_qos=a.step_qos,
                )
            )
    if a.only != "splitfed":
        results["step_workers"] = bench_step_workers(smoke=a.smoke, model=a.model)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
