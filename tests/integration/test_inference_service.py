"""Split inference over a real Mosquitto: device (edge ONNX) <-> broker <-> inference workers."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from cloud.inference_service import InferenceService, ServiceConfig
from cloud.serve_commands import READY
from converters.activation_codec import attach_pca
from converters.commands import export_split_dir
from converters.datasets import load_dataset, train_test_split
from converters.mqtt import MqttConfig, MqttEndpoint
from converters.wire import Envelope, MsgType, decode, encode
from edge.commands import infer
from edge.errors import EdgeInputError, ModelMismatchError
from edge.remote_infer import RemoteInferer
from split.graph import split_model
from split.manifest import Manifest
from split.store import save_split
from split.train import train_centralized
from split.zoo import build_model

pytestmark = pytest.mark.integration
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained digits-cnn split dir with edge.onnx and a 16-dim PCA; plus held-out digits."""
    train, test = train_test_split(load_dataset("digits"), test_fraction=0.25, seed=0)
    model, spec = build_model("digits-cnn", seed=0)
    train_centralized(model, train.x, train.y, epochs=10, lr=0.05, momentum=0.9, seed=0)
    model.eval()
    sm = split_model(model, cut=spec.default_cut, example_input=torch.zeros(2, *spec.input_shape))
    out = tmp_path_factory.mktemp("infer-split")
    save_split(sm, model, model_ref="digits-cnn", num_classes=10, out_dir=out)
    export_split_dir(out)
    attach_pca(out, train.x, dim=16)
    return out, test


def _service(directory, broker, **kw) -> InferenceService:
    return InferenceService(ServiceConfig(directory=str(directory), broker_url=broker.url, **kw))


def _probs(result) -> np.ndarray:
    return np.array([r["probabilities"] for r in result["rows"]])


def test_predictions_equal_local_infer(trained, mosquitto):
    directory, test = trained
    x = test.x[:40]
    local = infer(directory, x)
    with (
        _service(directory, mosquitto),
        RemoteInferer(
            directory, broker_url=mosquitto.url, device_id="pi-01", codec="float32"
        ) as device,
    ):
        batch = device.infer(x)
        singles = [device.infer(x[i]) for i in range(5)]
        default = RemoteInferer(directory, broker_url=mosquitto.url, device_id="pi-02")
        with default:
            compact = default.infer(test.x)
    assert [r["class"] for r in batch["rows"]] == [r["class"] for r in local["rows"]]
    np.testing.assert_allclose(_probs(batch), _probs(local), atol=1e-6, rtol=0)
    for i, one in enumerate(singles):
        assert len(one["rows"]) == 1
        np.testing.assert_allclose(_probs(one)[0], _probs(local)[i], atol=1e-6, rtol=0)
    # The default codec (int8 PCA codes) keeps the held-out accuracy within 0.5 points.
    assert compact["codec"] == "pca:16+int8"
    full = np.array([r["class"] for r in infer(directory, test.x)["rows"]])
    got = np.array([r["class"] for r in compact["rows"]])
    assert (got == test.y).mean() >= (full == test.y).mean() - 0.005


