"""Tests for the tensor codec: exactness and error bounds vs NumPy, layout, sizes, fuzzing."""

from __future__ import annotations

import contextlib
import struct
import sys
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from converters.errors import CodecError
from converters.tensor_codec import (
    CODECS,
    COMPRESSORS,
    decode_tensors,
    encode_tensors,
    tensor_nbytes,
)

NAMES = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
INT_DTYPES = ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "bool"]


def float32_arrays():
    return hnp.arrays(
        np.float32, SHAPES, elements=st.floats(allow_nan=False, allow_infinity=False, width=32)
    )


def model_100k(rng) -> dict[str, np.ndarray]:
    """A 100,042-parameter CNN-like state dict in six tensors."""
    shapes = {
        "conv1.weight": (32, 1, 3, 3),
        "conv1.bias": (32,),
        "fc1.weight": (128, 768),
        "fc1.bias": (128,),
        "fc2.weight": (10, 128),
        "fc2.bias": (10,),
    }
    return {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in shapes.items()}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(NAMES, float32_arrays(), max_size=4), st.sampled_from([None, "zlib"]))
def test_float32_round_trip_is_exact(tensors, compress):
    out = decode_tensors(encode_tensors(tensors, codec="float32", compress=compress))
    assert list(out) == list(tensors)
    for k, x in tensors.items():
        assert out[k].dtype == np.float32 and out[k].shape == x.shape
        np.testing.assert_array_equal(out[k], x)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from(INT_DTYPES), st.sampled_from(list(CODECS)))
def test_integer_tensors_pass_raw_whatever_the_codec(data, dtype, codec):
    x = data.draw(hnp.arrays(np.dtype(dtype), SHAPES))
    out = decode_tensors(encode_tensors({"buf": x}, codec=codec))["buf"]
    assert out.dtype == np.dtype(dtype) and out.shape == x.shape
    np.testing.assert_array_equal(out, x)


def test_num_batches_tracked_int64_lossless():
    x = np.array(2**62 + 12345, dtype=np.int64)
    out = decode_tensors(encode_tensors({"bn.num_batches_tracked": x}, codec="int8"))
    assert out["bn.num_batches_tracked"].dtype == np.int64
    assert int(out["bn.num_batches_tracked"]) == 2**62 + 12345


def test_float64_decodes_as_its_float32_rounding(rng):
    x = rng.normal(size=(7, 3))
    out = decode_tensors(encode_tensors({"x": x}))["x"]
    np.testing.assert_array_equal(out, x.astype(np.float32))


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, SHAPES, elements=st.floats(-65504, 65504, width=32)))
def test_fp16_error_within_half_epsilon_relative(x):
    out = decode_tensors(encode_tensors({"x": x}, codec="fp16"))["x"]
    eps = float(np.finfo(np.float16).eps)
    tiny = 2.0**-24  # spacing of fp16 subnormals
    err = np.abs(out.astype(np.float64) - x.astype(np.float64))
    bound = np.maximum(eps / 2 * np.abs(x.astype(np.float64)), tiny / 2)
    assert np.all(err <= bound)


def _int8_bound(x: np.ndarray, axis: int | None) -> np.ndarray:
    """Half a quantization step per element, from max|x| / 127 computed here in float64."""
    x64 = np.abs(x.astype(np.float64))
    if axis is None or x.ndim < 2 or x.size == 0:
        step = np.full(x.shape, x64.max(initial=0.0) / 127)
    else:
        amax = np.moveaxis(x64, axis, 0).reshape(x.shape[axis], -1).max(axis=1)
        shape = [1] * x.ndim
        shape[axis] = -1
        step = np.broadcast_to((amax / 127).reshape(shape), x.shape)
    # float32 storage of the scale and of the product each add at most one rounding.
    # One float32 subnormal spacing (2**-149) covers scales too small for a normal float32.
    return step / 2 * (1 + 1e-6) + np.abs(x.astype(np.float64)) * 2.0**-23 + 2.0**-149


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hnp.arrays(np.float32, SHAPES, elements=st.floats(-1e6, 1e6, width=32)),
    st.sampled_from([None, 0, 1, -1]),
)
def test_int8_error_within_half_scale(x, axis):
    if axis is not None and x.ndim >= 2 and not -x.ndim <= axis < x.ndim:
        axis = 0
    out = decode_tensors(encode_tensors({"x": x}, codec="int8", per_channel_axis=axis))["x"]
    err = np.abs(out.astype(np.float64) - x.astype(np.float64))
    norm_axis = None if axis is None or x.ndim < 2 else axis % x.ndim
    assert np.all(err <= _int8_bound(x, norm_axis))


