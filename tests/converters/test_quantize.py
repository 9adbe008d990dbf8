"""Quantized edge variants (static int8, fp16): accuracy vs fp32 and the export command."""

from __future__ import annotations

import argparse
import json
from importlib import metadata

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from converters.commands import export_split_dir, format_summary, register
from converters.datasets import load_digits, train_test_split
from converters.quantize import (
    QUANTIZERS,
    accuracy_change,
    convert_fp16,
    get_quantizer,
    quantize_static_int8,
    run_onnx,
)
from split.graph import split_model
from split.manifest import Manifest, sha256_file
from split.store import load_split, save_split
from split.train import evaluate
from split.zoo import build_model

# Stated tolerance: static int8 may cost at most this many accuracy points on held-out digits.
INT8_MAX_DROP_POINTS = 3.0
FP16_MAX_DROP_POINTS = 1.0
TEST_FRACTION, SEED = 0.2, 0


def _train_briefly(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int = 8) -> None:
    """A few seconds of Adam on digits: enough for ~90% held-out accuracy."""
    torch.manual_seed(SEED)
    # One thread: on a busy shared machine torch's pool of spinning threads is many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    try:
        for _ in range(epochs):
            perm = torch.randperm(len(xt))
            for i in range(0, len(xt), 64):
                idx = perm[i : i + 64]
                opt.zero_grad()
                nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()


@pytest.fixture(scope="module")
def digits_split(tmp_path_factory):
    """A trained digits-cnn split directory, exported with int8 and fp16 variants."""
    train, test = train_test_split(load_digits(), test_fraction=TEST_FRACTION, seed=SEED)
    model, spec = build_model("digits-cnn", seed=SEED)
    _train_briefly(model, train.x, train.y)
    sm = split_model(model, cut=spec.default_cut, example_input=torch.zeros(2, *spec.input_shape))
    out = tmp_path_factory.mktemp("digits-cnn")
    save_split(sm, model, model_ref="digits-cnn", num_classes=10, out_dir=out)
    summary = export_split_dir(
        out, quantize=["int8", "fp16"], data="digits", test_fraction=TEST_FRACTION, seed=SEED
    )
    return out, model, sm, train, test, summary


