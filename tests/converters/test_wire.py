"""Tests for the wire envelope: layout oracle, round trips, every rejection rule, fuzzing."""

from __future__ import annotations

import contextlib
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converters.errors import WireError
from converters.wire import (
    SCHEMA_VERSION,
    UNBOUND_TYPES,
    Envelope,
    MsgType,
    decode,
    encode,
)

IDS = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
JSON_LEAF = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
JSON_LEAF |= st.floats(allow_nan=False, allow_infinity=False)
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def craft(
    *,
    magic=b"EM",
    schema=SCHEMA_VERSION,
    type_code=int(MsgType.UPDATE),
    flags=0,
    run_id=b"run-1",
    sender=b"pi-7",
    nonce=b"\x01" * 12,
    rnd=3,
    seq=9,
    meta=b'{"num_samples":32}',
    body=b"payload",
    lengths=None,
    fix_crc=True,
) -> bytes:
    """Build a message byte by byte from the table in docs/protocol.md, independently of encode."""
    lens = lengths or (len(run_id), len(sender), len(nonce), len(meta), len(body))
    head = magic + bytes([schema, type_code, flags, lens[0], lens[1], lens[2]])
    head += struct.pack("<q", rnd) + struct.pack("<Q", seq)
    head += struct.pack("<I", lens[3]) + struct.pack("<I", lens[4])
    msg = head + run_id + sender + nonce + meta + body
    crc = zlib.crc32(msg) if fix_crc else 0xDEADBEEF
    return msg + struct.pack("<I", crc)


@st.composite
def envelopes(draw):
    msg_type = draw(st.sampled_from(list(MsgType)))
    run_id = draw(IDS | st.just("")) if msg_type in UNBOUND_TYPES else draw(IDS)
    return Envelope(
        type=msg_type,
        run_id=run_id,
        round=draw(st.integers(0, 2**63 - 1)),
        sender=draw(IDS),
        seq=draw(st.integers(0, 2**64 - 1)),
        nonce=draw(st.binary(max_size=64)),
        meta=draw(st.dictionaries(st.text(max_size=10), JSON, max_size=5)),
        body=draw(st.binary(max_size=300)),
    )


def test_encode_matches_the_documented_layout():
    env = Envelope(
        type=MsgType.UPDATE,
        run_id="run-1",
        round=3,
        sender="pi-7",
        seq=9,
        nonce=b"\x01" * 12,
        meta={"num_samples": 32},
        body=b"payload",
    )
    assert encode(env) == craft()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(envelopes())
def test_round_trip(env):
    data = encode(env)
    assert decode(data) == env
    assert decode(data, run_id=env.run_id) == env


def test_numpy_scalars_in_meta_become_json_numbers():
    env = Envelope(
        type=MsgType.EVAL,
        run_id="r",
        round=1,
        sender="pi",
        seq=0,
        meta={"n": np.int64(12), "acc": np.float32(0.75)},
    )
    out = decode(encode(env))
    assert out.meta == {"n": 12, "acc": 0.75}
    assert json.loads(json.dumps(out.meta)) == out.meta


def test_reply_keeps_run_and_round_with_fresh_nonce():
    env = Envelope(type=MsgType.ACTIVATION, run_id="r", round=4, sender="pi", seq=1)
    rep = env.reply(type=MsgType.GRADIENT, sender="cloud", seq=1, body=b"g")
    assert (rep.run_id, rep.round, rep.type) == ("r", 4, MsgType.GRADIENT)
    assert rep.nonce != env.nonce and len(rep.nonce) == 12


