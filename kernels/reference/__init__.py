"""Pure-Python/NumPy reference kernels: slow, obviously correct, the oracle for every backend."""
