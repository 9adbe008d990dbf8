"""SplitClient without a broker: only the awaited step's reply from the session's owner counts."""

from __future__ import annotations

import logging

import numpy as np

from converters.mqtt import MqttConfig
from converters.tensor_codec import encode_tensors
from converters.wire import Envelope, MsgType, encode
from edge.split_client import SplitClient, SplitClientOptions


def _client() -> SplitClient:
    return SplitClient(
        options=SplitClientOptions(device_id="pi-01", prefix="t", step_resend=30.0),
        mqtt=MqttConfig(client_id="pi-01", port=1),  # never connected
        x=np.zeros((4, 1, 8, 8), np.float32),
        y=np.arange(4),
    )


def _reply(step, worker, kind=MsgType.GRADIENT) -> bytes:
    meta = {"step": step}
    body = b""
    if kind == MsgType.ERROR:
        meta["error"] = "no cloud half\nfor this round"
    else:
        meta["worker"] = worker
        body = encode_tensors({"grad": np.full((4, 64), step, np.float32)})
    env = Envelope(type=kind, run_id="r", round=1, sender=worker, seq=step, meta=meta, body=body)
    return encode(env)


def test_stale_and_foreign_worker_replies_are_ignored_never_taken(caplog):
    # Step workers: w0 owns the session; step 2 is in hand. A late reply to step 1 (a resend
    # that crossed its answer), another worker's answer to a resent first step, and a reply
    # for step 2 from a worker that does not own the session must neither raise nor be taken.
    c = _client()
    model = Envelope(type=MsgType.MODEL, run_id="r", round=1, sender="cloud", seq=1, meta={})
    c._via_workers, c._worker = True, "w0"
    posted = []

    def post(topic, payload, *, qos=None):
        posted.append(topic)
        for stray in (
            _reply(1, "w0"),
            _reply(1, "w1"),
            _reply(2, "w1"),
            _reply(1, "w1", MsgType.ERROR),
            _reply(2, "w1", MsgType.ERROR),
        ):
            c._on_down("t/down/pi-01", "w1", stray)
        c._on_down("t/down/pi-01", "w0", _reply(2, "w0"))

    c.endpoint.post = post
    tensors = {"activation": np.zeros((4, 64), np.float32), "labels": np.zeros(4, np.int64)}
    try:
        with caplog.at_level(logging.INFO, logger="edge"):
            reply = c._exchange(
                model, 2, MsgType.ACTIVATION, {"batch": 4}, tensors, MsgType.GRADIENT
            )
        assert posted == ["t/steps/pi-01/w0"]
        assert reply.type == MsgType.GRADIENT and reply.sender == "w0"
        assert reply.meta["step"] == 2 and c._worker == "w0"
        assert c.rejected == 5 and c._replies.empty() and "\n" not in "".join(c.reasons)
        assert "unknown step 1" in c.reasons[0] and "pending: GRADIENT" in c.reasons[0]
        assert "from step worker 'w1', but 'w0' owns this session" in c.reasons[2]
        assert "from step worker 'w1'" in c.reasons[4] and "no cloud half" in c.reasons[4]
        mine = [r for r in caplog.records if r.name == "edge.split_client"]
        assert len(mine) == 5 and all(r.levelno == logging.INFO for r in mine)
        # The step is answered: a late repeat from the owner is a stray reply like the others.
        c._on_down("t/down/pi-01", "w0", _reply(2, "w0"))
        assert c.rejected == 6 and c._replies.empty()
    finally:
        c.endpoint.close()


def test_first_reply_pins_the_owner_and_a_second_workers_answer_is_ignored():
    # A resent first step reached two workers; the first answer wins the session.
    c = _client()
    model = Envelope(type=MsgType.MODEL, run_id="r", round=1, sender="cloud", seq=1, meta={})
    c._via_workers = True

    def post(topic, payload, *, qos=None):
        c._on_down("t/down/pi-01", "w1", _reply(1, "w1"))
        c._on_down("t/down/pi-01", "w0", _reply(1, "w0"))

    c.endpoint.post = post
    tensors = {"activation": np.zeros((4, 64), np.float32), "labels": np.zeros(4, np.int64)}
    try:
        reply = c._exchange(model, 1, MsgType.ACTIVATION, {"batch": 4}, tensors, MsgType.GRADIENT)
        assert reply.sender == "w1" and c._worker == "w1"
        assert c.rejected == 1 and "pending: none" in c.reasons[0]
    finally:
        c.endpoint.close()
