"""Pure secure-aggregation pieces shared by devices and cloud: Shamir, share encryption, framing.

Standards followed: Shamir t-of-n secret sharing over the prime field GF(2^521 - 1) (Shamir,
CACM 1979; coefficients drawn with :mod:`secrets`); X25519 key agreement (RFC 7748),
HKDF-SHA256 (RFC 5869) and AES-256-GCM (NIST SP 800-38D, random 96-bit nonces) from the
``cryptography`` package, as Bonawitz et al. (CCS'17) prescribe for SecAgg's share channel and
pairwise mask seeds. SecAgg+ (Bell et al., CCS'20) restricts key agreement, masks and shares to
a k-regular neighbour graph (:func:`neighbour_graph`). No I/O here: the cloud and edge modules
move these bytes over MQTT.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
from dataclasses import dataclass

import numpy as np

from converters.errors import WireError

PRIME = 2**521 - 1  # Mersenne prime M521: any 32-byte secret is a field element
SHARE_BYTES = 66  # ceil(521 / 8)
KEY_BYTES = 32  # X25519 public/private keys and 32-byte seeds
PROTOCOL = b"edgesplit-secagg-v1"
_MAP_MAGIC = b"ESM1"  # schema 1 of the device-keyed map below
_MAX_ENTRIES = 10_000


# -- Shamir secret sharing (textbook: random polynomial of degree t-1, value at 0 = secret) --


def split_secret(
    secret: int, *, threshold: int, xs: list[int], prime: int = PRIME
) -> dict[int, int]:
    """Splits ``secret`` into shares ``{x: f(x)}`` such that any ``threshold`` of them recover it.

    Args:
        secret: An int in ``[0, prime)``.
        threshold: t >= 1; t - 1 shares reveal nothing about the secret.
        xs: Distinct nonzero evaluation points in ``[1, prime)``, one per holder.
        prime: The field modulus (tests use small primes).

    Raises:
        ValueError: naming the broken rule.
    """
    if not isinstance(secret, int) or not 0 <= secret < prime:
        raise ValueError(f"secret must be an int in [0, prime), got {secret!r}")
    if not isinstance(threshold, int) or not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must be an int in [1, {len(xs)}] (holders), got {threshold!r}")
    if len(set(xs)) != len(xs) or any(not 0 < x < prime for x in xs):
        raise ValueError(f"xs must be distinct ints in [1, prime), got {xs!r}")
    coeffs = [secret] + [secrets.randbelow(prime) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % prime
        out[x] = acc
    return out


def reconstruct_secret(shares: dict[int, int], *, threshold: int, prime: int = PRIME) -> int:
    """Recovers the secret from at least ``threshold`` shares by Lagrange interpolation at 0.

    Only the first ``threshold`` shares (by x) are used; the caller checks extra shares for
    consistency when it can (e.g. a recovered key against its advertised public key).

    Raises:
        ValueError: fewer than ``threshold`` shares or bad share values.
    """
    if len(shares) < threshold:
        raise ValueError(f"need >= threshold={threshold} shares, got {len(shares)}")
    points = sorted(shares.items())[:threshold]
    for x, y in points:
        if not (0 < x < prime and 0 <= y < prime):
            raise ValueError(f"share ({x}, <y>) is outside the field")
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % prime
                den = den * (xi - xj) % prime
        secret = (secret + yi * num * pow(den, -1, prime)) % prime
    return secret


def share_to_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(raw: bytes) -> int:
    if len(raw) != SHARE_BYTES:
        raise WireError(f"share must be {SHARE_BYTES} bytes, got {len(raw)}")
    y = int.from_bytes(raw, "big")
    if y >= PRIME:
        raise WireError("share must be below the field prime 2^521 - 1")
    return y


def holder_indices(devices) -> dict[str, int]:
    """Evaluation point of each device: 1 + its rank in sorted order (never 0, the secret)."""
    return {d: i + 1 for i, d in enumerate(sorted(devices))}


def threshold_for(n: int, requested: int = 0) -> int:
    """The Shamir threshold for ``n`` holders: ``requested`` if > 0, else a majority n//2 + 1.

    A majority means the unmasking shares of any two disjoint survivor sets cannot both reach
    t, so the server can never collect both kinds of share of one device (Bonawitz et al. 4.2).

    SecAgg+ shares each secret among a device's closed neighbourhood only (itself and its k
    neighbours), so there ``n = k + 1`` and the default is ``t = (k + 1) // 2 + 1 > k / 2``
    (Bell et al. 3.3). Security: fewer than t colluding holders in one neighbourhood learn
    nothing about that device's secrets, and a majority still stops even a server lying about
    who dropped from getting both the self-mask and the mask-key shares of one device.
    Robustness: a device's input (or its dropout) can be unmasked only while >= t of its
    closed neighbourhood answer the unmasking step; with devices dropping independently at
    rate p, the chance that some neighbourhood falls short shrinks exponentially in k, which
    is why k grows like log n (Bell et al., Theorem 3.6). Too few in one neighbourhood fails
    the round with a one-line reason and the previous model stays.
    """
    t = requested if requested > 0 else n // 2 + 1
    return max(2, min(t, n)) if n >= 2 else 1


# -- SecAgg+ neighbour graph (Bell et al., CCS'20) -----------------------------------------------


def neighbour_count(n: int, requested: int = 0) -> int:
    """Degree k of the SecAgg+ graph on ``n`` devices.

    ``requested`` if > 0, else ``2 * ceil(log2 n) + 1`` (O(log n), Bell et al. 3.3); capped at
    ``n - 1`` (the complete graph: plain SecAgg) and raised by one when both k and n are odd,
    since a k-regular graph on n vertices needs ``n * k`` even.
    """
    if not isinstance(requested, int) or requested < 0:
        raise ValueError(f"requested neighbours must be an int >= 0, got {requested!r}")
    if n <= 1:
        return 0
    k = min(requested if requested > 0 else 2 * math.ceil(math.log2(n)) + 1, n - 1)
    if k % 2 and n % 2:
        k += 1  # k odd < n - 1 even here, so k + 1 <= n - 1
    return k


def neighbour_graph(
    devices, *, k: int, seed: str, run_id: str, round_: int
) -> dict[str, frozenset[str]]:
    """The k-regular SecAgg+ communication graph over ``devices`` (public and deterministic).

    A Harary-style circulant graph over the devices in a pseudo-random order: each device is
    joined to the ``k // 2`` devices on either side of it and, for odd k, to the one opposite.
    The order sorts devices by SHA-256 of the round's public ``seed`` (announced by the cloud
    with the model), run and round, so the cloud and every device derive the same graph from
    the same key list, and a device cannot choose its neighbours by choosing its id.

    Args:
        devices: the device ids (U1, the devices that advertised keys).
        k: requested degree, adjusted by :func:`neighbour_count` for ``len(devices)``; with
            ``k >= n - 1`` every device neighbours every other one (plain SecAgg).

    Returns:
        ``{device: its neighbours}`` (never itself); every set has the same size.
    """
    ids = sorted(set(devices))
    n, k = len(ids), neighbour_count(len(ids), k)
    if k >= n - 1:
        everyone = frozenset(ids)
        return {d: everyone - {d} for d in ids}
    salt = context(run_id, round_, "graph", seed) + b"|"
    order = sorted(ids, key=lambda d: hashlib.sha256(salt + d.encode()).digest())
    offsets = list(range(1, k // 2 + 1)) + ([n // 2] if k % 2 else [])
    return {
        d: frozenset(order[(i + s * o) % n] for o in offsets for s in (1, -1))
        for i, d in enumerate(order)
    }


# -- X25519 / HKDF / AES-GCM ---------------------------------------------------------------------


def _x25519():
    from cryptography.hazmat.primitives.asymmetric import x25519

    return x25519


def generate_private_key():
    """A fresh X25519 private key from the OS CSPRNG."""
    return _x25519().X25519PrivateKey.generate()


def public_bytes(private_key) -> bytes:
    from cryptography.hazmat.primitives import serialization as ser

    return private_key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)


def private_bytes(private_key) -> bytes:
    """Raw private key bytes; only ever Shamir-shared under AES-GCM, never sent in clear."""
    from cryptography.hazmat.primitives import serialization as ser

    return private_key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())


def private_key_from_bytes(raw: bytes):
    if len(raw) != KEY_BYTES:
        raise WireError(f"X25519 private key must be {KEY_BYTES} bytes, got {len(raw)}")
    return _x25519().X25519PrivateKey.from_private_bytes(raw)


def agree(private_key, peer_public: bytes, *, info: bytes) -> bytes:
    """HKDF-SHA256(X25519(sk, peer_pk)) -> 32 bytes; ``info`` binds the purpose and context.

    Raises:
        WireError: the peer key is malformed or a low-order point (all-zero shared secret).
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    if not isinstance(peer_public, (bytes, bytearray)) or len(peer_public) != KEY_BYTES:
        raise WireError(f"X25519 public key must be {KEY_BYTES} bytes, got {len(peer_public)}")
    try:
        peer = _x25519().X25519PublicKey.from_public_bytes(bytes(peer_public))
        shared = private_key.exchange(peer)
    except ValueError as exc:  # low-order point: the exchange yields all zeros
        raise WireError(f"X25519 public key rejected: {exc}") from None
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=PROTOCOL + b"|" + info
    ).derive(shared)


