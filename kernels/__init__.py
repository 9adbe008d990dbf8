"""Native kernels (Cython, Numba) for encrypted arithmetic, with pure-Python reference oracles.

The leaf of the import graph: NumPy in, NumPy out; never imports torch or paho.
"""

__edgesplit__ = True

__all__: list[str] = []
