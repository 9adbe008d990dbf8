"""Backend selection: env override, explicit-request errors, auto fallback warning, lazy imports."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

import kernels
from kernels import _backend
from kernels.errors import BackendUnavailableError


@pytest.fixture
def fresh_selection(monkeypatch):
    """Lets a test change EDGESPLIT_KERNELS / the module table, restoring both afterwards."""
    monkeypatch.setattr(_backend, "_MODULES", dict(_backend._MODULES))
    _backend._reset_for_tests()
    yield monkeypatch
    monkeypatch.undo()
    _backend._reset_for_tests()


def _break(monkeypatch, *pairs):
    for pair in pairs:
        _backend._MODULES[pair] = "kernels._does_not_exist"


def test_unknown_backend_lists_valid_ones(fresh_selection):
    fresh_selection.setenv("EDGESPLIT_KERNELS", "fortran")
    with pytest.raises(ValueError, match="auto, python, numba, cython"):
        _ = kernels.BACKEND


def test_explicit_unavailable_request_raises_with_build_command(fresh_selection):
    _break(fresh_selection, ("masking", "cython"))
    fresh_selection.setenv("EDGESPLIT_KERNELS", "cython")
    with pytest.raises(BackendUnavailableError, match="build_ext --inplace"):
        _ = kernels.BACKEND


def test_auto_falls_back_to_python_and_warns_once(fresh_selection):
    _break(fresh_selection, ("masking", "cython"), ("masking", "numba"), ("paillier", "cython"))
    fresh_selection.setenv("EDGESPLIT_KERNELS", "auto")
    with pytest.warns(RuntimeWarning, match="pure-Python reference"):
        assert kernels.BACKEND == "python"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.KERNEL_BACKENDS == {"masking": "python", "paillier": "python"}


def test_numba_request_uses_best_paillier_backend(fresh_selection):
    if "numba" not in _backend.available("masking"):
        pytest.skip("numba not installed")
    fresh_selection.setenv("EDGESPLIT_KERNELS", "numba")
    expected = "cython" if "cython" in _backend.available("paillier") else "python"
    assert kernels.BACKEND == "numba"
    assert {"masking": "numba", "paillier": expected} == kernels.KERNEL_BACKENDS
    _backend._reset_for_tests()
    _break(fresh_selection, ("paillier", "cython"))
    assert kernels.KERNEL_BACKENDS["paillier"] == "python"


def test_python_request_never_loads_compiled(fresh_selection):
    fresh_selection.setenv("EDGESPLIT_KERNELS", "python")
    assert kernels.BACKEND == "python"
    assert set(kernels.KERNEL_BACKENDS.values()) == {"python"}


def test_import_is_lazy_and_torch_free():
    code = (
        "import sys; sys.modules['torch'] = None; import kernels; "
        "assert 'numba' not in sys.modules, 'numba imported eagerly'; "
        "assert not any(m.startswith('kernels._cy') for m in sys.modules); "
        "print(kernels.BACKEND)"
    )
    env = dict(os.environ, EDGESPLIT_KERNELS="python")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "python"
