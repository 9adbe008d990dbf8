"""Versioned binary envelope for every application message between devices and the cloud."""

from __future__ import annotations

import json
import re
import secrets
import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum

from converters.errors import WireError

SCHEMA_VERSION = 1
MAGIC = b"EM"  # "edgesplit message"; transport frames use b"ES", tensor blobs b"ET"
MAX_META_BYTES = 64 * 1024
MAX_NONCE_BYTES = 64
MAX_BODY_BYTES = 2**32 - 1
DEFAULT_MAX_BYTES = 256 * 2**20

# magic, schema, type, flags, run_id_len, sender_len, nonce_len, round, seq, meta_len, body_len
_HEADER = struct.Struct("<2sBBBBBBqQII")
HEADER_SIZE = _HEADER.size  # 32
TRAILER_SIZE = 4  # CRC-32 of everything before it
_CRC = struct.Struct("<I")
_RUN_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DEVICE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class MsgType(IntEnum):
    """Message types; the numeric value is on the wire and never reused.

    Ranges: 1-15 session, 16-31 federated rounds, 32-47 split learning and inference,
    48-63 secure aggregation and homomorphic encryption, 64-127 reserved for future core types,
    128-255 reserved for experiments (rejected by this build like any unknown value).
    """

    # session
    HELLO = 1  # device -> cloud: join, capabilities in meta
    PRESENCE = 2  # device -> cloud (retained): online/offline
    BYE = 3  # either way: leaving (device) or run finished (cloud)
    ERROR = 4  # either way: a request was rejected; reason in meta["error"]
    # federated rounds
    ROUND_START = 16  # cloud -> all (retained on ctrl): round number + config in meta
    MODEL = 17  # cloud -> device: global parameters
    UPDATE = 18  # device -> cloud: local parameters or delta, meta["num_samples"]
    EVAL = 19  # down: evaluate the current model; up: metrics in meta
    ROUND_END = 20  # cloud -> all: round closed, aggregate metrics in meta
    # split learning / split inference
    ACTIVATION = 32  # device -> cloud: cut-layer activations (+ labels in vanilla split)
    GRADIENT = 33  # cloud -> device: gradient w.r.t. the cut activations
    INFER_REQUEST = 34  # device -> cloud: features for cloud-side inference
    INFER_REPLY = 35  # cloud -> device: predictions
    LOGITS = 36  # cloud -> device: U-shaped split, server output back to the label-holding device
    LOGIT_GRADIENT = 37  # device -> cloud: U-shaped split, gradient of the loss w.r.t. LOGITS
    HALF_REQUEST = 38  # step worker -> coordinator: send me the cloud half of meta["round"]
    HALF = 39  # coordinator -> step worker: the round's cloud-half parameters
    HALF_UPDATE = 40  # step worker -> coordinator: one device's trained cloud-half copy
    INFER_CLAIM = 41  # device -> cloud: claim a worker for a multi-frame request; back: its id
    STEP_CLAIM = 42  # device -> step workers: claim an owner before a multi-frame first step
    # secure aggregation (Bonawitz et al.) and HE aggregation (Phong et al.)
    KEY_ADVERTISE = 48  # device -> cloud -> devices: public keys
    KEY_SHARE = 49  # device -> cloud -> device: encrypted Shamir shares
    MASKED_UPDATE = 50  # device -> cloud: masked model update
    UNMASK_REQUEST = 51  # cloud -> device: survivor and dropout lists
    UNMASK_SHARES = 52  # device -> cloud: shares needed to remove masks
    CIPHERTEXT = 53  # device -> cloud: homomorphically encrypted update
    HE_PUBLIC_CONTEXT = 54  # cloud/key holder -> device: public HE parameters, never secret keys


# Types a device may send before it has joined a run, so their run_id may be empty.
UNBOUND_TYPES = frozenset({MsgType.HELLO, MsgType.PRESENCE, MsgType.BYE, MsgType.ERROR})


def _json_default(obj):
    """Let NumPy scalars (metrics, counts) pass without importing NumPy here."""
    if getattr(obj, "shape", None) == () and callable(getattr(obj, "item", None)):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


