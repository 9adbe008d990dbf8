"""Split inference and split-step transport on loopback: codec sizes, service latency, step time.

Usage::

    python benchmarks/split_throughput.py [--smoke] [--json results.json]

Three parts, each bounded:

1. Codecs: digits-cnn and digits-mlp (default cuts) trained centrally, edge exported to ONNX,
   a 16-dim PCA attached; for every codec, payload bytes per sample (batch 1 and 64, 4-byte
   header included) and held-out accuracy with every sample encoded on its own.
2. Service: 1 and 2 ``edgesplit serve`` worker processes (one shared subscription group) on a
   fresh Mosquitto; 1, 10 and 100 concurrent devices (one MQTT connection each, spread over
   ``--device-procs`` torch-free processes) send single-sample requests back to back with the
   default codec; requests/s and p50/p99 latency per request (encode, send, batch, forward,
   reply, decode), at MQTT QoS 1 (default) and QoS 0.
3. Split step: one batch-64 ACTIVATION up and its GRADIENT down between a device and a cloud
   endpoint (plain subscription, the sticky route training needs), codec included.
4. SplitFed V2 cloud: samples/s the split trainer sustains with 1, 10, 50 devices, batching
   every pending device's step into one forward/backward vs one device per call, and the CPU
   each party spends per 1,000 samples (``_splitfed_cloud.py``); plus the cloud half's compute
   alone (no messaging) at the same device counts.
5. SplitFed V1 in the trainer's process vs served by 1 and 2 step worker processes
   (``edgesplit split-worker``), samples/s and cloud CPU per 1,000 samples.
6. The ceiling of part 4's ratio on this machine (``_split_ceiling.py``): paho's own cost of a
   step message in and its reply out, our message code, and the cloud half one device per call
   vs batched, each measured alone; (M + Y) / (M + Z) bounds batched / one-at-a-time.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

CODECS = ("float32", "fp16", "int8", "topk:16+fp16", "topk:8+fp16", "pca:16", "pca:16+fp16",
          "pca:16+int8")  # fmt: skip
GOAL_RATIO, GOAL_LOSS_POINTS, STRETCH_RATIO = 4.0, 0.5, 8.0
GOAL_P99_MS_AT_10 = 50.0
GOAL_STEP_MS = 15.0
GOAL_SPLITFED_X = 5.0


def _train_split(name: str, out: Path, epochs: int, train, test):
    import torch

    from converters.activation_codec import attach_pca
    from converters.commands import export_split_dir
    from split.graph import split_model
    from split.store import save_split
    from split.train import train_centralized
    from split.zoo import build_model

    model, spec = build_model(name, seed=0)
    train_centralized(model, train.x, train.y, epochs=epochs, lr=0.05, momentum=0.9, seed=0)
    model.eval()
    sm = split_model(model, cut=spec.default_cut, example_input=torch.zeros(2, *spec.input_shape))
    save_split(sm, model, model_ref=name, num_classes=10, out_dir=out)
    export_split_dir(out)
    pca = attach_pca(out, train.x, dim=16)
    return sm, pca


def bench_codecs(workdir: Path, *, smoke: bool) -> dict:
    """Bytes per sample and held-out accuracy per codec for both digits models."""
    import torch

    from converters.activation_codec import get_codec
    from converters.datasets import load_dataset, train_test_split
    from edge.runtime import EdgeModel

    train, test = train_test_split(load_dataset("digits"), test_fraction=0.25, seed=0)
    results = {}
    for name in ("digits-cnn", "digits-mlp"):
        sm, pca = _train_split(name, workdir / name, 3 if smoke else 20, train, test)
        act = EdgeModel.from_dir(workdir / name, threads=1).run(test.x)

        def accuracy(a, sm=sm):
            with torch.inference_mode():
                return float((sm.cloud(torch.from_numpy(a)).argmax(1).numpy() == test.y).mean())

        base = accuracy(act)
        f32 = None
        rows = {}
        for spec in CODECS[:3] + CODECS[-1:] if smoke else CODECS:
            codec = get_codec(spec, pca=pca)
            blobs = [codec.encode(act[i : i + 1]) for i in range(len(act))]
            dec = np.concatenate([codec.decode(b, (1, *act.shape[1:])) for b in blobs])
            b1 = float(np.mean([len(b) for b in blobs]))
            f32 = f32 or b1
            rows[spec] = {
                "bytes_b1": b1,
                "bytes_b64": len(codec.encode(act[:64])) / 64,
                "ratio_b1": f32 / b1,
                "accuracy": accuracy(dec),
                "loss_points": 100 * (base - accuracy(dec)),
            }
        results[name] = {"activation_shape": list(act.shape[1:]), "fp32_accuracy": base,
                         "codecs": rows}  # fmt: skip
    return results


def _start_worker(directory: Path, url: str, worker_id: str, qos: int = 1) -> subprocess.Popen:
    code = "import sys; from cloud.serve_commands import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(directory), "--broker", url, "--id", worker_id,
         "--group", "bench", "--max-batch", "64", "--max-delay-ms", "1", "--qos", str(qos)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            line = proc.stdout.readline()
            if line.startswith("ready"):
                return proc
            if not line:
                break
    proc.kill()
    raise RuntimeError(f"worker {worker_id} did not start (exit code {proc.poll()})")


def _drive(devices, activations, seconds: float) -> tuple[list[float], int, float]:
    """Each device sends single-sample requests back to back; (latencies s, errors, wall s)."""
    lat: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    errors = [0]

    def loop(i):
        mine, k = [], 0
        dev = devices[i]
        while time.monotonic() < stop:
            x = activations[(i + k) % len(activations)][None]
            k += 1
            t0 = time.perf_counter()
            try:
                dev.infer_activation(x, timeout=10)
            except (TimeoutError, ConnectionError):
                errors[0] += 1
                continue
            mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(devices)) as pool:
        list(pool.map(loop, range(len(devices))))
    return lat, errors[0], time.perf_counter() - t0


def _device_process(conn, directory: str, url: str, ids: list[str], qos: int, acts) -> None:
    """Child process holding some devices (torch-free); runs loads on command."""
    from edge.remote_infer import RemoteInferer

    devices = [
        RemoteInferer(
            directory, broker_url=url, device_id=i, threads=1, mqtt_options={"qos": qos}
        ).connect()  # fmt: skip
        for i in ids
    ]
    conn.send("ready")
    while (cmd := conn.recv()) is not None:
        n, seconds = cmd
        conn.send(_drive(devices[:n], acts, seconds) if n else ([], 0, 0.0))
    for d in devices:
        d.close()


class _DeviceFleet:
    """Simulated devices spread over processes, so one GIL does not throttle all of them."""

    def __init__(self, directory, url, *, total: int, procs: int, qos: int, acts) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.procs, self.pipes = [], []
        for p in range(procs):
            ids = [f"dev-{qos}-{i:03d}" for i in range(p, total, procs)]
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_device_process, args=(child, str(directory), url, ids, qos, acts)
            )
            proc.start()
            self.procs.append(proc)
            self.pipes.append(parent)
        for pipe in self.pipes:
            if not pipe.poll(120) or pipe.recv() != "ready":
                raise RuntimeError("a device process did not start")

    def load(self, n: int, seconds: float) -> dict:
        """n devices (spread round-robin over the processes) for ``seconds``."""
        shares = [len(range(p, n, len(self.pipes))) for p in range(len(self.pipes))]
        for pipe, k in zip(self.pipes, shares, strict=True):
            pipe.send((k, seconds))
        lat, errors, wall = [], 0, 0.0
        for pipe in self.pipes:
            got, err, w = pipe.recv()
            lat += got
            errors += err
            wall = max(wall, w)
        ms = np.array(lat) * 1000
        return {
            "requests": len(lat),
            "errors": errors,
            "req_per_s": len(lat) / wall,
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
        }

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(None)
        for proc in self.procs:
            proc.join(timeout=30)


def bench_service(directory: Path, *, smoke: bool, device_procs: int = 2) -> dict:
    """Requests/s and latency percentiles per (QoS, workers, concurrent devices)."""
    from cloud.broker import MosquittoBroker
    from converters.datasets import load_dataset
    from edge.runtime import EdgeModel

    acts = EdgeModel.from_dir(directory, threads=1).run(load_dataset("digits").x[:256])
    seconds = 1.0 if smoke else 4.0
    out = {}
    broker = MosquittoBroker(extra_conf="max_connections -1\n").start()
    try:
        # QoS 1 is the default; QoS 0 (workers' --qos 0, devices' MqttConfig qos=0) drops the
        # PUBACKs and leans on the transport's end-to-end acks and the device's retries.
        for qos in (1, 0):
            levels = ((1, 10) if smoke else (1, 10, 100)) if qos == 1 else (10,)
            fleet = _DeviceFleet(
                directory, broker.url, total=max(levels), procs=device_procs, qos=qos, acts=acts
            )
            try:
                for n_workers in (1, 2):
                    procs = [
                        _start_worker(directory, broker.url, f"w{i}", qos) for i in range(n_workers)
                    ]
                    try:
                        fleet.load(1, 0.3)  # warm up connections and workers
                        for n in levels:
                            key = f"qos={qos} workers={n_workers} devices={n}"
                            out[key] = fleet.load(n, seconds)
                    finally:
                        for p in procs:
                            p.send_signal(signal.SIGTERM)
                            p.wait(timeout=20)
            finally:
                fleet.close()
    finally:
        broker.close()
    return out


def bench_split_step(*, smoke: bool) -> dict:
    """One batch-64 split-learning step's transport: activation up, gradient down."""
    import torch

    from cloud.broker import MosquittoBroker
    from converters.activation_codec import get_codec
    from converters.mqtt import MqttConfig, MqttEndpoint
    from converters.wire import Envelope, MsgType, decode, encode
    from split.graph import split_model
    from split.zoo import build_model

    shapes = {}
    for name in ("digits-cnn", "mobilenet-mini"):
        model, spec = build_model(name, seed=0)
        sm = split_model(
            model, cut=spec.default_cut, example_input=torch.zeros(2, *spec.input_shape)
        )
        shapes[name] = (64, *sm.activation_shape)
    n = 20 if smoke else 200
    rng = np.random.default_rng(0)
    out = {}
    broker = MosquittoBroker().start()
    cloud = MqttEndpoint(MqttConfig.from_url(broker.url, client_id="cloud"))
    dev = MqttEndpoint(MqttConfig.from_url(broker.url, client_id="pi-01"))
    try:
        cloud.connect()
        dev.connect()
        got, cond, state = [], threading.Condition(), {}

        def on_activation(topic, sender, payload):
            env = decode(payload)
            codec = get_codec(env.meta["codec"])
            a = codec.decode(env.body, env.meta["shape"])
            grad = env.reply(type=MsgType.GRADIENT, sender="cloud", seq=env.seq,
                             meta=env.meta, body=codec.encode(a * 0.01))  # fmt: skip
            cloud.send("es/down/pi-01", encode(grad), timeout=10)

        def on_gradient(topic, sender, payload):
            env = decode(payload)
            g = get_codec(env.meta["codec"]).decode(env.body, env.meta["shape"])
            with cond:
                got.append(g.shape)
                cond.notify_all()

        cloud.subscribe("es/up/+", on_activation)
        dev.subscribe("es/down/pi-01", on_gradient)
        for name, shape in shapes.items():
            a = np.maximum(rng.normal(size=shape), 0).astype(np.float32)
            for spec in ("float32", "fp16", "int8"):
                codec = get_codec(spec)
                times = []
                for i in range(n + 3):
                    t0 = time.perf_counter()
                    env = Envelope(type=MsgType.ACTIVATION, run_id="bench", round=0,
                                   sender="pi-01", seq=i + 1,
                                   meta={"codec": spec, "shape": list(shape)},
                                   body=codec.encode(a))  # fmt: skip
                    with cond:
                        before = len(got)
                    dev.send("es/up/pi-01", encode(env), timeout=10)
                    with cond:
                        cond.wait_for(lambda b=before: len(got) > b, timeout=10)
                    if i >= 3:  # the first steps open subscriptions and warm caches
                        times.append(1000 * (time.perf_counter() - t0))
                state[f"{name} {spec}"] = {
                    "activation_bytes": len(codec.encode(a)),
                    "p50_ms": float(np.percentile(times, 50)),
                    "p99_ms": float(np.percentile(times, 99)),
                }
        out = state
    finally:
        dev.close()
        cloud.close()
        broker.close()
    return out


