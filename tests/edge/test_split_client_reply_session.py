"""SplitClient without a broker: a step reply naming another cloud session is never taken.

A cloud restarted with the same run id repeats (run, round, step); the old session's late
reply must not answer the new session's step. A reply naming no session (an older cloud) is.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from converters.mqtt import MqttConfig
from converters.tensor_codec import decode_tensors, encode_tensors
from converters.wire import Envelope, MsgType, encode
from edge.split_client import SplitClient, SplitClientOptions

TENSORS = {"activation": np.zeros((4, 64), np.float32), "labels": np.zeros(4, np.int64)}


@pytest.fixture
def client():
    c = SplitClient(
        options=SplitClientOptions(device_id="pi-01", prefix="t", step_resend=30.0),
        mqtt=MqttConfig(client_id="pi-01", port=1),  # never connected
        x=np.zeros((4, 1, 8, 8), np.float32),
        y=np.arange(4),
    )
    yield c
    c.endpoint.close()


def _model(session) -> Envelope:
    meta = {} if session is None else {"session": session}
    return Envelope(type=MsgType.MODEL, run_id="r", round=1, sender="cloud", seq=1, meta=meta)


def _reply(step, session, kind=MsgType.GRADIENT, fill=0.0) -> bytes:
    meta = {"step": step}
    if session is not None:
        meta["session"] = session
    body = b""
    if kind == MsgType.ERROR:
        meta["error"] = "meta.session must be this cloud's session 'old'"
    else:
        body = encode_tensors({"grad": np.full((4, 64), fill, np.float32)})
    env = Envelope(type=kind, run_id="r", round=1, sender="cloud", seq=step, meta=meta, body=body)
    return encode(env)


def _exchange(c: SplitClient, model: Envelope, *replies: bytes) -> Envelope:
    """Step 1 of ``model``'s round; the cloud answers with ``replies`` in order."""

    def post(topic, payload, *, qos=None):
        for r in replies:
            c._on_down("t/down/pi-01", "cloud", r)

    c.endpoint.post = post
    return c._exchange(model, 1, MsgType.ACTIVATION, {"batch": 4}, TENSORS, MsgType.GRADIENT)


def test_a_reply_of_another_session_is_ignored_and_the_rounds_own_taken(client, caplog):
    strays = (_reply(1, "old", MsgType.ERROR), _reply(1, "old", fill=9.0))
    with caplog.at_level(logging.INFO, logger="edge"):
        reply = _exchange(client, _model("new"), *strays, _reply(1, "new", fill=1.0))
    assert reply.type == MsgType.GRADIENT and reply.meta["session"] == "new"
    assert (decode_tensors(reply.body)["grad"] == 1.0).all()
    assert client.rejected == 2 and client._replies.empty()
    assert all("of session 'old', but the round's session is 'new'" in r for r in client.reasons)
    mine = [r for r in caplog.records if r.name == "edge.split_client"]
    assert len(mine) == 2 and all(r.levelno == logging.INFO for r in mine)


@pytest.mark.parametrize("session", ["new", None])
def test_a_reply_naming_no_session_is_taken_as_before(client, session):
    reply = _exchange(client, _model(session), _reply(1, None, fill=1.0))
    assert reply.type == MsgType.GRADIENT and client.rejected == 0


def test_a_round_without_a_session_ignores_a_reply_naming_one(client):
    reply = _exchange(client, _model(None), _reply(1, "old"), _reply(1, None, fill=1.0))
    assert "session" not in reply.meta and client.rejected == 1