_NO_TORCH_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.modules["torch"] = None
    import numpy as np
    from edge.remote_infer import infer_remote
    directory, x_path, url = sys.argv[1:4]
    out = infer_remote(directory, np.load(x_path), broker_url=url, device_id="pi-nt",
                       variant=sys.argv[4], timeout=20)
    heavy = sorted(m for m in ("torch", "onnx", "sklearn") if sys.modules.get(m) is not None)
    print(json.dumps({"classes": [r["class"] for r in out["rows"]], "heavy": heavy,
                      "codec": out["codec"]}))
    """
)


@pytest.mark.parametrize("variant", ["fp32", "pca"])
def test_device_process_without_torch(trained, mosquitto, tmp_path, variant):
    directory, test = trained
    x = test.x[:12]
    np.save(tmp_path / "x.npy", x)
    with _service(directory, mosquitto):
        proc = subprocess.run(
            [sys.executable, "-c", _NO_TORCH_CHILD, str(directory), str(tmp_path / "x.npy"),
             mosquitto.url, variant],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    assert child["heavy"] == []
    assert child["codec"] == "pca:16+int8"
    want = [r["class"] for r in infer(directory, x)["rows"]]
    assert np.mean(np.array(child["classes"]) == np.array(want)) >= 11 / 12


def test_hash_mismatch_is_refused(trained, mosquitto, tmp_path):
    directory, test = trained
    stale = tmp_path / "stale"
    shutil.copytree(directory, stale)
    manifest = Manifest.load(stale)
    manifest.extra["note"] = "older export"
    manifest.save(stale)
    with _service(directory, mosquitto) as service:
        old = RemoteInferer(stale, broker_url=mosquitto.url, device_id="pi-old")
        with old, pytest.raises(ModelMismatchError) as info:
            old.infer(test.x[:2])
        with RemoteInferer(directory, broker_url=mosquitto.url, device_id="pi-ok") as ok:
            assert len(ok.infer(test.x[:3])["rows"]) == 3
    msg = str(info.value)
    assert "\n" not in msg
    assert msg == (
        f"model hash {manifest.digest()[:8]}... != cloud's {service.model_hash[:8]}...; "
        "re-export or update the device"
    )
    assert service.stats.errors == 1 and service.stats.replies == 1


class _RawDevice:
    """A device speaking the wire protocol by hand, to send what RemoteInferer never would."""

    def __init__(self, url, device_id, model_hash):
        self.id, self.hash, self.seq = device_id, model_hash, 0
        self.replies = {}
        self.cond = threading.Condition()
        self.ep = MqttEndpoint(MqttConfig.from_url(url, client_id=device_id))
        self.ep.connect()
        self.ep.subscribe(f"edgesplit/down/{device_id}", self._on)

    def _on(self, topic, sender, payload):
        env = decode(payload)
        with self.cond:
            self.replies[env.meta.get("request_id")] = env
            self.cond.notify_all()

    def request(self, rid, body, *, shape, codec="float32", model_hash=None):
        self.seq += 1
        meta = {"request_id": rid, "codec": codec, "shape": shape,
                "model_hash": model_hash or self.hash}  # fmt: skip
        env = Envelope(type=MsgType.INFER_REQUEST, run_id="infer", round=0, sender=self.id,
                       seq=self.seq, meta=meta, body=body)  # fmt: skip
        self.ep.send(f"edgesplit/up/{self.id}", encode(env), timeout=10)
        with self.cond:
            assert self.cond.wait_for(lambda: rid in self.replies, timeout=10), rid
            return self.replies[rid]


def test_bad_activation_refused_and_service_keeps_answering(trained, mosquitto):
    directory, test = trained
    head = b"EA\x01\x01"  # float32 activation payload header
    good = head + np.zeros((1, 16, 2, 2), "<f4").tobytes()
    nan = head + np.full((1, 16, 2, 2), np.nan, "<f4").tobytes()
    with _service(directory, mosquitto) as service:
        raw = _RawDevice(mosquitto.url, "pi-bad", service.model_hash)
        honest = RemoteInferer(directory, broker_url=mosquitto.url, device_id="pi-good")
        with honest:
            cases = {
                "nan": raw.request("nan", nan, shape=[1, 16, 2, 2]),
                "shape": raw.request("shape", good, shape=[1, 16, 4, 1]),
                "short": raw.request("short", good[:-4], shape=[1, 16, 2, 2]),
                "codec": raw.request("codec", good, shape=[1, 16, 2, 2], codec="zfp"),
            }
            answered = honest.infer(test.x[:4])
            ok = raw.request("ok", good, shape=[1, 16, 2, 2])
        raw.ep.close()
    for name, env in cases.items():
        assert env.type == MsgType.ERROR, name
        assert "\n" not in env.meta["error"]
    assert cases["nan"].meta["code"] == "bad_activation" and "NaN" in cases["nan"].meta["error"]
    assert "activation shape must be" in cases["shape"].meta["error"]
    assert cases["codec"].meta["code"] == "bad_codec" and "zfp" in cases["codec"].meta["error"]
    assert len(answered["rows"]) == 4
    assert ok.type == MsgType.INFER_REPLY
    assert service.stats.errors == 4 and service.stats.replies == 2


def test_retry_with_same_request_id_is_answered_once(trained, mosquitto):
    directory, test = trained
    with (
        _service(directory, mosquitto) as service,
        RemoteInferer(directory, broker_url=mosquitto.url, device_id="pi-01") as device,
    ):
        first = device.infer(test.x[:3], request_id="req-7")
        again = device.infer(test.x[:3], request_id="req-7")
    assert _probs(first).tolist() == _probs(again).tolist()
    assert first["worker"] == again["worker"] == "infer-0"
    # One forward of 3 rows; the retry was replayed from the cache.
    assert service.stats.rows == 3 and service.stats.replayed == 1
    assert device.duplicates == 0


def test_concurrent_requests_are_batched(trained, mosquitto):
    directory, test = trained
    devices = [
        RemoteInferer(directory, broker_url=mosquitto.url, device_id=f"pi-{i:02d}").connect()
        for i in range(8)
    ]
    try:
        with _service(directory, mosquitto, max_batch=4, max_delay_ms=100) as service:
            barrier = threading.Barrier(len(devices))

            def one(i):
                barrier.wait()
                return devices[i].infer(test.x[i])

            with ThreadPoolExecutor(len(devices)) as pool:
                results = list(pool.map(one, range(len(devices))))
    finally:
        for d in devices:
            d.close()
    local = infer(directory, test.x[:8])
    assert [r["rows"][0]["class"] for r in results] == [r["class"] for r in local["rows"]]
    assert service.stats.replies == 8
    assert 2 <= service.stats.batches <= 4  # 8 requests, at most 4 per forward


def _start_worker(directory, url, worker_id):
    code = "import sys; from cloud.serve_commands import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(directory), "--broker", url, "--id", worker_id,
         "--group", "g1", "--max-delay-ms", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    return proc


def _wait_ready(proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if line.startswith(READY):
                return
            if not line and proc.poll() is not None:
                break
    raise AssertionError(f"worker did not become ready (exit code {proc.poll()})")


def test_two_workers_share_load_and_survive_a_kill(trained, mosquitto):
    directory, test = trained
    procs = [_start_worker(directory, mosquitto.url, f"w{i}") for i in range(2)]
    opts = {"ack_timeout": 0.3, "retries": 10}
    devices = [
        RemoteInferer(
            directory, broker_url=mosquitto.url, device_id=f"pi-{i}", mqtt_options=opts, timeout=2.5
        ).connect()  # fmt: skip
        for i in range(4)
    ]
    outcomes: dict[tuple[int, int], list] = {}
    killed = threading.Event()

    def run(dev):
        for k in range(30):
            if k == 10 and dev == 0:
                procs[0].send_signal(signal.SIGKILL)
                killed.set()
            rid = f"r{dev}-{k}"
            after = killed.is_set()
            try:
                res = devices[dev].infer(test.x[k], request_id=rid)
                outcomes[(dev, k)] = ["ok", res["worker"], after]
            except TimeoutError:
                # Lost with the dead worker: the device is told, then retries the same id.
                res = devices[dev].infer(test.x[k], request_id=rid, retries=3)
                outcomes[(dev, k)] = ["retried", res["worker"], after]

    try:
        for p in procs:
            _wait_ready(p)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(run, range(4)))
    finally:
        for d in devices:
            d.close()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            p.wait(timeout=20)
    assert len(outcomes) == 120  # every request answered, none silently lost
    workers_before = {w for status, w, after in outcomes.values() if not after}
    assert workers_before == {"w0", "w1"}  # the broker spread the load over both
    late = [w for status, w, after in outcomes.values() if after and status == "ok"]
    assert late and set(late[len(late) // 2 :]) == {"w1"}  # the survivor took over
    assert sum(d.duplicates for d in devices) == 0  # nothing was answered twice
    assert procs[1].returncode == 0


def test_service_config_and_serve_flags_are_validated(trained):
    import argparse

    from cloud.serve_commands import register_serve_commands
    from converters.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        ServiceConfig(directory="d", broker_url="mqtt://x", max_batch=0, group="a/b")
    assert "max_batch must be >= 1, got 0" in str(info.value) and "group" in str(info.value)
    parser = argparse.ArgumentParser(prog="edgesplit")
    register_serve_commands(parser.add_subparsers())
    args = parser.parse_args(
        ["serve", "DIR", "--broker", "mqtt://h:1", "--workers", "3", "--max-batch", "8",
         "--max-delay-ms", "5", "--group", "g"]
    )  # fmt: skip
    assert (args.workers, args.max_batch, args.max_delay_ms, args.group) == (3, 8, 5.0, "g")
    args.workers = 0
    with pytest.raises(ValueError, match="--workers must be >= 1, got 0"):
        args.func(args)


def test_lost_request_times_out_then_retry_is_answered(trained, mosquitto):
    directory, test = trained
    # A worker that takes requests off the shared subscription (and acks them) but dies
    # before answering: the device must get a TimeoutError, never silence.
    hole = MqttEndpoint(MqttConfig.from_url(mosquitto.url, client_id="black-hole"))
    hole.connect()
    taken = []
    hole.subscribe("$share/infer/edgesplit/up/+", lambda t, s, p: taken.append(decode(p)))
    opts = {"ack_timeout": 0.3, "retries": 3}
    device = RemoteInferer(directory, broker_url=mosquitto.url, device_id="pi-01",
                           mqtt_options=opts, timeout=1.0).connect()  # fmt: skip
    try:
        with pytest.raises(TimeoutError, match="no INFER_REPLY for request_id='q1' within 1.0 s"):
            device.infer(test.x[:2], request_id="q1")
        assert [e.meta["request_id"] for e in taken] == ["q1"]
        hole.close()
        with pytest.raises(TimeoutError, match="no inference worker acknowledged"):
            device.infer(test.x[:2], request_id="q1")
        with _service(directory, mosquitto) as service:
            result = device.infer(test.x[:2], request_id="q1")
    finally:
        device.close()
    want = [r["class"] for r in infer(directory, test.x[:2])["rows"]]
    assert [r["class"] for r in result["rows"]] == want
    assert service.stats.replies == 1 and device.duplicates == 0


def test_qos0_service_answers_like_qos1(trained, mosquitto):
    directory, test = trained
    local = infer(directory, test.x[:6])
    with _service(directory, mosquitto, qos=0) as service, RemoteInferer(
        directory, broker_url=mosquitto.url, device_id="pi-q0", codec="float32",
        mqtt_options={"qos": 0},
    ) as device:  # fmt: skip
        results = [device.infer(test.x[i : i + 2]) for i in range(0, 6, 2)]
    got = np.concatenate([_probs(r) for r in results])
    np.testing.assert_allclose(got, _probs(local), atol=1e-6, rtol=0)
    assert service.stats.replies == 3 and device.duplicates == 0


@pytest.mark.slow  # ~20 s: two worker start-ups, a restart and the 5 s minimum uptime
def test_serve_supervisor_restarts_a_killed_worker(trained, mosquitto):
    directory, test = trained
    code = "import sys; from cloud.serve_commands import main; sys.exit(main(sys.argv[1:]))"
    sup = subprocess.Popen(
        [sys.executable, "-c", code, str(directory), "--broker", mosquitto.url, "--workers", "2",
         "--id", "s"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    lines: list[str] = []

    def wait_for(pred, timeout=90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([sup.stdout], [], [], 0.5)[0]:
                line = sup.stdout.readline()
                lines.append(line)
                if pred(line):
                    return line
        raise AssertionError(f"timed out; output so far: {lines}")

    try:
        first = wait_for(lambda ln: ln.startswith(READY))
        wait_for(lambda ln: ln.startswith(READY))
        victim = first.split()[2]  # "ready worker s-0 pid 123 ..."
        pid = int(first.split()[4])
        time.sleep(5.5)  # past the supervisor's minimum uptime for a restart
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda ln: ln.startswith(f"worker {victim} exited with -9; restarting"))
        again = wait_for(lambda ln: ln.startswith(READY))
        assert again.split()[2] == victim and int(again.split()[4]) != pid
        with RemoteInferer(directory, broker_url=mosquitto.url, device_id="pi-01") as device:
            assert len(device.infer(test.x[:2])["rows"]) == 2
    finally:
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=30) == 0
    # The workers stopped with the supervisor (each prints its stats on the way out).
    rest = sup.stdout.read()
    assert rest.count('"worker": "s-') == 2, rest


def test_dedupe_cache_is_bounded_by_bytes(trained, mosquitto):
    directory, test = trained
    # A 1-byte budget evicts every answer at once: a retry is then computed again.
    with (
        _service(directory, mosquitto, dedupe_bytes=1) as service,
        RemoteInferer(directory, broker_url=mosquitto.url, device_id="pi-01") as device,
    ):
        first = device.infer(test.x[:3], request_id="req-8")
        again = device.infer(test.x[:3], request_id="req-8")
    assert _probs(first).tolist() == _probs(again).tolist()
    assert service.stats.rows == 6 and service.stats.replayed == 0


def test_batch_bigger_than_one_frame_goes_out_in_slices(trained, mosquitto):
    directory, test = trained
    x = test.x[:50]  # 50 x 256 B float32 activations; frames capped at 4 KiB below
    local = infer(directory, x)
    with _service(directory, mosquitto) as service, RemoteInferer(
        directory, broker_url=mosquitto.url, device_id="pi-01", codec="float32",
        mqtt_options={"max_chunk": 4096},
    ) as device:  # fmt: skip
        result = device.infer(x, request_id="big")
        capped = RemoteInferer(directory, broker_url=mosquitto.url, device_id="pi-03",
                               codec="float32", max_rows=16)  # fmt: skip
        with capped:
            by_rows = capped.infer(x)
        with pytest.raises(EdgeInputError, match="one sample's request is"):
            tiny = RemoteInferer(directory, broker_url=mosquitto.url, device_id="pi-02",
                                 codec="float32", mqtt_options={"max_chunk": 200})  # fmt: skip
            with tiny:
                tiny.infer(x[:1])
    assert by_rows["requests"] == 4  # 16 + 16 + 16 + 2 rows
    assert result["requests"] == service.stats.replies - 4 > 1
    np.testing.assert_allclose(_probs(by_rows), _probs(local), atol=1e-6, rtol=0)
    assert [r["row"] for r in result["rows"]] == list(range(50))
    np.testing.assert_allclose(_probs(result), _probs(local), atol=1e-6, rtol=0)
