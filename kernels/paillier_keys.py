"""Paillier keys (Paillier, EUROCRYPT'99): generation, the public part, secret export.

Parameters: ``n = p * q`` with p, q independent primes of ``bits / 2`` bits each and ``g = n + 1``.
The default and minimum modulus is 2048 bits (about 112-bit security, NIST SP 800-57 Part 1
Table 2, the same size as RSA-2048); smaller keys are refused unless ``insecure_test_key=True``.

Primes are generated as in python-paillier and GMP-based libraries: a candidate is drawn from
the OS CSPRNG (``secrets.randbits``) with its top two bits set (so ``p * q`` has exactly ``bits``
bits) and its low bit set, then ``gmpy2.next_prime`` finds the next probable prime, which is
re-checked with 64 Miller-Rabin rounds. ``gcd(n, (p-1)(q-1)) = 1`` is enforced; it makes
``g = n + 1`` valid and the CRT randomness of ``kernels.paillier`` uniform.

The secret primes stay inside :class:`PaillierKeyPair`; :meth:`PaillierKeyPair.public_only` is
the one way to get something to send, and :meth:`PaillierKeyPair.export_secret` the explicit,
separate way to share the secret with another device of the same federation.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
from dataclasses import dataclass, field
from functools import cached_property

from kernels.errors import InsecureKeyError, KernelInputError

MIN_BITS = 2048
_PUBLIC_MAGIC = b"ESPK"
_SECRET_MAGIC = b"ESSK"
_VERSION = 1


def _n_bytes(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


def _check_bits(bits: int, insecure_test_key: bool) -> None:
    if bits < MIN_BITS and not insecure_test_key:
        raise InsecureKeyError(
            f"Paillier modulus must be >= {MIN_BITS} bits, got {bits}; "
            "pass insecure_test_key=True only in tests"
        )


@dataclass(frozen=True)
class PaillierPublicKey:
    """The public modulus n (g = n + 1). It can encrypt and add, never decrypt.

    Attributes:
        n: The modulus, odd, at least 2048 bits unless ``insecure_test_key``.
        insecure_test_key: Allows moduli below 2048 bits; for tests only.
    """

    n: int
    insecure_test_key: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 3 or self.n % 2 == 0:
            raise KernelInputError(f"n must be an odd int >= 3, got {self.n!r}")
        _check_bits(self.n.bit_length(), self.insecure_test_key)

    @property
    def bits(self) -> int:
        """Bit length of n."""
        return self.n.bit_length()

    @cached_property
    def nsquare(self) -> int:
        """n^2, the ciphertext modulus."""
        return self.n * self.n

    @cached_property
    def fingerprint(self) -> str:
        """First 16 hex digits of SHA-256 over n (big-endian), to tell keys apart."""
        return hashlib.sha256(_n_bytes(self.n)).hexdigest()[:16]

    def to_bytes(self) -> bytes:
        """Serialises as ``b"ESPK" | version u8 | len u16 | n big-endian``."""
        raw = _n_bytes(self.n)
        return _PUBLIC_MAGIC + struct.pack(">BH", _VERSION, len(raw)) + raw

    @classmethod
    def from_bytes(cls, data: bytes, *, insecure_test_key: bool = False) -> PaillierPublicKey:
        """Parses :meth:`to_bytes` output.

        Raises:
            KernelInputError: wrong magic, unknown version or truncated data.
        """
        header = len(_PUBLIC_MAGIC) + 3
        if len(data) < header or data[:4] != _PUBLIC_MAGIC:
            raise KernelInputError("public key bytes must start with b'ESPK'")
        version, length = struct.unpack(">BH", data[4:header])
        if version != _VERSION:
            raise KernelInputError(f"public key version must be {_VERSION}, got {version}")
        if len(data) != header + length:
            raise KernelInputError(
                f"public key length must be {header + length} bytes, got {len(data)}"
            )
        n = int.from_bytes(data[header:], "big")
        return cls(n=n, insecure_test_key=insecure_test_key)


def _random_prime(bits: int) -> int:
    import gmpy2  # only key generation needs it

    while True:
        candidate = secrets.randbits(bits) | (3 << (bits - 2)) | 1
        p = int(gmpy2.next_prime(candidate))
        if p.bit_length() == bits and gmpy2.is_prime(p, 64):
            return p


class PaillierKeyPair:
    """A Paillier key pair; holds the primes and the CRT constants derived from them.

    Attributes:
        public: The :class:`PaillierPublicKey` (safe to send).
    """

    __slots__ = ("public", "_p", "_q", "_crt")

    def __init__(self, public: PaillierPublicKey, p: int, q: int) -> None:
        """Wraps known primes; prefer :meth:`generate` or :meth:`import_secret`.

        Raises:
            KernelInputError: p * q != n, p == q, or gcd(n, (p-1)(q-1)) != 1.
        """
        if p == q or p * q != public.n:
            raise KernelInputError("secret primes must be distinct with p * q == public n")
        if math.gcd(public.n, (p - 1) * (q - 1)) != 1:
            raise KernelInputError("gcd(n, (p-1)(q-1)) must be 1 for g = n + 1")
        if p < q:  # canonical order so exports and CRT constants are reproducible
            p, q = q, p
        self.public = public
        self._p, self._q = p, q
        p2, q2 = p * p, q * q
        g = public.n + 1
        # hp = L_p(g^(p-1) mod p^2)^-1 mod p, L_p(x) = (x-1)/p (Paillier 1999, section 7).
        hp = pow((pow(g, p - 1, p2) - 1) // p, -1, p)
        hq = pow((pow(g, q - 1, q2) - 1) // q, -1, q)
        self._crt = {
            "p": p,
            "q": q,
            "hp": hp,
            "hq": hq,
            "qinv_p": pow(q, -1, p),
            "p2inv_q2": pow(p2, -1, q2),
        }

    @classmethod
    def generate(cls, bits: int = MIN_BITS, *, insecure_test_key: bool = False) -> PaillierKeyPair:
        """Generates a fresh key pair (about 0.1-1 s at 2048 bits).

        Args:
            bits: Modulus bit length, even, >= 2048 unless ``insecure_test_key``.
            insecure_test_key: Allows small moduli for fast tests; never in production.

        Raises:
            InsecureKeyError: ``bits`` < 2048 without ``insecure_test_key``.
            ValueError: ``bits`` odd or below 128.
        """
        if not isinstance(bits, int) or bits % 2 or bits < 128:
            raise ValueError(f"bits must be an even int >= 128, got {bits!r}")
        _check_bits(bits, insecure_test_key)
        while True:
            p, q = _random_prime(bits // 2), _random_prime(bits // 2)
            n = p * q
            if p != q and n.bit_length() == bits and math.gcd(n, (p - 1) * (q - 1)) == 1:
                return cls(PaillierPublicKey(n=n, insecure_test_key=insecure_test_key), p, q)

    def public_only(self) -> PaillierPublicKey:
        """Returns the public key: the only key object that should leave the device."""
        return self.public

    def export_secret(self) -> bytes:
        """Explicitly serialises the secret (p, q) for a device-to-device share.

        The bytes let anyone decrypt; send them only over an authenticated, encrypted channel.
        """
        p_raw, q_raw = _n_bytes(self._p), _n_bytes(self._q)
        return _SECRET_MAGIC + struct.pack(">BHH", _VERSION, len(p_raw), len(q_raw)) + p_raw + q_raw

    @classmethod
    def import_secret(cls, data: bytes, *, insecure_test_key: bool = False) -> PaillierKeyPair:
        """Rebuilds a key pair from :meth:`export_secret` output.

        Raises:
            KernelInputError: malformed data or inconsistent primes.
        """
        header = len(_SECRET_MAGIC) + 5
        if len(data) < header or data[:4] != _SECRET_MAGIC:
            raise KernelInputError("secret key bytes must start with b'ESSK'")
        version, lp, lq = struct.unpack(">BHH", data[4:header])
        if version != _VERSION:
            raise KernelInputError(f"secret key version must be {_VERSION}, got {version}")
        if len(data) != header + lp + lq:
            raise KernelInputError(
                f"secret key length must be {header + lp + lq} bytes, got {len(data)}"
            )
        p = int.from_bytes(data[header : header + lp], "big")
        q = int.from_bytes(data[header + lp :], "big")
        public = PaillierPublicKey(n=p * q, insecure_test_key=insecure_test_key)
        return cls(public, p, q)

    def _crt_params(self) -> dict[str, int]:
        """The CRT constants for the backends (private: secret material)."""
        return self._crt

    def __repr__(self) -> str:
        return (
            f"PaillierKeyPair(bits={self.public.bits}, "
            f"fingerprint={self.public.fingerprint!r}, secret=<hidden>)"
        )

    def __reduce__(self) -> object:
        raise TypeError(
            "PaillierKeyPair is not picklable: secret material is never serialised implicitly; "
            "send public_only(), or use export_secret() deliberately"
        )
