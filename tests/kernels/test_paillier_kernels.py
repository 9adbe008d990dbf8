"""Paillier: backends equal the Python-int reference, interop, homomorphic packed sums, safety."""

from __future__ import annotations

import math
import pickle
import secrets

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels import _backend
from kernels import paillier as pl
from kernels.errors import InsecureKeyError, KernelInputError
from kernels.reference import paillier as ref

BACKENDS = _backend.available("paillier")


@pytest.fixture(scope="module")
def kp2048():
    """A real 2048-bit key, generated once for the module (keygen is the slow part)."""
    return kernels.PaillierKeyPair.generate(2048)


@pytest.fixture(scope="module")
def kp1024():
    """INSECURE 1024-bit test key: keeps the pure-Python reference fast in Hypothesis tests."""
    return kernels.PaillierKeyPair.generate(1024, insecure_test_key=True)


def _textbook(kp):
    crt = kp._crt_params()
    p, q = crt["p"], crt["q"]
    lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
    return lam, pow(lam, -1, kp.public.n)


def test_selected_backend(kp1024):
    requested = _backend.requested()
    chosen = kernels.KERNEL_BACKENDS["paillier"]
    if requested in ("python", "cython"):
        assert chosen == requested
    assert chosen in BACKENDS


def test_key_parameters(kp2048):
    n = kp2048.public.n
    crt = kp2048._crt_params()
    p, q = crt["p"], crt["q"]
    assert kp2048.public.bits == 2048 and n == p * q and p != q
    assert p.bit_length() == q.bit_length() == 1024
    assert math.gcd(n, (p - 1) * (q - 1)) == 1
    assert len(kp2048.public.fingerprint) == 16


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**64), count=st.integers(1, 6))
def test_backend_equals_reference_same_randomness(kp1024, backend, seed, count):
    impl = _backend.load("paillier", backend)
    gen = np.random.default_rng(seed)
    n, nsq = kp1024.public.n, kp1024.public.nsquare
    crt = kp1024._crt_params()
    ms = [int.from_bytes(gen.bytes(128), "big") % n for _ in range(count)]
    rs = [int.from_bytes(gen.bytes(128), "big") % (n - 1) + 1 for _ in range(count)]
    # Public-key path: r^n mod n^2, identical ciphertexts for identical r.
    rn = impl.powmod_batch(rs, n, nsq)
    assert rn == ref.powmod_batch(rs, n, nsq)
    cts = impl.encrypt(ms, rn, n, nsq)
    assert cts == ref.encrypt(ms, rn, n, nsq)
    # Key-owner CRT path.
    rho = impl.nth_residue_crt(rs, crt["p"], crt["q"], crt["p2inv_q2"])
    assert rho == ref.nth_residue_crt(rs, crt["p"], crt["q"], crt["p2inv_q2"])
    cts_crt = impl.encrypt(ms, rho, n, nsq)
    # Decryption: CRT backend vs the textbook lambda/mu oracle, for both kinds.
    lam, mu = _textbook(kp1024)
    args = (crt["p"], crt["q"], crt["hp"], crt["hq"], crt["qinv_p"])
    assert impl.decrypt_crt(cts + cts_crt, *args) == ms + ms
    assert ref.decrypt_textbook(cts + cts_crt, n, lam, mu) == ms + ms
    # Homomorphic sum of three vectors.
    summed = impl.sum_columns([cts, cts_crt, cts], nsq)
    assert summed == ref.sum_columns([cts, cts_crt, cts], nsq)
    assert impl.decrypt_crt(summed, *args) == [(3 * m) % n for m in ms]


def test_crt_randomness_is_an_nth_residue(kp1024):
    """rho(r) must be an n-th residue: it encrypts 0, and n-th residues have order | phi(n)."""
    crt = kp1024._crt_params()
    p, q, n = crt["p"], crt["q"], kp1024.public.n
    rs = [secrets.randbelow(n - 1) + 1 for _ in range(4)]
    rho = ref.nth_residue_crt(rs, p, q, crt["p2inv_q2"])
    assert all(pow(x, (p - 1) * (q - 1), n * n) == 1 for x in rho)
    assert kernels.decrypt_batch(kp1024, rho) == [0, 0, 0, 0]
    assert len(set(rho)) == 4


