"""Cython extensions (built by setup.py); imported only through ``kernels._backend``."""
