"""Secure-aggregation masking (Bonawitz et al., CCS'17): fixed-point in Z_{2^32}, PRG masks.

Each client quantises its update into Z_{2^32}, adds pairwise masks expanded from agreed seeds
(``+m`` for one side of a pair, ``-m`` for the other) and a self mask; the server sums the masked
vectors mod 2^32, the pairwise masks cancel, and :func:`dequantize_sum` turns the sum back into
floats. These fronts validate and allocate; the arithmetic runs in the backend chosen by
``kernels._backend`` (Cython, Numba or the NumPy reference).
"""

from __future__ import annotations

import math

import numpy as np

from kernels import _backend
from kernels.errors import KernelInputError
from kernels.reference import masking as _ref

SEED_BYTES = 32
_MAX_FRAC_BITS = 30


def _check_frac_bits(frac_bits: int) -> None:
    if not isinstance(frac_bits, int) or not 0 <= frac_bits <= _MAX_FRAC_BITS:
        raise KernelInputError(
            f"frac_bits must be an int in [0, {_MAX_FRAC_BITS}], got {frac_bits!r}"
        )


def _check_u32_vector(name: str, a: object, length: int | None = None) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype != np.uint32 or a.ndim != 1:
        desc = f"{a.dtype}{list(a.shape)}" if isinstance(a, np.ndarray) else type(a).__name__
        raise KernelInputError(f"{name} must be a 1-D uint32 array, got {desc}")
    if length is not None and a.shape[0] != length:
        raise KernelInputError(f"{name} must have length {length}, got {a.shape[0]}")
    return np.ascontiguousarray(a)


def quantize_fixed(x: np.ndarray, *, frac_bits: int, clip: float) -> np.ndarray:
    """Encodes floats as two's-complement fixed point in Z_{2^32}.

    Args:
        x: Finite floats, any shape (flattened).
        frac_bits: Fractional bits; the resolution is 2^-frac_bits.
        clip: Values are clipped to [-clip, clip] first; ``clip * 2**frac_bits`` must stay below
            2^31 so one value cannot wrap. For a sum of k clients to decode, the caller also
            needs ``k * clip * 2**frac_bits < 2**31``.

    Returns:
        A 1-D uint32 array (round-to-nearest, so each value is off by at most 2^-(frac_bits+1)).

    Raises:
        KernelInputError: bad ``frac_bits``/``clip`` or non-finite input (index named).
    """
    _check_frac_bits(frac_bits)
    if not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
        raise KernelInputError(f"clip must be a finite float > 0, got {clip!r}")
    if clip * 2.0**frac_bits >= 2.0**31:
        raise KernelInputError(
            f"clip * 2**frac_bits must be < 2**31, got {clip} * 2**{frac_bits}; "
            "lower clip or frac_bits"
        )
    arr = np.asarray(x, dtype=np.float64).ravel()
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise KernelInputError(f"x must be finite, got x[{bad[0]}]={arr[bad[0]]}")
    return _ref.quantize_fixed(arr, frac_bits, float(clip))


def dequantize_sum(u: np.ndarray, *, frac_bits: int, n_summands: int) -> np.ndarray:
    """Decodes a mod-2^32 sum of ``n_summands`` quantised vectors back to float64.

    Args:
        u: 1-D uint32 sum.
        frac_bits: The ``frac_bits`` every summand was quantised with.
        n_summands: How many vectors were summed; the result equals the float sum within
            ``n_summands * 2**-(frac_bits + 1)`` provided no partial sum left (-2^31, 2^31).

    Returns:
        The float64 sum.

    Raises:
        KernelInputError: bad dtype, ``frac_bits`` or ``n_summands``.
    """
    _check_frac_bits(frac_bits)
    if not isinstance(n_summands, int) or n_summands < 1:
        raise KernelInputError(f"n_summands must be an int >= 1, got {n_summands!r}")
    return _ref.dequantize_sum(_check_u32_vector("u", u), frac_bits)


def expand_mask(seed: bytes, n: int) -> np.ndarray:
    """Expands a 32-byte seed into ``n`` uniform uint32 words with ChaCha20.

    The PRG is ChaCha20 (RFC 7539 via the ``cryptography`` package) keyed by ``seed`` with an
    all-zero 16-byte nonce/counter, encrypting zeros; words are read little-endian, so the same
    seed gives the same mask on every platform. A seed must mask one vector only: reusing it
    for two rounds reveals the difference of the two inputs.

    Raises:
        KernelInputError: seed is not 32 bytes or n is negative.
    """
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
        got = f"{len(seed)} bytes" if isinstance(seed, (bytes, bytearray)) else type(seed).__name__
        raise KernelInputError(f"seed must be {SEED_BYTES} bytes, got {got}")
    if not isinstance(n, int) or n < 0:
        raise KernelInputError(f"n must be an int >= 0, got {n!r}")
    # Imported here so devices that never mask do not need `cryptography` installed.
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    encryptor = Cipher(algorithms.ChaCha20(bytes(seed), b"\x00" * 16), mode=None).encryptor()
    stream = encryptor.update(b"\x00" * (4 * n))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def add_masks(x_u32: np.ndarray, masks: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """Returns ``(x + sum(sign * mask)) mod 2^32`` as a new array.

    Args:
        x_u32: 1-D uint32 quantised input (not modified).
        masks: ``(mask, sign)`` pairs, each mask a uint32 array of the same length, sign +1 or -1.

    Raises:
        KernelInputError: a mask has the wrong dtype/length or a sign is not +1/-1.
    """
    x = _check_u32_vector("x_u32", x_u32)
    checked = []
    for i, pair in enumerate(masks):
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise KernelInputError(f"masks[{i}] must be a (mask, sign) tuple, got {pair!r}")
        mask, sign = pair
        if sign not in (1, -1):
            raise KernelInputError(f"masks[{i}] sign must be +1 or -1, got {sign!r}")
        checked.append((_check_u32_vector(f"masks[{i}]", mask, x.shape[0]), int(sign)))
    out = x.copy()
    kernel = _backend.impl("masking")
    for mask, sign in checked:
        kernel.add_signed_inplace(out, mask, sign)
    return out


def sum_mod(arrays: np.ndarray) -> np.ndarray:
    """Returns the column sums mod 2^32 of a 2-D uint32 array (clients x n).

    Raises:
        KernelInputError: not a 2-D uint32 array.
    """
    if not isinstance(arrays, np.ndarray) or arrays.dtype != np.uint32 or arrays.ndim != 2:
        desc = (
            f"{arrays.dtype}{list(arrays.shape)}"
            if isinstance(arrays, np.ndarray)
            else type(arrays).__name__
        )
        raise KernelInputError(f"arrays must be a 2-D uint32 array (clients x n), got {desc}")
    arrays = np.ascontiguousarray(arrays)
    out = np.empty(arrays.shape[1], dtype=np.uint32)
    _backend.impl("masking").sum_mod_into(arrays, out)
    return out
