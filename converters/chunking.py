"""Chunked-transfer frames (DATA / ACK / ABORT) and the receiver-side reassembler; no paho."""

from __future__ import annotations

import struct
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from enum import IntEnum

from converters.errors import ChunkError

MAGIC = b"ES"
VERSION = 1


class Kind(IntEnum):
    """Frame kinds; DATA and ACK share a topic, the kind byte tells them apart."""

    DATA = 1
    ACK = 2
    ABORT = 3


# Common prefix: magic, version, kind, stream id.
_PREFIX = struct.Struct(">2sBBQ")
# DATA: seq, total, offset, total_len, crc32 of the whole payload, sender len, reply_to len.
_DATA = struct.Struct(">IIQQIBH")
# ACK: upto (every seq < upto received), 64-bit selective-ack bitmap for upto+1.., sender len.
_ACK = struct.Struct(">IQB")
# ABORT: sender len, reason len.
_ABORT = struct.Struct(">BH")

SACK_BITS = 64
MAX_TOTAL = 2**32 - 1


@dataclass(frozen=True)
class Frame:
    """One parsed frame; fields not used by a kind keep their defaults.

    Attributes:
        kind: DATA, ACK or ABORT.
        stream_id: random 64-bit id of the transfer.
        sender: client id of the publisher (empty if not given).
        seq: DATA chunk index.
        total: DATA number of chunks in the stream.
        offset: DATA byte offset of this chunk in the payload.
        total_len: DATA payload length in bytes.
        crc: DATA crc32 of the whole payload.
        reply_to: DATA topic the receiver publishes ACK/ABORT frames on.
        chunk: DATA chunk bytes (a view into the frame, not a copy).
        upto: ACK every seq below this was received.
        sack: ACK bit i set means seq upto+1+i was received.
        reason: ABORT one-line reason.
    """

    kind: Kind
    stream_id: int
    sender: str = ""
    seq: int = 0
    total: int = 0
    offset: int = 0
    total_len: int = 0
    crc: int = 0
    reply_to: str = ""
    chunk: memoryview | bytes = b""
    upto: int = 0
    sack: int = 0
    reason: str = ""

    def acked(self) -> set[int]:
        """Returns the seqs an ACK frame confirms beyond ``upto`` (selective part)."""
        return {self.upto + 1 + i for i in range(SACK_BITS) if self.sack >> i & 1}


def data_header_len(*, sender: str = "", reply_to: str = "") -> int:
    """Returns the bytes a DATA frame adds in front of its chunk."""
    return _PREFIX.size + _DATA.size + len(sender.encode()) + len(reply_to.encode())


def data_frame(
    payload: bytes | bytearray | memoryview,
    *,
    stream_id: int,
    seq: int,
    total: int,
    chunk_size: int,
    crc: int,
    sender: str = "",
    reply_to: str = "",
) -> bytes:
    """Encodes chunk ``seq`` of ``payload`` (built on demand so a sender never holds 2x payload)."""
    s, r = sender.encode(), reply_to.encode()
    offset = seq * chunk_size
    view = memoryview(payload)[offset : offset + chunk_size]
    head = _PREFIX.pack(MAGIC, VERSION, Kind.DATA, stream_id) + _DATA.pack(
        seq, total, offset, len(payload), crc, len(s), len(r)
    )
    return b"".join((head, s, r, view))