# One encoder for every message: json.dumps with these options would build a new one per call.
_META_ENCODER = json.JSONEncoder(
    separators=(",", ":"), allow_nan=False, ensure_ascii=False, default=_json_default
)


def _meta_bytes(meta: dict) -> bytes:
    """Strict JSON (no NaN/Infinity, so any JSON parser can read it), size-capped."""
    if not isinstance(meta, dict):
        raise WireError(f"meta must be a dict, got {type(meta).__name__}")
    for k in meta:
        if not isinstance(k, str):
            raise WireError(f"meta keys must be str, got {k!r}")
    try:
        text = _META_ENCODER.encode(meta)
        # Lone surrogates survive json.dumps but are not UTF-8; reject them here.
        data = text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise WireError(f"meta must be strict UTF-8 JSON (no NaN/Inf): {reason}") from None
    if len(data) > MAX_META_BYTES:
        raise WireError(f"meta must be <= {MAX_META_BYTES} bytes as JSON, got {len(data)}")
    return data


@dataclass(frozen=True)
class Envelope:
    """One application message.

    Attributes:
        type: what the message is (:class:`MsgType`; ints are coerced).
        run_id: the run it belongs to, ``[A-Za-z0-9_.-]{1,64}``; may be ``""`` only for
            HELLO, PRESENCE, BYE and ERROR (a device that has not joined a run yet).
        round: federated round (or split-learning step group), ``>= 0``.
        sender: device id of the sender (the cloud uses its own id, e.g. ``"cloud"``).
        seq: per-sender sequence number, ``0 <= seq < 2**64``; lets receivers drop duplicates
            that QoS 1 may deliver.
        nonce: 0-64 random bytes (default 12), unique per message, for replay detection.
        meta: small JSON object (<= 64 KiB): num_samples, metrics, codec name, step id ...
        body: opaque payload, usually a :mod:`converters.tensor_codec` blob.
        schema: wire schema version; only :data:`SCHEMA_VERSION` can be encoded.

    Raises:
        WireError: on construction if any field breaks its rule.
    """

    type: MsgType
    run_id: str
    round: int
    sender: str
    seq: int
    nonce: bytes = field(default_factory=lambda: secrets.token_bytes(12))
    meta: dict = field(default_factory=dict)
    body: bytes = b""
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if type(self.type) is not MsgType:
            try:
                object.__setattr__(self, "type", MsgType(self.type))
            except ValueError:
                raise WireError(f"type {self.type!r} unknown; known: {_known_types()}") from None
        if self.schema != SCHEMA_VERSION:
            raise WireError(
                f"schema_version {self.schema!r} not supported; this build speaks {SCHEMA_VERSION}"
            )
        _check_run_id(self.run_id, self.type)
        if not isinstance(self.sender, str) or _DEVICE_ID.fullmatch(self.sender) is None:
            raise WireError(
                f"sender must be 1-64 characters from [A-Za-z0-9_.-], got {self.sender!r}"
            )
        if not _is_int(self.round) or not 0 <= self.round < 2**63:
            raise WireError(f"round must be an int in [0, 2**63), got {self.round!r}")
        if not _is_int(self.seq) or not 0 <= self.seq < 2**64:
            raise WireError(f"seq must be an int in [0, 2**64), got {self.seq!r}")
        for name, value, limit in (
            ("nonce", self.nonce, MAX_NONCE_BYTES),
            ("body", self.body, MAX_BODY_BYTES),
        ):
            if type(value) is not bytes:
                if not isinstance(value, (bytes, bytearray, memoryview)):
                    raise WireError(f"{name} must be bytes, got {type(value).__name__}")
                value = bytes(value)
                object.__setattr__(self, name, value)
            if len(value) > limit:
                raise WireError(f"{name} must be <= {limit} bytes, got {len(value)}")
        _meta_bytes(self.meta)

    @classmethod
    def _parsed(cls, msg_type, run_id, round_, sender, seq, nonce, meta, body) -> Envelope:
        """An envelope whose fields :func:`decode` has already checked one by one: only meta,
        parsed from JSON, still goes through :func:`_meta_bytes` (an overflowing number such as
        1e400 or a lone surrogate escape parses but is not strict JSON)."""
        _meta_bytes(meta)
        env = object.__new__(cls)
        # Frozen blocks attribute assignment, not the instance dict: one update sets them all.
        env.__dict__.update(
            type=msg_type, run_id=run_id, round=round_, sender=sender, seq=seq, nonce=nonce,
            meta=meta, body=body, schema=SCHEMA_VERSION,
        )  # fmt: skip
        return env

    def __repr__(self) -> str:
        # The body can be megabytes; logs and test failures only need its size.
        return (
            f"Envelope(type={self.type.name}, run_id={self.run_id!r}, round={self.round}, "
            f"sender={self.sender!r}, seq={self.seq}, nonce={self.nonce.hex()}, "
            f"meta={self.meta!r}, "
            f"body=<{len(self.body)} bytes>, schema={self.schema})"
        )

    def reply(
        self,
        *,
        type: MsgType,
        sender: str,
        seq: int,
        meta: dict | None = None,
        body: bytes = b"",
    ) -> Envelope:
        """A new message in the same run and round, with a fresh nonce (never copy a nonce)."""
        return Envelope(
            type=type,
            run_id=self.run_id,
            round=self.round,
            sender=sender,
            seq=seq,
            meta={} if meta is None else meta,
            body=body,
        )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _known_types() -> str:
    return ", ".join(f"{t.name}={t.value}" for t in MsgType)


