"""Fixed-point encoding of float vectors packed into Paillier plaintext slots.

Each float becomes ``q = round(x * 2^frac_bits) + 2^(value_bits - 1)``, a non-negative integer
below ``2^value_bits`` (the offset makes negatives representable without wrap-around, which
additive HE over Z_n cannot undo per slot). ``slots_per_ciphertext`` such integers are laid side
by side in one plaintext, slot j at bit ``j * slot_bits``; each slot carries
``ceil(log2(max_summands)) + guard_bits`` spare high bits so adding up to ``max_summands``
ciphertexts never carries into the next slot. After decryption each slot holds
``sum(q_i) = sum(round(x_i * 2^f)) + n_summands * offset``; :func:`unpack_decode` removes the
offsets. Packing divides the number of Paillier operations by the slot count (Phong et al.,
IEEE TIFS 2018, pack many gradient values per ciphertext the same way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kernels.errors import KernelInputError

_MAX_SLOT_BITS = 62  # slot sums are decoded in uint64 lanes


@dataclass(frozen=True)
class PackingSpec:
    """How floats map onto packed plaintext slots.

    Attributes:
        value_bits: Payload bits per value, sign offset included (range ±2^(value_bits-1-frac)).
        frac_bits: Fractional bits; resolution 2^-frac_bits.
        max_summands: Most ciphertexts that may be added before decryption (headroom).
        guard_bits: Extra zero bits per slot, a margin against off-by-one headroom mistakes.
        modulus_bits: Bit length of the Paillier modulus n the plaintexts must stay below.
    """

    value_bits: int = 32
    frac_bits: int = 16
    max_summands: int = 16
    guard_bits: int = 1
    modulus_bits: int = 2048

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.value_bits, int) or not 2 <= self.value_bits <= 60:
            problems.append(f"value_bits must be an int in [2, 60], got {self.value_bits!r}")
        elif not isinstance(self.frac_bits, int) or not 0 <= self.frac_bits < self.value_bits:
            problems.append(
                f"frac_bits must be an int in [0, value_bits={self.value_bits}), "
                f"got {self.frac_bits!r}"
            )
        if not isinstance(self.max_summands, int) or self.max_summands < 1:
            problems.append(f"max_summands must be an int >= 1, got {self.max_summands!r}")
        if not isinstance(self.guard_bits, int) or self.guard_bits < 0:
            problems.append(f"guard_bits must be an int >= 0, got {self.guard_bits!r}")
        if not isinstance(self.modulus_bits, int) or self.modulus_bits < 64:
            problems.append(f"modulus_bits must be an int >= 64, got {self.modulus_bits!r}")
        if problems:
            raise ValueError("; ".join(problems))
        if self.slot_bits > _MAX_SLOT_BITS:
            raise ValueError(
                f"slot_bits = value_bits + ceil(log2(max_summands)) + guard_bits must be "
                f"<= {_MAX_SLOT_BITS}, got {self.slot_bits}; lower value_bits or max_summands"
            )

    @classmethod
    def for_key(cls, public_key: object, **kwargs: int) -> PackingSpec:
        """Builds a spec whose ``modulus_bits`` matches ``public_key.bits``."""
        return cls(modulus_bits=public_key.bits, **kwargs)

    @property
    def offset(self) -> int:
        """The per-value offset 2^(value_bits - 1) that makes encodings non-negative."""
        return 1 << (self.value_bits - 1)

    @property
    def slot_bits(self) -> int:
        """Bits per slot: payload + summation headroom + guard."""
        return self.value_bits + math.ceil(math.log2(self.max_summands)) + self.guard_bits

    @property
    def slots_per_ciphertext(self) -> int:
        """How many values one plaintext holds, keeping every packed sum below n."""
        return (self.modulus_bits - 1) // self.slot_bits

    @property
    def min_value(self) -> float:
        """Smallest encodable float."""
        return -self.offset / 2.0**self.frac_bits

    @property
    def max_value(self) -> float:
        """Largest encodable float."""
        return (self.offset - 1) / 2.0**self.frac_bits

    def n_plaintexts(self, n_values: int) -> int:
        """Number of plaintexts needed for ``n_values`` values."""
        return -(-n_values // self.slots_per_ciphertext)


def encode_fixed(x: np.ndarray, spec: PackingSpec) -> np.ndarray:
    """Returns the offset fixed-point integers (uint64) of ``x``, validating the range.

    Raises:
        KernelInputError: a value is non-finite or outside [min_value, max_value] (index named).
    """
    arr = np.asarray(x, dtype=np.float64).ravel()
    scaled = np.rint(arr * 2.0**spec.frac_bits)
    ok = np.isfinite(scaled) & (scaled >= -spec.offset) & (scaled <= spec.offset - 1)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise KernelInputError(
            f"x[{i}]={arr[i]} is outside the representable range "
            f"[{spec.min_value}, {spec.max_value}] of value_bits={spec.value_bits}, "
            f"frac_bits={spec.frac_bits}; clip first or widen value_bits"
        )
    return (scaled.astype(np.int64) + spec.offset).astype(np.uint64)


def encode_pack(x: np.ndarray, spec: PackingSpec) -> list[int]:
    """Encodes floats as fixed point and packs them into plaintext integers.

    Args:
        x: Float array, any shape (flattened in C order).
        spec: The packing layout.

    Returns:
        ``spec.n_plaintexts(x.size)`` non-negative ints below ``2^(modulus_bits - 1)``; unused
        trailing slots of the last plaintext are zero.

    Raises:
        KernelInputError: a value is non-finite or out of range.
    """
    q = encode_fixed(x, spec)
    slots, bits = spec.slots_per_ciphertext, spec.slot_bits
    k = spec.n_plaintexts(q.size)
    grid = np.zeros((k, slots), dtype=np.uint64)
    grid.ravel()[: q.size] = q
    # Bit-level layout, vectorised: (k, slots, bits) little-endian bits -> bytes -> int.
    shifts = np.arange(bits, dtype=np.uint64)
    bitmat = ((grid[:, :, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    packed = np.packbits(bitmat.reshape(k, slots * bits), axis=1, bitorder="little")
    return [int.from_bytes(row.tobytes(), "little") for row in packed]


def unpack_decode(
    plaintexts: list[int], spec: PackingSpec, *, n_values: int, n_summands: int
) -> np.ndarray:
    """Unpacks decrypted (summed) plaintexts and decodes them to float64.

    Args:
        plaintexts: Decrypted ints, each the packed sum of ``n_summands`` encodings.
        spec: The layout they were packed with.
        n_values: How many values to return (the original vector length).
        n_summands: How many encodings were added (1 for a plain round trip); their offsets
            are subtracted. Each value is within ``n_summands * 2^-(frac_bits + 1)`` of the
            float sum.

    Returns:
        A float64 array of length ``n_values``.

    Raises:
        KernelInputError: bad counts, or a plaintext wider than the packed layout.
    """
    slots, bits = spec.slots_per_ciphertext, spec.slot_bits
    if not isinstance(n_summands, int) or not 1 <= n_summands <= spec.max_summands:
        raise KernelInputError(
            f"n_summands must be an int in [1, max_summands={spec.max_summands}], "
            f"got {n_summands!r}"
        )
    if not isinstance(n_values, int) or not 0 <= n_values <= len(plaintexts) * slots:
        raise KernelInputError(
            f"n_values must be an int in [0, {len(plaintexts) * slots}] for "
            f"{len(plaintexts)} plaintexts of {slots} slots, got {n_values!r}"
        )
    nbytes = -(-(slots * bits) // 8)
    limit = 1 << (slots * bits)
    for i, pt in enumerate(plaintexts):
        if not isinstance(pt, int) or not 0 <= pt < limit:
            raise KernelInputError(
                f"plaintexts[{i}] must be an int in [0, 2^{slots * bits}) for this spec; "
                "wrong key, spec or too many summands?"
            )
    raw = b"".join(pt.to_bytes(nbytes, "little") for pt in plaintexts)
    byte_rows = np.frombuffer(raw, dtype=np.uint8).reshape(len(plaintexts), nbytes)
    bitmat = np.unpackbits(byte_rows, axis=1, bitorder="little")[:, : slots * bits]
    weights = np.left_shift(np.uint64(1), np.arange(bits, dtype=np.uint64))
    sums = (bitmat.reshape(-1, bits).astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
    sums = sums[:n_values].astype(np.int64) - n_summands * spec.offset
    return sums.astype(np.float64) / 2.0**spec.frac_bits
