"""Chooses the implementation behind every kernel; the only module that imports compiled code.

``EDGESPLIT_KERNELS=auto|python|numba|cython`` (default ``auto``) selects the backend once per
process, on first use (so ``import kernels`` stays cheap and never imports numba):

* ``python``: every kernel runs its pure-Python reference (``kernels/reference``).
* ``numba``: array kernels (masking) run under Numba. Numba has no big integers, so Paillier
  uses the Cython/GMP extension when it is built and the reference otherwise; this per-kernel
  fallback is documented, not an error, and shows in :data:`KERNEL_BACKENDS`.
* ``cython``: every kernel runs in the Cython extensions.
* ``auto``: per kernel, Cython if built, else Numba (masking only), else the reference; falling
  back to the reference warns once because it is orders of magnitude slower.

An explicit request that cannot be met raises :class:`~kernels.errors.BackendUnavailableError`
naming the build command. ``kernels.BACKEND`` is the backend of the array kernels (the name the
user asked for, or what ``auto`` picked) and ``kernels.KERNEL_BACKENDS`` maps each kernel to the
backend actually running it.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from kernels.errors import BackendUnavailableError

ENV_VAR = "EDGESPLIT_KERNELS"
BACKENDS = ("auto", "python", "numba", "cython")
KERNELS = ("masking", "paillier")
BUILD_COMMAND = "EDGESPLIT_STRICT_BUILD=1 python setup.py build_ext --inplace"

# Module path of each (kernel, backend) implementation; absent pairs do not exist.
_MODULES: dict[tuple[str, str], str] = {
    ("masking", "python"): "kernels.reference.masking",
    ("masking", "numba"): "kernels._numba.masking",
    ("masking", "cython"): "kernels._cy.masking",
    ("paillier", "python"): "kernels.reference.paillier",
    ("paillier", "cython"): "kernels._cy.paillier",
}
# Preference order per kernel when the user did not name a backend.
_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "masking": ("cython", "numba", "python"),
    "paillier": ("cython", "python"),
}

_lock = threading.Lock()
_selection: dict[str, str] | None = None
_warned = False


def requested() -> str:
    """Returns the backend named by ``EDGESPLIT_KERNELS`` (``auto`` when unset).

    Raises:
        ValueError: the variable names an unknown backend.
    """
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is unknown; valid backends: {', '.join(BACKENDS)}")
    return value


def load(kernel: str, backend: str) -> ModuleType:
    """Imports one implementation of ``kernel``.

    Args:
        kernel: ``"masking"`` or ``"paillier"``.
        backend: ``"python"``, ``"numba"`` or ``"cython"``.

    Returns:
        The implementation module.

    Raises:
        ValueError: unknown kernel or backend.
        BackendUnavailableError: the backend exists but is not built or installed.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is unknown; valid kernels: {', '.join(KERNELS)}")
    if backend not in BACKENDS[1:]:
        raise ValueError(f"backend={backend!r} is unknown; valid: python, numba, cython")
    path = _MODULES.get((kernel, backend))
    if path is None:
        raise BackendUnavailableError(f"kernel {kernel!r} has no {backend} implementation")
    try:
        return importlib.import_module(path)
    except ImportError as exc:
        hint = (
            "install numba (pip install numba)"
            if backend == "numba"
            else f"build the extensions: {BUILD_COMMAND} (Paillier needs libgmp-dev)"
        )
        raise BackendUnavailableError(
            f"{kernel} backend {backend!r} is unavailable ({exc}); {hint}"
        ) from exc


def available(kernel: str) -> tuple[str, ...]:
    """Returns the backends of ``kernel`` that import on this machine, reference first."""
    found = []
    for backend in ("python", "numba", "cython"):
        if (kernel, backend) not in _MODULES:
            continue
        try:
            load(kernel, backend)
        except BackendUnavailableError:
            continue
        found.append(backend)
    return tuple(found)


def _choose(kernel: str, request: str) -> str:
    if request == "python":
        return "python"
    if request == "cython" or (request == "numba" and kernel == "masking"):
        load(kernel, request)  # raises with the build command when missing
        return request
    # auto, or numba for a kernel numba cannot express: best available, documented above.
    for backend in _AUTO_ORDER[kernel]:
        if backend == "numba" and request != "auto":
            continue
        try:
            load(kernel, backend)
        except BackendUnavailableError:
            continue
        return backend
    return "python"  # pragma: no cover - the reference always imports


def selection() -> dict[str, str]:
    """Returns ``{kernel: backend}`` for this process, resolving it on first call."""
    global _selection, _warned
    with _lock:
        if _selection is None:
            request = requested()
            chosen = {kernel: _choose(kernel, request) for kernel in KERNELS}
            slow = sorted(k for k, b in chosen.items() if b == "python")
            if request == "auto" and slow and not _warned:
                _warned = True
                warnings.warn(
                    f"edgesplit kernels {', '.join(slow)} fall back to the pure-Python reference "
                    f"(slow); build the extensions with: {BUILD_COMMAND}",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _selection = chosen
        return dict(_selection)


def backend_name() -> str:
    """Returns the headline backend: the explicit request, or what ``auto`` chose for masking."""
    chosen = selection()  # resolves (and raises for an unmet explicit request) first
    request = requested()
    return chosen["masking"] if request == "auto" else request


def impl(kernel: str) -> ModuleType:
    """Returns the selected implementation module of ``kernel``."""
    return load(kernel, selection()[kernel])


@contextmanager
def forced(backend: str) -> Iterator[dict[str, str]]:
    """Temporarily runs every kernel on one backend (benchmarks compare backends in-process).

    Kernels without that backend use what an explicit request for it would pick (Paillier
    under ``numba`` -> Cython or reference). Not thread-safe against concurrent kernel calls.

    Raises:
        BackendUnavailableError: the backend cannot run here.
    """
    global _selection
    chosen = {kernel: _choose(kernel, backend) for kernel in KERNELS}
    with _lock:
        previous, _selection = _selection, chosen
    try:
        yield dict(chosen)
    finally:
        with _lock:
            _selection = previous


def _reset_for_tests() -> None:
    """Forgets the cached selection so a test can change ``EDGESPLIT_KERNELS``."""
    global _selection, _warned
    with _lock:
        _selection = None
        _warned = False
