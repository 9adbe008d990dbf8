"""Named-tensor codec: float32 / fp16 / int8 payloads with optional zlib or zstd compression.

Blob layout (all little-endian, independent of the host's byte order)::

    magic b"ET" | version u8 | compression u8 | count u32 | payload_len u64      (16 bytes)
    payload (compressed as a whole when compression != 0), ``count`` records of:
    name_len u16 | name UTF-8 | kind u8 | ndim u8 | dims u32[ndim] | data_len u64
    | [int8 only: axis i8 (-1 = per tensor) | scales f32[1 or dims[axis]]] | data

Float tensors (float16/32/64) are encoded by the chosen codec and always decode to float32.
Integer and bool tensors are always sent raw in their own dtype, whatever the codec, so buffers
such as ``num_batches_tracked`` (int64) round-trip losslessly.

Measured (asserted in tests/converters/test_tensor_codec.py) for a 100,042-parameter model in six
tensors: float32 = raw + 190 bytes (0.05% overhead); fp16 = 0.5005x raw; int8 with per-channel
scales = 0.252x raw. Headers cost 16 bytes per blob plus 12 + len(name) + 4 * ndim per tensor.
Uncompressed encode/decode of that model takes ~0.4-1 ms on one core; zlib costs 6-25 ms to
encode and saves 7-8% on trained-looking (Gaussian) weights, much more on sparse ones.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from converters.errors import CodecError, ConfigError

CODEC_VERSION = 1
MAGIC = b"ET"
_BLOB = struct.Struct("<2sBBIQ")
_NAME_LEN = struct.Struct("<H")
_KIND_NDIM = struct.Struct("<BB")
_U64 = struct.Struct("<Q")
_AXIS = struct.Struct("<b")
MAX_NDIM = 32
_DIMS = [struct.Struct(f"<{n}I") for n in range(MAX_NDIM + 1)]  # dims u32[ndim], by ndim
MAX_NAME_BYTES = 1024

# Raw kinds 16-24: integer/bool tensors stored as-is. Float kinds 1-3 are the codecs below.
_RAW_CODES = ["<i1", "<u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "?"]
_RAW_KINDS: dict[int, np.dtype] = {16 + i: np.dtype(c) for i, c in enumerate(_RAW_CODES)}
# Keyed by (kind, itemsize) so the lookup ignores the caller's byte order.
_KIND_OF_RAW = {(dt.kind, dt.itemsize): k for k, dt in _RAW_KINDS.items()}


@dataclass(frozen=True)
class _Codec:
    """How float tensors are stored: kind code on the wire and the stored dtype."""

    name: str
    kind: int
    wire_dtype: str


CODECS: dict[str, _Codec] = {
    "float32": _Codec("float32", 1, "<f4"),
    "fp16": _Codec("fp16", 2, "<f2"),
    "int8": _Codec("int8", 3, "<i1"),
}
_CODEC_BY_KIND = {c.kind: c for c in CODECS.values()}
_WIRE_DTYPE = {c.kind: np.dtype(c.wire_dtype) for c in CODECS.values()}
_FP16_MAX = float(np.finfo(np.float16).max)
_FP32_MAX = float(np.finfo(np.float32).max)


def _zstd():
    try:
        import zstandard
    except ImportError:
        raise CodecError(
            "compress='zstd' needs the zstandard package; pip install zstandard "
            "(or use compress='zlib')"
        ) from None
    return zstandard


def _zlib_decompress(data: bytes, limit: int) -> bytes:
    d = zlib.decompressobj()
    out = d.decompress(data, limit + 1)  # bounded: a bomb stops at limit + 1 bytes
    if not d.eof or d.unused_data:
        raise CodecError("zlib payload is truncated, oversized or has trailing bytes")
    return out


def _zstd_decompress(data: bytes, limit: int) -> bytes:
    import io

    reader = _zstd().ZstdDecompressor().stream_reader(io.BytesIO(data))
    return reader.read(limit + 1)


# name -> (wire code, compress(bytes) -> bytes, decompress(bytes, limit) -> bytes)
COMPRESSORS: dict[str, tuple[int, object, object]] = {
    "zlib": (1, lambda b: zlib.compress(b, 6), _zlib_decompress),
    "zstd": (2, lambda b: _zstd().ZstdCompressor(level=3).compress(b), _zstd_decompress),
}
_COMPRESSOR_BY_CODE = {code: (name, dec) for name, (code, _, dec) in COMPRESSORS.items()}


def get_codec(name: str) -> _Codec:
    """Look up a codec by name; unknown names raise ``ValueError`` listing the known ones."""
    if name not in CODECS:
        raise ConfigError(f"codec={name!r} unknown; known codecs: {', '.join(sorted(CODECS))}")
    return CODECS[name]


def tensor_nbytes(tensors: Mapping[str, np.ndarray]) -> int:
    """Raw size to compare encodings against: 4 bytes per float element (float32), the own
    itemsize for integer and bool tensors."""
    total = 0
    for arr in tensors.values():
        a = np.asarray(arr)
        total += a.size * (4 if a.dtype.kind == "f" else a.dtype.itemsize)
    return total


def _int8_quantize(x: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8: scale = max|x| / 127 per tensor or per slice along ``axis``."""
    x64 = x.astype(np.float64)
    if axis is None:
        amax = np.array([np.abs(x64).max(initial=0.0)])
        shape = (1,) * x.ndim
    else:
        others = tuple(i for i in range(x.ndim) if i != axis)
        amax = np.abs(x64).max(axis=others, initial=0.0)
        shape = tuple(-1 if i == axis else 1 for i in range(x.ndim))
    ideal = amax / 127.0
    scales = ideal.astype("<f4")
    # Round the float32 scale up, never down, so |x| / scale <= 127 and nothing is clipped.
    low = scales.astype(np.float64) < ideal
    scales[low] = np.nextafter(scales[low], np.float32(np.inf))
    # Quantize with the float32 scale the decoder will see, so the error stays <= scale / 2.
    s64 = scales.astype(np.float64).reshape(shape)
    safe = np.where(s64 > 0, s64, 1.0)
    q = np.clip(np.rint(x64 / safe), -127, 127).astype("<i1")
    return scales, q


