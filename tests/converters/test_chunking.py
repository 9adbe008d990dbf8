"""Chunked-transfer frames and the reassembler, checked against the original payload."""

from __future__ import annotations

import random
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converters.chunking import (
    Kind,
    Reassembler,
    abort_frame,
    ack_frame,
    n_chunks,
    parse_frame,
    split_frames,
)
from converters.errors import ChunkError


def _feed_all(r: Reassembler, frames, sender="pi-01", now=0.0):
    out = [p for f in frames if (p := r.feed(sender, f, now=now)) is not None]
    return out


@settings(max_examples=60, deadline=None)
@given(
    payload=st.binary(min_size=0, max_size=5000),
    max_chunk=st.integers(1, 700),
    seed=st.integers(0, 2**32 - 1),
    dup=st.integers(0, 3),
)
def test_round_trip_any_order_with_duplicates(payload, max_chunk, seed, dup):
    frames = split_frames(payload, stream_id=seed, max_chunk=max_chunk, sender="pi-01")
    assert len(frames) == n_chunks(len(payload), max_chunk)
    rnd = random.Random(seed)
    shuffled = frames + [rnd.choice(frames) for _ in range(dup)]
    rnd.shuffle(shuffled)
    r = Reassembler()
    out = _feed_all(r, shuffled)
    assert len(out) == 1  # exactly once, even with duplicates after completion
    assert bytes(out[0]) == payload
    assert r.open_bytes == 0
    # A late duplicate of a completed stream is recognised and acked as complete.
    assert r.feed("pi-01", frames[0], now=1.0) is None
    assert r.progress("pi-01", seed) == (len(frames), 0)


def test_frame_fields_round_trip():
    frames = split_frames(
        b"abcdefghij", stream_id=0xDEADBEEF, max_chunk=4, sender="s", reply_to="r/t"
    )
    f = parse_frame(frames[2])
    assert (f.kind, f.stream_id, f.seq, f.total, f.offset, f.total_len) == (
        Kind.DATA,
        0xDEADBEEF,
        2,
        3,
        8,
        10,
    )
    assert (f.sender, f.reply_to, bytes(f.chunk)) == ("s", "r/t", b"ij")
    a = parse_frame(ack_frame(7, upto=5, sack=0b101, sender="cloud"))
    assert (a.kind, a.stream_id, a.upto, a.sender, a.acked()) == (Kind.ACK, 7, 5, "cloud", {6, 8})
    b = parse_frame(abort_frame(9, reason="too big", sender="x"))
    assert (b.kind, b.reason, b.sender) == (Kind.ABORT, "too big", "x")


def test_same_stream_id_from_two_senders_is_two_streams():
    r = Reassembler()
    a = split_frames(b"A" * 100, stream_id=1, max_chunk=30)
    b = split_frames(b"B" * 100, stream_id=1, max_chunk=30)
    out = []
    for fa, fb in zip(a, b, strict=True):
        out += [p for p in (r.feed("pi-01", fa), r.feed("pi-02", fb)) if p is not None]
    assert sorted(bytes(p) for p in out) == [b"A" * 100, b"B" * 100]


def test_selective_ack_reports_gaps():
    frames = split_frames(bytes(range(100)), stream_id=5, max_chunk=10)
    r = Reassembler()
    for i in (0, 1, 3, 4, 9):
        r.feed("d", frames[i])
    upto, sack = r.progress("d", 5)
    assert upto == 2
    assert parse_frame(ack_frame(5, upto=upto, sack=sack)).acked() == {3, 4, 9}


def test_corrupted_chunk_raises_checksum_mismatch():
    frames = [bytearray(f) for f in split_frames(b"x" * 1000, stream_id=0xAB, max_chunk=100)]
    frames[3][-1] ^= 0xFF
    r = Reassembler()
    with pytest.raises(
        ChunkError, match=r"stream 0x00000000000000ab from pi-01: checksum mismatch"
    ):
        _feed_all(r, frames)
    assert r.failed("pi-01", 0xAB)
    with pytest.raises(ChunkError, match="already expired or aborted"):
        r.feed("pi-01", frames[0])


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda f: b"XX" + f[2:], "magic"),
        (lambda f: f[:2] + b"\x09" + f[3:], "version"),
        (lambda f: f[:3] + b"\x07" + f[4:], "kind"),
        (lambda f: f[:10], "too short"),
    ],
)
def test_malformed_frames_are_rejected(mutate, match):
    frame = split_frames(b"hello", stream_id=1, max_chunk=8)[0]
    with pytest.raises(ChunkError, match=match):
        Reassembler().feed("d", mutate(frame))


def test_inconsistent_header_is_rejected():
    a = split_frames(b"a" * 50, stream_id=3, max_chunk=10)
    b = split_frames(b"b" * 60, stream_id=3, max_chunk=10)
    r = Reassembler()
    r.feed("d", a[0])
    with pytest.raises(ChunkError, match="disagrees"):
        r.feed("d", b[1])


def test_idle_stream_expires():
    frames = split_frames(b"z" * 100, stream_id=11, max_chunk=10)
    r = Reassembler(timeout=5.0)
    r.feed("pi-01", frames[0], now=0.0)
    r.feed("pi-01", frames[1], now=4.0)
    assert r.expire(now=8.0) == []  # activity at t=4 keeps it alive
    assert r.expire(now=9.5) == [("pi-01", 11)]
    assert r.open_bytes == 0
    with pytest.raises(ChunkError, match="expired"):
        r.feed("pi-01", frames[2], now=10.0)


def test_memory_caps():
    r = Reassembler(max_bytes=1000, max_streams=2)
    with pytest.raises(ChunkError, match="max_bytes=1000, got 1001"):
        r.feed("d", split_frames(b"x" * 1001, stream_id=1, max_chunk=100)[0])
    r.feed("d", split_frames(b"x" * 500, stream_id=2, max_chunk=100)[0])
    r.feed("d", split_frames(b"x" * 500, stream_id=3, max_chunk=100)[0])
    with pytest.raises(ChunkError, match="max_streams=2"):
        r.feed("d", split_frames(b"x" * 500, stream_id=4, max_chunk=100)[0])
    assert not r.failed("d", 4)  # busy, not failed: the sender may retransmit later
    assert r.open_bytes == 1000


def test_receiver_peak_memory_is_about_one_payload():
    size, chunk = 4 << 20, 64 << 10
    payload = random.Random(0).randbytes(size)
    frames = split_frames(payload, stream_id=1, max_chunk=chunk)
    r = Reassembler()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out = _feed_all(r, frames)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert bytes(out[0]) == payload
    assert peak <= 1.1 * size + 4 * chunk, peak


def test_bad_arguments():
    with pytest.raises(ChunkError, match="max_chunk must be >= 1, got 0"):
        split_frames(b"x", stream_id=1, max_chunk=0)
    with pytest.raises(ChunkError, match="stream_id must be a u64"):
        split_frames(b"x", stream_id=-1, max_chunk=1)
