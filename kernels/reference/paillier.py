"""Reference Paillier arithmetic (Paillier, EUROCRYPT'99) over Python ints: the oracle.

Every function takes and returns lists of Python ints; the Cython/GMP backend
(``kernels/_cy/paillier.pyx``) implements the same signatures and must give identical results
for identical inputs (including identical randomness ``r``). Validation happens in the public
front ``kernels.paillier``; nothing here checks its inputs. ``g = n + 1`` throughout, so
``g^m = 1 + m*n (mod n^2)`` by the binomial theorem.
"""

from __future__ import annotations


def powmod_batch(bases: list[int], exponent: int, modulus: int) -> list[int]:
    """Returns ``[b^exponent mod modulus]``; with exponent n, modulus n^2 this is r^n."""
    return [pow(b, exponent, modulus) for b in bases]


def nth_residue_crt(rs: list[int], p: int, q: int, p2inv_q2: int) -> list[int]:
    """Key-owner randomness: ``rho(r) = CRT(r^p mod p^2, r^q mod q^2)``, an n-th residue mod n^2.

    Why this equals textbook ``r^n`` in distribution: when ``gcd(n, phi(n)) = 1`` (checked at
    key generation) the n-th residues mod n^2 are, by CRT, the p-th powers mod p^2 times the
    q-th powers mod q^2, and ``r -> r^p mod p^2`` is a bijection from Z*_p onto the p-th powers
    (``s^p = t^p mod p^2`` implies ``s = t mod p`` by Fermat). So for uniform ``r`` in Z*_n,
    ``rho(r)`` is uniform over the n-th residues, exactly like ``r^n``, with exponents of
    |p| bits instead of |n| bits. The halves are recombined with Garner's formula
    ``a + p^2 * ((b - a) * (p^2)^-1 mod q^2)``.
    """
    p2, q2 = p * p, q * q
    out = []
    for r in rs:
        a = pow(r % p, p, p2)
        b = pow(r % q, q, q2)
        out.append(a + p2 * (((b - a) * p2inv_q2) % q2))
    return out


def encrypt(ms: list[int], rns: list[int], n: int, nsq: int) -> list[int]:
    """Returns ``[(1 + m*n) * r^n mod n^2]`` given precomputed ``rns = [r^n mod n^2]``."""
    return [((1 + m * n) * rn) % nsq for m, rn in zip(ms, rns, strict=True)]


def add(a: list[int], b: list[int], nsq: int) -> list[int]:
    """Homomorphic addition: E(x) * E(y) = E(x + y) (mod n^2), elementwise."""
    return [(x * y) % nsq for x, y in zip(a, b, strict=True)]


def sum_columns(rows: list[list[int]], nsq: int) -> list[int]:
    """Homomorphic sum of several equally long ciphertext vectors, elementwise."""
    out = list(rows[0])
    for row in rows[1:]:
        out = add(out, row, nsq)
    return out


def decrypt_textbook(cts: list[int], n: int, lam: int, mu: int) -> list[int]:
    """Textbook decryption ``m = L(c^lambda mod n^2) * mu mod n`` with ``L(x) = (x - 1) / n``."""
    nsq = n * n
    return [((pow(c, lam, nsq) - 1) // n * mu) % n for c in cts]


def decrypt_crt(cts: list[int], p: int, q: int, hp: int, hq: int, qinv_p: int) -> list[int]:
    """CRT decryption (Paillier 1999, section 7): work mod p^2 and q^2, recombine mod n.

    ``m_p = L_p(c^(p-1) mod p^2) * hp mod p`` with ``L_p(x) = (x - 1) / p`` and
    ``hp = L_p(g^(p-1) mod p^2)^-1 mod p`` (likewise for q), then
    ``m = m_q + q * ((m_p - m_q) * q^-1 mod p)``.
    """
    p2, q2 = p * p, q * q
    out = []
    for c in cts:
        mp = ((pow(c % p2, p - 1, p2) - 1) // p * hp) % p
        mq = ((pow(c % q2, q - 1, q2) - 1) // q * hq) % q
        out.append(mq + q * (((mp - mq) * qinv_p) % p))
    return out


def pack_slots(values: list[int], slot_bits: int, slots: int) -> list[int]:
    """Packs non-negative ints into plaintexts, value j of a group at bit ``j * slot_bits``."""
    out = []
    for start in range(0, len(values), slots):
        acc = 0
        for j, v in enumerate(values[start : start + slots]):
            acc += v << (j * slot_bits)
        out.append(acc)
    return out


def unpack_slots(plaintexts: list[int], slot_bits: int, slots: int, count: int) -> list[int]:
    """Inverse of :func:`pack_slots`: the first ``count`` slot values, in order."""
    mask = (1 << slot_bits) - 1
    values = [(pt >> (j * slot_bits)) & mask for pt in plaintexts for j in range(slots)]
    return values[:count]
