"""Numba versions of the mod-2^32 masking kernels; inputs are validated by ``kernels.masking``."""

from __future__ import annotations

import numba
import numpy as np

from kernels._numba import JIT_OPTIONS

# Arithmetic is done in uint64 and masked, so it wraps identically when compiled and when run
# as plain Python under NUMBA_DISABLE_JIT=1 (coverage runs), without overflow warnings.
_LOW32 = np.uint64(0xFFFFFFFF)
_TWO32 = np.uint64(1 << 32)


@numba.njit(**JIT_OPTIONS)
def _add(out, mask):
    for i in numba.prange(out.shape[0]):
        out[i] = (np.uint64(out[i]) + np.uint64(mask[i])) & _LOW32


@numba.njit(**JIT_OPTIONS)
def _sub(out, mask):
    for i in numba.prange(out.shape[0]):
        out[i] = (np.uint64(out[i]) + _TWO32 - np.uint64(mask[i])) & _LOW32


@numba.njit(**JIT_OPTIONS)
def _sum_cols(arrays, out):
    rows, cols = arrays.shape
    for j in numba.prange(cols):
        acc = np.uint64(0)
        for i in range(rows):
            acc = (acc + np.uint64(arrays[i, j])) & _LOW32
        out[j] = acc


def add_signed_inplace(out: np.ndarray, mask: np.ndarray, sign: int) -> None:
    """out = (out + sign * mask) mod 2^32."""
    if sign > 0:
        _add(out, mask)
    else:
        _sub(out, mask)


def sum_mod_into(arrays: np.ndarray, out: np.ndarray) -> None:
    """out = column sums of ``arrays`` mod 2^32."""
    _sum_cols(arrays, out)
