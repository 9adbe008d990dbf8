"""Model partitioning: cut points, edge/cloud halves, manifests, privacy training and audits."""

from __future__ import annotations

import importlib

__edgesplit__ = True

# Public name -> defining module. Loaded on first access so `import split` (and the torch-free
# `split.manifest`) work on devices without torch.
_EXPORTS = {
    "MANIFEST_SCHEMA": "split.manifest",
    "CutInfo": "split.cuts",
    "Manifest": "split.manifest",
    "ManifestError": "split.errors",
    "ModelSpec": "split.zoo",
    "SplitModel": "split.graph",
    "SplitPointError": "split.errors",
    "build_model": "split.zoo",
    "evaluate": "split.train",
    "get_spec": "split.zoo",
    "list_cuts": "split.cuts",
    "list_models": "split.zoo",
    "load_split": "split.store",
    "merge_state": "split.graph",
    "save_split": "split.store",
    "split_model": "split.graph",
    "split_state": "split.graph",
    "train_centralized": "split.train",
    "train_epochs": "split.train",
    "valid_cuts": "split.graph",
}

__all__ = [
    "CutInfo",
    "MANIFEST_SCHEMA",
    "Manifest",
    "ManifestError",
    "ModelSpec",
    "SplitModel",
    "SplitPointError",
    "build_model",
    "evaluate",
    "get_spec",
    "list_cuts",
    "list_models",
    "load_split",
    "merge_state",
    "save_split",
    "split_model",
    "split_state",
    "train_centralized",
    "train_epochs",
    "valid_cuts",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'split' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