@pytest.mark.parametrize("amax", [1.4e-45, 1e-40, 3e-38, 1.0, 3.4e38])
def test_int8_extreme_magnitudes_stay_within_bound(amax):
    x = np.array([[amax, -amax / 3], [0.0, amax / 2]], np.float32)
    for axis in (None, 0):
        out = decode_tensors(encode_tensors({"x": x}, codec="int8", per_channel_axis=axis))["x"]
        err = np.abs(out.astype(np.float64) - x.astype(np.float64))
        assert np.all(err <= _int8_bound(x, axis))


def test_per_channel_int8_beats_per_tensor_on_uneven_channels(rng):
    x = (rng.normal(size=(8, 64)) * np.logspace(-3, 1, 8)[:, None]).astype(np.float32)
    per_ch = decode_tensors(encode_tensors({"w": x}, codec="int8", per_channel_axis=0))["w"]
    per_t = decode_tensors(encode_tensors({"w": x}, codec="int8", per_channel_axis=None))["w"]
    # The smallest channel (|x| ~ 1e-3) drowns in the per-tensor step (~0.3 / 127).
    assert np.abs(per_ch - x)[0].max() < 0.05 * np.abs(per_t - x)[0].max()


def test_layout_is_little_endian_whatever_the_input_byte_order():
    x = np.array([[1.5, -2.0]], dtype=">f4")
    n = np.array([7], dtype=">i8")
    blob = encode_tensors({"w": x, "n": n})
    assert blob == encode_tensors({"w": x.astype("<f4"), "n": n.astype("<i8")})
    # Oracle: the bytes written out by hand from the documented layout.
    rec_w = struct.pack("<H", 1) + b"w" + bytes([1, 2]) + struct.pack("<2I", 1, 2)
    rec_w += struct.pack("<Q", 8) + struct.pack("<2f", 1.5, -2.0)
    rec_n = struct.pack("<H", 1) + b"n" + bytes([22, 1]) + struct.pack("<I", 1)
    rec_n += struct.pack("<Q", 8) + struct.pack("<q", 7)
    payload = rec_w + rec_n
    assert blob == b"ET" + bytes([1, 0]) + struct.pack("<IQ", 2, len(payload)) + payload
    out = decode_tensors(blob)
    assert out["w"].dtype == np.float32 and out["w"].dtype.isnative
    assert out["n"].dtype == np.int64 and out["n"].dtype.isnative
    np.testing.assert_array_equal(out["w"], x)
    out["w"][0, 0] = 0.0  # decoded arrays are writable copies


def test_encoded_sizes_match_stated_bounds(rng):
    tensors = model_100k(rng)
    raw = tensor_nbytes(tensors)
    assert raw == 4 * sum(t.size for t in tensors.values()) == 4 * 100_042
    headers = 16 + sum(12 + len(k.encode()) + 4 * t.ndim for k, t in tensors.items())
    f32 = len(encode_tensors(tensors, codec="float32"))
    assert f32 == raw + headers  # the per-record formula in the module docstring
    assert (f32 - raw) / raw < 0.01
    fp16 = len(encode_tensors(tensors, codec="fp16")) / raw
    int8 = len(encode_tensors(tensors, codec="int8")) / raw
    assert 0.5 <= fp16 < 0.505
    assert 0.25 <= int8 < 0.26


def test_zlib_compresses_redundant_data():
    x = np.zeros((256, 256), np.float32)
    blob = encode_tensors({"z": x}, compress="zlib")
    assert len(blob) < 0.01 * x.nbytes
    np.testing.assert_array_equal(decode_tensors(blob)["z"], x)


def test_zstd_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(CodecError, match="pip install zstandard"):
        encode_tensors({"x": np.ones(3, np.float32)}, compress="zstd")


def test_zstd_round_trip_when_available():
    pytest.importorskip("zstandard")
    x = np.arange(1000, dtype=np.float32)
    out = decode_tensors(encode_tensors({"x": x}, compress="zstd"))
    np.testing.assert_array_equal(out["x"], x)


def test_unknown_names_list_known_ones():
    with pytest.raises(ValueError, match="known codecs: float32, fp16, int8"):
        encode_tensors({}, codec="bf16")
    with pytest.raises(ValueError, match="zlib, zstd"):
        encode_tensors({}, compress="lz4")
    assert set(COMPRESSORS) == {"zlib", "zstd"}


def test_expect_reports_every_mismatch():
    blob = encode_tensors({"fc1.weight": np.zeros((64, 32), np.float32), "extra": np.zeros(1)})
    expect = {"fc1.weight": ((32, 64), "float32"), "fc1.bias": ((32,), "float32")}
    with pytest.raises(CodecError) as info:
        decode_tensors(blob, expect=expect)
    msg = str(info.value)
    assert "tensor 'fc1.weight': shape (32, 64) expected, got (64, 32)" in msg
    assert "missing tensors ['fc1.bias']" in msg and "unexpected tensors ['extra']" in msg
    ok = {"fc1.weight": ((64, 32), "float32"), "extra": ((1,), "float32")}
    assert set(decode_tensors(blob, expect=ok)) == {"fc1.weight", "extra"}
    with pytest.raises(CodecError, match="dtype int64 expected, got float32"):
        decode_tensors(blob, expect={**ok, "extra": ((1,), "int64")})


