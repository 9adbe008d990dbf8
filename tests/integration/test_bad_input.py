"""Bad input on a live federation: each is rejected with a reason, counted, and never aggregated."""

from __future__ import annotations

import json
import struct
import threading

import numpy as np
import pytest

from converters.mqtt import MqttConfig, MqttEndpoint
from converters.tensor_codec import encode_tensors
from converters.topics import Topics
from converters.wire import Envelope, MsgType, decode, encode

pytestmark = pytest.mark.integration


def _bad_messages(params: dict[str, np.ndarray], run_id: str, rnd: int) -> list[tuple[str, bytes]]:
    """(device, payload) pairs, each breaking one rule."""
    good = {k: v.copy() for k, v in params.items()}
    first = next(iter(good))

    def update(sender="dev-0000", body=None, run=run_id, round_=rnd, meta=None):
        env = Envelope(
            type=MsgType.UPDATE,
            run_id=run,
            round=round_,
            sender=sender,
            seq=99,
            meta={"num_samples": 10} if meta is None else meta,
            body=encode_tensors(good) if body is None else body,
        )
        return encode(env)

    nan = {k: v.copy() for k, v in good.items()}
    nan[first].flat[0] = np.nan
    wrong_shape = {k: v.copy() for k, v in good.items()}
    wrong_shape[first] = np.zeros((3, 3), np.float32)
    wrong_version = bytearray(update())
    wrong_version[2] = 7  # schema version byte of the envelope header
    return [
        ("dev-0000", b"\x00garbage that is not an envelope"),
        ("dev-0000", bytes(wrong_version)),
        ("dev-0000", update()[:-9]),  # truncated
        ("dev-0000", update(body=encode_tensors(nan))),
        ("dev-0000", update(body=encode_tensors(wrong_shape))),
        ("dev-0000", update(body=b"ET" + struct.pack("<BBIQ", 1, 0, 1, 10**12))),
        ("dev-0000", update(meta={"num_samples": -5})),
        ("dev-0000", update(run="another-run")),
        ("dev-0000", update(sender="dev-0001")),  # speaks for another device
        ("ghost", update(sender="ghost")),  # never registered
    ]


def test_bad_updates_are_rejected_counted_and_never_absorbed(
    federation, fast_config, tmp_path, mosquitto
):
    config = fast_config.replace(rounds=2)
    fed = federation(config, clients=3, partition="iid")
    server = fed.server()
    topics = Topics(prefix=config.prefix)
    rogue = MqttEndpoint(MqttConfig.from_url(mosquitto.url, client_id="rogue"))
    rogue.connect()
    sent = threading.Event()
    bad = _bad_messages(server.params, config.run_id, 1)

    def on_ctrl(topic, sender, payload):
        env = decode(payload)
        if env.type == MsgType.ROUND_START and env.round == 1 and not sent.is_set():
            sent.set()
            for device, payload in bad:
                rogue.send(topics.up(device), payload, timeout=10)

    rogue.subscribe(topics.ctrl(), on_ctrl)
    try:
        summary = server.run()
    finally:
        rogue.close()
    assert sent.is_set()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["rejected"] >= len(bad), rows[0]
    assert all(r["status"] == "ok" and r["clients_ok"] == 3 for r in rows)
    assert all(np.all(np.isfinite(v)) for v in server.params.values())
    assert summary["accuracy"] > 0.7
