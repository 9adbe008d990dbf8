"""Exception types raised by the split package."""


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
