"""SplitClient without a broker: every message of a round names the MODEL's cloud session."""

from __future__ import annotations

import time

import numpy as np
import pytest

from converters.mqtt import MqttConfig
from converters.tensor_codec import encode_tensors
from converters.wire import Envelope, MsgType, decode, encode
from edge.split_client import SplitClient, SplitClientOptions


@pytest.fixture
def client():
    rng = np.random.default_rng(0)
    c = SplitClient(
        options=SplitClientOptions(device_id="pi-01", prefix="t", step_resend=30.0),
        mqtt=MqttConfig(client_id="pi-01", port=1),  # never connected
        x=rng.standard_normal((4, 1, 8, 8)).astype(np.float32),
        y=np.arange(4),
    )
    yield c
    c.endpoint.close()


def _model(session, *, steps="cloud") -> Envelope:
    """A vanilla MODEL of digits-mlp cut at act1: two steps of two samples."""
    import torch

    from split.graph import split_template

    torch.set_num_threads(1)
    edge = split_template("digits-mlp", "act1").edge.state_dict()
    meta = {"model": "digits-mlp", "cut": "act1", "mode": "vanilla", "head_cut": None,
            "steps": steps, "config": {"epochs": 1, "batch_size": 2, "lr": 0.1}}  # fmt: skip
    if session is not None:
        meta["session"] = session
    body = encode_tensors({k: v.numpy() for k, v in edge.items()})
    return Envelope(type=MsgType.MODEL, run_id="r", round=1, sender="cloud", seq=1, meta=meta,
                    body=body)  # fmt: skip


def _cloud(c: SplitClient) -> list[tuple[str, Envelope]]:
    """Answers every step the device posts with a GRADIENT; records what the device sends."""
    out: list[tuple[str, Envelope]] = []

    def post(topic, payload, *, qos=None):
        env = decode(payload)
        out.append((topic, env))
        if env.type == MsgType.ACTIVATION:
            grad = np.full((env.meta["batch"], 64), 1e-3, np.float32)
            reply = Envelope(type=MsgType.GRADIENT, run_id=env.run_id, round=env.round,
                             sender="cloud", seq=len(out), meta={"step": env.meta["step"]},
                             body=encode_tensors({"grad": grad}))  # fmt: skip
            c._on_down("t/down/pi-01", "cloud", encode(reply))

    c.endpoint.post = post
    c.endpoint.send = lambda topic, payload, **kw: out.append((topic, decode(payload)))
    c.endpoint.publish_small = lambda topic, payload, **kw: out.append((topic, decode(payload)))
    return out


@pytest.mark.parametrize("session", ["5e55107d0c0ffee1", None])
def test_steps_and_the_update_carry_the_models_session(client, session):
    sent = _cloud(client)
    client._train(_model(session))
    kinds = [e.type for _, e in sent]
    assert kinds == [MsgType.ACTIVATION, MsgType.ACTIVATION, MsgType.UPDATE], kinds
    assert [e.meta["step"] for _, e in sent[:2]] == [1, 2]
    if session is None:  # a cloud that names no session: the messages are as before
        assert all("session" not in e.meta for _, e in sent)
    else:
        assert all(e.meta["session"] == session for _, e in sent)


def test_a_step_claim_and_an_error_report_carry_the_session(client):
    sent = _cloud(client)
    model = _model("5e55107d0c0ffee1", steps="workers")
    client._via_workers = True

    def post(topic, payload, *, qos=None):
        env = decode(payload)
        sent.append((topic, env))
        grant = Envelope(type=MsgType.STEP_CLAIM, run_id="r", round=1, sender="w0", seq=1,
                         meta={"claim": env.meta["claim"], "worker": "w0"})  # fmt: skip
        client._on_down("t/down/pi-01", "w0", encode(grant))

    client.endpoint.post = post
    client._claim_worker(model, 1, time.monotonic() + 5)
    assert client._worker == "w0"
    client._send_error(model, "step 3: no reply from the cloud")
    (topic, claim), (_, error) = sent
    assert topic == "t/steps/pi-01" and claim.type == MsgType.STEP_CLAIM
    assert claim.meta["session"] == "5e55107d0c0ffee1" and claim.meta["step"] == 1
    assert error.type == MsgType.ERROR and error.meta["session"] == "5e55107d0c0ffee1"
