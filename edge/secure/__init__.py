"""Device side of secure aggregation modes: SecAgg pairwise masking and Paillier HE."""

from __future__ import annotations

import importlib
from typing import Any

# Mode name -> (module, session class); loaded on first use so `import edge` stays light.
_SESSIONS = {
    "secagg": ("edge.secure.secagg_client", "SecAggSession"),
    "he-paillier": ("edge.secure.he_client", "HeSession"),
}

__all__ = ["SESSION_MODES", "make_session"]

SESSION_MODES = tuple(sorted(_SESSIONS))


def make_session(mode: str, **kwargs: Any) -> Any:
    """Builds the device session for a secure mode (``secagg`` or ``he-paillier``).

    Raises:
        ValueError: unknown mode, listing the known ones.
    """
    if mode not in _SESSIONS:
        raise ValueError(f"secure={mode!r} unknown; known: {', '.join(SESSION_MODES)}")
    module, name = _SESSIONS[mode]
    return getattr(importlib.import_module(module), name)(**kwargs)
