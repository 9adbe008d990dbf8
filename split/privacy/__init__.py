"""Differential privacy: DP-SGD on devices, budgets and Opacus-backed privacy ledgers."""

from __future__ import annotations

from typing import Any

from split.privacy.budget import DPConfig, PrivacyLedger, check_delta, noise_for_target

__all__ = ["DPConfig", "DPTrainer", "PrivacyLedger", "check_delta", "fix_model", "noise_for_target"]

# DPTrainer needs torch + opacus; loading it lazily keeps DPConfig importable on torch-free hosts.
_LAZY = {"DPTrainer": "split.privacy.dpsgd", "fix_model": "split.privacy.dpsgd"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'split.privacy' has no attribute {name!r}")
