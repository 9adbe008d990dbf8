"""How far batching can lift the SplitFed cloud on this machine: the per-step floors.

Used by ``benchmarks/split_throughput.py``; run alone: ``python benchmarks/_split_ceiling.py``.
A device step costs the cloud messaging M (MQTT in and out, our frame/envelope/tensor
decoding and the reply's encoding) plus the cloud half's compute: Y per call served one device
at a time, Z per device step when many devices share one call. Whatever the implementation,
batched / one-at-a-time <= (M + Y) / (M + Z). This script measures each term in isolation on
one thread, where nothing else competes for the cores:

* ``paho_us``: paho-mqtt's own cost of one step message in and one reply out through Mosquitto
  (a single-threaded echo on paho's external-loop API: no thread hand-offs, no decoding; our
  endpoint adds its worker threads on top of this);
* ``own_us``: our code per step without MQTT (frame parse and reassembly, envelope and
  activation decode with every check, the reply's tensors, envelope and frame);
* ``one_us`` / ``batched_us``: ``CloudHalf.train_step`` for one device's 16 samples, and per
  device when 50 devices share a call.

The bound printed is the ratio the batched cloud could reach if M were only these floors.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# The echo's peer: 50 "devices" on one connection, one step in flight each, until N replies.
_PEER = """
import sys, threading, paho.mqtt.client as mqtt
host, (port, n, size, qos) = sys.argv[1], map(int, sys.argv[2:6])
body, done, sent = b"x" * size, threading.Event(), [0]
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="peer", protocol=mqtt.MQTTv5)
def on_connect(c, u, f, rc, p):
    c.subscribe("bench/down/+", qos=qos)
def on_subscribe(c, u, mid, rcs, p):
    for i in range(50):
        sent[0] += 1
        c.publish(f"bench/up/dev-{i:02d}", body, qos=qos)
def on_message(c, u, m):
    if sent[0] < n:
        sent[0] += 1
        c.publish("bench/up/" + m.topic.rsplit("/", 1)[1], body, qos=qos)
    elif sent[0] >= n:
        done.set()
