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
from converters.errors import TransportError
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

    def request(self, rid, body, *, shape, codec="float32", model_hash=None, worker=None):
        """Sends an INFER_REQUEST on the uplink, or streams it to ``worker``'s own topic."""
        meta = {"request_id": rid, "codec": codec, "shape": shape,
                "model_hash": model_hash or self.hash}  # fmt: skip
        data = self._encode(MsgType.INFER_REQUEST, meta, body)
        up = worker is None  # else streamed to the worker's own topic, as after a grant
        topic = f"edgesplit/up/{self.id}" if up else f"edgesplit/infer/{self.id}/{worker}"
        with self.cond:
            self.replies.pop(rid, None)
        self.ep.send(topic, data, ack_topic_for_peer=f"edgesplit/down/{self.id}", timeout=10)
        return self._reply(rid)

    def claim(self, rid, size, *, model_hash=None, token=7):
        """Posts an INFER_CLAIM through the shared uplink; returns the grant or the ERROR."""
        meta = {"request_id": rid, "model_hash": model_hash or self.hash, "bytes": size,
                "claim": token}  # fmt: skip
        with self.cond:
            self.replies.pop(rid, None)
        self.ep.post(f"edgesplit/up/{self.id}", self._encode(MsgType.INFER_CLAIM, meta))
        return self._reply(rid)

    def _encode(self, msg_type, meta, body=b""):
        self.seq += 1
        return encode(Envelope(type=msg_type, run_id="infer", round=0, sender=self.id,
                               seq=self.seq, meta=meta, body=body))  # fmt: skip

    def _reply(self, rid):
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
        ServiceConfig(directory="d", broker_url="mqtt://x", max_batch=0, group="a/b",
                      claim_timeout=0)  # fmt: skip
    assert "max_batch must be >= 1, got 0" in str(info.value) and "group" in str(info.value)
    assert "claim_timeout must be in (0, 3600] seconds, got 0" in str(info.value)
    parser = argparse.ArgumentParser(prog="edgesplit")
    register_serve_commands(parser.add_subparsers())
    args = parser.parse_args(
        ["serve", "DIR", "--broker", "mqtt://h:1", "--workers", "3", "--max-batch", "8",
         "--max-delay-ms", "5", "--group", "g", "--claim-timeout", "3"]
    )  # fmt: skip
    assert (args.workers, args.max_batch, args.max_delay_ms, args.group) == (3, 8, 5.0, "g")
    assert args.claim_timeout == 3.0
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


SMALL_FRAMES = {"max_chunk": 256}  # one float32 digits sample is a 468-byte request