def _encode_one(name: str, arr, codec: _Codec, per_channel_axis: int | None) -> bytes:
    if not isinstance(name, str):
        raise CodecError(f"tensor names must be str, got {name!r}")
    name_b = name.encode("utf-8", "strict")
    if not 1 <= len(name_b) <= MAX_NAME_BYTES:
        raise CodecError(f"tensor name must be 1-{MAX_NAME_BYTES} UTF-8 bytes, got {name!r}")
    a = np.asarray(arr)
    if a.ndim > MAX_NDIM or any(d >= 2**32 for d in a.shape):
        raise CodecError(f"tensor {name!r}: shape {a.shape} exceeds ndim <= 32, dims < 2**32")
    extra = b""
    if a.dtype.kind == "f":
        # NaN/Inf travel as such in float32/fp16; decode rejects them unless allowed. Finite
        # values that would overflow to inf are refused here instead of corrupting silently.
        limit = _FP16_MAX if codec.kind == 2 else _FP32_MAX
        # A finite float32 never exceeds the float32 range: only fp16 needs the scan then.
        if a.dtype.itemsize > 2 and a.size and (codec.kind == 2 or a.dtype.itemsize > 4):
            over = int(np.count_nonzero(np.abs(a[np.isfinite(a)]) > limit))
            if over:
                raise CodecError(
                    f"tensor {name!r}: {over} values exceed the {codec.name} range "
                    f"(|x| <= {limit:.6g}); use a wider codec"
                )
        if codec.kind == 1:
            data = a.astype("<f4", copy=False).tobytes()
        elif codec.kind == 2:
            data = a.astype("<f2", copy=False).tobytes()
        else:
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            if bad:
                raise CodecError(f"tensor {name!r}: {bad} NaN/Inf values cannot be int8-quantized")
            axis = per_channel_axis
            if axis is not None:
                if a.ndim < 2 or a.size == 0:
                    axis = None  # one scale per element would cost more than the data
                elif not -a.ndim <= axis < a.ndim:
                    raise CodecError(
                        f"per_channel_axis must be in [{-a.ndim}, {a.ndim}) for tensor {name!r} "
                        f"of shape {a.shape}, got {axis}"
                    )
                else:
                    axis %= a.ndim
            scales, q = _int8_quantize(a, axis)
            extra = _AXIS.pack(-1 if axis is None else axis) + scales.tobytes()
            data = q.tobytes()
        kind = codec.kind
    elif a.dtype.kind in "iub":
        kind = _KIND_OF_RAW[(a.dtype.kind, a.dtype.itemsize)]
        data = a.astype(_RAW_KINDS[kind], copy=False).tobytes()
    else:
        raise CodecError(
            f"tensor {name!r}: dtype {a.dtype} not supported; use float, integer or bool"
        )
    dims = _DIMS[a.ndim].pack(*a.shape)
    return b"".join(
        (
            _NAME_LEN.pack(len(name_b)),
            name_b,
            _KIND_NDIM.pack(kind, a.ndim),
            dims,
            _U64.pack(len(data)),
            extra,
            data,
        )
    )


