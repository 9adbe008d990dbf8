"""Reference secure-aggregation masking: fixed-point quantisation and mod-2^32 mask arithmetic.

Written for clarity over speed; every compiled backend is tested bit-for-bit against it. The
backend interface is :func:`add_signed_inplace` and :func:`sum_mod_into`; the remaining functions
are whole-operation oracles used by the public front and the tests.
"""

from __future__ import annotations

import numpy as np

MODULUS = 2**32


def quantize_fixed(x: np.ndarray, frac_bits: int, clip: float) -> np.ndarray:
    """Clips to [-clip, clip], rounds to multiples of 2^-frac_bits, wraps into Z_{2^32}."""
    scaled = np.rint(np.clip(np.asarray(x, dtype=np.float64), -clip, clip) * 2.0**frac_bits)
    return (scaled.astype(np.int64) % MODULUS).astype(np.uint32)


def dequantize_sum(u: np.ndarray, frac_bits: int) -> np.ndarray:
    """Reads a mod-2^32 sum as two's complement and scales back to floats."""
    signed = u.astype(np.int64)
    signed = np.where(signed >= MODULUS // 2, signed - MODULUS, signed)
    return signed.astype(np.float64) / 2.0**frac_bits


def add_masks(x: np.ndarray, masks: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """Returns (x + sum(sign * mask)) mod 2^32, computed in exact integers."""
    acc = x.astype(np.int64)
    for mask, sign in masks:
        acc = (acc + int(sign) * mask.astype(np.int64)) % MODULUS
    return acc.astype(np.uint32)


def sum_mod(arrays: np.ndarray) -> np.ndarray:
    """Returns the column sums of a 2-D uint32 array mod 2^32, in exact integers."""
    acc = np.zeros(arrays.shape[1], dtype=np.uint64)
    for row in arrays:
        acc = (acc + row.astype(np.uint64)) % MODULUS
    return acc.astype(np.uint32)


def add_signed_inplace(out: np.ndarray, mask: np.ndarray, sign: int) -> None:
    """Backend interface: out = (out + sign * mask) mod 2^32 (uint32 arithmetic wraps)."""
    if sign > 0:
        np.add(out, mask, out=out)
    else:
        np.subtract(out, mask, out=out)


def sum_mod_into(arrays: np.ndarray, out: np.ndarray) -> None:
    """Backend interface: out = column sums of ``arrays`` mod 2^32."""
    out[:] = sum_mod(arrays)