@pytest.mark.parametrize("codec", ["float32", "fp16"])
def test_nonfinite_rejected_unless_allowed(codec):
    x = np.array([1.0, np.nan, np.inf, -np.inf, 2.0], np.float32)
    blob = encode_tensors({"g": x}, codec=codec)
    with pytest.raises(CodecError, match="tensor 'g': 3 non-finite"):
        decode_tensors(blob)
    out = decode_tensors(blob, allow_nonfinite=True)["g"]
    np.testing.assert_array_equal(out, x)


def test_encode_refuses_what_the_codec_cannot_carry():
    with pytest.raises(CodecError, match="NaN/Inf values cannot be int8"):
        encode_tensors({"x": np.array([np.nan], np.float32)}, codec="int8")
    with pytest.raises(CodecError, match="2 values exceed the fp16 range"):
        encode_tensors({"x": np.array([1e5, -7e4, 1.0], np.float32)}, codec="fp16")
    with pytest.raises(CodecError, match="1 values exceed the float32 range"):
        encode_tensors({"x": np.array([1e300, 1.0])}, codec="float32")
    with pytest.raises(CodecError, match="dtype complex64 not supported"):
        encode_tensors({"x": np.zeros(2, np.complex64)})
    with pytest.raises(CodecError, match="per_channel_axis"):
        encode_tensors({"x": np.zeros((2, 2), np.float32)}, codec="int8", per_channel_axis=5)


def test_caps_stop_oversized_and_bomb_payloads():
    big = encode_tensors({"x": np.zeros(1000, np.float32)})
    with pytest.raises(CodecError, match="max_elements=999"):
        decode_tensors(big, max_elements=999)
    # A bomb: a few KB of zlib that would inflate to 80 MB, declared as 1 KB.
    bomb = zlib.compress(b"\x00" * 80_000_000, 9)
    blob = b"ET" + bytes([1, 1]) + struct.pack("<IQ", 1, 1024) + bomb
    with pytest.raises(CodecError, match="zlib payload"):
        decode_tensors(blob)
    # The same bomb declared honestly is refused before inflating anything.
    blob = b"ET" + bytes([1, 1]) + struct.pack("<IQ", 1, 80_000_000) + bomb
    with pytest.raises(CodecError, match="payload_len must be <="):
        decode_tensors(blob, max_elements=1000)


def test_header_claims_checked_against_the_bytes():
    blob = bytearray(encode_tensors({"w": np.ones((2, 3), np.float32)}))
    with pytest.raises(CodecError, match="version 9 not supported"):
        decode_tensors(bytes(blob[:2]) + b"\x09" + bytes(blob[3:]))
    dims_at = 16 + 2 + 1 + 2
    bad = bytes(blob[:dims_at]) + struct.pack("<I", 3) + bytes(blob[dims_at + 4 :])
    with pytest.raises(CodecError, match="data_len must be 36"):
        decode_tensors(bad)
    with pytest.raises(CodecError, match="trailing"):
        decode_tensors(bytes(blob[:8]) + struct.pack("<Q", len(blob) - 16 + 1) + blob[16:] + b"x")
    with pytest.raises(CodecError, match="payload_len must match"):
        decode_tensors(bytes(blob[:-1]))
    short = bytes(blob[:8]) + struct.pack("<Q", len(blob) - 17) + bytes(blob[16:-1])
    with pytest.raises(CodecError, match=r"tensor 'w' data needs 24 bytes at offset \d+, only 23"):
        decode_tensors(short)


def _decode_or_codec_error(data: bytes) -> None:
    # Anything but CodecError escapes and fails the test.
    with contextlib.suppress(CodecError):
        decode_tensors(data, max_elements=10_000)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data):
    _decode_or_codec_error(data)
    _decode_or_codec_error(b"ET\x01\x00" + data)
    _decode_or_codec_error(b"ET\x01\x01" + data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(list(CODECS)),
    st.sampled_from([None, "zlib"]),
    st.integers(0, 2**32 - 1),
    st.data(),
)
def test_fuzz_mutations_and_truncations(codec, compress, seed, data):
    rng = np.random.default_rng(seed)
    tensors = {
        "w": rng.normal(size=(3, 4)).astype(np.float32),
        "b": rng.normal(size=(4,)).astype(np.float32),
        "n": np.array(seed, np.int64),
        "mask": rng.random(5) > 0.5,
    }
    blob = bytearray(encode_tensors(tensors, codec=codec, compress=compress))
    _decode_or_codec_error(bytes(blob[: data.draw(st.integers(0, len(blob) - 1))]))
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    _decode_or_codec_error(bytes(blob))
