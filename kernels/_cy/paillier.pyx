# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Paillier batch arithmetic over GMP ``mpz_t``: same signatures and results as the reference.

Big ints cross into C as one fixed-width big-endian byte buffer per batch (``mpz_import`` /
``mpz_export``); the loops run ``nogil`` so the front can split a batch across threads. Secret
exponents (p, q, p - 1, q - 1) use ``mpz_powm_sec`` (constant time); the public exponent n of
the public-key r^n uses the faster ``mpz_powm``. Nothing here validates: ``kernels.paillier``
does.
"""

from libc.string cimport memset


cdef extern from "gmp.h" nogil:
    ctypedef struct __mpz_struct:
        pass
    ctypedef __mpz_struct mpz_t[1]
    ctypedef __mpz_struct* mpz_ptr
    ctypedef const __mpz_struct* mpz_srcptr

    void mpz_init(mpz_ptr)
    void mpz_clear(mpz_ptr)
    void mpz_import(mpz_ptr, size_t, int, size_t, int, size_t, const void*)
    void* mpz_export(void*, size_t*, int, size_t, int, size_t, mpz_srcptr)
    size_t mpz_sizeinbase(mpz_srcptr, int)
    void mpz_powm(mpz_ptr, mpz_srcptr, mpz_srcptr, mpz_srcptr)
    void mpz_powm_sec(mpz_ptr, mpz_srcptr, mpz_srcptr, mpz_srcptr)
    void mpz_mul(mpz_ptr, mpz_srcptr, mpz_srcptr)
    void mpz_add(mpz_ptr, mpz_srcptr, mpz_srcptr)
    void mpz_add_ui(mpz_ptr, mpz_srcptr, unsigned long)
    void mpz_sub(mpz_ptr, mpz_srcptr, mpz_srcptr)
    void mpz_sub_ui(mpz_ptr, mpz_srcptr, unsigned long)
    void mpz_mod(mpz_ptr, mpz_srcptr, mpz_srcptr)
    void mpz_divexact(mpz_ptr, mpz_srcptr, mpz_srcptr)


cdef inline void _load(mpz_ptr z, const unsigned char* buf, size_t width) noexcept nogil:
    mpz_import(z, width, 1, 1, 1, 0, buf)


cdef inline void _store(unsigned char* buf, size_t width, mpz_srcptr z) noexcept nogil:
    # Right-align in a zeroed fixed-width field (the value may be shorter than the field).
    cdef size_t count = 0
    cdef size_t size = (mpz_sizeinbase(z, 2) + 7) // 8
    memset(buf, 0, width)
    mpz_export(buf + width - size, &count, 1, 1, 1, 0, z)


cdef size_t _width(object modulus):
    return (modulus.bit_length() + 7) // 8


cdef bytes _to_buffer(list xs, size_t width):
    return b"".join([x.to_bytes(width, "big") for x in xs])


cdef list _from_buffer(bytearray buf, size_t width, Py_ssize_t count):
    cdef object view = memoryview(buf)
    return [int.from_bytes(view[i * width : (i + 1) * width], "big") for i in range(count)]


cdef void _set(mpz_ptr z, object value):
    cdef size_t width = _width(value) or 1
    cdef bytes raw = value.to_bytes(width, "big")
    _load(z, raw, width)


def powmod_batch(list bases, object exponent, object modulus):
    """Returns ``[b^exponent mod modulus]`` (public exponent: plain ``mpz_powm``)."""
    cdef Py_ssize_t i, count = len(bases)
    cdef size_t w = _width(modulus)
    cdef bytes src = _to_buffer(bases, w)
    cdef const unsigned char* inp = src
    cdef bytearray dst = bytearray(count * w)
    cdef unsigned char* outp = dst
    cdef mpz_t e, m, x
    mpz_init(e); mpz_init(m); mpz_init(x)
    _set(e, exponent); _set(m, modulus)
    with nogil:
        for i in range(count):
            _load(x, inp + i * w, w)
            mpz_powm(x, x, e, m)
            _store(outp + i * w, w, x)
    mpz_clear(e); mpz_clear(m); mpz_clear(x)
    return _from_buffer(dst, w, count)


def nth_residue_crt(list rs, object p, object q, object p2inv_q2):
    """Key-owner randomness CRT(r^p mod p^2, r^q mod q^2); exponents are secret: powm_sec."""
    cdef Py_ssize_t i, count = len(rs)
    cdef object p2 = p * p
    cdef object q2 = q * q
    cdef size_t w = _width(p2 * q2)
    cdef bytes src = _to_buffer(rs, w)
    cdef const unsigned char* inp = src
    cdef bytearray dst = bytearray(count * w)
    cdef unsigned char* outp = dst
    cdef mpz_t P, Q, P2, Q2, INV, r, a, b
    mpz_init(P); mpz_init(Q); mpz_init(P2); mpz_init(Q2); mpz_init(INV)
    mpz_init(r); mpz_init(a); mpz_init(b)
    _set(P, p); _set(Q, q); _set(P2, p2); _set(Q2, q2); _set(INV, p2inv_q2)
    with nogil:
        for i in range(count):
            _load(r, inp + i * w, w)
            mpz_mod(a, r, P)
            mpz_powm_sec(a, a, P, P2)
            mpz_mod(b, r, Q)
            mpz_powm_sec(b, b, Q, Q2)
            # Garner: a + p^2 * ((b - a) * inv mod q^2)
            mpz_sub(b, b, a)
            mpz_mul(b, b, INV)
            mpz_mod(b, b, Q2)
            mpz_mul(b, b, P2)
            mpz_add(a, a, b)
            _store(outp + i * w, w, a)
    mpz_clear(P); mpz_clear(Q); mpz_clear(P2); mpz_clear(Q2); mpz_clear(INV)
    mpz_clear(r); mpz_clear(a); mpz_clear(b)
    return _from_buffer(dst, w, count)


def encrypt(list ms, list rns, object n, object nsq):
    """Returns ``[(1 + m*n) * r^n mod n^2]`` given precomputed ``rns``."""
    cdef Py_ssize_t i, count = len(ms)
    cdef size_t wn = _width(n)
    cdef size_t w = _width(nsq)
    cdef bytes msrc = _to_buffer(ms, wn)
    cdef bytes rsrc = _to_buffer(rns, w)
    cdef const unsigned char* mp = msrc
    cdef const unsigned char* rp = rsrc
    cdef bytearray dst = bytearray(count * w)
    cdef unsigned char* outp = dst
    cdef mpz_t N, NSQ, m, rn
    mpz_init(N); mpz_init(NSQ); mpz_init(m); mpz_init(rn)
    _set(N, n); _set(NSQ, nsq)
    with nogil:
        for i in range(count):
            _load(m, mp + i * wn, wn)
            _load(rn, rp + i * w, w)
            mpz_mul(m, m, N)
            mpz_add_ui(m, m, 1)
            mpz_mul(m, m, rn)
            mpz_mod(m, m, NSQ)
            _store(outp + i * w, w, m)
    mpz_clear(N); mpz_clear(NSQ); mpz_clear(m); mpz_clear(rn)
    return _from_buffer(dst, w, count)


def sum_columns(list rows, object nsq):
    """Homomorphic elementwise sum (product mod n^2) of equally long ciphertext vectors."""
    cdef Py_ssize_t i, j, k = len(rows), count = len(rows[0])
    cdef size_t w = _width(nsq)
    cdef bytes src = b"".join([_to_buffer(row, w) for row in rows])
    cdef const unsigned char* inp = src
    cdef bytearray dst = bytearray(count * w)
    cdef unsigned char* outp = dst
    cdef mpz_t NSQ, acc, x
    mpz_init(NSQ); mpz_init(acc); mpz_init(x)
    _set(NSQ, nsq)
    with nogil:
        for j in range(count):
            _load(acc, inp + j * w, w)
            for i in range(1, k):
                _load(x, inp + (i * count + j) * w, w)
                mpz_mul(acc, acc, x)
                mpz_mod(acc, acc, NSQ)
            _store(outp + j * w, w, acc)
    mpz_clear(NSQ); mpz_clear(acc); mpz_clear(x)
    return _from_buffer(dst, w, count)


def add(list a, list b, object nsq):
    """Homomorphic addition E(x) * E(y) = E(x + y) (mod n^2), elementwise."""
    return sum_columns([a, b], nsq)


def decrypt_crt(list cts, object p, object q, object hp, object hq, object qinv_p):
    """CRT decryption (Paillier 1999, section 7); see the reference for the formulas."""
    cdef Py_ssize_t i, count = len(cts)
    cdef object n = p * q
    cdef size_t w = _width(n * n)
    cdef size_t wn = _width(n)
    cdef bytes src = _to_buffer(cts, w)
    cdef const unsigned char* inp = src
    cdef bytearray dst = bytearray(count * wn)
    cdef unsigned char* outp = dst
    cdef mpz_t P, Q, P2, Q2, PM1, QM1, HP, HQ, QINV, c, mp, mq
    mpz_init(P); mpz_init(Q); mpz_init(P2); mpz_init(Q2); mpz_init(PM1); mpz_init(QM1)
    mpz_init(HP); mpz_init(HQ); mpz_init(QINV); mpz_init(c); mpz_init(mp); mpz_init(mq)
    _set(P, p); _set(Q, q); _set(P2, p * p); _set(Q2, q * q); _set(PM1, p - 1)
    _set(QM1, q - 1); _set(HP, hp); _set(HQ, hq); _set(QINV, qinv_p)
    with nogil:
        for i in range(count):
            _load(c, inp + i * w, w)
            # m_p = L_p(c^(p-1) mod p^2) * hp mod p
            mpz_mod(mp, c, P2)
            mpz_powm_sec(mp, mp, PM1, P2)
            mpz_sub_ui(mp, mp, 1)
            mpz_divexact(mp, mp, P)
            mpz_mul(mp, mp, HP)
            mpz_mod(mp, mp, P)
            # m_q likewise
            mpz_mod(mq, c, Q2)
            mpz_powm_sec(mq, mq, QM1, Q2)
            mpz_sub_ui(mq, mq, 1)
            mpz_divexact(mq, mq, Q)
            mpz_mul(mq, mq, HQ)
            mpz_mod(mq, mq, Q)
            # m = m_q + q * ((m_p - m_q) * q^-1 mod p)
            mpz_sub(mp, mp, mq)
            mpz_mul(mp, mp, QINV)
            mpz_mod(mp, mp, P)
            mpz_mul(mp, mp, Q)
            mpz_add(mp, mp, mq)
            _store(outp + i * wn, wn, mp)
    mpz_clear(P); mpz_clear(Q); mpz_clear(P2); mpz_clear(Q2); mpz_clear(PM1); mpz_clear(QM1)
    mpz_clear(HP); mpz_clear(HQ); mpz_clear(QINV); mpz_clear(c); mpz_clear(mp); mpz_clear(mq)
    return _from_buffer(dst, wn, count)