def _check_run_id(run_id, msg_type: MsgType) -> None:
    if not isinstance(run_id, str):
        raise WireError(f"run_id must be a str, got {type(run_id).__name__}")
    if run_id == "" and msg_type in UNBOUND_TYPES:
        return
    if _RUN_ID.fullmatch(run_id) is None:
        raise WireError(
            f"run_id must be 1-64 characters from [A-Za-z0-9_.-] ({msg_type.name} needs a run), "
            f"got {run_id!r}"
        )


def encode(env: Envelope) -> bytes:
    """Serialize an envelope (layout in docs/protocol.md).

    Overhead is 36 bytes plus run_id, sender, nonce and meta JSON; the body is copied once.

    Raises:
        WireError: if ``meta`` was mutated after construction into something invalid.
    """
    if not isinstance(env, Envelope):
        raise WireError(f"encode needs an Envelope, got {type(env).__name__}")
    run_id = env.run_id.encode("ascii")
    sender = env.sender.encode("ascii")
    meta = _meta_bytes(env.meta)
    header = _HEADER.pack(
        MAGIC,
        SCHEMA_VERSION,
        int(env.type),
        0,
        len(run_id),
        len(sender),
        len(env.nonce),
        env.round,
        env.seq,
        len(meta),
        len(env.body),
    )
    parts = (header, run_id, sender, env.nonce, meta, env.body)
    crc = 0
    for part in parts:  # the CRC runs over the parts so the body is copied once, by the join
        crc = zlib.crc32(part, crc)
    return b"".join((*parts, _CRC.pack(crc)))


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def _no_duplicates(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):  # rare: find the first repeated key for the message
        obj = {}
        for key, value in pairs:
            if key in obj:
                raise ValueError(f"duplicate key {key!r}")
            obj[key] = value
    return obj


# One decoder for every message, as _META_ENCODER (json.loads with options builds one per call).
_META_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


