"""Masking kernels: every backend equals the reference bit for bit; masks cancel; decoding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kernels
from kernels import _backend
from kernels.errors import KernelInputError
from kernels.reference import masking as ref

BACKENDS = _backend.available("masking")
u32_arrays = hnp.arrays(np.uint32, st.integers(0, 40), elements=st.integers(0, 2**32 - 1))


def _masked_with(backend: str, x: np.ndarray, masks: list[tuple[np.ndarray, int]]) -> np.ndarray:
    impl = _backend.load("masking", backend)
    out = x.copy()
    for m, s in masks:
        impl.add_signed_inplace(out, m, s)
    return out


def test_selected_backend_is_the_requested_one():
    requested = _backend.requested()
    if requested != "auto":
        assert requested == kernels.BACKEND
        assert kernels.KERNEL_BACKENDS["masking"] == requested
    assert kernels.KERNEL_BACKENDS["masking"] in BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(data=st.data(), x=u32_arrays)
def test_add_masks_backends_equal_reference(backend, data, x):
    k = data.draw(st.integers(0, 4))
    masks = [
        (
            data.draw(hnp.arrays(np.uint32, x.shape, elements=st.integers(0, 2**32 - 1))),
            data.draw(st.sampled_from([1, -1])),
        )
        for _ in range(k)
    ]
    expected = ref.add_masks(x, masks)
    np.testing.assert_array_equal(_masked_with(backend, x, masks), expected)
    np.testing.assert_array_equal(kernels.add_masks(x, masks), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(
    arrays=hnp.arrays(
        np.uint32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
        elements=st.integers(0, 2**32 - 1),
    )
)
def test_sum_mod_backends_equal_reference(backend, arrays):
    out = np.empty(arrays.shape[1], dtype=np.uint32)
    _backend.load("masking", backend).sum_mod_into(np.ascontiguousarray(arrays), out)
    expected = ref.sum_mod(arrays)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(kernels.sum_mod(arrays), expected)
    # Independent oracle: exact Python-int sums.
    exact = [sum(int(v) for v in col) % 2**32 for col in arrays.T]
    assert out.tolist() == exact


def test_expand_mask_deterministic_and_seed_dependent():
    seed = bytes(range(32))
    a = kernels.expand_mask(seed, 1000)
    assert a.dtype == np.uint32 and a.shape == (1000,)
    np.testing.assert_array_equal(a, kernels.expand_mask(seed, 1000))
    np.testing.assert_array_equal(a[:10], kernels.expand_mask(seed, 10))  # prefix-stable stream
    b = kernels.expand_mask(bytes(31) + b"\x01", 1000)
    assert np.mean(a == b) < 0.01
    # A uniform PRG: the mean of 1000 words is near 2^31 (6 sigma ~ 2.4e8).
    assert abs(float(a.mean()) - 2**31) < 2.4e8


def test_pairwise_masks_cancel_in_the_sum(rng):
    n_clients, n = 6, 5000
    inputs = rng.integers(0, 2**32, size=(n_clients, n), dtype=np.uint32)
    seeds = {
        (i, j): bytes(rng.integers(0, 256, 32, dtype=np.uint8))
        for i in range(n_clients)
        for j in range(i + 1, n_clients)
    }
    masked = []
    for i in range(n_clients):
        masks = []
        for (a, b), seed in seeds.items():
            if i in (a, b):
                masks.append((kernels.expand_mask(seed, n), 1 if i == a else -1))
        masked.append(kernels.add_masks(inputs[i], masks))
        assert not np.array_equal(masked[-1], inputs[i])
    np.testing.assert_array_equal(kernels.sum_mod(np.stack(masked)), ref.sum_mod(inputs))


@settings(max_examples=30, deadline=None)
@given(
    frac_bits=st.integers(4, 20),
    n_clients=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_dequantized_sum_matches_float_sum(frac_bits, n_clients, seed):
    gen = np.random.default_rng(seed)
    clip = 2.0**30 / 2**frac_bits / n_clients  # keep every partial sum inside int32
    x = gen.uniform(-1.2 * clip, 1.2 * clip, size=(n_clients, 64))
    quantized = np.stack([kernels.quantize_fixed(row, frac_bits=frac_bits, clip=clip) for row in x])
    total = kernels.dequantize_sum(
        kernels.sum_mod(quantized), frac_bits=frac_bits, n_summands=n_clients
    )
    expected = np.clip(x, -clip, clip).sum(axis=0)
    assert np.all(np.abs(total - expected) <= n_clients * 2.0 ** -(frac_bits + 1) + 1e-9)


def test_quantize_two_complement_encoding():
    q = kernels.quantize_fixed(np.array([1.0, -1.0, 0.0, -0.5]), frac_bits=4, clip=4.0)
    assert q.tolist() == [16, 2**32 - 16, 0, 2**32 - 8]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: kernels.quantize_fixed(np.ones(3), frac_bits=31, clip=1.0), "frac_bits"),
        (lambda: kernels.quantize_fixed(np.ones(3), frac_bits=20, clip=4096.0), "clip"),
        (lambda: kernels.quantize_fixed(np.ones(3), frac_bits=8, clip=-1.0), "clip"),
        (lambda: kernels.quantize_fixed(np.array([0, np.nan]), frac_bits=8, clip=1.0), r"x\[1\]"),
        (lambda: kernels.expand_mask(b"short", 4), "32 bytes"),
        (lambda: kernels.add_masks(np.ones(3, np.int64), []), "uint32"),
        (
            lambda: kernels.add_masks(np.ones(3, np.uint32), [(np.ones(4, np.uint32), 1)]),
            "length 3",
        ),
        (
            lambda: kernels.add_masks(np.ones(3, np.uint32), [(np.ones(3, np.uint32), 2)]),
            "sign",
        ),
        (lambda: kernels.sum_mod(np.ones(3, np.uint32)), "2-D"),
        (
            lambda: kernels.dequantize_sum(np.ones(3, np.uint32), frac_bits=8, n_summands=0),
            "n_summands",
        ),
    ],
)
def test_bad_inputs_rejected(call, match):
    with pytest.raises(KernelInputError, match=match):
        call()


def test_add_masks_does_not_modify_input(rng):
    x = rng.integers(0, 2**32, 100, dtype=np.uint32)
    before = x.copy()
    kernels.add_masks(x, [(kernels.expand_mask(bytes(32), 100), -1)])
    np.testing.assert_array_equal(x, before)