def test_request_bigger_than_one_frame_is_claimed_and_answered_by_one_worker(trained, mosquitto):
    directory, test = trained
    x = test.x[:50]
    local = infer(directory, x)  # oracle: edge and cloud halves in this process
    with (
        _service(directory, mosquitto, worker_id="w0") as w0,
        _service(directory, mosquitto, worker_id="w1") as w1,
        RemoteInferer(directory, broker_url=mosquitto.url, device_id="pi-01", codec="float32",
                      mqtt_options=SMALL_FRAMES) as device,
    ):  # fmt: skip
        one = device.infer(x[0], request_id="one")  # a single sample over two frames
        batch = device.infer(x, request_id="batch")  # 50 samples, ~13 KB: one claim, one stream
        streamed = [(s.stats.claims, s.stats.streams, s.stats.replies) for s in (w0, w1)]
        capped = RemoteInferer(directory, broker_url=mosquitto.url, device_id="pi-03",
                               codec="float32", max_rows=16)  # fmt: skip
        with capped:
            by_rows = capped.infer(x)
        refused = r"request_id='c' is \d+ bytes, more than one transport frame \(150 bytes\)"
        with pytest.raises(EdgeInputError, match=refused):
            tiny = RemoteInferer(directory, broker_url=mosquitto.url, device_id="pi-02",
                                 codec="float32", mqtt_options={"max_chunk": 150})  # fmt: skip
            with tiny:
                tiny.infer(x[:1], request_id="c")
        open_claims = w0.open_claims + w1.open_claims
    np.testing.assert_allclose(_probs(one)[0], _probs(local)[0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(_probs(batch), _probs(local), atol=1e-6, rtol=0)
    assert [r["row"] for r in batch["rows"]] == list(range(50))
    assert one["requests"] == batch["requests"] == 1
    # Each big request was granted, streamed to and answered by one worker, and only there.
    assert sum(c for c, _, _ in streamed) == 2 and all(c == s == r for c, s, r in streamed)
    by_worker = {w: r for w, (_, _, r) in zip(("w0", "w1"), streamed, strict=True)}
    assert by_worker[one["worker"]] >= 1 and by_worker[batch["worker"]] >= 1
    assert open_claims == 0 and device.duplicates == device.stale == 0
    assert by_rows["requests"] == 4  # 16 + 16 + 16 + 2 rows, through the shared uplink
    np.testing.assert_allclose(_probs(by_rows), _probs(local), atol=1e-6, rtol=0)


def test_concurrent_large_requests_are_each_answered_once(trained, mosquitto):
    directory, test = trained
    rng = np.random.default_rng(0)
    # 4 devices x 2 threads x 4 requests of 1-3 samples, every one bigger than a frame.
    picks = {(d, t, k): rng.choice(len(test.x), size=int(rng.integers(1, 4)), replace=False)
             for d in range(4) for t in range(2) for k in range(4)}  # fmt: skip
    devices = [
        RemoteInferer(directory, broker_url=mosquitto.url, device_id=f"pi-{d}", codec="float32",
                      mqtt_options=SMALL_FRAMES).connect()
        for d in range(4)
    ]  # fmt: skip
    results = {}
    try:
        with (
            _service(directory, mosquitto, worker_id="w0", max_delay_ms=5) as w0,
            _service(directory, mosquitto, worker_id="w1", max_delay_ms=5) as w1,
        ):
            barrier = threading.Barrier(8)

            def run(dt):
                d, t = dt
                barrier.wait()
                for k in range(4):
                    rows = test.x[picks[(d, t, k)]]
                    results[(d, t, k)] = devices[d].infer(rows, request_id=f"r{t}-{k}")

            with ThreadPoolExecutor(8) as pool:
                list(pool.map(run, [(d, t) for d in range(4) for t in range(2)]))
            stats = [s.stats.as_dict() for s in (w0, w1)]
    finally:
        for d in devices:
            d.close()
    assert len(results) == 32
    everything = np.concatenate([test.x[i] for i in picks.values()])
    want = _probs(infer(directory, everything))
    got = np.concatenate([_probs(results[key]) for key in picks])
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert {r["worker"] for r in results.values()} == {"w0", "w1"}
    assert sum(s["claims"] for s in stats) == sum(s["streams"] for s in stats) == 32
    assert sum(s["replies"] for s in stats) == 32  # no request computed or answered twice
    assert sum(s["errors"] + s["unclaimed"] + s["expired"] for s in stats) == 0
    assert sum(d.duplicates + d.stale for d in devices) == 0


def test_stream_without_claim_and_abandoned_claim_are_refused_and_forgotten(trained, mosquitto):
    directory, test = trained
    good = b"EA\x01\x01" + np.zeros((1, 16, 2, 2), "<f4").tobytes()  # float32 payload
    with _service(directory, mosquitto, claim_timeout=0.5) as service:
        raw = _RawDevice(mosquitto.url, "pi-raw", service.model_hash)
        honest = RemoteInferer(directory, broker_url=mosquitto.url, device_id="pi-good",
                               codec="float32", mqtt_options=SMALL_FRAMES)  # fmt: skip
        plain = RemoteInferer(directory, broker_url=mosquitto.url, device_id="pi-plain",
                              codec="float32")  # fmt: skip
        with honest, plain:
            unclaimed = raw.request("s1", good, shape=[1, 16, 2, 2], worker="infer-0")
            other_model = raw.claim("c1", 500, model_hash="0" * 64)
            too_big = raw.claim("c2", 2**40)
            grant = raw.claim("c3", 500, token=42)
            held = service.open_claims
            small = plain.infer(test.x[0], request_id="ok-small")  # one frame: no claim
            time.sleep(0.6)  # past claim_timeout: c3 is forgotten
            forgotten = service.open_claims
            late = raw.request("c3", good, shape=[1, 16, 2, 2], worker="infer-0")
            big = honest.infer(test.x[:3], request_id="ok-big")
            again = raw.claim("c4", 500)
            served = raw.request("c4", good, shape=[1, 16, 2, 2], worker="infer-0")
        raw.ep.close()
    assert unclaimed.type == MsgType.ERROR and unclaimed.meta["code"] == "unclaimed"
    assert unclaimed.meta["error"] == (
        "request_id 's1' has no open claim on worker infer-0 (none granted, or the stream came "
        "after claim_timeout=0.5 s); send INFER_CLAIM through the shared uplink first"
    )
    assert other_model.type == MsgType.ERROR and other_model.meta["code"] == "model_hash"
    assert too_big.type == MsgType.ERROR and too_big.meta["code"] == "too_large"
    assert "claimed request must be 1..268435456 bytes, got 1099511627776" in too_big.meta["error"]
    assert grant.type == MsgType.INFER_CLAIM
    assert grant.meta == {"request_id": "c3", "worker": "infer-0", "claim": 42}
    assert (held, forgotten) == (1, 0)
    assert late.type == MsgType.ERROR and late.meta["code"] == "unclaimed"
    assert again.type == MsgType.INFER_CLAIM and served.type == MsgType.INFER_REPLY
    for env in (unclaimed, other_model, too_big, late):
        assert "\n" not in env.meta["error"]
    want = _probs(infer(directory, test.x[:3]))
    np.testing.assert_allclose(_probs(small)[0], want[0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(_probs(big), want, atol=1e-6, rtol=0)
    st = service.stats
    assert (st.unclaimed, st.expired, st.errors, st.replies) == (2, 1, 4, 3)
    assert (st.claims, st.streams) == (3, 2)  # c3, ok-big, c4 granted; ok-big and c4 streamed


def test_worker_killed_after_its_claim_is_replaced_on_retry(trained, mosquitto):
    directory, test = trained
    procs = {f"w{i}": _start_worker(directory, mosquitto.url, f"w{i}") for i in range(2)}
    device = RemoteInferer(
        directory, broker_url=mosquitto.url, device_id="pi-k", codec="float32", timeout=3.0,
        mqtt_options={**SMALL_FRAMES, "ack_timeout": 0.3, "retries": 2},
    )  # fmt: skip
    killed = []
    send = device.endpoint.send

    def kill_then_send(topic, payload, **kw):
        # The grant came, the stream has not left: kill the worker that granted the claim.
        if not killed and "/infer/" in topic:
            killed.append(topic.rsplit("/", 1)[1])
            procs[killed[0]].send_signal(signal.SIGKILL)
            procs[killed[0]].wait(timeout=10)
        return send(topic, payload, **kw)

    device.endpoint.send = kill_then_send
    try:
        for p in procs.values():
            _wait_ready(p)
        with device:
            result = device.infer(test.x[:3], request_id="k1", retries=2)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            p.wait(timeout=20)
    survivor = ({"w0", "w1"} - set(killed)).pop()
    assert len(killed) == 1 and result["worker"] == survivor
    np.testing.assert_allclose(_probs(result), _probs(infer(directory, test.x[:3])), atol=1e-6)
    assert device.duplicates == 0
    assert procs[survivor].returncode == 0


def test_claimed_stream_passes_the_generated_broker_acl(trained, mosquitto_acl):
    directory, test = trained
    b, pw = mosquitto_acl, mosquitto_acl.credentials
    cloud_url = f"mqtt://cloud:{pw['cloud']}@{b.host}:{b.port}"
    device_url = f"mqtt://pi-01:{pw['pi-01']}@{b.host}:{b.port}"
    config = ServiceConfig(directory=str(directory), broker_url=cloud_url, prefix="es")
    with InferenceService(config) as service, RemoteInferer(
        directory, broker_url=device_url, device_id="pi-01", prefix="es", codec="float32",
        mqtt_options={**SMALL_FRAMES, "ack_timeout": 0.3, "retries": 1},
    ) as device:  # fmt: skip
        result = device.infer(test.x[:2])
        # The ACL lets a device stream only under its own id.
        with pytest.raises(TransportError, match="broker refused a frame"):
            device.endpoint.send("es/infer/pi-02/infer-0", b"x" * 600,
                                 ack_topic_for_peer="es/down/pi-01")  # fmt: skip
    np.testing.assert_allclose(_probs(result), _probs(infer(directory, test.x[:2])), atol=1e-6)
    assert service.stats.streams == 1
