"""Exception types raised by the converters package."""


class PackageClashError(ImportError):
    """One of edgesplit's top-level packages resolves to another distribution's module."""


class ConfigError(ValueError):
    """A configuration value breaks its rule."""


class WireError(ValueError):
    """A wire message is malformed, oversized, of an unknown version or for another run."""


class CodecError(WireError):
    """A tensor payload cannot be decoded (bad header, dtype, shape, NaN/Inf)."""


class ChunkError(WireError):
    """A chunked transfer is inconsistent, corrupt or timed out."""


class TransportError(ConnectionError):
    """The MQTT connection failed or a transfer could not be delivered."""


class ExportError(RuntimeError):
    """A model half could not be exported to ONNX or failed verification."""


class DatasetError(ValueError):
    """A dataset file or array breaks its format rule (bad magic, truncated, NaN, label range)."""