def _parse_meta(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
        if text.startswith("\ufeff"):  # what json.loads refuses before decoding
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        meta = _META_DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, UnicodeDecodeError and int-digit limits;
        # RecursionError comes from deeply nested arrays an attacker can fit in 64 KiB.
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise WireError(f"meta must be a UTF-8 JSON object: {reason}") from None
    if not isinstance(meta, dict):
        raise WireError(f"meta must be a JSON object, got {type(meta).__name__}")
    return meta


def _ascii(raw: bytes, name: str) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise WireError(f"{name} must be ASCII, got {raw[:64]!r}") from None


def decode(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    run_id: str | None = None,
    sender: str | None = None,
) -> Envelope:
    """Parse and validate one message; every malformed input raises :class:`WireError`.

    Args:
        data: bytes as received (bytes, bytearray or memoryview).
        max_bytes: reject larger messages before parsing anything.
        run_id: if given, the message must belong to this run (messages of
            :data:`UNBOUND_TYPES` may also carry the empty run_id).
        sender: if given, the message's sender must equal it; pass the device id from the
            topic (``Topics.parse_device``) so a device cannot speak for another one.

    Returns:
        The envelope; ``meta`` is a fresh dict and ``body`` a bytes copy.

    Raises:
        WireError: one line naming the field, the rule and the value.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"message must be bytes, got {type(data).__name__}")
    data = bytes(data)
    n = len(data)
    if n > max_bytes:
        raise WireError(f"message size must be <= max_bytes={max_bytes}, got {n} bytes")
    if n < 3:
        raise WireError(f"message must be at least {HEADER_SIZE + TRAILER_SIZE} bytes, got {n}")
    if data[:2] != MAGIC:
        raise WireError(f"magic must be {MAGIC!r}, got {data[:2]!r}")
    # Version is checked before the size so a newer, differently sized header gets this message.
    if data[2] != SCHEMA_VERSION:
        raise WireError(
            f"schema_version {data[2]} not supported; this build speaks {SCHEMA_VERSION}"
        )
    if n < HEADER_SIZE + TRAILER_SIZE:
        raise WireError(f"message must be at least {HEADER_SIZE + TRAILER_SIZE} bytes, got {n}")
    (_, _, type_code, flags, run_len, sender_len, nonce_len, rnd, seq, meta_len, body_len) = (
        _HEADER.unpack_from(data)
    )
    msg_type = MsgType._value2member_map_.get(type_code)
    if msg_type is None:
        raise WireError(f"type {type_code} unknown; known: {_known_types()}")
    if flags != 0:
        raise WireError(f"flags must be 0 in schema {SCHEMA_VERSION}, got {flags:#04x}")
    if run_len > 64:
        raise WireError(f"run_id length must be <= 64, got {run_len}")
    if not 1 <= sender_len <= 64:
        raise WireError(f"sender length must be in [1, 64], got {sender_len}")
    if nonce_len > MAX_NONCE_BYTES:
        raise WireError(f"nonce length must be <= {MAX_NONCE_BYTES}, got {nonce_len}")
    if meta_len > MAX_META_BYTES:
        raise WireError(f"meta length must be <= {MAX_META_BYTES}, got {meta_len}")
    expected = HEADER_SIZE + run_len + sender_len + nonce_len + meta_len + body_len + TRAILER_SIZE
    if expected != n:
        raise WireError(
            f"length fields must add up to the message size; header says {expected} bytes "
            f"(meta {meta_len}, body {body_len}), got {n}"
        )
    (crc,) = _CRC.unpack_from(data, n - TRAILER_SIZE)
    actual = zlib.crc32(memoryview(data)[: n - TRAILER_SIZE])
    if crc != actual:
        raise WireError(f"crc32 must match the content, got {crc:#010x} for {actual:#010x}")
    if rnd < 0:
        raise WireError(f"round must be >= 0, got {rnd}")

    pos = HEADER_SIZE
    fields = []
    for length in (run_len, sender_len, nonce_len, meta_len, body_len):
        fields.append(data[pos : pos + length])
        pos += length
    run_raw, sender_raw, nonce, meta_raw, body = fields
    msg_run = _ascii(run_raw, "run_id")
    msg_sender = _ascii(sender_raw, "sender")
    if _DEVICE_ID.fullmatch(msg_sender) is None:
        raise WireError(f"sender must be 1-64 characters from [A-Za-z0-9_.-], got {msg_sender!r}")
    _check_run_id(msg_run, msg_type)
    if (
        run_id is not None
        and msg_run != run_id
        and not (msg_run == "" and msg_type in UNBOUND_TYPES)
    ):
        raise WireError(f"run_id must be {run_id!r}, got {msg_run!r} from sender {msg_sender!r}")
    if sender is not None and msg_sender != sender:
        raise WireError(f"sender must be {sender!r} (from the topic), got {msg_sender!r}")
    meta = _parse_meta(meta_raw)
    # Every field but meta was checked above, as strictly as Envelope.__post_init__ would.
    return Envelope._parsed(msg_type, msg_run, rnd, msg_sender, seq, nonce, meta, body)
