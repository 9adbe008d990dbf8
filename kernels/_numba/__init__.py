"""Numba kernels; ``JIT_OPTIONS`` is the one place their compilation flags are set."""

# cache=True: compile once per machine, not per process (device start-up matters);
# parallel=True: prange across the cores; integer kernels gain nothing from fastmath.
JIT_OPTIONS = {"cache": True, "nogil": True, "parallel": True, "fastmath": False}
