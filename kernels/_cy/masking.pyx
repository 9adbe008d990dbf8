# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Cython versions of the mod-2^32 masking kernels; inputs are validated by ``kernels.masking``."""

from libc.stdint cimport uint32_t


def add_signed_inplace(uint32_t[::1] out, const uint32_t[::1] mask, int sign):
    """out = (out + sign * mask) mod 2^32 (unsigned C arithmetic wraps by definition)."""
    cdef Py_ssize_t i, n = out.shape[0]
    with nogil:
        if sign > 0:
            for i in range(n):
                out[i] = out[i] + mask[i]
        else:
            for i in range(n):
                out[i] = out[i] - mask[i]


def sum_mod_into(const uint32_t[:, ::1] arrays, uint32_t[::1] out):
    """out = column sums of ``arrays`` mod 2^32, row by row for contiguous access."""
    cdef Py_ssize_t i, j, rows = arrays.shape[0], cols = arrays.shape[1]
    with nogil:
        for j in range(cols):
            out[j] = 0
        for i in range(rows):
            for j in range(cols):
                out[j] = out[j] + arrays[i, j]
