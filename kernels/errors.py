"""Exception types raised by the kernels package."""


class BackendUnavailableError(ImportError):
    """An explicitly requested kernel backend is not built or not installed."""


class KernelInputError(ValueError):
    """A kernel received an array of the wrong dtype, shape or range."""


class InsecureKeyError(ValueError):
    """A cryptographic key or parameter is below the library's security floor."""
