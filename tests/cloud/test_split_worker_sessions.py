"""Step workers keep each coordinator session's cloud half and step ledger apart (no broker).

A coordinator restarted with the same run id (``--resume`` after a crash mid-round) starts a
new session that repeats round numbers while the workers stay up.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud.split_session import CloudHalf, StepInput
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
    """A cloud half of digits-mlp cut at act1; each seed moves it elsewhere."""
    rng = np.random.default_rng(seed)
    own = split_template("digits-mlp", "act1").cloud.state_dict()
    return {
        k: (v.numpy() + 0.05 * rng.standard_normal(v.shape)).astype(np.float32)
        for k, v in own.items()
    }


def _half(params: dict, session, *, round_=1) -> Envelope:
    """The HALF a coordinator of ``session`` answers a HALF_REQUEST with."""
    meta = {"model": "digits-mlp", "cut": "act1", "batch_size": 4, "lr": LR, "momentum": MOMENTUM,
            "act_codec": "float32", "num_classes": 10, "step_qos": 1}  # fmt: skip
    if session is not None:
        meta["session"] = session
    return Envelope(type=MsgType.HALF, run_id="run", round=round_, sender="cloud", seq=1,
                    meta=meta, body=encode_tensors(params, codec="float32"))  # fmt: skip


def _tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "activation": rng.standard_normal((4, 64)).astype(np.float32),
        "labels": rng.integers(0, 10, 4).astype(np.int64),
    }


def _step(step: int, session, *, seed: int, round_=1, last=False) -> bytes:
    meta = {"step": step, "batch": 4, "epoch": 0}
    if session is not None:
        meta["session"] = session
    if last:
        meta["last"] = True
    env = Envelope(type=MsgType.ACTIVATION, run_id="run", round=round_, sender=DEVICE, seq=step,
                   meta=meta, body=encode_tensors(_tensors(seed)))  # fmt: skip
    return encode(env)


class Harness:
    """A worker that is never started: the coordinator answers each HALF_REQUEST with the
    next queued HALF, step replies and HALF_UPDATEs are recorded."""

    def __init__(self) -> None:
        self.worker = SplitStepWorker(
            worker_id="w0", group="g", prefix="ws", mqtt=MqttConfig(client_id="w0", port=1),
            fetch_timeout=2.0,
        )  # fmt: skip
        self.answers: list[Envelope] = []
        self.requests: list[Envelope] = []
        self.updates: list[Envelope] = []
        self.replies: list[Envelope] = []
        self.worker._post = lambda device, payload: self.replies.append(decode(payload))
        self.worker.endpoint.send = self._send

    def _send(self, topic: str, payload: bytes, **kw) -> None:
        env = decode(payload)
        if env.type == MsgType.HALF_REQUEST:
            self.requests.append(env)
            self.worker._fetched.put(self.answers.pop(0))
        else:
            assert env.type == MsgType.HALF_UPDATE, env.type
            self.updates.append(env)

    def arrive(self, *payloads: bytes, shared=True) -> list[Envelope]:
        """Delivers step messages, serves them as the compute thread would; the new replies."""
        before = len(self.replies)
        for i, payload in enumerate(payloads):
            first = shared and i == 0  # the pick-up topic, then this worker's own
            topic = "ws/steps/dev-0000" if first else "ws/steps/dev-0000/w0"
            self.worker._on_step(topic, DEVICE, payload)
        self.worker._work.put(None)
        self.worker._loop()  # returns at the None above
        return self.replies[before:]

    def close(self) -> None:
        self.worker.endpoint.close()


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.close()


def _oracle(params: dict, seeds: list[int]) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """CloudHalf driven by hand from ``params`` on the steps: their gradients and the copy."""
    module = split_template("digits-mlp", "act1").cloud
    module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in params.items()})
    half = CloudHalf(mode="splitfed-v1", module=module, lr=LR, momentum=MOMENTUM, num_classes=10)
    grads = []
    for step, seed in enumerate(seeds, start=1):
        t = _tensors(seed)
        (g,) = half.train_step([StepInput(DEVICE, step, t["activation"], t["labels"])])
        grads.append(g)
    return grads, half.copies()[DEVICE]


def test_a_new_session_repeating_a_round_gets_its_own_half_and_fresh_steps(harness):
    half_a, half_b = _params(1), _params(2)
    # Session A serves round 1 to its end (steps 1-3, the last one sends the copy on).
    harness.answers.append(_half(half_a, "A"))
    got = harness.arrive(*(_step(s, "A", seed=s, last=s == 3) for s in (1, 2, 3)))
    assert [(e.type, e.meta["step"]) for e in got] == [(MsgType.GRADIENT, s) for s in (1, 2, 3)]
    assert len(harness.updates) == 1
    # The coordinator restarts with the same run id: session B runs round 1 again, from
    # another cloud half. Its steps 1-2 are older than A's answered step 3, yet new to B.
    harness.answers.append(_half(half_b, "B"))
    seeds = [11, 12, 13]
    got = harness.arrive(*(_step(s, "B", seed=seeds[s - 1], last=s == 3) for s in (1, 2, 3)))
    assert len(harness.requests) == 2, "session B's half must be asked for, not A's reused"
    assert [(e.type, e.meta["step"]) for e in got] == [(MsgType.GRADIENT, s) for s in (1, 2, 3)]
    want_grads, want_copy = _oracle(half_b, seeds)
    for e, want in zip(got, want_grads, strict=True):
        grad = decode_tensors(e.body)["grad"] / np.float32(e.meta["scale"])
        np.testing.assert_allclose(grad, want, rtol=0, atol=1e-6)
    assert [u.meta.get("session") for u in harness.updates] == ["A", "B"]
    update = harness.updates[-1]
    assert update.meta["device"] == DEVICE
    copy = decode_tensors(update.body)
    assert copy.keys() == want_copy.keys()
    for k, v in want_copy.items():
        np.testing.assert_allclose(copy[k], v, rtol=0, atol=1e-6, err_msg=k)
    w = harness.worker
    assert w.duplicates == 0 and w.rejected == 0, w.reasons
    assert w.steps_served == 6
    # Only recent halves stay: A's round 1 goes once B's round 2 arrives.
    assert list(w._halves) == [("run", 1, "A"), ("run", 1, "B")]
    harness.answers.append(_half(half_b, "B", round_=2))
    assert harness.arrive(_step(1, "B", seed=21, round_=2))[0].type == MsgType.GRADIENT
    assert list(w._halves) == [("run", 1, "B"), ("run", 2, "B")]


def test_a_half_of_another_session_is_refused_and_the_worker_goes_on(harness):
    # The step is session B's; the answer is session A's (the old coordinator's late reply).
    harness.answers.append(_half(_params(1), "A"))
    (err,) = harness.arrive(_step(1, "B", seed=1))
    assert err.type == MsgType.ERROR and err.meta["step"] == 1
    assert "meta.session must equal the step's session 'B', got 'A'" in err.meta["error"]
    assert "\n" not in err.meta["error"]
    w = harness.worker
    assert w.rejected == 1 and "got 'A'" in w.reasons[0]
    assert w.steps_served == 0 and w._halves == {} and not w.sessions
    # A resend of the refused step gets the same ERROR again, never a retry on A's half.
    assert harness.arrive(_step(1, "B", seed=1), shared=False) == [err]
    # The worker keeps running: B's next step fetches B's half and is served.
    harness.answers.append(_half(_params(2), "B"))
    (grad,) = harness.arrive(_step(2, "B", seed=2), shared=False)
    assert grad.type == MsgType.GRADIENT and grad.meta["step"] == 2
    assert len(harness.requests) == 2 and list(w._halves) == [("run", 1, "B")]


def test_steps_without_a_session_take_any_half_as_before(harness):
    harness.answers.append(_half(_params(1), "A"))
    got = harness.arrive(*(_step(s, None, seed=s, last=s == 2) for s in (1, 2)))
    assert [e.type for e in got] == [MsgType.GRADIENT, MsgType.GRADIENT]
    assert "session" not in harness.updates[0].meta
    assert harness.arrive(_step(1, None, seed=1)) == []  # stale, as today
    assert harness.worker.duplicates == 1 and harness.worker.rejected == 0


def test_a_malformed_session_is_rejected_on_arrival(harness):
    env = decode(_step(1, "B", seed=1))
    env = Envelope(type=env.type, run_id=env.run_id, round=1, sender=DEVICE, seq=1,
                   meta={**env.meta, "session": ["B"]}, body=env.body)  # fmt: skip
    assert harness.arrive(encode(env)) == []
    assert harness.worker.rejected == 1
    assert "meta.session must be a str of 1-64 characters, got ['B']" in harness.worker.reasons[0]