def context(run_id: str, round_: int, *parts: str) -> bytes:
    """Binds keys and ciphertexts to one run, round and purpose (no cross-round replay)."""
    return "|".join([run_id, str(round_), *parts]).encode()


def seal(key: bytes, plaintext: bytes, *, aad: bytes) -> bytes:
    """AES-256-GCM with a fresh random 96-bit nonce; returns nonce || ciphertext || tag."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, *, aad: bytes, what: str) -> bytes:
    """Inverse of :func:`seal`.

    Raises:
        WireError: "<what> failed its AES-GCM tag" on any tampering, wrong key or wrong context.
    """
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(blob) < 12 + 16:
        raise WireError(f"{what} must be >= 28 bytes (nonce + tag), got {len(blob)}")
    try:
        return AESGCM(key).decrypt(blob[:12], blob[12:], aad)
    except InvalidTag:
        raise WireError(f"{what} failed its AES-GCM tag (tampered, wrong key or context)") from None


# -- framing ---------------------------------------------------------------------------------


def pack_map(entries: dict[str, bytes]) -> bytes:
    """``b"ESM1" | count u32 | (id_len u8, id, len u32, value)*`` with ids sorted."""
    out = [_MAP_MAGIC, struct.pack(">I", len(entries))]
    for key in sorted(entries):
        raw = key.encode("ascii")
        out += [
            struct.pack(">B", len(raw)),
            raw,
            struct.pack(">I", len(entries[key])),
            entries[key],
        ]
    return b"".join(out)


def unpack_map(data: bytes, *, value_len: int | None = None) -> dict[str, bytes]:
    """Parses :func:`pack_map`; every malformed input raises one-line :class:`WireError`."""
    from converters.topics import validate_device_id

    data = bytes(data)
    if data[:4] != _MAP_MAGIC or len(data) < 8:
        raise WireError(f"map must start with {_MAP_MAGIC!r} and a count, got {data[:4]!r}")
    (count,) = struct.unpack_from(">I", data, 4)
    if count > _MAX_ENTRIES:
        raise WireError(f"map count must be <= {_MAX_ENTRIES}, got {count}")
    pos, out = 8, {}
    try:
        for _ in range(count):
            (klen,) = struct.unpack_from(">B", data, pos)
            if pos + 1 + klen > len(data):
                raise WireError(f"map truncated in a key at byte {pos}")
            key = validate_device_id(data[pos + 1 : pos + 1 + klen].decode("ascii"))
            pos += 1 + klen
            (vlen,) = struct.unpack_from(">I", data, pos)
            value = data[pos + 4 : pos + 4 + vlen]
            if len(value) != vlen:
                raise WireError(f"map value for {key!r} truncated: {len(value)} of {vlen} bytes")
            if value_len is not None and vlen != value_len:
                raise WireError(f"map value for {key!r} must be {value_len} bytes, got {vlen}")
            if key in out:
                raise WireError(f"map key {key!r} appears twice")
            out[key] = value
            pos += 4 + vlen
    except (struct.error, UnicodeDecodeError) as exc:
        raise WireError(f"map truncated or not ASCII at byte {pos}: {exc}") from None
    if pos != len(data):
        raise WireError(f"map has {len(data) - pos} trailing bytes")
    return out


# -- fixed point and parameter vectors ---------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FixedPointPlan:
    """Fixed point in Z_{2^32} such that the sum over ``n_devices`` inputs never wraps.

    Each device clips its update delta to ``[-clip, clip]`` per coordinate and multiplies it by
    its FedAvg weight ``w_i = n_i / N_planned`` (<= 1), so every summand lies in [-clip, clip];
    ``frac_bits`` is the largest with ``n_devices * clip * 2^frac_bits < 2^31``. The decoded sum
    is then within ``n_devices * 2^-(frac_bits + 1)`` of the float sum (round to nearest), and
    the averaged delta within that divided by the survivors' total weight. Example: 10 devices,
    clip 4.0 -> frac_bits 25, sum within 1.5e-7 (float32 resolution near 1 is 1.2e-7).
    """

    clip: float
    frac_bits: int
    n_devices: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a finite float > 0, got {self.clip!r}")
        if not isinstance(self.n_devices, int) or self.n_devices < 1:
            raise ValueError(f"n_devices must be an int >= 1, got {self.n_devices!r}")
        if not isinstance(self.frac_bits, int) or not 0 <= self.frac_bits <= 30:
            raise ValueError(f"frac_bits must be an int in [0, 30], got {self.frac_bits!r}")
        if self.n_devices * self.clip * 2.0**self.frac_bits >= 2.0**31:
            raise ValueError(
                f"n_devices * clip * 2**frac_bits must be < 2**31, got "
                f"{self.n_devices} * {self.clip} * 2**{self.frac_bits}; lower clip or frac_bits"
            )

    @classmethod
    def for_devices(cls, n_devices: int, *, clip: float) -> FixedPointPlan:
        """The finest plan for ``n_devices`` summands bounded by ``clip``."""
        bound = 2.0**31 / (n_devices * clip)
        frac = min(30, math.ceil(math.log2(bound)) - 1)
        while frac > 0 and n_devices * clip * 2.0**frac >= 2.0**31:
            frac -= 1
        if frac < 0 or n_devices * clip >= 2.0**31:
            raise ValueError(f"n_devices * clip must be < 2**31, got {n_devices} * {clip}")
        return cls(clip=clip, frac_bits=frac, n_devices=n_devices)

    @property
    def precision(self) -> float:
        """Bound on |decoded sum - float sum| for up to ``n_devices`` summands."""
        return self.n_devices * 2.0 ** -(self.frac_bits + 1)


def flatten_params(params: dict[str, np.ndarray]) -> np.ndarray:
    """Concatenates the arrays in sorted-key order as float64 (both sides use the same order)."""
    if not params:
        return np.zeros(0)
    return np.concatenate([np.asarray(params[k], np.float64).ravel() for k in sorted(params)])


def unflatten_params(vec: np.ndarray, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Splits a flat float64 vector back into arrays shaped like ``like`` (float64)."""
    total = sum(int(np.size(v)) for v in like.values())
    if vec.shape != (total,):
        raise WireError(f"parameter vector must have length {total}, got {vec.shape}")
    out, pos = {}, 0
    for k in sorted(like):
        size = int(np.size(like[k]))
        out[k] = vec[pos : pos + size].reshape(np.shape(like[k]))
        pos += size
    return out


def weighted_clipped_delta(
    new: dict[str, np.ndarray], old: dict[str, np.ndarray], *, weight: float, clip: float
) -> np.ndarray:
    """``weight * clip(new - old, -clip, clip)`` flattened: what a device contributes.

    Clipping happens before masking/encryption so one device cannot dominate the sum (and so a
    distributed-DP noise share, added by the caller after this, has a bounded sensitivity).
    """
    if not 0 < weight <= 1:
        raise ValueError(f"weight must be in (0, 1], got {weight!r}")
    delta = flatten_params(new) - flatten_params(old)
    return weight * np.clip(delta, -clip, clip)
