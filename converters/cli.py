"""The ``edgesplit`` console script: a thin dispatcher over subcommands registered by each package.

Packages contribute subcommands through the ``edgesplit.commands`` entry-point group (see
pyproject.toml), each a ``register(subparsers)`` function. The dispatcher imports none of them
statically, so a torch-free device install only loads the commands it has.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from importlib import metadata

from converters.provenance import check_packages
from split.errors import one_line

GROUP = "edgesplit.commands"
# Modules only the cloud / training extra installs (a Raspberry Pi agent has none of them).
_CLOUD_ONLY = {"torch", "opacus", "onnx", "onnxscript", "sklearn", "matplotlib", "rich", "amqtt"}
# Used when the distribution's metadata is absent (running from a source tree without install).
_FALLBACK = {
    "split": "split.commands:register",
    "converters": "converters.commands:register",
    "edge": "edge.commands:register",
    "cloud": "cloud.commands:register",
}


def _registrars():
    eps = {ep.name: ep.value for ep in metadata.entry_points(group=GROUP)}
    for name, value in (eps or _FALLBACK).items():
        module_name, _, attr = value.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            # A device install lacks the cloud stack: its commands are simply not offered.
            logging.getLogger(__name__).debug("commands of %s unavailable: %s", name, exc)
            continue
        yield getattr(module, attr)


class _Parser(argparse.ArgumentParser):
    """Reports a bad flag in one line (argparse would print the whole usage above it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="edgesplit",
        description="Split and federated learning between devices and a cloud, over MQTT.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in _registrars():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit code. Expected errors print one line, not a traceback."""
    try:
        check_packages()
    except ImportError as exc:
        print(f"edgesplit: error: {exc}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except ImportError as exc:
        if args.verbose:
            raise
        missing = getattr(exc, "name", None) or str(exc)
        extra = "cloud" if missing.split(".")[0] in _CLOUD_ONLY else "edge"
        print(
            f"edgesplit {args.command}: error: needs {missing!r}, which is not installed here; "
            f"pip install 'edgesplit[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except (ValueError, OSError, RuntimeError, KeyError) as exc:
        if args.verbose:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        text = one_line(str(msg)) or repr(exc)  # a library's multi-line message, on one line
        print(f"edgesplit {args.command}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgesplit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
