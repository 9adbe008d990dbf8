"""Load generator for the SplitFed cloud benchmark: devices that replay fixed activations.

Run as ``python benchmarks/_splitfed_devices.py --broker URL --model M --count N ...``. Each
device is a real :class:`edge.split_client.SplitClient` (own MQTT connection, presence, the
real step protocol and codecs) whose local data ARE activations at the cut: a step sends a
batch of them with its labels and decodes the cloud's gradient, but skips the edge forward and
backward. The cloud therefore sees exactly the traffic of real devices while the devices cost
almost nothing, so the benchmark measures what the cloud sustains, not what a 2-core machine
can simulate of 50 phones.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _replay_client_class():
    from converters.wire import MsgType
    from edge.split_client import SplitClient

    class ReplayClient(SplitClient):
        def _step(self, env, step, meta, sm, xb, yb):
            a_np = xb.numpy()
            reply = self._exchange(
                env,
                step,
                MsgType.ACTIVATION,
                meta,
                {"activation": a_np, "labels": yb},
                MsgType.GRADIENT,
            )
            self._reply_tensor(reply, MsgType.GRADIENT, "grad", a_np.shape)
            return None

    return ReplayClient


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--broker", required=True)
    p.add_argument("--prefix", default="edgesplit")
    p.add_argument("--model", default="digits-cnn")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--samples", type=int, default=256, help="samples per device")
    p.add_argument("--max-seconds", type=float, default=600.0)
    p.add_argument("--qos", type=int, default=1)
    p.add_argument("--protocol", default="v5")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from converters.datasets import load_dataset
    from converters.mqtt import MqttConfig
    from edge.split_client import SplitClientOptions
    from split.graph import split_model
    from split.zoo import build_model

    model, spec = build_model(args.model, seed=0)
    sm = split_model(model, cut=spec.default_cut, example_input=torch.zeros(2, *spec.input_shape))
    data = load_dataset("digits")
    with torch.no_grad():
        acts = sm.edge(torch.as_tensor(data.x[:512], dtype=torch.float32)).numpy()
    labels = data.y[:512]
    cls = _replay_client_class()
    executor = ThreadPoolExecutor(max_workers=args.count, thread_name_prefix="dev")
    clients = []
    for i in range(args.first, args.first + args.count):
        dev = f"dev-{i:04d}"
        idx = (np.arange(args.samples) + 37 * i) % len(acts)
        client = cls(
            options=SplitClientOptions(device_id=dev, prefix=args.prefix),
            mqtt=MqttConfig.from_url(
                args.broker, client_id=dev, qos=args.qos, protocol=args.protocol
            ),
            x=acts[idx],
            y=labels[idx],
            executor=executor,
        )
        client.start()
        clients.append(client)
    print("ready", flush=True)
    deadline = time.monotonic() + args.max_seconds
    try:
        while time.monotonic() < deadline and not all(c.finished.is_set() for c in clients):
            time.sleep(0.1)
    finally:
        for c in clients:
            c.stop()
        executor.shutdown(wait=False, cancel_futures=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
