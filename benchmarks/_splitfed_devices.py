"""Load generator for the SplitFed cloud benchmark: devices that replay fixed activations.

Run as ``python benchmarks/_splitfed_devices.py --broker URL --model M --count N ...``. Each
device is a real :class:`edge.split_client.SplitClient` (own MQTT connection, presence, the
real step exchange and codecs) whose local data ARE activations at the cut: a step sends a
batch of them with its labels and decodes the cloud's gradient, but skips the edge forward and
backward. The cloud therefore sees exactly the traffic of real devices while the devices cost
little, so the benchmark measures what the cloud sustains, not what a 2-core machine can
simulate of 50 phones.

The replay round is lean on purpose: its batches are cut once, in a fixed order (contiguous
NumPy arrays, no torch and no optimizer per step), and the UPDATE that ends the round sends the
device half it was given back unchanged (what the cloud checks is its names and shapes).
``_splitfed_cloud.py`` spreads the devices over two such processes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _replay_client_class():
    from converters.wire import MsgType, encode
    from edge.errors import SplitProtocolError
    from edge.split_client import SplitClient, _parse_model_meta

    class ReplayClient(SplitClient):
        """A device whose local data are activations at the cut (non-U-shaped modes)."""

        _cut: tuple[int, list] | None = None  # (batch size, [(activation, labels), ...])

        def _batches(self, bs: int) -> list:
            if self._cut is None or self._cut[0] != bs:
                x = np.ascontiguousarray(self.x, dtype=np.float32)
                y = np.ascontiguousarray(self.y, dtype=np.int64)
                self._cut = (bs, [(x[s : s + bs], y[s : s + bs]) for s in range(0, len(y), bs)])
            return self._cut[1]

        def _train(self, env) -> None:
            cfg, mode, _, _ = _parse_model_meta(env.meta)
            if mode == "ushaped":
                raise SplitProtocolError("replay devices hold no head; use a non-U-shaped mode")
            self._codec = str(cfg.get("act_codec", "float32"))
            self._via_workers, self._worker = env.meta.get("steps") == "workers", None
            epochs, batches = int(cfg["epochs"]), self._batches(int(cfg["batch_size"]))
            t0, step, last = time.perf_counter(), 0, epochs * len(batches)
            for epoch in range(epochs):
                for xb, yb in batches:
                    step += 1
                    meta = {"epoch": epoch, "batch": len(yb)}
                    if self._via_workers and step == last:
                        meta["last"] = True  # the worker then sends our cloud-half copy on
                    tensors = {"activation": xb, "labels": yb}
                    reply = self._exchange(
                        env, step, MsgType.ACTIVATION, meta, tensors, MsgType.GRADIENT
                    )
                    self._reply_tensor(reply, MsgType.GRADIENT, "grad", xb.shape)
                    self.steps += 1
            n = len(self.y)
            metrics = {"steps": step, "train_seconds": time.perf_counter() - t0, "samples": n}
            update = env.reply(
                type=MsgType.UPDATE,
                sender=self.id,
                seq=self._next_seq(),
                meta={"num_samples": n, "metrics": metrics},
                body=env.body,  # the device half as received: float32, the names the cloud expects
            )
            self.endpoint.send(
                self.topics.up(self.id), encode(update), timeout=self.options.send_timeout
            )
            self.rounds_trained += 1

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
    from converters.datasets import load_dataset, synthetic
    from converters.mqtt import MqttConfig
    from edge.split_client import SplitClientOptions
    from split.graph import split_model
    from split.zoo import build_model

    model, spec = build_model(args.model, seed=0)
    sm = split_model(model, cut=spec.default_cut, example_input=torch.zeros(2, *spec.input_shape))
    # Digits for the digits models; a synthetic set of the model's input shape otherwise (no
    # data is fetched at run time).
    data = (
        load_dataset("digits")
        if tuple(spec.input_shape) == (1, 8, 8)
        else synthetic(n=512, shape=tuple(spec.input_shape), num_classes=spec.num_classes, seed=0)
    )
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
