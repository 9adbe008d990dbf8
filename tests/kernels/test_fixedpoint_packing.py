"""Fixed-point packing: vectorised packer equals the plain-int reference; ranges; headroom."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels.errors import KernelInputError
from kernels.fixedpoint import encode_fixed
from kernels.reference import paillier as ref

specs = st.builds(
    kernels.PackingSpec,
    value_bits=st.integers(4, 40),
    frac_bits=st.integers(0, 3),
    max_summands=st.integers(1, 1000),
    guard_bits=st.integers(0, 2),
    modulus_bits=st.sampled_from([64, 200, 1024, 2048]),
)


@settings(max_examples=60, deadline=None)
@given(spec=specs, seed=st.integers(0, 2**32 - 1), length=st.integers(0, 300))
def test_pack_matches_reference_and_roundtrips(spec, seed, length):
    gen = np.random.default_rng(seed)
    x = gen.uniform(spec.min_value, spec.max_value, size=length)
    q = encode_fixed(x, spec)
    expected_q = [int(round(v * 2**spec.frac_bits)) + spec.offset for v in x]
    assert q.tolist() == expected_q
    packed = kernels.encode_pack(x, spec)
    assert packed == ref.pack_slots(expected_q, spec.slot_bits, spec.slots_per_ciphertext)
    assert all(pt < 2 ** (spec.modulus_bits - 1) for pt in packed)
    out = kernels.unpack_decode(packed, spec, n_values=length, n_summands=1)
    assert np.all(np.abs(out - x) <= 2.0 ** -(spec.frac_bits + 1))


@settings(max_examples=40, deadline=None)
@given(spec=specs, seed=st.integers(0, 2**32 - 1), length=st.integers(1, 100))
def test_max_summands_never_overflow_a_slot(spec, seed, length):
    """Plaintext sums of max_summands extreme encodings decode exactly per slot."""
    gen = np.random.default_rng(seed)
    k = min(spec.max_summands, 50)
    spec = kernels.PackingSpec(
        value_bits=spec.value_bits,
        frac_bits=spec.frac_bits,
        max_summands=k,
        guard_bits=0,  # no safety margin: headroom alone must suffice
        modulus_bits=spec.modulus_bits,
    )
    x = gen.choice([spec.min_value, spec.max_value], size=(k, length))
    total = [0] * spec.n_plaintexts(length)
    for row in x:
        total = [a + b for a, b in zip(total, kernels.encode_pack(row, spec), strict=True)]
    out = kernels.unpack_decode(total, spec, n_values=length, n_summands=k)
    np.testing.assert_array_equal(out, x.sum(axis=0))
    slots = ref.unpack_slots(total, spec.slot_bits, spec.slots_per_ciphertext, length)
    assert slots == [int(round(v * 2**spec.frac_bits)) + k * spec.offset for v in x.sum(axis=0)]


def test_out_of_range_names_index_and_range():
    spec = kernels.PackingSpec(value_bits=8, frac_bits=2)
    with pytest.raises(KernelInputError, match=r"x\[2\]=40.0 is outside .*\[-32.0, 31.75\]"):
        kernels.encode_pack(np.array([0.0, 1.0, 40.0]), spec)
    with pytest.raises(KernelInputError, match=r"x\[0\]=nan"):
        kernels.encode_pack(np.array([np.nan]), spec)


def test_spec_validation_and_geometry():
    spec = kernels.PackingSpec(value_bits=32, frac_bits=16, max_summands=10, guard_bits=1)
    assert spec.slot_bits == 32 + 4 + 1
    assert spec.slots_per_ciphertext == 2047 // 37
    with pytest.raises(ValueError, match="frac_bits"):
        kernels.PackingSpec(value_bits=8, frac_bits=8)
    with pytest.raises(ValueError, match="slot_bits"):
        kernels.PackingSpec(value_bits=60, max_summands=64)
    with pytest.raises(ValueError, match="max_summands must be an int >= 1, got 0"):
        kernels.PackingSpec(max_summands=0)


def test_unpack_rejects_bad_counts():
    spec = kernels.PackingSpec(value_bits=8, frac_bits=2, max_summands=4)
    packed = kernels.encode_pack(np.zeros(3), spec)
    with pytest.raises(KernelInputError, match="n_summands"):
        kernels.unpack_decode(packed, spec, n_values=3, n_summands=5)
    with pytest.raises(KernelInputError, match="n_values"):
        kernels.unpack_decode(packed, spec, n_values=10**6, n_summands=1)
    with pytest.raises(KernelInputError, match=r"plaintexts\[0\]"):
        kernels.unpack_decode([2**4000], spec, n_values=1, n_summands=1)