def bench_cloud_compute(*, smoke: bool) -> dict:
    """The cloud half's forward/backward/step alone: ms per device step, batched vs not."""
    import torch

    from cloud.split_session import CloudHalf, StepInput
    from split.graph import split_model
    from split.zoo import build_model

    out = {}
    rng = np.random.default_rng(0)
    for name in ("digits-cnn", "mnist-cnn"):
        model, spec = build_model(name, seed=0)
        sm = split_model(
            model, cut=spec.default_cut, example_input=torch.zeros(2, *spec.input_shape)
        )
        half = CloudHalf(mode="splitfed-v2", module=sm.cloud, lr=0.05, momentum=0.9, num_classes=10)
        for n in (1, 10, 50):
            items = [
                StepInput(f"d{i}", 1,
                          rng.normal(size=(16, *sm.activation_shape)).astype(np.float32),
                          rng.integers(0, 10, 16))
                for i in range(n)
            ]  # fmt: skip
            for _ in range(3):
                half.train_step(items)
            reps = max(2, (20 if smoke else 200) // n)
            t0 = time.process_time()
            for _ in range(reps):
                half.train_step(items)
            per_call = (time.process_time() - t0) / reps
            one = out.get(f"{name} devices=1", {}).get("ms_per_step", per_call * 1000)
            out[f"{name} devices={n}"] = {
                "ms_per_step": 1000 * per_call / n,
                "speedup": one / (1000 * per_call / n),
            }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="few epochs, short loads (seconds)")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument(
        "--device-procs", type=int, default=2, help="processes the simulated devices run in"
    )
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="split-bench-") as tmp:
        codecs = bench_codecs(Path(tmp), smoke=args.smoke)
        print("codec bytes/sample (batch 1, batch 64) and held-out accuracy, digits test set")
        for model, r in codecs.items():
            print(f"{model} activation {tuple(r['activation_shape'])} "
                  f"fp32 accuracy {100 * r['fp32_accuracy']:.2f}%")  # fmt: skip
            for spec, c in r["codecs"].items():
                print(f"  {spec:<14} {c['bytes_b1']:>6.1f} B {c['bytes_b64']:>6.1f} B "
                      f"{c['ratio_b1']:>5.2f}x  acc {100 * c['accuracy']:.2f}% "
                      f"({-c['loss_points']:+.2f} pt)")  # fmt: skip
        service = bench_service(
            Path(tmp) / "digits-cnn", smoke=args.smoke, device_procs=args.device_procs
        )
    print("inference service (digits-cnn, default codec pca:16+int8, single-sample requests)")
    for key, r in service.items():
        print(
            f"  {key:<28} {r['req_per_s']:>7.0f} req/s  p50 {r['p50_ms']:6.2f} ms  "
            f"p99 {r['p99_ms']:6.2f} ms  ({r['requests']} requests, {r['errors']} errors)"
        )
    step = bench_split_step(smoke=args.smoke)
    print("split step transport, batch 64: activation up + gradient down (codec included)")
    for key, r in step.items():
        print(f"  {key:<26} {r['activation_bytes']:>8} B up  p50 {r['p50_ms']:6.2f} ms  "
              f"p99 {r['p99_ms']:6.2f} ms")  # fmt: skip
    print("SplitFed V2 cloud (digits-cnn, 16-sample steps, devices replay activations; "
          "CPU ms per 1k samples by party)")  # fmt: skip
    from _splitfed_cloud import bench_splitfed, bench_step_workers  # beside this script

    splitfed = bench_splitfed(smoke=args.smoke)
    print("SplitFed V1 served in-process vs by step worker processes (same harness)")
    step_workers = bench_step_workers(smoke=args.smoke)
    compute = bench_cloud_compute(smoke=args.smoke)
    print("cloud half compute alone (forward + backward + SGD step, 16 samples per device)")
    for key, r in compute.items():
        print(f"  {key:<26} {r['ms_per_step']:7.3f} ms per device step  {r['speedup']:5.1f}x")
    from _split_ceiling import ceiling, report  # beside this script

    print("what batching can reach at most here: each term of a device step measured alone")
    bound = ceiling(smoke=args.smoke)
    report(bound)
    top = max(int(k.split()[0].split("=")[1]) for k in splitfed)
    wall_x = (
        splitfed[f"devices={top} batched"]["samples_per_s"]
        / splitfed[f"devices={top} one-at-a-time"]["samples_per_s"]
    )
    cpu_x = (
        splitfed[f"devices={top} one-at-a-time"]["cloud_cpu_ms_per_1k"]
        / splitfed[f"devices={top} batched"]["cloud_cpu_ms_per_1k"]
    )
    print(f"batched vs one at a time at {top} devices: {wall_x:.2f}x samples/s (wall), "
          f"{cpu_x:.2f}x less cloud CPU per sample, "
          f"{compute[f'digits-cnn devices={top}']['speedup']:.1f}x less cloud compute")  # fmt: skip
    p99_10 = max(
        r["p99_ms"]
        for k, r in service.items()
        if k.startswith("qos=1") and k.endswith("devices=10")
    )
    default = codecs["digits-cnn"]["codecs"]["pca:16+int8"]
    goals = {
        f"default codec >= {GOAL_RATIO}x smaller, <= {GOAL_LOSS_POINTS} pt loss": all(
            r["codecs"]["pca:16+int8"]["ratio_b1"] >= GOAL_RATIO
            and r["codecs"]["pca:16+int8"]["loss_points"] <= GOAL_LOSS_POINTS
            for r in codecs.values()
        ),
        f"default codec >= {STRETCH_RATIO}x (stretch)": default["ratio_b1"] >= STRETCH_RATIO,
        f"p99 < {GOAL_P99_MS_AT_10} ms at 10 devices (QoS 1, 1 and 2 workers)": p99_10
        < GOAL_P99_MS_AT_10,
        f"digits-cnn float32 step p50 <= {GOAL_STEP_MS} ms": step["digits-cnn float32"]["p50_ms"]
        <= GOAL_STEP_MS,
        f"batched SplitFed >= {GOAL_SPLITFED_X}x samples/s at {top} devices": wall_x
        >= GOAL_SPLITFED_X,
    }
    for goal, ok in goals.items():
        # Smoke mode trains 3 epochs and loads for a second: its figures judge nothing.
        print(f"goal {'met' if ok else 'MISSED'}: {goal}" + (" (smoke run)" if args.smoke else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"smoke": args.smoke, "codecs": codecs, "service": service,
                       "split_step": step, "splitfed": splitfed, "cloud_compute": compute,
                       "step_workers": step_workers, "ceiling": bound,
                       "goals": goals}, f, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
