"""EdgeModel (onnxruntime) vs the torch edge half, input validation, hashes and `infer`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from converters.cli import main
from converters.commands import export_split_dir
from edge import ArtifactMissingError, EdgeInputError, EdgeModel, ModelMismatchError
from edge.commands import infer
from split.graph import split_model
from split.manifest import Manifest
from split.store import save_split
from split.zoo import build_model

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    model, spec = build_model("digits-cnn", seed=3)
    model.eval()
    sm = split_model(model, cut=spec.default_cut, example_input=torch.zeros(2, *SHAPE))
    out = tmp_path_factory.mktemp("edge-runtime")
    save_split(sm, model, model_ref="digits-cnn", num_classes=10, out_dir=out)
    export_split_dir(out, quantize=["int8", "fp16"], data="digits")
    return out, model, sm


def _torch_edge(sm, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return sm.edge(torch.from_numpy(np.asarray(x, np.float32))).numpy()


@pytest.mark.parametrize("threads", [None, 1])
def test_fp32_matches_torch_and_single_sample(split_dir, rng, threads):
    out, _, sm = split_dir
    edge = EdgeModel.from_dir(out, threads=threads)
    assert edge.input_shape == SHAPE and edge.activation_shape == tuple(sm.activation_shape)
    assert edge.variant == "fp32"
    x = rng.uniform(0, 1, size=(9, *SHAPE)).astype(np.float32)
    np.testing.assert_allclose(edge.run(x), _torch_edge(sm, x), atol=1e-4, rtol=0)
    single = edge.run(x[4])
    assert single.shape == edge.activation_shape
    np.testing.assert_allclose(single, _torch_edge(sm, x[4:5])[0], atol=1e-4, rtol=0)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    x=st.integers(1, 12).flatmap(
        lambda n: arrays(
            np.float32,
            (n, *SHAPE),
            elements=st.floats(-4, 4, width=32, allow_nan=False, allow_infinity=False),
        )
    )
)
def test_fp32_matches_torch_on_generated_batches(split_dir, x):
    out, _, sm = split_dir
    edge = EdgeModel.from_dir(out, threads=1)
    np.testing.assert_allclose(edge.run(x), _torch_edge(sm, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize(("variant", "rel_tol"), [("int8", 0.1), ("fp16", 0.01)])
def test_variants_track_torch(split_dir, rng, variant, rel_tol):
    out, _, sm = split_dir
    edge = EdgeModel.from_dir(out, variant=variant)
    x = rng.uniform(0, 1, size=(32, *SHAPE)).astype(np.float32)
    want = _torch_edge(sm, x)
    got = edge.run(x)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < rel_tol


def test_other_float_dtypes_are_rounded_to_float32(split_dir, rng):
    out, *_ = split_dir
    edge = EdgeModel.from_dir(out)
    x64 = rng.uniform(0, 1, size=(3, *SHAPE))
    want = edge.run(x64.astype(np.float32))
    np.testing.assert_array_equal(edge.run(x64), want)
    x16 = x64.astype(np.float16)
    np.testing.assert_array_equal(edge.run(x16), edge.run(x16.astype(np.float32)))
    # Non-contiguous views are fine too.
    np.testing.assert_array_equal(edge.run(np.asfortranarray(x64.astype(np.float32))), want)


def _bad(array):
    a = np.zeros((2, *SHAPE), np.float32)
    a[1, 0, 3, 3] = array
    return a


@pytest.mark.parametrize(
    ("x", "pattern"),
    [
        (np.zeros((2, *SHAPE), np.int64), r"dtype must be float32 .* got int64"),
        (np.zeros((2, *SHAPE), bool), r"dtype must be float32 .* got bool"),
        (
            np.zeros((2, 64), np.float32),
            r"shape must be \(N, 1, 8, 8\) or \(1, 8, 8\), got \(2, 64\)",
        ),
        (np.zeros((8, 8), np.float32), r"got \(8, 8\) float32"),
        (np.zeros((0, *SHAPE), np.float32), r"batch must hold >= 1 sample"),
        (_bad(np.nan), r"finite, got 1 NaN and 0 Inf .* rows \[1\]"),
        (_bad(np.inf), r"finite, got 0 NaN and 1 Inf"),
        (np.full((1, *SHAPE), 1e300), r"finite, got 0 NaN and 64 Inf .*float32"),
        ([[0.0] * 8] * 8, r"must be a numpy.ndarray, got list"),
    ],
)
def test_input_validation_errors(split_dir, x, pattern):
    out, *_ = split_dir
    edge = EdgeModel.from_dir(out)
    with pytest.raises(EdgeInputError, match=pattern) as info:
        edge.run(x)
    assert "\n" not in str(info.value)


def test_tampered_onnx_is_rejected(split_dir, tmp_path):
    out, *_ = split_dir
    copy = tmp_path / "split"
    copy.mkdir()
    for name in ("manifest.json", "edge.onnx"):
        (copy / name).write_bytes((out / name).read_bytes())
    EdgeModel.from_dir(copy)  # a device copy with only manifest + edge.onnx loads
    data = bytearray((copy / "edge.onnx").read_bytes())
    data[-5] ^= 0x01
    (copy / "edge.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelMismatchError, match="does not match the manifest"):
        EdgeModel.from_dir(copy)


def test_missing_and_unknown_variants(split_dir, tmp_path):
    out, *_ = split_dir
    copy = tmp_path / "split"
    copy.mkdir()
    manifest = Manifest.load(out)
    del manifest.artifacts["edge.int8.onnx"]
    manifest.save(copy)
    (copy / "edge.onnx").write_bytes((out / "edge.onnx").read_bytes())
    with pytest.raises(ArtifactMissingError, match="--quantize int8"):
        EdgeModel.from_dir(copy, variant="int8")
    with pytest.raises(ArtifactMissingError, match=r"edge.fp16.onnx not found"):
        EdgeModel.from_dir(copy, variant="fp16")
    with pytest.raises(ValueError, match="known: fp32, int8, fp16"):
        EdgeModel.from_dir(copy, variant="int4")


def test_model_hash_and_manifest_free_use(split_dir, rng):
    out, _, sm = split_dir
    manifest = Manifest.load(out)
    assert EdgeModel.from_dir(out).model_hash == manifest.digest()
    bare = EdgeModel(out / "edge.onnx")
    assert bare.input_shape == SHAPE and bare.activation_shape == tuple(sm.activation_shape)
    assert bare.model_hash == manifest.artifacts["edge.onnx"]
    x = rng.uniform(size=(2, *SHAPE)).astype(np.float32)
    np.testing.assert_allclose(bare.run(x), _torch_edge(sm, x), atol=1e-4)
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        EdgeModel(out / "edge.onnx", threads=0)


def test_infer_matches_unsplit_model(split_dir, rng):
    out, model, _ = split_dir
    x = rng.uniform(0, 1, size=(5, *SHAPE)).astype(np.float32)
    result = infer(out, x)
    with torch.no_grad():
        want = torch.softmax(model(torch.from_numpy(x)).double(), dim=1).numpy()
    got = np.array([row["probabilities"] for row in result["rows"]])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [row["class"] for row in result["rows"]] == want.argmax(1).tolist()
    assert len(infer(out, x[0])["rows"]) == 1  # one sample without batch axis


def test_infer_cli(split_dir, rng, tmp_path, capsys):
    out, model, _ = split_dir
    x = rng.uniform(0, 1, size=(3, *SHAPE)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["infer", str(out), str(tmp_path / "x.npy"), "--variant", "int8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["variant"] == "int8" and len(result["rows"]) == 3
    assert main(["infer", str(out), str(tmp_path / "x.npy")]) == 0
    table = capsys.readouterr().out
    with torch.no_grad():
        classes = model(torch.from_numpy(x)).argmax(1).tolist()
    for i, c in enumerate(classes):
        assert f"row {i:>4}  class {c:>3}" in table
    np.save(tmp_path / "bad.npy", np.zeros((3, 64), np.float32))
    assert main(["infer", str(out), str(tmp_path / "bad.npy")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "input shape must be (N, 1, 8, 8)" in err


def test_u_shaped_split_infer_matches_unsplit_model(tmp_path, rng):
    model, spec = build_model("digits-mlp", seed=7)
    model.eval()
    sm = split_model(model, cut="act1", head_cut="act2", example_input=torch.zeros(2, *SHAPE))
    save_split(sm, model, model_ref="digits-mlp", num_classes=10, out_dir=tmp_path)
    export_split_dir(tmp_path)
    x = rng.uniform(0, 1, size=(4, *SHAPE)).astype(np.float32)
    with torch.no_grad():
        want = torch.softmax(model(torch.from_numpy(x)).double(), dim=1).numpy()
    got = np.array([row["probabilities"] for row in infer(tmp_path, x)["rows"]])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_manifest_shape_disagreeing_with_graph_is_rejected(split_dir):
    out, *_ = split_dir
    manifest = Manifest.load(out)
    manifest.activation_shape = [7]
    with pytest.raises(ModelMismatchError, match=r"gives per-sample shape \(16, 2, 2\)"):
        EdgeModel(out / "edge.onnx", manifest=manifest)


def test_lazy_public_names_resolve():
    import edge

    assert edge.__all__ == sorted(edge.__all__)
    for name in edge.__all__:
        assert getattr(edge, name).__name__ == name
    with pytest.raises(AttributeError):
        edge.NoSuchThing  # noqa: B018
