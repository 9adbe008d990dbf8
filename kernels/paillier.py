"""Packed Paillier encryption for HE aggregation (Paillier '99; Phong et al., IEEE TIFS 2018).

Devices of a federation share one key pair; the server holds only the public key, adds the
devices' ciphertexts (``E(a) * E(b) = E(a + b) mod n^2``) and never sees a plaintext. Floats are
packed many per plaintext by :mod:`kernels.fixedpoint`.

Encryption is ``c = (1 + m*n) * rho mod n^2`` (``g = n + 1``, so ``g^m = 1 + m*n``) with ``rho``
a fresh uniformly random n-th residue. A public-key holder computes ``rho = r^n mod n^2`` for
uniform ``r`` in Z*_n. A key owner (every device here) computes it by CRT as
``CRT(r^p mod p^2, r^q mod q^2)``, which has the same uniform distribution over the n-th
residues (proof in ``kernels.reference.paillier.nth_residue_crt``) at |p|-bit instead of
|n|-bit exponents mod half-size moduli. Decryption uses the standard CRT speed-up with
``hp``, ``hq`` (Paillier 1999, section 7). :class:`RandomnessPool` moves the ``rho``
exponentiations off the critical path, leaving one modular multiplication per online encryption.

These fronts validate and allocate; arithmetic runs in the backend chosen by
``kernels._backend`` (Cython over GMP, or the Python-int reference), split across threads for
the Cython backend, whose loops release the GIL.
"""

from __future__ import annotations

import math
import os
import secrets
import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from kernels import _backend
from kernels.errors import KernelInputError
from kernels.fixedpoint import PackingSpec, encode_pack, unpack_decode
from kernels.paillier_keys import MIN_BITS, PaillierKeyPair, PaillierPublicKey

__all__ = [
    "MIN_BITS",
    "PackingSpec",
    "PaillierKeyPair",
    "PaillierPublicKey",
    "RandomnessPool",
    "add_batch",
    "decrypt_batch",
    "deserialize_ciphertexts",
    "encode_pack",
    "encrypt_batch",
    "serialize_ciphertexts",
    "sum_ciphertexts",
    "unpack_decode",
]

Key = PaillierPublicKey | PaillierKeyPair
_CT_MAGIC = b"ESCT"
_CT_VERSION = 1
_CT_HEADER = struct.Struct(">4sB8sIH")
_MIN_CHUNK = 4  # below this many items per thread, threading costs more than it saves

_executor_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def _workers() -> int:
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 8))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, min(os.cpu_count() or 1, 8))


def _pool_executor() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(_workers(), thread_name_prefix="edgesplit-paillier")
        return _executor