def n_chunks(total_len: int, max_chunk: int) -> int:
    """Number of chunks for a payload; an empty payload still travels as one empty chunk."""
    return max(1, -(-total_len // max_chunk))


def split_frames(
    payload: bytes | bytearray | memoryview,
    *,
    stream_id: int,
    max_chunk: int,
    sender: str = "",
    reply_to: str = "",
) -> list[bytes]:
    """Splits ``payload`` into DATA frames of at most ``max_chunk`` chunk bytes each.

    Args:
        payload: opaque bytes to send.
        stream_id: random 64-bit id unique per transfer.
        max_chunk: largest chunk in bytes (frame header excluded).
        sender: publisher's client id, echoed in error messages and handlers.
        reply_to: topic the receiver should acknowledge on.

    Returns:
        The frames in seq order.

    Raises:
        ChunkError: if max_chunk < 1, stream_id is not a u64 or there would be too many chunks.
    """
    if max_chunk < 1:
        raise ChunkError(f"max_chunk must be >= 1, got {max_chunk}")
    if not 0 <= stream_id < 2**64:
        raise ChunkError(f"stream_id must be a u64, got {stream_id}")
    total = n_chunks(len(payload), max_chunk)
    if total > MAX_TOTAL:
        raise ChunkError(f"payload needs {total} chunks, more than {MAX_TOTAL}; raise max_chunk")
    crc = zlib.crc32(payload)
    return [
        data_frame(
            payload,
            stream_id=stream_id,
            seq=i,
            total=total,
            chunk_size=max_chunk,
            crc=crc,
            sender=sender,
            reply_to=reply_to,
        )
        for i in range(total)
    ]


def ack_frame(stream_id: int, *, upto: int, sack: int = 0, sender: str = "") -> bytes:
    """Encodes an ACK: every seq < ``upto`` arrived, plus the selective bitmap ``sack``."""
    s = sender.encode()
    return (
        _PREFIX.pack(MAGIC, VERSION, Kind.ACK, stream_id)
        + _ACK.pack(upto, sack & (2**SACK_BITS - 1), len(s))
        + s
    )


def abort_frame(stream_id: int, *, reason: str, sender: str = "") -> bytes:
    """Encodes an ABORT: the receiver gave up on the stream (corrupt, too large, expired)."""
    s, r = sender.encode(), reason.encode()[:65535]
    return _PREFIX.pack(MAGIC, VERSION, Kind.ABORT, stream_id) + _ABORT.pack(len(s), len(r)) + s + r


def _text(buf: memoryview, start: int, n: int, what: str) -> str:
    if start + n > len(buf):
        raise ChunkError(f"frame truncated in {what}: needs {start + n} bytes, has {len(buf)}")
    try:
        return bytes(buf[start : start + n]).decode()
    except UnicodeDecodeError:
        raise ChunkError(f"frame {what} is not valid UTF-8") from None


def parse_frame(frame: bytes | bytearray | memoryview) -> Frame:
    """Parses one frame.

    Raises:
        ChunkError: on a short frame, wrong magic, unknown version or kind, or bad lengths.
    """
    buf = memoryview(frame)
    if len(buf) < _PREFIX.size:
        raise ChunkError(f"frame too short: {len(buf)} bytes, header needs {_PREFIX.size}")
    magic, version, kind, stream_id = _PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise ChunkError(f"frame magic must be {MAGIC!r}, got {bytes(magic)!r}")
    if version != VERSION:
        raise ChunkError(f"frame version must be {VERSION}, got {version}")
    pos = _PREFIX.size
    if kind == Kind.DATA:
        if len(buf) < pos + _DATA.size:
            raise ChunkError(f"DATA frame too short: {len(buf)} bytes")
        seq, total, offset, total_len, crc, ns, nr = _DATA.unpack_from(buf, pos)
        pos += _DATA.size
        sender = _text(buf, pos, ns, "sender")
        reply_to = _text(buf, pos + ns, nr, "reply_to")
        chunk = buf[pos + ns + nr :]
        if total < 1 or seq >= total:
            raise ChunkError(f"DATA seq must be < total, got seq={seq} total={total}")
        if offset + len(chunk) > total_len:
            raise ChunkError(
                f"DATA chunk at offset {offset} of {len(chunk)} bytes overruns "
                f"total_len {total_len}"
            )
        return Frame(
            Kind.DATA, stream_id, sender, seq, total, offset, total_len, crc, reply_to, chunk
        )
    if kind == Kind.ACK:
        if len(buf) < pos + _ACK.size:
            raise ChunkError(f"ACK frame too short: {len(buf)} bytes")
        upto, sack, ns = _ACK.unpack_from(buf, pos)
        sender = _text(buf, pos + _ACK.size, ns, "sender")
        return Frame(Kind.ACK, stream_id, sender, upto=upto, sack=sack)
    if kind == Kind.ABORT:
        if len(buf) < pos + _ABORT.size:
            raise ChunkError(f"ABORT frame too short: {len(buf)} bytes")
        ns, nr = _ABORT.unpack_from(buf, pos)
        pos += _ABORT.size
        return Frame(
            Kind.ABORT,
            stream_id,
            _text(buf, pos, ns, "sender"),
            reason=_text(buf, pos + ns, nr, "reason"),
        )
    raise ChunkError(f"frame kind must be one of {[k.name for k in Kind]}, got {kind}")


class _Stream:
    """One stream being assembled into a single preallocated buffer (peak ~1x payload)."""

    __slots__ = ("buf", "got", "n_got", "upto", "total", "total_len", "crc", "last")

    def __init__(self, f: Frame, now: float) -> None:
        self.buf = bytearray(f.total_len)
        self.got = bytearray(f.total)
        self.n_got = 0
        self.upto = 0
        self.total, self.total_len, self.crc = f.total, f.total_len, f.crc
        self.last = now


def _name(sender: str, stream_id: int) -> str:
    """How errors name a stream (formatted only when one is raised)."""
    return f"stream 0x{stream_id:016x} from {sender}"


class Reassembler:
    """Receiver side of chunked transfers: dedup, ordering, memory caps, timeouts, checksum.

    Streams are keyed by ``(sender, stream_id)``. A completed stream is remembered (bounded) so
    late duplicates are recognised, acknowledged as complete and never delivered twice.

    Args:
        max_bytes: largest payload accepted per stream.
        max_streams: most streams assembled at once (per Reassembler).
        timeout: seconds a stream may stay idle before ``expire`` drops it.
        remember: how many completed or expired stream ids to remember for dedup.
    """

    def __init__(
        self,
        *,
        max_bytes: int = 1 << 30,
        max_streams: int = 64,
        timeout: float = 30.0,
        remember: int = 4096,
    ) -> None:
        if max_bytes < 0:
            raise ChunkError(f"max_bytes must be >= 0, got {max_bytes}")
        if max_streams < 1:
            raise ChunkError(f"max_streams must be >= 1, got {max_streams}")
        if timeout <= 0:
            raise ChunkError(f"timeout must be > 0, got {timeout}")
        self.max_bytes, self.max_streams, self.timeout = max_bytes, max_streams, timeout
        self._remember = remember
        self._open: dict[tuple[str, int], _Stream] = {}
        # Value: total chunks if completed, -1 if expired or aborted.
        self._closed: OrderedDict[tuple[str, int], int] = OrderedDict()

    @property
    def open_bytes(self) -> int:
        """Bytes preallocated for streams still being assembled."""
        return sum(s.total_len for s in self._open.values())

    def _close(self, key: tuple[str, int], value: int) -> None:
        self._open.pop(key, None)
        self._closed[key] = value
        while len(self._closed) > self._remember:
            self._closed.popitem(last=False)

    def feed(
        self,
        sender: str,
        frame: bytes | bytearray | memoryview | Frame,
        *,
        now: float | None = None,
    ) -> bytearray | None:
        """Adds one DATA frame.

        Args:
            sender: who sent it (device id or client id); part of the dedup key.
            frame: raw frame bytes or an already parsed ``Frame``.
            now: clock for timeouts (``time.monotonic()`` if None).

        Returns:
            The whole payload (one preallocated bytearray, not a copy) the first time the stream
            completes; None otherwise, including for every later duplicate.

        Raises:
            ChunkError: on a malformed frame, a frame inconsistent with its stream, a payload over
                ``max_bytes``, too many open streams, a stream that already expired, or a checksum
                mismatch on completion (the stream is then dropped).
        """
        now = time.monotonic() if now is None else now
        f = frame if isinstance(frame, Frame) else parse_frame(frame)
        if f.kind != Kind.DATA:
            raise ChunkError(f"Reassembler.feed takes DATA frames, got {f.kind.name}")
        key = (sender, f.stream_id)
        st = self._open.get(key)
        if st is None:
            if key in self._closed:
                if self._closed[key] < 0:
                    raise ChunkError(
                        f"{_name(sender, f.stream_id)}: already expired or aborted; "
                        "resend as a new stream"
                    )
                return None
            if f.total_len > self.max_bytes:
                self._close(key, -1)
                raise ChunkError(
                    f"{_name(sender, f.stream_id)}: total_len must be <= "
                    f"max_bytes={self.max_bytes}, got {f.total_len}"
                )
            if len(self._open) >= self.max_streams:
                raise ChunkError(
                    f"{_name(sender, f.stream_id)}: open streams must be <= "
                    f"max_streams={self.max_streams}; "
                    "frame dropped, the sender will retransmit"
                )
            st = self._open[key] = _Stream(f, now)
        elif (f.total, f.total_len, f.crc) != (st.total, st.total_len, st.crc):
            raise ChunkError(
                f"{_name(sender, f.stream_id)}: frame header (total={f.total}, "
                f"total_len={f.total_len}, "
                f"crc=0x{f.crc:08x}) disagrees with the stream's first frame"
            )
        st.last = now
        if st.got[f.seq]:
            return None
        st.buf[f.offset : f.offset + len(f.chunk)] = f.chunk
        st.got[f.seq] = 1
        st.n_got += 1
        while st.upto < st.total and st.got[st.upto]:
            st.upto += 1
        if st.n_got < st.total:
            return None
        crc = zlib.crc32(st.buf)
        if crc != st.crc:
            self._close(key, -1)
            raise ChunkError(
                f"{_name(sender, f.stream_id)}: checksum mismatch (crc32 0x{crc:08x}, "
                f"header says 0x{st.crc:08x}); "
                "the stream was dropped, resend it"
            )
        self._close(key, st.total)
        return st.buf

    def progress(self, sender: str, stream_id: int) -> tuple[int, int]:
        """Returns ``(upto, sack)`` for an ACK frame about this stream (``(0, 0)`` if unknown)."""
        key = (sender, stream_id)
        st = self._open.get(key)
        if st is None:
            return (max(self._closed.get(key, 0), 0), 0)
        sack = 0
        for i in range(min(SACK_BITS, st.total - st.upto - 1)):
            if st.got[st.upto + 1 + i]:
                sack |= 1 << i
        return st.upto, sack

    def failed(self, sender: str, stream_id: int) -> bool:
        """True if the stream was dropped for good (corrupt, too large, expired or aborted)."""
        return self._closed.get((sender, stream_id)) == -1

    def drop(self, sender: str, stream_id: int) -> None:
        """Forgets an open stream (e.g. after the sender aborted it)."""
        if (sender, stream_id) in self._open:
            self._close((sender, stream_id), -1)

    def expire(self, *, now: float | None = None) -> list[tuple[str, int]]:
        """Drops streams idle for longer than ``timeout`` and returns their ``(sender, id)``.

        A later frame for an expired stream raises ChunkError rather than starting it over.
        """
        now = time.monotonic() if now is None else now
        dead = [k for k, s in self._open.items() if now - s.last > self.timeout]
        for k in dead:
            self._close(k, -1)
        return dead