def test_int8_accuracy_within_tolerance_of_fp32(digits_split):
    out, model, _, _, test, summary = digits_split
    torch_acc, _ = evaluate(model, test.x, test.y)  # oracle: the unsplit torch model
    ex = summary["export"]
    assert abs(ex["fp32_accuracy"] - torch_acc) <= 1 / len(test)  # at most one borderline flip
    assert torch_acc > 0.8  # the model learned, so an accuracy drop would be visible
    int8 = ex["variants"]["int8"]
    print(
        f"digits-cnn held-out ({int8['n']}): fp32 {100 * int8['fp32_accuracy']:.2f}% -> int8 "
        f"{100 * int8['variant_accuracy']:.2f}% ({int8['change_points']:+.2f} points)"
    )
    assert int8["change_points"] >= -INT8_MAX_DROP_POINTS
    assert int8["calibration_samples"] == 256
    # The variant really is quantized: QDQ nodes and int8 weights.
    graph = onnx.load(str(out / "edge.int8.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)


def test_fp16_variant_keeps_float32_io_and_accuracy(digits_split):
    out, _, sm, _, test, summary = digits_split
    model = onnx.load(str(out / "edge.fp16.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    got = run_onnx(out / "edge.fp16.onnx", test.x[:64])
    with torch.no_grad():
        want = sm.edge(torch.from_numpy(test.x[:64])).numpy()
    np.testing.assert_allclose(got, want, atol=2e-2 * np.abs(want).max(), rtol=0)
    assert summary["export"]["variants"]["fp16"]["change_points"] >= -FP16_MAX_DROP_POINTS


def test_accuracy_change_against_torch_oracle(digits_split):
    out, _, sm, _, test, _ = digits_split
    result = accuracy_change(
        out / "edge.onnx", out / "edge.int8.onnx", rest=sm.cloud, x=test.x, y=test.y
    )
    with torch.no_grad():
        act = torch.from_numpy(run_onnx(out / "edge.int8.onnx", test.x))
        want = float((sm.cloud(act).argmax(1).numpy() == test.y).mean())
    assert result["variant_accuracy"] == pytest.approx(want)
    assert result["change_points"] == pytest.approx(
        100 * (result["variant_accuracy"] - result["fp32_accuracy"])
    )
    assert result["activation_max_abs_err"] > 0 and result["activation_rel_err"] < 0.1


def test_manifest_records_every_variant(digits_split):
    out, *_ = digits_split
    manifest = Manifest.load(out)
    manifest.verify(out)
    for name in ("edge.onnx", "edge.int8.onnx", "edge.fp16.onnx"):
        assert manifest.artifacts[name] == sha256_file(out / name)
    assert manifest.opset == 18
    assert manifest.extra["export"]["exporter"] == "dynamo"
    assert set(manifest.extra["export"]["variants"]) == {"int8", "fp16"}
    load_split(out)  # the directory still loads (every hash verified)


def test_static_int8_direct(digits_split, tmp_path):
    out, _, _, train, test, _ = digits_split
    path = quantize_static_int8(
        out / "edge.onnx", tmp_path / "q.onnx", calibration=train.x[:64], per_channel=False
    )
    fp32 = run_onnx(out / "edge.onnx", test.x)
    got = run_onnx(path, test.x)
    assert got.shape == fp32.shape
    # Per-tensor scales and few calibration samples clip outliers, so bound the RMS error.
    rel_rms = np.linalg.norm(got - fp32) / np.linalg.norm(fp32)
    print(f"int8 per-tensor, 64 calibration samples: relative RMS error {rel_rms:.4f}")
    assert rel_rms < 0.05


def test_quantizer_registry_and_argument_errors(digits_split, tmp_path):
    out, *_ = digits_split
    assert set(QUANTIZERS) == {"int8", "fp16"}
    with pytest.raises(ValueError, match="known: fp16, int8"):
        get_quantizer("int4")
    with pytest.raises(ValueError, match="needs calibration samples"):
        get_quantizer("int8")(out / "edge.onnx", tmp_path / "q.onnx")
    with pytest.raises(ValueError, match="calibration must hold >= 8 samples"):
        quantize_static_int8(
            out / "edge.onnx", tmp_path / "q.onnx", calibration=np.zeros((3, 1, 8, 8))
        )
    bad = np.zeros((16, 1, 8, 8), np.float32)
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        quantize_static_int8(out / "edge.onnx", tmp_path / "q.onnx", calibration=bad)
    assert convert_fp16(out / "edge.onnx", tmp_path / "h.onnx").is_file()


def _parse(argv):
    parser = argparse.ArgumentParser(prog="edgesplit")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_export_command_json_and_dropping_variants(tmp_path, capsys):
    model, spec = build_model("digits-mlp", seed=1)
    model.eval()
    sm = split_model(model, cut=spec.default_cut, example_input=torch.zeros(2, *spec.input_shape))
    save_split(sm, model, model_ref="digits-mlp", num_classes=10, out_dir=tmp_path)
    args = _parse(["export", str(tmp_path), "--quantize", "fp16", "--json"])
    assert args.func(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["export"]["data"] == "digits"  # the zoo model's bundled dataset, by default
    assert first["export"]["max_abs_err_real"] <= 1e-4
    assert (tmp_path / "edge.fp16.onnx").is_file()
    # Re-exporting without fp16 drops the stale variant from disk and manifest.
    args = _parse(["export", str(tmp_path)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "edge.onnx" in text and "model hash" in text
    assert not (tmp_path / "edge.fp16.onnx").exists()
    assert "edge.fp16.onnx" not in Manifest.load(tmp_path).artifacts
    assert format_summary(first).count("\n") >= 4


def test_failed_export_leaves_directory_intact(tmp_path, monkeypatch):
    import converters.quantize as quantize_module
    from converters.errors import ExportError

    model, spec = build_model("digits-mlp", seed=2)
    model.eval()
    sm = split_model(model, cut=spec.default_cut, example_input=torch.zeros(2, *spec.input_shape))
    save_split(sm, model, model_ref="digits-mlp", num_classes=10, out_dir=tmp_path)
    export_split_dir(tmp_path, quantize=["fp16"])
    # New edge weights, so a re-export would write different edge.onnx bytes.
    with torch.no_grad():
        model.fc1.weight.add_(0.1)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    manifest = Manifest.load(tmp_path)
    manifest.add_artifact(tmp_path, "model.pt")
    manifest.save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(*args, **kwargs):
        raise ExportError("simulated quantizer failure")

    monkeypatch.setitem(quantize_module.QUANTIZERS, "fp16", broken)
    with pytest.raises(ExportError, match="simulated"):
        export_split_dir(tmp_path, quantize=["fp16"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing touched
    load_split(tmp_path)  # every recorded hash still matches


def test_int8_without_data_is_refused(tmp_path):
    model, spec = build_model("mnist-cnn", seed=0)  # no bundled dataset for MNIST
    model.eval()
    sm = split_model(model, cut=spec.default_cut, example_input=torch.zeros(2, *spec.input_shape))
    save_split(sm, model, model_ref="mnist-cnn", num_classes=10, out_dir=tmp_path)
    with pytest.raises(ValueError, match="int8 quantization needs real calibration samples"):
        export_split_dir(tmp_path, quantize=["int8"])
    with pytest.raises(ValueError, match=r"data='digits' has samples of shape \(1, 8, 8\)"):
        export_split_dir(tmp_path, data="digits")


def _has_entry_point() -> bool:
    eps = metadata.entry_points(group="edgesplit.commands")
    return any(ep.value == "converters.commands:register" for ep in eps)


@pytest.mark.skipif(not _has_entry_point(), reason="converters entry point not installed yet")
def test_export_through_main(digits_split, capsys):
    from converters.cli import main

    out, *_ = digits_split
    assert main(["export", str(out), "--quantize", "int8", "--quantize", "fp16"]) == 0
    assert "int8" in capsys.readouterr().out
    assert main(["export", str(out), "--calibration", "2"]) == 2
    assert "calibration must be >= 8" in capsys.readouterr().err
