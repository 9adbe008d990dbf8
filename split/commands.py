"""CLI subcommands owned by the split package (registered through the edgesplit.commands group)."""

from __future__ import annotations


def register(subparsers) -> None:
    """Adds this package's subcommands to the ``edgesplit`` parser."""