def encode_tensors(
    tensors: Mapping[str, np.ndarray],
    *,
    codec: str = "float32",
    compress: str | None = None,
    per_channel_axis: int | None = 0,
) -> bytes:
    """Serialize named tensors, keeping their order.

    Args:
        tensors: name -> array (NumPy or anything ``np.asarray`` accepts).
        codec: ``"float32"``, ``"fp16"`` or ``"int8"`` for float tensors (see :data:`CODECS`).
        compress: ``None``, ``"zlib"`` or ``"zstd"`` (needs ``pip install zstandard``).
        per_channel_axis: int8 only; one scale per slice along this axis for tensors with
            ``ndim >= 2``; 1-D, 0-d and empty tensors and ``None`` use one scale per tensor.

    Returns:
        The blob.

    Raises:
        ValueError: unknown codec or compression name.
        CodecError: a tensor cannot be encoded (bad name or dtype, fp16 overflow, NaN for int8).
    """
    c = get_codec(codec)
    if compress is not None and compress not in COMPRESSORS:
        raise ConfigError(
            f"compress={compress!r} unknown; known: None, {', '.join(sorted(COMPRESSORS))}"
        )
    if not isinstance(tensors, Mapping):
        raise CodecError(f"tensors must be a mapping name -> array, got {type(tensors).__name__}")
    payload = b"".join(_encode_one(k, v, c, per_channel_axis) for k, v in tensors.items())
    code = 0
    body = payload
    if compress is not None:
        code, compress_fn, _ = COMPRESSORS[compress]
        body = compress_fn(payload)
    return _BLOB.pack(MAGIC, CODEC_VERSION, code, len(tensors), len(payload)) + body


def _short(n: int, pos: int, end: int, what: str, *args) -> None:
    """Raises for a read past the end (``what.format(*args)`` is only built then: a decode
    reads six fields per tensor)."""
    raise CodecError(f"{what.format(*args)} needs {n} bytes at offset {pos}, only {end - pos} left")