def test_schema_version_error_names_both_versions():
    with pytest.raises(WireError, match=r"schema_version 7 not supported; this build speaks 1"):
        decode(craft(schema=7))


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        (b"", "at least"),
        (b"EM", "at least"),
        (b"EM\x01" + b"\x00" * 10, "at least"),
        (craft(magic=b"XX"), "magic"),
        (craft(type_code=200), "type 200 unknown"),
        (craft(type_code=0), "type 0 unknown"),
        (craft(flags=1), "flags must be 0"),
        (craft(fix_crc=False), "crc32"),
        (craft(lengths=(5, 4, 12, 18, 8)), "length fields"),
        (craft(lengths=(5, 4, 12, 18, 6)), "length fields"),
        (craft(lengths=(65, 4, 12, 18, 7)), "run_id length"),
        (craft(lengths=(5, 0, 12, 18, 7)), "sender length"),
        (craft(nonce=b"n" * 65), "nonce length"),
        (craft(meta=b"[1, 2]"), "JSON object"),
        (craft(meta=b"{not json"), "JSON object"),
        (craft(meta=b'{"a": NaN}'), "JSON object"),
        (craft(meta=b'{"a": 1, "a": 2}'), "duplicate"),
        (craft(meta=b'{"a": "\xff"}'), "JSON object"),
        (craft(meta=b"[" * 60000 + b"]" * 60000), "meta length"),
        (craft(meta=b'{"a":' + b"[" * 30000 + b"]" * 30000 + b"}"), "JSON object"),
        (craft(meta=b"{" + b" " * (64 * 1024) + b"}"), "meta length"),
        (craft(meta=b'{"x": 1e999}'), "strict"),
        (craft(meta=b'{"x": "\\ud800"}'), "strict"),
        (craft(rnd=-1), "round must be >= 0, got -1"),
        (craft(sender=b"pi/7"), "sender must be"),
        (craft(sender=b"pi\xff"), "sender must be ASCII"),
        (craft(run_id=b""), "run_id must be"),
        (craft(run_id=b"a b"), "run_id must be"),
    ],
)
def test_malformed_messages_raise_one_line_wire_error(data, pattern):
    with pytest.raises(WireError, match=pattern) as info:
        decode(data)
    assert "\n" not in str(info.value)


def test_oversized_message_rejected_before_parsing():
    data = craft(body=b"x" * 1000)
    with pytest.raises(WireError, match="max_bytes=500"):
        decode(data, max_bytes=500)
    assert decode(data, max_bytes=len(data)).body == b"x" * 1000


def test_run_id_filter():
    data = craft(run_id=b"run-1")
    assert decode(data, run_id="run-1").run_id == "run-1"
    with pytest.raises(WireError, match="run_id must be 'run-2', got 'run-1'"):
        decode(data, run_id="run-2")
    hello = craft(run_id=b"", type_code=int(MsgType.HELLO))
    assert decode(hello, run_id="run-2").run_id == ""  # a device that has not joined yet


def test_sender_must_match_the_topic():
    data = craft(sender=b"pi-7")
    assert decode(data, sender="pi-7").sender == "pi-7"
    with pytest.raises(WireError, match="sender must be 'pi-8' \\(from the topic\\), got 'pi-7'"):
        decode(data, sender="pi-8")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"round": -1}, "round must be"),
        ({"round": True}, "round must be"),
        ({"seq": 2**64}, "seq must be"),
        ({"sender": "a/b"}, "sender must be"),
        ({"run_id": ""}, r"run_id must be .*UPDATE needs a run"),
        ({"type": 99}, "type 99 unknown"),
        ({"nonce": b"n" * 65}, "nonce must be <= 64"),
        ({"meta": {"loss": float("nan")}}, "strict"),
        ({"meta": {1: "x"}}, "meta keys must be str"),
        ({"meta": {"big": "x" * 70000}}, "meta must be <= 65536"),
        ({"meta": [1]}, "meta must be a dict"),
        ({"body": "text"}, "body must be bytes"),
        ({"schema": 2}, "schema_version 2 not supported"),
    ],
)
def test_envelope_validates_on_construction(kwargs, pattern):
    base = {"type": MsgType.UPDATE, "run_id": "r", "round": 0, "sender": "pi", "seq": 0}
    with pytest.raises(WireError, match=pattern):
        Envelope(**{**base, **kwargs})


def _decode_or_wire_error(data: bytes) -> None:
    # Anything but WireError escapes and fails the test.
    with contextlib.suppress(WireError):
        decode(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data):
    _decode_or_wire_error(data)
    _decode_or_wire_error(b"EM\x01" + data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(envelopes(), st.data())
def test_fuzz_mutations_and_truncations(env, data):
    msg = bytearray(encode(env))
    cut = data.draw(st.integers(0, len(msg) - 1))
    with pytest.raises(WireError):
        decode(bytes(msg[:cut]))
    pos = data.draw(st.integers(0, len(msg) - 1))
    msg[pos] ^= data.draw(st.integers(1, 255))
    # Raw mutation: the CRC must catch it whatever byte changed.
    with pytest.raises(WireError):
        decode(bytes(msg))
    # Mutation with a recomputed CRC reaches the field parsers: decode or WireError only.
    fixed = bytes(msg[:-4]) + struct.pack("<I", zlib.crc32(bytes(msg[:-4])))
    _decode_or_wire_error(fixed)


def test_non_bytes_input_is_a_wire_error():
    with pytest.raises(WireError, match="must be bytes"):
        decode("EM")  # type: ignore[arg-type]


def test_protocol_modules_import_without_torch_or_paho():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['paho'] = None; "
        "import converters.wire, converters.topics, converters.tensor_codec"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