def _chunked(fn: Callable[..., list[int]], columns: Sequence[list], *args: object) -> list[int]:
    """Runs ``fn(*column_slices, *args)`` on slices of the columns across threads, in order.

    Only the Cython backend releases the GIL, so only it is split.
    """
    count = len(columns[0])
    workers = _workers() if _backend.selection()["paillier"] == "cython" else 1
    if workers == 1 or count < 2 * _MIN_CHUNK:
        return fn(*columns, *args)
    size = -(-count // workers)
    parts = [[col[i : i + size] for col in columns] for i in range(0, count, size)]
    results = _pool_executor().map(lambda cols: fn(*cols, *args), parts)
    return [x for part in results for x in part]


def _public(key: Key) -> PaillierPublicKey:
    if isinstance(key, PaillierKeyPair):
        return key.public
    if isinstance(key, PaillierPublicKey):
        return key
    raise TypeError(f"key must be a PaillierPublicKey or PaillierKeyPair, got {type(key).__name__}")


def _check_ints(name: str, values: Sequence[int], low: int, high: int, label: str) -> list[int]:
    out = list(values)
    for i, v in enumerate(out):
        if not isinstance(v, int) or not low <= v < high:
            shown = (
                v if not isinstance(v, int) or v.bit_length() < 80 else f"<{v.bit_length()} bits>"
            )
            raise KernelInputError(f"{name}[{i}] must be an int in [{low}, {label}), got {shown}")
    return out


def _random_units(n: int, count: int) -> list[int]:
    out = []
    while len(out) < count:
        r = secrets.randbelow(n - 1) + 1
        if math.gcd(r, n) == 1:  # fails only if r reveals a factor: probability ~2^-1023
            out.append(r)
    return out


def _residues(key: Key, rs: list[int], *, threaded: bool = True) -> list[int]:
    """Random n-th residues from units ``rs``: CRT for a key owner, r^n mod n^2 otherwise."""
    impl = _backend.impl("paillier")
    run = _chunked if threaded else (lambda fn, cols, *a: fn(*cols, *a))
    if isinstance(key, PaillierKeyPair):
        crt = key._crt_params()
        return run(impl.nth_residue_crt, [rs], crt["p"], crt["q"], crt["p2inv_q2"])
    pk = _public(key)
    return run(impl.powmod_batch, [rs], pk.n, pk.nsquare)


def _encrypt_with_randomness(key: Key, plaintexts: Sequence[int], rs: Sequence[int]) -> list[int]:
    """Encrypts with caller-chosen units ``rs`` (tests only: reusing r breaks security)."""
    pk = _public(key)
    ms = _check_ints("plaintexts", plaintexts, 0, pk.n, "n")
    units = _check_ints("rs", rs, 1, pk.n, "n")
    return _chunked(
        _backend.impl("paillier").encrypt, [ms, _residues(key, units)], pk.n, pk.nsquare
    )


def encrypt_batch(
    key: Key, plaintexts: Sequence[int], *, randomness_pool: RandomnessPool | None = None
) -> list[int]:
    """Encrypts plaintext ints in ``[0, n)``.

    Args:
        key: A public key, or the key pair (faster: CRT randomness).
        plaintexts: Ints below n, e.g. from :func:`encode_pack`.
        randomness_pool: Precomputed n-th residues for the same key; each is used once.

    Returns:
        Ciphertexts in ``Z*_{n^2}``.

    Raises:
        KernelInputError: a plaintext is out of range, or the pool belongs to another key.
    """
    pk = _public(key)
    ms = _check_ints("plaintexts", plaintexts, 0, pk.n, "n")
    if randomness_pool is not None:
        if randomness_pool.fingerprint != pk.fingerprint:
            raise KernelInputError(
                f"randomness pool key fingerprint {randomness_pool.fingerprint} != "
                f"key {pk.fingerprint}"
            )
        rhos = randomness_pool.take(len(ms))
    else:
        rhos = _residues(key, _random_units(pk.n, len(ms)))
    return _chunked(_backend.impl("paillier").encrypt, [ms, rhos], pk.n, pk.nsquare)


def add_batch(key: Key, a: Sequence[int], b: Sequence[int]) -> list[int]:
    """Homomorphic elementwise addition: decrypts to ``(a_i + b_i) mod n``.

    Raises:
        KernelInputError: lengths differ or a ciphertext is outside (0, n^2).
    """
    return sum_ciphertexts(key, [a, b])


def sum_ciphertexts(key: Key, ciphertext_lists: Sequence[Sequence[int]]) -> list[int]:
    """Homomorphic elementwise sum of equally long ciphertext vectors (e.g. one per device).

    Raises:
        KernelInputError: no vectors, lengths differ, or a ciphertext is outside (0, n^2).
    """
    pk = _public(key)
    if len(ciphertext_lists) == 0:
        raise KernelInputError("ciphertext_lists must hold at least one vector, got 0")
    length = len(ciphertext_lists[0])
    rows = []
    for i, row in enumerate(ciphertext_lists):
        if len(row) != length:
            raise KernelInputError(
                f"ciphertext_lists[{i}] must have length {length} like [0], got {len(row)}"
            )
        rows.append(_check_ints(f"ciphertext_lists[{i}]", row, 1, pk.nsquare, "n^2"))
    if len(rows) == 1 or length == 0:
        return list(rows[0])
    impl = _backend.impl("paillier")
    return _chunked(lambda *cols: impl.sum_columns(list(cols), pk.nsquare), rows)


def decrypt_batch(keypair: PaillierKeyPair, ciphertexts: Sequence[int]) -> list[int]:
    """Decrypts with the secret key by CRT.

    Raises:
        TypeError: given a public key (which cannot decrypt).
        KernelInputError: a ciphertext is outside (0, n^2).
    """
    if not isinstance(keypair, PaillierKeyPair):
        raise TypeError(
            f"decrypt_batch needs a PaillierKeyPair, got {type(keypair).__name__}; "
            "a public key cannot decrypt"
        )
    pk = keypair.public
    cts = _check_ints("ciphertexts", ciphertexts, 1, pk.nsquare, "n^2")
    crt = keypair._crt_params()
    return _chunked(
        _backend.impl("paillier").decrypt_crt,
        [cts],
        crt["p"],
        crt["q"],
        crt["hp"],
        crt["hq"],
        crt["qinv_p"],
    )


def serialize_ciphertexts(key: Key, ciphertexts: Sequence[int]) -> bytes:
    """Packs ciphertexts as ``b"ESCT" | version | fingerprint(8) | count u32 | width u16 | data``.

    Each ciphertext is a fixed-width big-endian field of ``ceil(bits(n^2) / 8)`` bytes.
    """
    pk = _public(key)
    cts = _check_ints("ciphertexts", ciphertexts, 1, pk.nsquare, "n^2")
    width = (pk.nsquare.bit_length() + 7) // 8
    header = _CT_HEADER.pack(_CT_MAGIC, _CT_VERSION, bytes.fromhex(pk.fingerprint), len(cts), width)
    return header + b"".join(c.to_bytes(width, "big") for c in cts)


def deserialize_ciphertexts(key: Key, data: bytes) -> list[int]:
    """Parses :func:`serialize_ciphertexts` output, checking key and group membership.

    Raises:
        KernelInputError: wrong magic/version/length, a fingerprint of another key, or a value
            outside Z*_{n^2} (``0 < c < n^2`` and ``gcd(c, n) == 1``).
    """
    pk = _public(key)
    if len(data) < _CT_HEADER.size:
        raise KernelInputError(f"ciphertext bytes must be >= {_CT_HEADER.size}, got {len(data)}")
    magic, version, fp, count, width = _CT_HEADER.unpack_from(data)
    if magic != _CT_MAGIC:
        raise KernelInputError(f"ciphertext bytes must start with {_CT_MAGIC!r}, got {magic!r}")
    if version != _CT_VERSION:
        raise KernelInputError(f"ciphertext version must be {_CT_VERSION}, got {version}")
    if fp.hex() != pk.fingerprint:
        raise KernelInputError(
            f"ciphertext key fingerprint {fp.hex()} != federation key {pk.fingerprint}"
        )
    expected = _CT_HEADER.size + count * width
    if width != (pk.nsquare.bit_length() + 7) // 8 or len(data) != expected:
        raise KernelInputError(
            f"ciphertext payload must be {count} x {(pk.nsquare.bit_length() + 7) // 8} bytes, "
            f"got width {width} and {len(data) - _CT_HEADER.size} bytes"
        )
    view = memoryview(data)[_CT_HEADER.size :]
    out = [int.from_bytes(view[i * width : (i + 1) * width], "big") for i in range(count)]
    for i, c in enumerate(out):
        if not 0 < c < pk.nsquare or math.gcd(c, pk.n) != 1:
            raise KernelInputError(
                f"ciphertext[{i}] must be in Z*_(n^2) (0 < c < n^2, gcd(c, n) = 1)"
            )
    return out


class RandomnessPool:
    """Precomputes encryption randomness (n-th residues) in a background thread.

    Each value is handed out once and then forgotten. Built from a key pair it uses the CRT
    path; from a public key, ``r^n mod n^2``. With the Cython backend the worker releases the
    GIL, so precomputation overlaps with the caller's work.

    Args:
        key: The key the values are for.
        capacity: How many values to keep ready.
        batch: Values computed per background step.
        background: Start the refilling thread (else only :meth:`fill` computes).
    """

    def __init__(
        self, key: Key, *, capacity: int = 1024, batch: int = 64, background: bool = True
    ) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        self._key = key
        self._n = _public(key).n
        self.fingerprint = _public(key).fingerprint
        self.capacity, self.batch = capacity, batch
        self._values: deque[int] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(
                target=self._run, name="edgesplit-randomness-pool", daemon=True
            )
            self._thread.start()

    def __len__(self) -> int:
        with self._cond:
            return len(self._values)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and len(self._values) >= self.capacity:
                    self._cond.wait()
                if self._closed:
                    return
                need = min(self.batch, self.capacity - len(self._values))
            fresh = _residues(self._key, _random_units(self._n, need), threaded=False)
            self._store(fresh)

    def _store(self, fresh: list[int]) -> None:
        # Both the thread and fill() may have computed for the same gap; never exceed capacity.
        with self._cond:
            room = max(0, self.capacity - len(self._values))
            self._values.extend(fresh[:room])
            self._cond.notify_all()

    def fill(self) -> None:
        """Tops the pool up to ``capacity`` now, in the calling thread(s), using all cores."""
        need = self.capacity - len(self)
        if need > 0:
            self._store(_residues(self._key, _random_units(self._n, need)))

    def take(self, count: int) -> list[int]:
        """Removes and returns ``count`` values, computing any shortfall on the spot."""
        with self._cond:
            got = [self._values.popleft() for _ in range(min(count, len(self._values)))]
            self._cond.notify_all()
        if len(got) < count:
            got += _residues(self._key, _random_units(self._n, count - len(got)))
        return got

    def close(self) -> None:
        """Stops the background thread and forgets the remaining values."""
        with self._cond:
            self._closed = True
            self._values.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> RandomnessPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