def _read_blob_header(data) -> tuple[int, int, int, memoryview]:
    """Check magic and version; return (compression code, count, payload_len, rest as a view)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"tensor blob must be bytes, got {type(data).__name__}")
    data = bytes(data)  # no copy for bytes; a caller's mutable buffer is copied once
    if len(data) < _BLOB.size:
        raise CodecError(f"tensor blob must be at least {_BLOB.size} bytes, got {len(data)}")
    magic, version, comp, count, payload_len = _BLOB.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(f"tensor blob magic must be {MAGIC!r}, got {magic!r}")
    if version != CODEC_VERSION:
        raise CodecError(
            f"tensor codec version {version} not supported; this build speaks {CODEC_VERSION}"
        )
    return comp, count, payload_len, memoryview(data)[_BLOB.size :]


def decode_tensors(
    data: bytes,
    *,
    expect: Mapping[str, tuple[tuple[int, ...], str]] | None = None,
    allow_nonfinite: bool = False,
    max_elements: int = 2**28,
) -> dict[str, np.ndarray]:
    """Parse a blob from :func:`encode_tensors`; malformed input only ever raises CodecError.

    Args:
        data: the blob.
        expect: name -> (shape, dtype name) that must match exactly (float codecs decode to
            ``"float32"``); all mismatches are reported together.
        allow_nonfinite: accept NaN/Inf in float tensors (rejected by default).
        max_elements: cap on the total element count; also caps the decompressed size at
            ``8 * max_elements + 1 MiB`` so a compression bomb cannot exhaust memory.

    Returns:
        name -> writable array in blob order: float32 for float codecs, the original dtype
        (native byte order) for integer and bool tensors.

    Raises:
        CodecError: bad header, truncated or inconsistent data, expectation mismatch, NaN/Inf.
    """
    comp, count, payload_len, body = _read_blob_header(data)
    cap = 8 * max_elements + 2**20
    if payload_len > cap:
        raise CodecError(
            f"payload_len must be <= {cap} (8 * max_elements + 1 MiB), got {payload_len}"
        )
    if comp == 0:
        payload = body
    elif comp in _COMPRESSOR_BY_CODE:
        cname, decompress = _COMPRESSOR_BY_CODE[comp]
        try:
            payload = decompress(body, payload_len)
        except CodecError:
            raise
        except Exception as exc:  # zlib.error, zstd.ZstdError: corrupt compressed stream
            raise CodecError(f"{cname} payload is corrupt: {type(exc).__name__}") from None
    else:
        raise CodecError(f"compression code must be 0, 1 or 2, got {comp}")
    if len(payload) != payload_len:
        raise CodecError(
            f"payload_len must match the payload, header says {payload_len}, got {len(payload)}"
        )

    # Bounds-checked reads straight from a view of the payload (every read past the end is a
    # CodecError, never an IndexError); array data is copied once, by _to_array.
    buf = memoryview(payload)
    end = len(buf)
    pos = 0
    out: dict[str, np.ndarray] = {}
    total = 0
    for i in range(count):
        if end - pos < 2:
            _short(2, pos, end, "record {} name length", i)
        (name_len,) = _NAME_LEN.unpack_from(buf, pos)
        pos += 2
        if not 1 <= name_len <= MAX_NAME_BYTES:
            raise CodecError(
                f"record {i}: name length must be in [1, {MAX_NAME_BYTES}], got {name_len}"
            )
        if end - pos < name_len:
            _short(name_len, pos, end, "record {} name", i)
        try:
            name = str(buf[pos : pos + name_len], "utf-8")
        except UnicodeDecodeError:
            raise CodecError(f"record {i}: name must be UTF-8") from None
        pos += name_len
        if name in out:
            raise CodecError(f"tensor {name!r} appears twice")
        if end - pos < 2:
            _short(2, pos, end, "tensor {!r} kind", name)
        kind, ndim = _KIND_NDIM.unpack_from(buf, pos)
        pos += 2
        if ndim > MAX_NDIM:
            raise CodecError(f"tensor {name!r}: ndim must be <= {MAX_NDIM}, got {ndim}")
        dims = _DIMS[ndim]
        if end - pos < dims.size:
            _short(dims.size, pos, end, "tensor {!r} dims", name)
        shape = dims.unpack_from(buf, pos)
        pos += dims.size
        size = 1
        for d in shape:
            size *= d  # Python ints: no overflow however large the dims claim to be
        total += size
        if total > max_elements:
            raise CodecError(
                f"tensor {name!r}: total elements must be <= max_elements={max_elements}, "
                f"got {total}"
            )
        if end - pos < 8:
            _short(8, pos, end, "tensor {!r} data length", name)
        (data_len,) = _U64.unpack_from(buf, pos)
        pos += 8
        if kind in _CODEC_BY_KIND:
            codec = _CODEC_BY_KIND[kind]
            wire_dtype = _WIRE_DTYPE[kind]
        elif kind in _RAW_KINDS:
            codec = None
            wire_dtype = _RAW_KINDS[kind]
        else:
            raise CodecError(f"tensor {name!r}: kind code {kind} unknown")
        if data_len != size * wire_dtype.itemsize:
            raise CodecError(
                f"tensor {name!r}: data_len must be {size * wire_dtype.itemsize} for shape "
                f"{shape} as {wire_dtype.name}, got {data_len}"
            )
        scales = None
        axis = -1
        if codec is not None and codec.name == "int8":
            if end - pos < 1:
                _short(1, pos, end, "tensor {!r} int8 axis", name)
            (axis,) = _AXIS.unpack_from(buf, pos)
            pos += 1
            if not (axis == -1 or 0 <= axis < ndim):
                raise CodecError(
                    f"tensor {name!r}: int8 axis must be -1 or in [0, {ndim}), got {axis}"
                )
            n = 4 * (1 if axis == -1 else shape[axis])
            if end - pos < n:
                _short(n, pos, end, "tensor {!r} scales", name)
            scales = np.frombuffer(buf[pos : pos + n], "<f4")
            pos += n
            if not (np.isfinite(scales).all() and (scales >= 0).all()):
                raise CodecError(f"tensor {name!r}: int8 scales must be finite and >= 0")
        if end - pos < data_len:
            _short(data_len, pos, end, "tensor {!r} data", name)
        raw = np.frombuffer(buf[pos : pos + data_len], wire_dtype)
        pos += data_len
        arr = _to_array(name, raw, codec, shape, scales, axis)
        if codec is not None and not allow_nonfinite:
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            if bad:
                raise CodecError(
                    f"tensor {name!r}: {bad} non-finite values (NaN/Inf); "
                    f"pass allow_nonfinite=True to accept them"
                )
        out[name] = arr
    if pos != end:
        raise CodecError(f"payload has {end - pos} trailing bytes after {count} tensors")
    if expect is not None:
        _check_expect(out, expect)
    return out


def _to_array(name, raw, codec, shape, scales, axis) -> np.ndarray:
    """Convert the wire buffer to a writable native-order array of the decoded dtype."""
    try:
        if codec is None:
            if raw.dtype.kind == "b" and raw.view(np.uint8).max(initial=0) > 1:
                raise CodecError(f"tensor {name!r}: bool bytes must be 0 or 1")
            return raw.astype(raw.dtype.newbyteorder("=")).reshape(shape)
        arr = raw.astype(np.float32).reshape(shape)
        if scales is not None:
            ndim = len(shape)
            bshape = (
                (1,) * ndim if axis == -1 else tuple(-1 if j == axis else 1 for j in range(ndim))
            )
            # Hostile scales can overflow to inf; the non-finite check right after rejects it.
            with np.errstate(over="ignore", invalid="ignore"):
                arr *= scales.astype(np.float32).reshape(bshape)
        return arr
    except ValueError as exc:  # numpy refuses absurd shapes such as (0, 2**32 - 1, ...)
        if isinstance(exc, CodecError):
            raise
        raise CodecError(f"tensor {name!r}: shape {shape} rejected by numpy: {exc}") from None


def _check_expect(out: dict[str, np.ndarray], expect) -> None:
    if len(out) == len(expect) and all(
        name in out and out[name].shape == tuple(shape) and out[name].dtype == dtype
        for name, (shape, dtype) in expect.items()
    ):
        return  # the common case, checked without building the report
    problems = []
    missing = [k for k in expect if k not in out]
    extra = [k for k in out if k not in expect]
    if missing:
        problems.append(f"missing tensors {missing}")
    if extra:
        problems.append(f"unexpected tensors {extra}")
    for name, (shape, dtype) in expect.items():
        if name not in out:
            continue
        arr = out[name]
        if tuple(arr.shape) != tuple(shape):
            problems.append(f"tensor {name!r}: shape {tuple(shape)} expected, got {arr.shape}")
        if arr.dtype != np.dtype(dtype):
            problems.append(
                f"tensor {name!r}: dtype {np.dtype(dtype).name} expected, got {arr.dtype.name}"
            )
    if problems:
        raise CodecError("; ".join(problems))
