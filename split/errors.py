"""Exception types raised by the split package."""


class SplitPointError(ValueError):
    """A cut point does not exist or cannot split the model there."""


class ManifestError(ValueError):
    """A manifest is malformed or does not match its artifacts."""