c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
c.connect(host, port)
c.loop_start()
done.wait(120)
c.loop_stop()
"""


def paho_echo_us(*, size: int, n: int, qos: int) -> float:
    """CPU microseconds per step (one message in, one reply out) of a single-threaded paho
    client driven through its external-loop API, replies as big as the requests."""
    import paho.mqtt.client as mqtt

    from cloud.broker import MosquittoBroker

    broker = MosquittoBroker().start()
    host, port = "127.0.0.1", int(broker.url.rsplit(":", 1)[1])
    count = [0]
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="echo", protocol=mqtt.MQTTv5)

    def on_message(client, userdata, msg):
        count[0] += 1
        client.publish("bench/down/" + msg.topic.rsplit("/", 1)[1], msg.payload, qos=qos)

    c.on_message = on_message
    peer = None
    try:
        c.connect(host, port)
        c.subscribe("bench/up/+", qos=qos)
        sel = selectors.DefaultSelector()
        sel.register(c.socket(), selectors.EVENT_READ)
        for _ in range(20):  # CONNACK and SUBACK
            if sel.select(0.05):
                c.loop_read()
        peer = subprocess.Popen(
            [sys.executable, "-c", _PEER, host, str(port), str(n), str(size), str(qos)],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        start = None
        deadline = time.monotonic() + 120
        while count[0] < n and time.monotonic() < deadline:
            if sel.select(0.5):
                if start is None:
                    start = (time.process_time(), count[0])
                rc = c.loop_read()
                while rc == mqtt.MQTT_ERR_SUCCESS and sel.select(0):  # drain, then write
                    rc = c.loop_read()
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    raise RuntimeError(f"echo lost its broker connection: {mqtt.error_string(rc)}")
            if c.want_write():
                c.loop_write()
            c.loop_misc()
        if start is None or count[0] < n:
            raise RuntimeError(f"echo got {count[0]} of {n} messages")
        return 1e6 * (time.process_time() - start[0]) / (count[0] - start[1])
    finally:
        if peer is not None:
            try:
                peer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                peer.kill()
        c.disconnect()
        broker.close()


def own_code_us(*, activation: np.ndarray, labels: np.ndarray, reps: int) -> float:
    """CPU microseconds per step of our own message code on the cloud, without MQTT."""
    from cloud.split_steps import decode_activation, grad_scale
    from converters.chunking import Reassembler, data_frame, parse_frame
    from converters.tensor_codec import encode_tensors
    from converters.wire import Envelope, MsgType, decode, encode

    def frame(payload: bytes, sender: str, i: int) -> bytes:
        crc = zlib.crc32(payload)
        return data_frame(payload, stream_id=i, seq=0, total=1, chunk_size=len(payload),
                          crc=crc, sender=sender)  # fmt: skip

    frames = []
    for i in range(reps):
        body = encode_tensors({"activation": activation, "labels": labels})
        env = Envelope(type=MsgType.ACTIVATION, run_id="bench", round=1, sender="dev-01",
                       seq=i + 1, meta={"step": i + 1, "epoch": 0, "batch": len(labels)},
                       body=body)  # fmt: skip
        frames.append(frame(encode(env), "dev-01", i + 1))
    reasm = Reassembler(max_bytes=1 << 24, max_streams=64, timeout=60.0)
    shape = tuple(activation.shape[1:])
    t0 = time.process_time()
    for i, raw in enumerate(frames):
        f = parse_frame(raw)
        whole = reasm.feed(f.sender, f)
        reasm.progress(f.sender, f.stream_id)
        env = decode(whole, max_bytes=1 << 24, run_id="bench")
        item = decode_activation("dev-01", env, batch_size=len(labels),
                                 activation_shape=shape, with_labels=True)  # fmt: skip
        g = item.activation  # stands in for the gradient: same shape and dtype
        meta = {"step": item.step, "epoch": 0, "scale": grad_scale(g, "float32")}
        reply = Envelope(type=MsgType.GRADIENT, run_id="bench", round=1, sender="cloud",
                         seq=i + 1, meta=meta, body=encode_tensors({"grad": g}))  # fmt: skip
        frame(encode(reply), "cloud", i + 1)
    return 1e6 * (time.process_time() - t0) / reps


def compute_us(model: str, *, reps: int) -> tuple[float, float]:
    """``CloudHalf.train_step`` CPU microseconds: one device per call, and per device with 50
    devices per call (16 samples each)."""
    import torch

    from cloud.split_session import CloudHalf, StepInput
    from split.graph import split_model
    from split.zoo import build_model

    net, spec = build_model(model, seed=0)
    sm = split_model(net, cut=spec.default_cut, example_input=torch.zeros(2, *spec.input_shape))
    half = CloudHalf(mode="splitfed-v2", module=sm.cloud, lr=0.05, momentum=0.9,
                     num_classes=spec.num_classes)  # fmt: skip
    rng = np.random.default_rng(0)
    out = []
    for n in (1, 50):
        items = [StepInput(f"d{i}", 1,
                           rng.normal(size=(16, *sm.activation_shape)).astype(np.float32),
                           rng.integers(0, spec.num_classes, 16)) for i in range(n)]  # fmt: skip
        for _ in range(3):
            half.train_step(items)
        calls = max(2, reps // n)
        t0 = time.process_time()
        for _ in range(calls):
            half.train_step(items)
        out.append(1e6 * (time.process_time() - t0) / calls / n)
    return out[0], out[1]


def ceiling(*, model: str = "digits-cnn", smoke: bool = False) -> dict:
    import torch

    from split.graph import split_model
    from split.zoo import build_model

    net, spec = build_model(model, seed=0)
    sm = split_model(net, cut=spec.default_cut, example_input=torch.zeros(2, *spec.input_shape))
    rng = np.random.default_rng(0)
    act = rng.normal(size=(16, *sm.activation_shape)).astype(np.float32)
    labels = rng.integers(0, spec.num_classes, 16)
    from converters.tensor_codec import encode_tensors

    size = len(encode_tensors({"activation": act, "labels": labels})) + 120  # + envelope, frame
    n = 2000 if smoke else 20000
    r = {
        "model": model,
        "step_bytes": size,
        "paho_us_qos0": paho_echo_us(size=size, n=n, qos=0),
        "paho_us_qos1": paho_echo_us(size=size, n=n, qos=1),
        "own_us": own_code_us(activation=act, labels=labels, reps=n),
    }
    r["one_us"], r["batched_us"] = compute_us(model, reps=100 if smoke else 1000)
    for qos in (0, 1):
        m = r[f"paho_us_qos{qos}"] + r["own_us"]
        r[f"bound_qos{qos}"] = (m + r["one_us"]) / (m + r["batched_us"])
        # The same with our own code free: what paho alone leaves.
        p = r[f"paho_us_qos{qos}"]
        r[f"bound_paho_only_qos{qos}"] = (p + r["one_us"]) / (p + r["batched_us"])
    return r


def report(r: dict) -> None:
    print(
        f"  per device step ({r['model']}, {r['step_bytes']} B messages, one thread, "
        f"nothing else running): paho in+out {r['paho_us_qos0']:.0f} us at QoS 0 / "
        f"{r['paho_us_qos1']:.0f} us at QoS 1; our message code {r['own_us']:.0f} us; "
        f"cloud half {r['one_us']:.0f} us one at a time, {r['batched_us']:.0f} us batched"
    )
    for qos in (0, 1):
        print(
            f"  ceiling at QoS {qos}: batched / one-at-a-time <= {r[f'bound_qos{qos}']:.2f}x "
            f"({r[f'bound_paho_only_qos{qos}']:.2f}x if our message code cost nothing)"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--model", default="digits-cnn")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    report(ceiling(model=a.model, smoke=a.smoke))
