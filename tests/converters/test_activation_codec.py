"""Activation codecs against NumPy oracles; PCA against sklearn and inside the edge ONNX graph."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from converters.activation_codec import (
    CODECS,
    PCA_FILE,
    PCA_ONNX_FILE,
    PcaProjection,
    attach_pca,
    fit_pca,
    get_codec,
    load_pca,
)
from converters.commands import export_split_dir
from converters.datasets import load_dataset
from converters.errors import CodecError, ConfigError
from split.graph import split_model
from split.manifest import Manifest
from split.store import save_split
from split.zoo import build_model

torch.set_num_threads(1)

_floats = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False)
# Conv-like (N, C, H, W) and flat (N, F) batches.
batches = st.one_of(
    st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 3), st.integers(1, 3)),
    st.tuples(st.integers(1, 5), st.integers(1, 70)),
).flatmap(lambda shape: arrays(np.float32, shape, elements=_floats))


def _roundtrip(spec, x, pca=None):
    codec = get_codec(spec, pca=pca)
    return codec.decode(codec.encode(x), x.shape)


@settings(max_examples=60, deadline=None)
@given(batches)
def test_float32_is_exact(x):
    out = _roundtrip("float32", x)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_array_equal(out, x)


@settings(max_examples=60, deadline=None)
@given(batches)
def test_fp16_within_half_ulp(x):
    err = np.abs(_roundtrip("fp16", x).astype(np.float64) - x)
    # Round-to-nearest: half an ulp, 2**-11 relative in the normal range, 2**-25 below it.
    assert (err <= np.maximum(np.abs(x) * 2.0**-11, 2.0**-25)).all()


@settings(max_examples=60, deadline=None)
@given(batches)
def test_int8_within_half_scale(x):
    x64 = x.astype(np.float64)
    if x.ndim >= 3:  # oracle: one scale per channel (axis 1) over the batch
        scale = np.abs(x64).max(axis=(0, 2, 3), keepdims=True) / 127
    else:  # one per row
        scale = np.abs(x64).max(axis=1, keepdims=True) / 127
    err = np.abs(_roundtrip("int8", x).astype(np.float64) - x64)
    # The codec rounds its float32 scale up by at most one ulp; float32 decode adds ~1 ulp.
    assert (err <= scale / 2 * (1 + 1e-6) + np.abs(x64) * 2e-7 + 1e-30).all()


@settings(max_examples=60, deadline=None)
@given(batches, st.integers(1, 80))
def test_topk_keeps_largest_exactly(x, k):
    out = _roundtrip(f"topk:{k}", x).reshape(len(x), -1)
    flat = x.reshape(len(x), -1)
    kept = min(k, flat.shape[1])
    for row, got in zip(flat, out, strict=True):
        idx = np.flatnonzero(got != 0)
        # Every nonzero output is an exact input value at the same position.
        np.testing.assert_array_equal(got[idx], row[idx])
        nz_kept = np.count_nonzero(row[idx])
        assert nz_kept <= kept
        dropped = np.setdiff1d(np.arange(len(row)), idx)
        kept_min = np.abs(np.sort(np.abs(row))[::-1][:kept]).min()
        if dropped.size and np.count_nonzero(row[dropped]):
            assert np.abs(row[dropped]).max() <= kept_min


def test_topk_fraction_and_fp16_values(rng):
    x = rng.normal(size=(3, 40)).astype(np.float32)
    codec = get_codec("topk:0.25+fp16")
    assert codec.kept(40) == 10
    out = codec.decode(codec.encode(x), x.shape)
    assert (np.count_nonzero(out, axis=1) == 10).all()
    nz = out != 0
    np.testing.assert_allclose(out[nz], x[nz].astype(np.float16).astype(np.float32), rtol=0)
    assert len(codec.encode(x)) == 4 + 3 * 10 * (2 + 2)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 12), st.integers(1, 4))
def test_pca_roundtrip_equals_numpy_projection(seed, dim, n):
    rng = np.random.default_rng(seed)
    train = rng.normal(size=(60, 4, 2, 2)) * rng.uniform(0.1, 3, size=(1, 4, 2, 2))
    proj = fit_pca(train, dim)
    x = rng.normal(size=(n, 4, 2, 2)).astype(np.float32)
    flat = x.reshape(n, -1).astype(np.float64)
    c = proj.components.astype(np.float64)
    want = ((flat - proj.mean) @ c.T) @ c + proj.mean
    out = _roundtrip(f"pca:{dim}", x, proj)
    assert out.shape == x.shape
    np.testing.assert_allclose(out.reshape(n, -1), want, atol=1e-5)
    # A point in the span of the components (around the mean) comes back unchanged.
    inside = (proj.mean + rng.normal(size=(n, dim)) @ c).astype(np.float32).reshape(x.shape)
    np.testing.assert_allclose(_roundtrip(f"pca:{dim}", inside, proj), inside, atol=1e-4)


def test_fit_pca_matches_sklearn(rng):
    from sklearn.decomposition import PCA

    x = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12))
    proj = fit_pca(x, 5)
    ref = PCA(n_components=5, svd_solver="full").fit(x)
    np.testing.assert_allclose(proj.mean, ref.mean_, atol=1e-5)
    # Components agree up to sign; explained variance ratios agree.
    dots = np.abs(np.sum(proj.components * ref.components_, axis=1))
    np.testing.assert_allclose(dots, 1.0, atol=1e-4)
    np.testing.assert_allclose(proj.explained, ref.explained_variance_ratio_, rtol=1e-6)


@pytest.mark.parametrize("spec", ["float32", "fp16", "int8", "topk:3", "pca:2+int8"])
def test_decode_rejects_malformed_payloads(spec, rng):
    proj = fit_pca(rng.normal(size=(20, 8)), 2)
    codec = get_codec(spec, pca=proj)
    x = rng.normal(size=(2, 8)).astype(np.float32)
    good = codec.encode(x)
    for bad in (good[:-1], good + b"\0", b"XX" + good[2:], good[:3] + b"\x09" + good[4:], b""):
        with pytest.raises(CodecError):
            codec.decode(bad, x.shape)
    with pytest.raises(CodecError):
        codec.decode(good, (3, 8))  # wrong shape for this payload
    with pytest.raises(CodecError, match="finite"):
        codec.encode(np.full((1, 8), np.nan, np.float32))
    with pytest.raises(CodecError):
        codec.encode(x.astype(np.int32))


def test_decode_rejects_nan_payload():
    codec = get_codec("float32")
    payload = codec.encode(np.zeros((1, 4), np.float32))[:4] + np.full(4, np.nan, "<f4").tobytes()
    with pytest.raises(CodecError, match="NaN"):
        codec.decode(payload, (1, 4))


def test_topk_rejects_out_of_range_or_repeated_indices():
    codec = get_codec("topk:2")
    head = codec.encode(np.ones((1, 4), np.float32))[:4]
    vals = np.ones(2, "<f4").tobytes()
    for idx in ([0, 9], [1, 1], [2, 1]):
        with pytest.raises(CodecError, match="indices"):
            codec.decode(head + np.array(idx, "<u2").tobytes() + vals, (1, 4))


def test_registry_errors_list_known_names(rng):
    with pytest.raises(ValueError, match="known: " + ", ".join(CODECS)):
        get_codec("zfp")
    for bad in ("topk", "topk:0", "topk:1.5", "topk:x", "int8:3", "topk:4+int4", "fp16+int8"):
        with pytest.raises(ConfigError):
            get_codec(bad)
    with pytest.raises(ConfigError, match="attach_pca"):
        get_codec("pca:4")
    with pytest.raises(ConfigError, match="fitted pca dim 2"):
        get_codec("pca:3", pca=fit_pca(rng.normal(size=(10, 5)), 2))
    with pytest.raises(ConfigError, match="dim"):
        fit_pca(rng.normal(size=(10, 5)), 6)
    with pytest.raises(ConfigError, match="orthonormal"):
        PcaProjection(mean=np.zeros(3), components=np.ones((2, 3)), explained=np.zeros(2))


@pytest.fixture(scope="module")
def pca_split(tmp_path_factory):
    model, spec = build_model("digits-cnn", seed=7)
    model.eval()
    sm = split_model(model, cut=spec.default_cut, example_input=torch.zeros(2, *spec.input_shape))
    out = tmp_path_factory.mktemp("pca-split")
    save_split(sm, model, model_ref="digits-cnn", num_classes=10, out_dir=out)
    export_split_dir(out)
    before = Manifest.load(out).digest()
    x = load_dataset("digits").x
    proj = attach_pca(out, x[:400], dim=12)
    return out, proj, before, x


def test_onnx_with_pca_equals_numpy(pca_split):
    out, proj, before, x = pca_split
    sample = x[400:480]
    act = ort.InferenceSession(str(out / "edge.onnx")).run(None, {"input": sample})[0]
    code = ort.InferenceSession(str(out / PCA_ONNX_FILE)).run(None, {"input": sample})[0]
    want = (act.reshape(len(act), -1).astype(np.float64) - proj.mean) @ proj.components.T
    assert code.shape == (80, 12)
    np.testing.assert_allclose(code, want, atol=1e-5)
    # The codes decode to the same reconstruction as encoding the activation on the cloud.
    codec = get_codec("pca:12", pca=proj)
    via_onnx = codec.decode(codec.encode_codes(code), act.shape)
    np.testing.assert_allclose(via_onnx, codec.decode(codec.encode(act), act.shape), atol=1e-5)


def test_attach_pca_records_projection_in_manifest(pca_split):
    out, proj, before, _ = pca_split
    manifest = Manifest.load(out)
    assert {PCA_FILE, PCA_ONNX_FILE} <= set(manifest.artifacts)
    assert manifest.digest() != before  # the model hash covers the projection
    assert manifest.extra["pca"]["dim"] == 12
    assert manifest.extra["pca"]["explained_variance"] == pytest.approx(proj.explained.sum())
    assert 0 < proj.explained.sum() <= 1 + 1e-9
    loaded = load_pca(out)
    np.testing.assert_array_equal(loaded.components, proj.components)
    manifest.extra["pca"]["edge_onnx_sha256"] = "0" * 64
    manifest.save(out)
    try:
        with pytest.raises(ConfigError, match="another edge.onnx"):
            load_pca(out)
    finally:
        manifest.extra["pca"]["edge_onnx_sha256"] = manifest.artifacts["edge.onnx"]
        manifest.save(out)