def test_front_equals_reference_2048(kp2048):
    """The selected backend through the public front, at the production key size."""
    n, nsq = kp2048.public.n, kp2048.public.nsquare
    ms = [secrets.randbelow(n) for _ in range(3)]
    rs = [secrets.randbelow(n - 1) + 1 for _ in range(3)]
    crt = kp2048._crt_params()
    expected_owner = ref.encrypt(
        ms, ref.nth_residue_crt(rs, crt["p"], crt["q"], crt["p2inv_q2"]), n, nsq
    )
    assert pl._encrypt_with_randomness(kp2048, ms, rs) == expected_owner
    expected_public = ref.encrypt(ms, ref.powmod_batch(rs, n, nsq), n, nsq)
    assert pl._encrypt_with_randomness(kp2048.public, ms, rs) == expected_public
    lam, mu = _textbook(kp2048)
    assert ref.decrypt_textbook(expected_owner, n, lam, mu) == ms
    assert kernels.decrypt_batch(kp2048, expected_public) == ms


@pytest.mark.parametrize("enc_backend", BACKENDS)
@pytest.mark.parametrize("dec_backend", BACKENDS)
def test_interop_between_backends(kp2048, enc_backend, dec_backend):
    enc, dec = _backend.load("paillier", enc_backend), _backend.load("paillier", dec_backend)
    n, nsq = kp2048.public.n, kp2048.public.nsquare
    crt = kp2048._crt_params()
    ms = [secrets.randbelow(n) for _ in range(2)]
    rs = [secrets.randbelow(n - 1) + 1 for _ in range(2)]
    cts = enc.encrypt(ms, enc.nth_residue_crt(rs, crt["p"], crt["q"], crt["p2inv_q2"]), n, nsq)
    assert dec.decrypt_crt(cts, crt["p"], crt["q"], crt["hp"], crt["hq"], crt["qinv_p"]) == ms


def test_packed_homomorphic_sum_2048(kp2048, rng):
    spec = kernels.PackingSpec.for_key(kp2048.public, value_bits=32, frac_bits=16, max_summands=10)
    n_devices, n_values = 10, 3 * spec.slots_per_ciphertext + 7
    x = rng.normal(0.0, 20.0, size=(n_devices, n_values))
    public = kp2048.public_only()
    device_cts = [kernels.encrypt_batch(kp2048, kernels.encode_pack(row, spec)) for row in x]
    summed = kernels.sum_ciphertexts(public, device_cts)  # the server only has the public key
    total = kernels.unpack_decode(
        kernels.decrypt_batch(kp2048, summed), spec, n_values=n_values, n_summands=n_devices
    )
    bound = n_devices * 2.0 ** -(spec.frac_bits + 1)
    assert np.max(np.abs(total - x.sum(axis=0))) <= bound + 1e-9
    assert len(summed) == spec.n_plaintexts(n_values)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_summands=st.integers(1, 8), length=st.integers(1, 80))
def test_packed_sum_hypothesis(kp1024, seed, n_summands, length):
    gen = np.random.default_rng(seed)
    spec = kernels.PackingSpec.for_key(kp1024.public, value_bits=20, frac_bits=10, max_summands=8)
    x = gen.uniform(spec.min_value, spec.max_value, size=(n_summands, length))
    cts = [kernels.encrypt_batch(kp1024.public, kernels.encode_pack(row, spec)) for row in x]
    out = kernels.unpack_decode(
        kernels.decrypt_batch(kp1024, kernels.sum_ciphertexts(kp1024, cts)),
        spec,
        n_values=length,
        n_summands=n_summands,
    )
    assert np.max(np.abs(out - x.sum(axis=0))) <= n_summands * 2.0 ** -(spec.frac_bits + 1)


def test_add_batch_and_pool(kp1024):
    pool = kernels.RandomnessPool(kp1024, capacity=8, batch=4)
    try:
        pool.fill()
        assert len(pool) == 8
        a = kernels.encrypt_batch(kp1024, [1, 2, 3], randomness_pool=pool)
        b = kernels.encrypt_batch(kp1024.public, [10, 20, 30])
        assert len(pool) <= 5 + 4  # three values were consumed (the thread may refill)
        assert kernels.decrypt_batch(kp1024, kernels.add_batch(kp1024, a, b)) == [11, 22, 33]
        c = kernels.encrypt_batch(kp1024, [0] * 20, randomness_pool=pool)  # beyond capacity
        assert len(set(c)) == 20
        assert kernels.decrypt_batch(kp1024, c) == [0] * 20
    finally:
        pool.close()
    other = kernels.PaillierKeyPair.generate(512, insecure_test_key=True)
    with (
        kernels.RandomnessPool(other, capacity=2, background=False) as wrong,
        pytest.raises(KernelInputError, match="fingerprint"),
    ):
        kernels.encrypt_batch(kp1024, [1], randomness_pool=wrong)


