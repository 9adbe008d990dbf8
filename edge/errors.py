"""Exception types raised by the edge package."""


class EdgeInputError(ValueError):
    """An input to the on-device model has the wrong shape, dtype or values."""


class ModelMismatchError(ValueError):
    """The device's model half does not match the cloud's (manifest hash differs)."""
