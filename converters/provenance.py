"""Checks that edgesplit's generic top-level package names resolve to this distribution.

``kernels``, ``split``, ``edge``, ``cloud`` and ``converters`` are common names: another
installed project may own one of them. Each of ours carries the marker ``__edgesplit__ = True``
in its ``__init__.py``; the check reads the file found on ``sys.path`` (without importing it, so
a foreign package's import side effects never run) and reports every clash at once.
"""

from __future__ import annotations

import importlib.util
import re

from converters.errors import PackageClashError

PACKAGES = ("converters", "kernels", "split", "edge", "cloud")
_MARKER = re.compile(r"^__edgesplit__\s*=\s*True\s*$", re.MULTILINE)


def package_origins() -> dict[str, str | None]:
    """Returns where each top-level package name resolves (its ``__init__.py``), or None."""
    origins: dict[str, str | None] = {}
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        origins[name] = spec.origin if spec is not None else None
    return origins


def check_packages() -> None:
    """Raises PackageClashError naming every package that is missing or not edgesplit's."""
    problems = []
    for name, origin in package_origins().items():
        if origin is None or not origin.endswith("__init__.py"):
            problems.append(f"{name}: resolves to {origin!r}, not edgesplit's package")
            continue
        with open(origin, encoding="utf-8") as fh:
            text = fh.read()
        if not _MARKER.search(text):
            problems.append(f"{name}: resolves to {origin}, which is not edgesplit's")
    if problems:
        raise PackageClashError(
            "top-level package clash: "
            + "; ".join(problems)
            + " (uninstall the other distribution or use a separate virtualenv)"
        )
