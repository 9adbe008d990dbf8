"""Loopback transport benchmark: latency, throughput, burst loss and receiver memory per broker.

Run ``python benchmarks/transport.py`` (about a minute) or ``--smoke`` (seconds, for CI).
Prints a table and the goals; ``--json PATH`` also saves the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import zlib

import paho.mqtt.client as mqtt

from cloud.broker import EmbeddedBroker, MosquittoBroker, mosquitto_binary
from converters.mqtt import MqttConfig, MqttEndpoint

MiB = 1 << 20


def _ep(broker, client_id: str, **kw) -> MqttEndpoint:
    ep = MqttEndpoint(MqttConfig.from_url(broker.url, client_id=client_id, **kw))
    ep.connect(timeout=10)
    return ep


class _Latch:
    def __init__(self) -> None:
        self.cond, self.n, self.last = threading.Condition(), 0, None

    def __call__(self, topic, sender, payload) -> None:
        with self.cond:
            self.n, self.last = self.n + 1, payload
            self.cond.notify_all()

    def wait(self, n: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.n >= n, timeout=timeout)


def bench_rtt(broker, *, nodelay: bool, n: int) -> dict:
    """Ping-pong of a 64-byte control message (QoS 1, unchunked) device -> cloud -> device."""
    cloud = _ep(broker, "cloud", tcp_nodelay=nodelay)
    dev = _ep(broker, "pi-01", tcp_nodelay=nodelay)
    pong = _Latch()
    cloud.subscribe("es/up/+", lambda t, s, p: cloud.publish_small("es/down/pi-01", bytes(p)))
    dev.subscribe("es/down/pi-01", pong)
    times = []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            dev.publish_small("es/up/pi-01", b"p" * 64, timeout=5)
            if not pong.wait(i + 1, timeout=5):
                raise RuntimeError("control round trip lost a message")
            times.append(time.perf_counter() - t0)
    finally:
        cloud.close()
        dev.close()
    times.sort()
    return {
        "median_ms": 1e3 * statistics.median(times),
        "p99_ms": 1e3 * times[min(len(times) - 1, int(0.99 * len(times)))],
    }


def bench_throughput(broker, *, size: int, variants: list[tuple[int, int]], repeats: int) -> dict:
    """A payload sent, acked, reassembled and crc-checked at the receiver, per (chunk, data QoS).

    Variants run interleaved, one transfer each per round, so a busy neighbour on a shared box
    slows them alike. Reports best and median MB/s and the median CPU time of this process
    (sender + receiver; the broker's own CPU is not included).
    """
    payload = random.Random(0).randbytes(size)
    crc = zlib.crc32(payload)
    pairs = []
    for i, (chunk, qos) in enumerate(variants):
        kw = {"max_chunk": chunk, "data_qos": qos}
        cloud, dev = _ep(broker, f"cloud-{i}", **kw), _ep(broker, f"pi-{i:02d}", **kw)
        got = _Latch()
        cloud.subscribe(f"es/up/pi-{i:02d}", got)
        pairs.append((cloud, dev, got, [], []))
    try:
        for r in range(repeats):
            for i, (_, dev, got, times, cpu) in enumerate(pairs):
                t0, c0 = time.perf_counter(), time.process_time()
                dev.send(f"es/up/pi-{i:02d}", payload, timeout=120)
                if not got.wait(r + 1, timeout=60) or zlib.crc32(got.last) != crc:
                    raise RuntimeError("payload not delivered intact")
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
    finally:
        for cloud, dev, *_ in pairs:
            cloud.close()
            dev.close()
    return {
        f"{chunk // 1024}KiB_qos{qos}": {
            "MB_per_s": size / min(times) / 1e6,
            "median_MB_per_s": size / statistics.median(times) / 1e6,
            "cpu_ms": 1e3 * statistics.median(cpu),
            "retransmits": dev.stats.retransmits,
        }
        for (chunk, qos), (_, dev, _, times, cpu) in zip(variants, pairs, strict=True)
    }


class _SlowReader(MqttEndpoint):
    """Reads its socket slowly (like a busy Pi), so the broker must queue for it."""

    delay = 0.0002

    def _on_message(self, client, userdata, msg) -> None:
        time.sleep(self.delay)
        super()._on_message(client, userdata, msg)


def bench_burst(broker, *, chunks: int) -> dict:
    """``chunks`` 1 KiB frames to a slow reader: windowed transport vs a raw QoS 1 burst."""
    payload = random.Random(1).randbytes(chunks * 1024)
    reader = _SlowReader(MqttConfig.from_url(broker.url, client_id="cloud"))
    reader.connect(timeout=10)
    got = _Latch()
    reader.subscribe("es/up/+", got)
    dev = _ep(broker, "pi-01", max_chunk=1024, ack_timeout=2.0)
    t0 = time.perf_counter()
    try:
        dev.send("es/up/pi-01", payload, timeout=600)
        ok = got.wait(1, timeout=30) and bytes(got.last) == payload
        outcome = "complete, verified" if ok else "LOUD FAILURE: content differs"
    except Exception as e:  # a loud failure is an acceptable outcome; silence is not
        outcome = f"LOUD FAILURE: {e}"
    finally:
        elapsed = time.perf_counter() - t0
        stats = dev.stats.as_dict()
        dev.close()
        reader.close()
    return {
        "outcome": outcome,
        "seconds": elapsed,
        "retransmits": stats["retransmits"],
        "raw_qos1_lost": _raw_burst_loss(broker, n=chunks),
    }


def _raw_burst_loss(broker, *, n: int) -> int:
    """Baseline: plain paho QoS 1 publishes to a slow subscriber; returns messages never seen."""
    seen = set()
    proto = mqtt.MQTTv311 if isinstance(broker, EmbeddedBroker) else mqtt.MQTTv5

    def client(cid):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=proto)
        c.connect(broker.host, broker.port)
        c.loop_start()
        return c

    def on_message(c, u, msg):
        time.sleep(_SlowReader.delay)
        seen.add(int.from_bytes(msg.payload[:4], "big"))

    sub = client("raw-sub")
    sub.on_message = on_message
    sub.subscribe("raw/burst", qos=1)[1]
    time.sleep(0.3)
    pub = client("raw-pub")
    infos = [pub.publish("raw/burst", i.to_bytes(4, "big") * 256, qos=1) for i in range(n)]
    for info in infos:
        info.wait_for_publish(60)  # every publish acknowledged by the broker...
    # Wait until nothing new has arrived for a second: what is missing then is never coming.
    last, quiet_since = -1, time.monotonic()
    while len(seen) < n and time.monotonic() - quiet_since < 1.0:
        if len(seen) != last:
            last, quiet_since = len(seen), time.monotonic()
        time.sleep(0.05)
    for c in (pub, sub):
        c.loop_stop()
        c.disconnect()
    return n - len(seen)  # ...yet these never arrived


_RECEIVER = textwrap.dedent(
    """
    import json, sys, threading, tracemalloc, zlib
    from converters.mqtt import MqttConfig, MqttEndpoint
    def rss():  # current resident set (ru_maxrss is useless: imports peak higher than this)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    url, crc = sys.argv[1], int(sys.argv[2])
    ep = MqttEndpoint(MqttConfig.from_url(url, client_id="cloud"))
    ep.connect()
    done, box = threading.Event(), {}
    def handler(t, s, p):
        box["ok"] = zlib.crc32(p) == crc
        box["peak"] = tracemalloc.get_traced_memory()[1]
        box["rss"] = rss()
        done.set()
    ep.subscribe("es/up/+", handler)
    rss0 = rss()
    tracemalloc.start()
    print("ready", flush=True)
    done.wait(300)
    print(json.dumps({"ok": box.get("ok"), "peak": box.get("peak"), "rss": box["rss"] - rss0}))
    ep.close()
    """
)


def bench_memory(broker, *, size: int, max_chunk: int, window: int) -> dict:
    """Receiver peak (tracemalloc, in a separate process) for one ``size``-byte payload."""
    payload = random.Random(2).randbytes(size)
    proc = subprocess.Popen(
        [sys.executable, "-c", _RECEIVER, broker.url, str(zlib.crc32(payload))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("receiver process did not start")
        dev = _ep(broker, "pi-01", max_chunk=max_chunk, window=window)
        try:
            dev.send("es/up/pi-01", payload, timeout=300)
        finally:
            dev.close()
        out = json.loads(proc.stdout.readline())
    finally:
        proc.wait(30)
    bound = 1.5 * size + window * max_chunk
    return {
        "verified": out["ok"],
        "peak_MiB": out["peak"] / MiB,
        "peak_over_payload": out["peak"] / size,
        "rss_delta_MiB": out["rss"] / MiB,
        "bound_MiB": bound / MiB,
        "payload_MiB": size / MiB,
    }


def run(*, smoke: bool) -> dict:
    """Runs every benchmark on every available broker; returns the figures."""
    brokers = {"embedded-amqtt": lambda: EmbeddedBroker()}
    if mosquitto_binary():
        brokers = {"mosquitto": lambda: MosquittoBroker(), **brokers}
    n_rtt = 50 if smoke else 500  # Nagle runs a tenth: each takes ~90 ms
    size = (2 if smoke else 10) * MiB
    chunks = 2000 if smoke else 20_000
    mem_size = (5 if smoke else 50) * MiB
    results: dict = {}
    for name, make in brokers.items():
        broker = make()
        t0 = time.perf_counter()
        broker.start()
        r = results[name] = {"start_ms": 1e3 * (time.perf_counter() - t0)}
        try:
            r["rtt_nodelay"] = bench_rtt(broker, nodelay=True, n=n_rtt)
            r["rtt_nagle"] = bench_rtt(broker, nodelay=False, n=max(10, n_rtt // 10))
            variants = [(256 * 1024, 1), (MiB, 1), (256 * 1024, 0), (MiB, 0)]
            r["throughput"] = bench_throughput(
                broker, size=size, variants=variants, repeats=2 if smoke else 7
            )
            r["burst"] = bench_burst(broker, chunks=chunks)
            r["memory"] = bench_memory(broker, size=mem_size, max_chunk=256 * 1024, window=16)
        finally:
            broker.stop()
        _print(name, r, size)
    return results


def _print(name: str, r: dict, size: int) -> None:
    print(f"\n== {name} (started in {r['start_ms']:.0f} ms)")
    for k in ("rtt_nodelay", "rtt_nagle"):
        print(
            f"  control RTT {k[4:]:8s} median {r[k]['median_ms']:7.2f} ms  p99 "
            f"{r[k]['p99_ms']:7.2f} ms"
        )
    for k, v in r["throughput"].items():
        chunk, qos = k.split("_")
        print(
            f"  {size / MiB:.0f} MiB acked+verified, {chunk:>7s} chunks, data {qos}: "
            f"best {v['MB_per_s']:6.1f} MB/s, median {v['median_MB_per_s']:6.1f} MB/s, "
            f"CPU {v['cpu_ms']:5.1f} ms ({v['retransmits']} retransmits)"
        )
    b = r["burst"]
    print(
        f"  burst to slow reader: {b['outcome']} in {b['seconds']:.1f} s, {b['retransmits']} "
        f"retransmits; raw QoS 1 baseline silently lost {b['raw_qos1_lost']}"
    )
    m = r["memory"]
    print(
        f"  receiver peak for {m['payload_MiB']:.0f} MiB payload: {m['peak_MiB']:.1f} MiB "
        f"({m['peak_over_payload']:.2f}x payload; bound {m['bound_MiB']:.1f} MiB; "
        f"RSS +{m['rss_delta_MiB']:.1f} MiB; verified={m['verified']})"
    )


def _goals(results: dict) -> list[tuple[str, bool]]:
    goals = []
    if "mosquitto" in results:
        m = results["mosquitto"]
        goals.append(("RTT median <= 2 ms (mosquitto)", m["rtt_nodelay"]["median_ms"] <= 2))
        best = max(v["MB_per_s"] for v in m["throughput"].values())
        goals.append(("throughput >= 300 MB/s (mosquitto, best run of any setting)", best >= 300))
    for name, r in results.items():
        b = r["burst"]
        goals.append((f"zero silent loss ({name})", b["outcome"].startswith(("complete", "LOUD"))))
        m = r["memory"]
        goals.append(
            (f"receiver peak <= 1.5x payload + window ({name})", m["peak_MiB"] <= m["bound_MiB"])
        )
    return goals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="small sizes, a few seconds")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    # The raw baseline makes amqtt time out on PUBACKs from the slow reader; that is the point.
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    results = run(smoke=args.smoke)
    print("\n== goals")
    goals = _goals(results)
    for text, ok in goals:
        print(f"  {'PASS' if ok else 'MISS'}  {text}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"smoke": args.smoke, "results": results, "goals": dict(goals)}, f, indent=2)
    # Smoke mode fails only on correctness (loss, corruption), not on speed of a shared CI box.
    broken = [t for t, ok in goals if not ok and ("loss" in t or "peak" in t)]
    return 1 if broken else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
