"""HALF_REQUEST names the step's session and step replies echo it (no broker).

After a coordinator restart with the same run id, the old session's late HALF may reach a step
worker after its request for the new session: it is skipped, never the live step's ERROR.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud.config import FederatedConfig
from cloud.round_state import RoundState
from cloud.split_session import CloudHalf, StepInput
from cloud.split_trainer import SplitTrainer
from cloud.split_worker import SplitStepWorker
from converters.mqtt import MqttConfig
from converters.tensor_codec import decode_tensors, encode_tensors
from converters.wire import Envelope, MsgType, decode, encode
from split.graph import split_template

DEVICE, LR, MOMENTUM = "dev-0000", 0.1, 0.9


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    own = split_template("digits-mlp", "act1").cloud.state_dict()
    return {
        k: (v.numpy() + 0.05 * rng.standard_normal(v.shape)).astype(np.float32)
        for k, v in own.items()
    }


def _half(params: dict, session) -> Envelope:
    meta = {"model": "digits-mlp", "cut": "act1", "batch_size": 4, "lr": LR, "momentum": MOMENTUM,
            "act_codec": "float32", "num_classes": 10, "step_qos": 1}  # fmt: skip
    if session is not None:
        meta["session"] = session
    return Envelope(type=MsgType.HALF, run_id="run", round=1, sender="cloud", seq=1, meta=meta,
                    body=encode_tensors(params, codec="float32"))  # fmt: skip


def _tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "activation": rng.standard_normal((4, 64)).astype(np.float32),
        "labels": rng.integers(0, 10, 4).astype(np.int64),
    }


def _step(step: int, session, *, seed: int, batch=4, sender=DEVICE) -> bytes:
    meta = {"step": step, "batch": batch, "epoch": 0}
    if session is not None:
        meta["session"] = session
    env = Envelope(type=MsgType.ACTIVATION, run_id="run", round=1, sender=sender, seq=step,
                   meta=meta, body=encode_tensors(_tensors(seed)))  # fmt: skip
    return encode(env)


# -- step worker -------------------------------------------------------------------------------


@pytest.fixture
def worker():
    """A worker never started: each HALF_REQUEST is answered with every queued message of
    ``w.answers.pop(0)`` (a list, in order); requests and step replies are recorded."""
    w = SplitStepWorker(worker_id="w0", group="g", prefix="ws",
                        mqtt=MqttConfig(client_id="w0", port=1), fetch_timeout=0.5)  # fmt: skip
    w.answers, w.requests, w.replies = [], [], []
    w._post = lambda device, payload: w.replies.append(decode(payload))

    def send(topic, payload, **kw):
        env = decode(payload)
        assert env.type == MsgType.HALF_REQUEST, env.type
        w.requests.append(env)
        for answer in w.answers.pop(0):
            w._fetched.put(answer)

    w.endpoint.send = send
    yield w
    w.endpoint.close()


def _serve(w: SplitStepWorker, payload: bytes) -> Envelope:
    w._on_step("ws/steps/dev-0000", DEVICE, payload)
    w._work.put(None)
    w._loop()  # returns at the None above
    return w.replies[-1]


def test_a_late_half_of_the_old_session_is_skipped_and_the_right_one_used(worker, caplog):
    old, new = _params(1), _params(2)
    # The old coordinator's late HALF lands first, then the live session's answer.
    worker.answers.append([_half(old, "A"), _half(new, "B")])
    with caplog.at_level("INFO", logger="cloud.split_worker"):
        reply = _serve(worker, _step(1, "B", seed=7))
    assert [r.meta.get("session") for r in worker.requests] == ["B"]
    assert reply.type == MsgType.GRADIENT and reply.meta["step"] == 1, reply.meta
    assert reply.meta["session"] == "B"
    assert worker.rejected == 0 and list(worker._halves) == [("run", 1, "B")]
    assert any("got 'A'" in r.getMessage() and r.levelname == "INFO" for r in caplog.records)
    # Oracle: CloudHalf on session B's parameters, driven by hand.
    module = split_template("digits-mlp", "act1").cloud
    module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in new.items()})
    half = CloudHalf(mode="splitfed-v1", module=module, lr=LR, momentum=MOMENTUM, num_classes=10)
    t = _tensors(7)
    (want,) = half.train_step([StepInput(DEVICE, 1, t["activation"], t["labels"])])
    got = decode_tensors(reply.body)["grad"] / np.float32(reply.meta["scale"])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_an_error_echoing_another_session_is_skipped_one_echoing_ours_fails_the_step(worker):
    late = Envelope(type=MsgType.ERROR, run_id="run", round=1, sender="cloud", seq=2,
                    meta={"error": "round 1 is not running", "session": "A"})  # fmt: skip
    worker.answers.append([late, _half(_params(2), "B")])
    assert _serve(worker, _step(1, "B", seed=1)).type == MsgType.GRADIENT
    refused = Envelope(type=MsgType.ERROR, run_id="run", round=1, sender="cloud", seq=3,
                       meta={"error": "meta.session must be this cloud's session 'C', got 'D'",
                             "session": "D"})  # fmt: skip
    worker.answers.append([refused])
    err = _serve(worker, _step(1, "D", seed=1))
    assert err.type == MsgType.ERROR and err.meta["session"] == "D"
    assert "coordinator refused: meta.session must be this cloud's session" in err.meta["error"]


def test_only_halves_of_another_session_time_out_naming_what_was_skipped(worker):
    worker.answers.append([_half(_params(1), "A")])
    err = _serve(worker, _step(1, "B", seed=1))
    assert err.type == MsgType.ERROR and err.meta["step"] == 1 and err.meta["session"] == "B"
    assert "within 0.5 s; skipped a HALF: meta.session must equal the step's session 'B', " \
        "got 'A'" in err.meta["error"]  # fmt: skip


def test_a_step_without_a_session_asks_and_is_answered_as_before(worker):
    worker.answers.append([_half(_params(1), "A")])
    reply = _serve(worker, _step(1, None, seed=1))
    assert worker.requests[0].meta == {}
    assert reply.type == MsgType.GRADIENT and "session" not in reply.meta


# -- coordinator -------------------------------------------------------------------------------


class _Now:
    """A pool that runs each task at once."""

    def submit(self, fn, *args):
        fn(*args)


def _trainer(tmp_path, **kw) -> tuple[SplitTrainer, list[Envelope], list[Envelope]]:
    base = dict(
        run_id="run", model="digits-mlp", mode="vanilla", rounds=1, min_clients=1, batch_size=4,
        lr=0.1, momentum=0.9, out_dir=str(tmp_path / "run"), seed=0, prefix="ss",
    )  # fmt: skip
    trainer = SplitTrainer(FederatedConfig(**{**base, **kw}),
                           mqtt=MqttConfig(client_id="cloud", port=1), test_set=None)  # fmt: skip
    to_devices: list[Envelope] = []
    to_workers: list[Envelope] = []
    trainer._deliver = lambda device, payload: to_devices.append(decode(payload))
    trainer._send_worker = lambda worker, payload: to_workers.append(decode(payload))
    trainer._pool = _Now()
    trainer._state = RoundState(round=1, selected=frozenset({DEVICE}))
    trainer.half.begin_round()
    return trainer, to_devices, to_workers


def _half_request(**meta) -> bytes:
    env = Envelope(type=MsgType.HALF_REQUEST, run_id="run", round=1, sender="w0", seq=1,
                   meta=meta)  # fmt: skip
    return encode(env)


def test_the_coordinator_refuses_a_half_request_of_another_session(tmp_path):
    trainer, _, to_workers = _trainer(tmp_path, mode="splitfed-v1", split_workers=1)
    trainer._on_worker("ss/workers/w0/up", "w0", _half_request(session="old-session"))
    (err,) = to_workers
    assert err.type == MsgType.ERROR and err.meta["session"] == "old-session"
    assert (
        "HALF_REQUEST from worker w0 round 1: meta.session must be this cloud's session "
        f"{trainer.session!r}, got 'old-session'" in err.meta["error"]
    )
    # It keeps running: its own session's request and one naming none get the HALF.
    trainer._on_worker("ss/workers/w0/up", "w0", _half_request(session=trainer.session))
    trainer._on_worker("ss/workers/w0/up", "w0", _half_request())
    assert [e.type for e in to_workers[1:]] == [MsgType.HALF, MsgType.HALF]
    assert all(e.meta["session"] == trainer.session for e in to_workers[1:])
    # A request for a round not running: the ERROR echoes the asked session, if any.
    trainer._state = None
    trainer._on_worker("ss/workers/w0/up", "w0", _half_request(session=trainer.session))
    trainer._on_worker("ss/workers/w0/up", "w0", _half_request())
    assert [e.type for e in to_workers[3:]] == [MsgType.ERROR, MsgType.ERROR]
    assert to_workers[3].meta["session"] == trainer.session and "session" not in to_workers[4].meta


def test_the_coordinators_step_replies_echo_the_steps_session(tmp_path):
    trainer, sent, _ = _trainer(tmp_path)

    def arrive(payload: bytes) -> Envelope:
        trainer._on_up("ss/up/dev-0000", DEVICE, payload)
        while not trainer._work._q.empty():  # what the compute thread would serve
            trainer._serve([trainer._work._q.get_nowait()])
        return sent[-1]

    mine = trainer.session
    grad = arrive(_step(1, mine, seed=1))
    assert grad.type == MsgType.GRADIENT and grad.meta["session"] == mine
    bad = arrive(_step(2, mine, seed=2, batch=3))  # refused on arrival
    assert bad.type == MsgType.ERROR and bad.meta["step"] == 2 and bad.meta["session"] == mine
    other = arrive(_step(3, "old-session", seed=3))  # its own device must take this ERROR
    assert other.type == MsgType.ERROR and other.meta["session"] == "old-session"
    # A repeat is answered from the ledger with the same reply, session included.
    assert arrive(_step(1, mine, seed=1)) == grad
    plain = arrive(_step(3, None, seed=3))  # a device naming no session: as before
    assert plain.type == MsgType.GRADIENT and "session" not in plain.meta