def test_public_key_cannot_decrypt(kp1024):
    public = kp1024.public_only()
    assert set(vars(public)) <= {"n", "insecure_test_key", "nsquare", "fingerprint"}
    assert not any("decrypt" in name or "secret" in name for name in dir(public))
    ct = kernels.encrypt_batch(public, [42])
    with pytest.raises(TypeError, match="public key cannot decrypt"):
        kernels.decrypt_batch(public, ct)
    # Serialising the public key carries n only.
    restored = kernels.PaillierPublicKey.from_bytes(public.to_bytes(), insecure_test_key=True)
    assert restored == public and restored.fingerprint == public.fingerprint
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(kp1024)
    assert "hidden" in repr(kp1024) and str(kp1024._crt_params()["p"]) not in repr(kp1024)


def test_secret_export_roundtrip(kp1024):
    clone = kernels.PaillierKeyPair.import_secret(kp1024.export_secret(), insecure_test_key=True)
    assert clone.public == kp1024.public
    assert kernels.decrypt_batch(clone, kernels.encrypt_batch(kp1024, [7, 8])) == [7, 8]


def test_small_keys_refused_without_flag():
    with pytest.raises(InsecureKeyError, match="2048"):
        kernels.PaillierKeyPair.generate(1024)
    small = kernels.PaillierKeyPair.generate(512, insecure_test_key=True)
    with pytest.raises(InsecureKeyError, match="2048"):
        kernels.PaillierPublicKey(n=small.public.n)
    with pytest.raises(InsecureKeyError):
        kernels.PaillierPublicKey.from_bytes(small.public.to_bytes())


def test_serialization_roundtrip_and_rejections(kp1024):
    pk = kp1024.public
    cts = kernels.encrypt_batch(pk, [5, 6, 7])
    data = kernels.serialize_ciphertexts(pk, cts)
    assert kernels.deserialize_ciphertexts(pk, data) == cts
    other = kernels.PaillierKeyPair.generate(1024, insecure_test_key=True).public
    with pytest.raises(
        KernelInputError, match=f"{pk.fingerprint} != federation key {other.fingerprint}"
    ):
        kernels.deserialize_ciphertexts(other, data)
    width = (pk.nsquare.bit_length() + 7) // 8
    header = data[: len(data) - 3 * width]
    for bad in (0, kp1024._crt_params()["p"] * 12345, pk.nsquare + 1):
        if bad.bit_length() > 8 * width:
            continue  # not representable in the fixed width; covered by the truncation case
        forged = header + b"".join(c.to_bytes(width, "big") for c in [cts[0], bad, cts[2]])
        with pytest.raises(KernelInputError, match=r"ciphertext\[1\]"):
            kernels.deserialize_ciphertexts(pk, forged)
    with pytest.raises(KernelInputError, match="payload"):
        kernels.deserialize_ciphertexts(pk, data[:-1])
    with pytest.raises(KernelInputError, match="version"):
        kernels.deserialize_ciphertexts(pk, data[:4] + b"\x09" + data[5:])


def test_front_rejects_bad_ciphertexts_and_plaintexts(kp1024):
    pk = kp1024.public
    with pytest.raises(KernelInputError, match=r"plaintexts\[1\]"):
        kernels.encrypt_batch(pk, [1, pk.n])
    with pytest.raises(KernelInputError, match=r"ciphertexts\[0\]"):
        kernels.decrypt_batch(kp1024, [0])
    with pytest.raises(KernelInputError, match="length"):
        kernels.add_batch(pk, [1, 2], [3])
    with pytest.raises(KernelInputError, match=r"ciphertext_lists\[0\]\[0\]"):
        kernels.sum_ciphertexts(pk, [[pk.nsquare]])
