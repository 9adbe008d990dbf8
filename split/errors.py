"""Exception types raised by the split package, and the one-line form of an error message."""

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(text: str, *, limit: int = 600) -> str:
    """A message on one line: ANSI escapes dropped, its non-empty lines joined with " | ",
    cut to ``limit`` characters (a library's multi-line error keeps its reasons)."""
    lines = (" ".join(line.split()) for line in _ANSI.sub("", text).splitlines())
    joined = " | ".join(line for line in lines if line)
    return joined if len(joined) <= limit else joined[: limit - 3] + "..."


class SplitPointError(ValueError):
    """A cut point does not exist or cannot split the model there."""


class ManifestError(ValueError):
    """A manifest is malformed or does not match its artifacts."""


class PrivacyConfigError(ValueError):
    """A differential-privacy setting is invalid or cannot reach its target."""


class PrivacyBudgetExceededError(RuntimeError):
    """Training stopped because the next step would spend more than the privacy budget."""


class InputShapeError(ValueError):
    """An input shape (or example input) does not fit the model."""
