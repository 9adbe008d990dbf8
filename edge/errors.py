"""Exception types raised by the edge package."""


class EdgeInputError(ValueError):
    """An input to the on-device model has the wrong shape, dtype or values."""


class ModelMismatchError(ValueError):
    """The device's model half does not match the cloud's (manifest hash differs)."""


class ArtifactMissingError(FileNotFoundError):
    """A model file the device needs (e.g. an ONNX variant) was never exported or is absent."""


class SplitProtocolError(ValueError):
    """A split-learning message from the cloud (gradient, logits) breaks the step protocol."""
