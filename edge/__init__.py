"""On-device runtime: onnxruntime inference and the MQTT agent. Imports without torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__edgesplit__ = True

# Public name -> module defining it. Loaded on first access (PEP 562) so `import edge` stays
# cheap and never pulls onnxruntime or paho until they are used.
_LAZY = {
    "AgentOptions": "edge.agent",
    "ArtifactMissingError": "edge.errors",
    "DeviceAgent": "edge.agent",
    "EdgeInputError": "edge.errors",
    "EdgeModel": "edge.runtime",
    "ModelMismatchError": "edge.errors",
}

__all__ = [
    "AgentOptions",
    "ArtifactMissingError",
    "DeviceAgent",
    "EdgeInputError",
    "EdgeModel",
    "ModelMismatchError",
]

if TYPE_CHECKING:
    from edge.agent import AgentOptions, DeviceAgent
    from edge.errors import ArtifactMissingError, EdgeInputError, ModelMismatchError
    from edge.runtime import EdgeModel


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
