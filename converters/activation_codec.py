"""Codecs for cut-layer activations and gradients: float32, fp16, int8, top-k and frozen PCA."""

from __future__ import annotations

import math
import struct

import numpy as np

from converters.errors import CodecError, ConfigError
from converters.pca import (  # re-exported: the codec registry is where users look first
    PCA_FILE,
    PCA_ONNX_FILE,
    PcaProjection,
    attach_pca,
    export_pca_onnx,
    fit_pca,
    load_pca,
)

# Payload layout: magic b"EA" | version u8 | family id u8 | body. The shape travels in the
# request's meta (and is checked against the manifest), so it is not repeated here: a digits
# activation is 256 bytes as float32, and tensor_codec's ~46-byte header would eat the savings.
MAGIC = b"EA"
VERSION = 1
HEADER = struct.Struct("<2sBB")
_FP16_MAX = float(np.finfo(np.float16).max)


def _check_batch(x, what: str = "activation") -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        raise CodecError(f"{what} must be a float numpy array, got {getattr(x, 'dtype', type(x))}")
    if x.ndim < 2 or x.shape[0] == 0 or x.size == 0:
        raise CodecError(f"{what} must have shape (N>=1, features...), got {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise CodecError(f"{what} must be finite, got {int((~np.isfinite(x)).sum())} NaN/Inf")
    return x


def _take(buf: memoryview, pos: int, n: int, what: str) -> tuple[memoryview, int]:
    if n > len(buf) - pos:
        raise CodecError(f"{what} needs {n} bytes at offset {pos}, only {len(buf) - pos} left")
    return buf[pos : pos + n], pos + n


class ActivationCodec:
    """Base class: ``encode(batch) -> bytes`` and ``decode(bytes, shape) -> float32 batch``.

    Subclasses implement ``_pack`` (body bytes) and ``_unpack`` (body -> array, consuming
    exactly the body). Decoding validates the header, every length against ``shape`` and
    rejects NaN/Inf, so a hostile payload raises CodecError and nothing else.
    """

    name = "base"
    family = 0

    def encode(self, x: np.ndarray) -> bytes:
        """Encodes a batch ``(N, *shape)``; raises CodecError on NaN/Inf or a bad shape."""
        x = _check_batch(x)
        return HEADER.pack(MAGIC, VERSION, self.family) + self._pack(x)

    def decode(self, data: bytes, shape) -> np.ndarray:
        """Decodes a payload into a float32 array of ``shape`` ``(N, *activation_shape)``."""
        shape = tuple(int(d) for d in shape)
        if len(shape) < 2 or any(d < 1 for d in shape):
            raise CodecError(f"shape must be (N>=1, dims>=1...), got {shape}")
        buf = memoryview(bytes(data))
        if len(buf) < HEADER.size:
            raise CodecError(f"{self.name} payload must be >= {HEADER.size} bytes, got {len(buf)}")
        magic, version, family = HEADER.unpack_from(buf)
        if magic != MAGIC or version != VERSION:
            raise CodecError(
                f"payload header must be {MAGIC!r} v{VERSION}, got {magic!r} v{version}"
            )
        if family != self.family:
            raise CodecError(f"payload codec id must be {self.family} ({self.name}), got {family}")
        out, pos = self._unpack(buf, HEADER.size, shape)
        if pos != len(buf):
            raise CodecError(f"{self.name} payload has {len(buf) - pos} trailing bytes")
        if not np.isfinite(out).all():
            raise CodecError(
                f"{self.name} payload decodes to {int((~np.isfinite(out)).sum())} NaN/Inf"
            )
        return out.reshape(shape)

    def _pack(self, x: np.ndarray) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def _unpack(self, buf, pos, shape):  # pragma: no cover - abstract
        raise NotImplementedError


class Float32Codec(ActivationCodec):
    """Lossless little-endian float32."""

    name, family = "float32", 1

    def _pack(self, x):
        return x.astype("<f4").tobytes()

    def _unpack(self, buf, pos, shape):
        raw, pos = _take(buf, pos, 4 * math.prod(shape), self.name)
        return np.frombuffer(raw, "<f4").astype(np.float32), pos


class Fp16Codec(ActivationCodec):
    """IEEE half precision: relative error <= 2**-11 in the normal range, finite values only."""

    name, family = "fp16", 2

    def _pack(self, x):
        if x.size and float(np.abs(x).max()) > _FP16_MAX:
            raise CodecError(f"fp16 values must satisfy |x| <= {_FP16_MAX}, got {np.abs(x).max()}")
        return x.astype("<f2").tobytes()

    def _unpack(self, buf, pos, shape):
        raw, pos = _take(buf, pos, 2 * math.prod(shape), self.name)
        return np.frombuffer(raw, "<f2").astype(np.float32), pos


class Int8Codec(ActivationCodec):
    """Symmetric int8, |error| <= scale / 2 with scale = max|x| / 127 per channel.

    Conv activations ``(N, C, ...)`` get one float32 scale per channel C over the batch; flat
    ``(N, F)`` ones (and PCA codes) one per row, since a scale per feature would cost 4 bytes
    per feature for a single-sample request and the row is what a request owns.
    """

    name, family = "int8", 3

    @staticmethod
    def _axes(shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if len(shape) >= 3:
            return tuple(i for i in range(len(shape)) if i != 1), (1, shape[1]) + (1,) * (
                len(shape) - 2
            )
        return (1,), (shape[0], 1)

    def _pack(self, x):
        reduce_axes, bshape = self._axes(x.shape)
        ideal = np.abs(x.astype(np.float64)).max(axis=reduce_axes) / 127.0
        scales = ideal.astype("<f4")
        low = scales.astype(np.float64) < ideal  # round up so |x| / scale <= 127 never clips
        scales[low] = np.nextafter(scales[low], np.float32(np.inf))
        s64 = scales.astype(np.float64).reshape(bshape)
        q = np.rint(x / np.where(s64 > 0, s64, 1.0)).clip(-127, 127).astype("<i1")
        return scales.tobytes() + q.tobytes()

    def _unpack(self, buf, pos, shape):
        _, bshape = self._axes(shape)
        raw, pos = _take(buf, pos, 4 * math.prod(bshape), "int8 scales")
        scales = np.frombuffer(raw, "<f4")
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise CodecError("int8 scales must be finite and >= 0")
        raw, pos = _take(buf, pos, math.prod(shape), "int8 data")
        q = np.frombuffer(raw, "<i1").reshape(shape).astype(np.float32)
        return q * scales.astype(np.float32).reshape(bshape), pos


VALUE_CODECS = {"float32": Float32Codec, "fp16": Fp16Codec, "int8": Int8Codec}


def _value_codec(name: str | None, spec: str) -> ActivationCodec:
    if name is None:
        return Float32Codec()
    if name not in VALUE_CODECS:
        raise ConfigError(
            f"codec={spec!r}: values codec after '+' must be one of "
            f"{', '.join(VALUE_CODECS)}, got {name!r}"
        )
    return VALUE_CODECS[name]()


class TopKCodec(ActivationCodec):
    """Keeps the K largest-magnitude entries per sample (indices + values); decodes to dense.

    Kept values are exact with float32 values (fp16 with ``+fp16``); dropped ones decode to 0.
    """

    family = 4

    def __init__(self, k: int | None = None, fraction: float | None = None, values=None) -> None:
        self.k, self.fraction = k, fraction
        self.values = values or Float32Codec()
        arg = k if k is not None else fraction
        suffix = "" if self.values.name == "float32" else f"+{self.values.name}"
        self.name = f"topk:{arg}{suffix}"

    def kept(self, features: int) -> int:
        """Entries kept per sample for ``features`` features."""
        k = self.k if self.k is not None else math.ceil(self.fraction * features)
        return max(1, min(k, features))

    def _pack(self, x):
        flat = x.reshape(len(x), -1)
        k = self.kept(flat.shape[1])
        idx = np.sort(np.argpartition(-np.abs(flat), k - 1, axis=1)[:, :k], axis=1)
        itype = "<u2" if flat.shape[1] <= 65536 else "<u4"
        vals = np.take_along_axis(flat, idx, axis=1)
        return idx.astype(itype).tobytes() + self.values._pack(vals)

    def _unpack(self, buf, pos, shape):
        n, f = shape[0], math.prod(shape[1:])
        k = self.kept(f)
        itype = np.dtype("<u2" if f <= 65536 else "<u4")
        raw, pos = _take(buf, pos, n * k * itype.itemsize, "topk indices")
        idx = np.frombuffer(raw, itype).reshape(n, k).astype(np.int64)
        if (idx >= f).any() or (k > 1 and (np.diff(idx, axis=1) <= 0).any()):
            raise CodecError(f"topk indices must be strictly increasing and < {f} per row")
        vals, pos = self.values._unpack(buf, pos, (n, k))
        out = np.zeros((n, f), np.float32)
        np.put_along_axis(out, idx, vals.reshape(n, k), axis=1)
        return out, pos


class PcaCodec(ActivationCodec):
    """Sends D PCA codes per sample; the cloud reconstructs ``code @ components + mean``.

    The cloud half runs unchanged on the reconstruction (it is not fine-tuned on codes). On a
    device ``edge.pca.onnx`` already outputs codes: send them with :meth:`encode_codes`.
    """

    family = 5

    def __init__(self, projection: PcaProjection, values=None) -> None:
        self.projection = projection
        self.values = values or Float32Codec()
        suffix = "" if self.values.name == "float32" else f"+{self.values.name}"
        self.name = f"pca:{projection.dim}{suffix}"

    def encode_codes(self, codes: np.ndarray) -> bytes:
        """Encodes codes ``(N, D)`` already computed by the edge graph."""
        codes = _check_batch(codes, "pca codes")
        if codes.shape[1:] != (self.projection.dim,):
            raise CodecError(
                f"pca codes must have shape (N, {self.projection.dim}), got {codes.shape}"
            )
        return HEADER.pack(MAGIC, VERSION, self.family) + self.values._pack(codes)

    def _pack(self, x):
        return self.values._pack(self.projection.project(x).astype(np.float32))

    def _unpack(self, buf, pos, shape):
        if math.prod(shape[1:]) != self.projection.features:
            raise CodecError(f"pca decodes to {self.projection.features} features, shape {shape}")
        codes, pos = self.values._unpack(buf, pos, (shape[0], self.projection.dim))
        return self.projection.reconstruct(codes.reshape(shape[0], -1)), pos


def _simple(cls):
    def make(arg, values, pca, spec):
        if arg is not None or values is not None:
            raise ConfigError(f"codec={spec!r}: {cls.name} takes no ':' argument or '+' suffix")
        return cls()

    return make


def _topk(arg, values, pca, spec):
    try:
        num = float(arg) if arg is not None and "." in arg else int(arg or "")
    except ValueError:
        num = None
    if isinstance(num, int) and num >= 1:
        return TopKCodec(k=num, values=_value_codec(values, spec))
    if isinstance(num, float) and 0 < num <= 1:
        return TopKCodec(fraction=num, values=_value_codec(values, spec))
    raise ConfigError(f"codec={spec!r}: topk needs K >= 1 or a FRACTION in (0, 1], e.g. topk:0.25")


def _pca(arg, values, pca, spec):
    if pca is None:
        raise ConfigError(f"codec={spec!r} needs the split's {PCA_FILE}; run attach_pca first")
    if arg is None or not arg.isdigit() or int(arg) != pca.dim:
        raise ConfigError(f"codec={spec!r}: D must equal the fitted pca dim {pca.dim}")
    return PcaCodec(pca, _value_codec(values, spec))


# Family name -> factory(arg after ':', values codec after '+', projection, spec).
CODECS = {
    "float32": _simple(Float32Codec),
    "fp16": _simple(Fp16Codec),
    "int8": _simple(Int8Codec),
    "topk": _topk,
    "pca": _pca,
}


def get_codec(spec: str, *, pca: PcaProjection | None = None) -> ActivationCodec:
    """Builds a codec from ``name[:arg][+values]``: float32, fp16, int8, topk:K|FRACTION[+fp16],
    pca:D[+fp16|+int8] (``pca`` is the split's frozen projection).

    Raises:
        ConfigError: Unknown name (listing the known ones) or a bad argument.
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"codec must be a non-empty string, got {spec!r}")
    head, _, values = spec.partition("+")
    name, sep, arg = head.partition(":")
    if name not in CODECS:
        raise ConfigError(f"codec={spec!r} unknown; known: {', '.join(CODECS)}")
    return CODECS[name](arg if sep else None, values or None, pca, spec)


def default_codec(pca: PcaProjection | None) -> str:
    """The codec devices use unless told otherwise: int8 PCA codes when the split has a PCA
    (24 bytes per digits sample at D=16, 10.8x below float32), else int8 (up to 4x)."""
    return "int8" if pca is None else f"pca:{pca.dim}+int8"


__all__ = [
    "CODECS",
    "PCA_FILE",
    "PCA_ONNX_FILE",
    "ActivationCodec",
    "PcaCodec",
    "PcaProjection",
    "attach_pca",
    "default_codec",
    "export_pca_onnx",
    "fit_pca",
    "get_codec",
    "load_pca",
]
