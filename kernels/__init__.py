"""Native kernels (Cython, Numba) for encrypted arithmetic, with pure-Python reference oracles.

The leaf of the import graph: NumPy in, NumPy out; never imports torch or paho. ``BACKEND`` is
the backend named by ``EDGESPLIT_KERNELS`` (or, under ``auto``, the one chosen for the array
kernels); ``KERNEL_BACKENDS`` maps each kernel to what actually runs it (Paillier has no Numba
version, so under ``numba`` it runs on Cython/GMP, or the reference if unbuilt). Both resolve on
first access (see ``kernels._backend``), so importing the package never imports numba or a
compiled extension.
"""

from kernels.masking import add_masks, dequantize_sum, expand_mask, quantize_fixed, sum_mod
from kernels.paillier import (
    PackingSpec,
    PaillierKeyPair,
    PaillierPublicKey,
    RandomnessPool,
    add_batch,
    decrypt_batch,
    deserialize_ciphertexts,
    encode_pack,
    encrypt_batch,
    serialize_ciphertexts,
    sum_ciphertexts,
    unpack_decode,
)

__edgesplit__ = True

__all__ = [
    "BACKEND",
    "KERNEL_BACKENDS",
    "PackingSpec",
    "PaillierKeyPair",
    "PaillierPublicKey",
    "RandomnessPool",
    "add_batch",
    "add_masks",
    "decrypt_batch",
    "dequantize_sum",
    "deserialize_ciphertexts",
    "encode_pack",
    "encrypt_batch",
    "expand_mask",
    "quantize_fixed",
    "serialize_ciphertexts",
    "sum_ciphertexts",
    "sum_mod",
    "unpack_decode",
]


def __getattr__(name: str) -> object:
    # Lazy so that `import kernels` stays cheap and an unmet explicit request raises on use.
    from kernels import _backend

    if name == "BACKEND":
        return _backend.backend_name()
    if name == "KERNEL_BACKENDS":
        return _backend.selection()
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
