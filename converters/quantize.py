"""Quantized variants of an exported edge half (static int8 QDQ, float16) and their accuracy."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from converters.errors import ExportError

log = logging.getLogger(__name__)

# Calibration batches: large enough for stable min/max, small enough to bound memory.
_CALIBRATION_BATCH = 64
_EVAL_BATCH = 256
MIN_CALIBRATION_SAMPLES = 8

# Variant name -> file name inside a split directory; edge/runtime.py reads this table, so
# this module must keep importing nothing heavier than NumPy at load time.
VARIANT_FILES = {"fp32": "edge.onnx", "int8": "edge.int8.onnx", "fp16": "edge.fp16.onnx"}


class _ArrayReader:
    """A ``CalibrationDataReader`` over real samples, in fixed-size batches."""

    def __init__(self, input_name: str, samples: np.ndarray) -> None:
        self._input_name = input_name
        self._samples = samples
        self._start = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._start >= len(self._samples):
            return None
        batch = self._samples[self._start : self._start + _CALIBRATION_BATCH]
        self._start += _CALIBRATION_BATCH
        return {self._input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    def rewind(self) -> None:
        self._start = 0


def quantize_static_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    *,
    calibration: np.ndarray,
    per_channel: bool = True,
) -> Path:
    """Writes a static int8 (QDQ) copy of an fp32 ONNX graph, calibrated on real samples.

    Activations and weights are signed int8 with min/max calibration; onnxruntime fuses the
    QuantizeLinear/DequantizeLinear pairs around Conv/MatMul into integer kernels. Dynamic
    quantization is deliberately not offered: on conv extractors it ran 4-6x slower than fp32.

    Args:
        fp32_path: The float32 ONNX model.
        out_path: Destination file.
        calibration: Real input samples ``(N, *input_shape)``, N >= 8, that set the activation
            ranges; use training data, never the evaluation set.
        per_channel: One weight scale per output channel (more accurate for conv layers).

    Returns:
        ``out_path`` as a Path.

    Raises:
        ValueError: Too few or non-finite calibration samples.
        ExportError: onnxruntime could not quantize the graph.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    calibration = np.asarray(calibration, dtype=np.float32)
    if calibration.ndim < 2 or len(calibration) < MIN_CALIBRATION_SAMPLES:
        raise ValueError(
            f"calibration must hold >= {MIN_CALIBRATION_SAMPLES} samples (N, ...), "
            f"got shape {calibration.shape}"
        )
    if not np.all(np.isfinite(calibration)):
        raise ValueError("calibration samples must be finite, found NaN or Inf")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    input_name = _input_name(fp32_path)
    with tempfile.TemporaryDirectory(prefix="edgesplit-quant-") as tmp:
        # Shape inference + graph cleanup first, as onnxruntime recommends before quantizing.
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:  # pre-processing is an optimisation; quantize the raw graph
            log.info("quant_pre_process failed (%s); quantizing the unprocessed graph", exc)
            prepared = fp32_path
        try:
            quantize_static(
                str(prepared),
                str(out_path),
                _ArrayReader(input_name, calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        except Exception as exc:
            raise ExportError(f"int8 quantization of {fp32_path} failed: {exc}") from exc
    return out_path


def convert_fp16(fp32_path: str | Path, out_path: str | Path) -> Path:
    """Writes a float16 copy of an fp32 ONNX graph whose inputs and outputs stay float32.

    Keeping float32 IO means callers feed and receive the same arrays as with the fp32 graph;
    the casts sit inside the graph. On CPUs without native fp16 arithmetic onnxruntime computes
    some ops through float32 again, so this variant mainly halves the file size.

    Returns:
        ``out_path`` as a Path.

    Raises:
        ExportError: The conversion failed.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    try:
        model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
        # The converter appends the float32<->float16 IO casts at the end of the node list;
        # ONNX requires topological order, so sort before checking and saving.
        wrapped = OnnxModel(model)
        wrapped.topological_sort()
        model = wrapped.model
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ExportError(f"float16 conversion of {fp32_path} failed: {exc}") from exc
    onnx.save(model, str(out_path))
    return out_path


def _quantize_int8(fp32_path, out_path, *, calibration=None, per_channel=True) -> Path:
    if calibration is None:
        raise ValueError("the int8 quantizer needs calibration samples (real training inputs)")
    return quantize_static_int8(
        fp32_path, out_path, calibration=calibration, per_channel=per_channel
    )


def _convert_fp16(fp32_path, out_path, *, calibration=None, per_channel=True) -> Path:
    del calibration, per_channel  # float16 conversion is data-free
    return convert_fp16(fp32_path, out_path)


# Name -> function(fp32_path, out_path, *, calibration=None, per_channel=True) -> Path.
QUANTIZERS: dict[str, Callable[..., Path]] = {"fp16": _convert_fp16, "int8": _quantize_int8}


def get_quantizer(name: str) -> Callable[..., Path]:
    """Returns the quantizer registered as ``name``.

    Raises:
        ValueError: Unknown name; the message lists the known ones.
    """
    try:
        return QUANTIZERS[name]
    except KeyError:
        raise ValueError(
            f"quantize={name!r} is not a known quantizer; known: {', '.join(sorted(QUANTIZERS))}"
        ) from None


def run_onnx(onnx_path: str | Path, x: np.ndarray, *, threads: int | None = None) -> np.ndarray:
    """Runs an edge ONNX graph on a float32 batch in chunks; returns the float32 output."""
    session = _session(onnx_path, threads=threads)
    name = session.get_inputs()[0].name
    outs = [
        session.run(None, {name: np.ascontiguousarray(x[i : i + _EVAL_BATCH], dtype=np.float32)})[0]
        for i in range(0, len(x), _EVAL_BATCH)
    ]
    return np.concatenate(outs).astype(np.float32, copy=False)


def accuracy_change(
    fp32_path: str | Path,
    variant_path: str | Path,
    *,
    rest: Callable[[Any], Any],
    x: np.ndarray,
    y: np.ndarray,
) -> dict[str, float | int]:
    """Compares the whole split model's accuracy with the fp32 edge graph vs a variant.

    Both runs feed the edge activation (from onnxruntime) through the same torch remainder, so
    the difference is the variant's alone.

    Args:
        fp32_path: The float32 edge graph.
        variant_path: The quantized (or float16) edge graph.
        rest: The torch part after the edge half, mapping an activation tensor to logits (the
            cloud half, followed by the head in U-shaped splits).
        x: Held-out inputs ``(N, *input_shape)``, N >= 1.
        y: Their integer labels ``(N,)``.

    Returns:
        ``fp32_accuracy`` and ``variant_accuracy`` (fractions), ``change_points`` (variant minus
        fp32, in percentage points), ``activation_max_abs_err`` and
        ``activation_rel_err`` (max abs err over max |fp32 activation|), and ``n``.
    """
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    if len(x) == 0 or y.shape != (len(x),):
        raise ValueError(f"x and y must hold the same N >= 1 samples, got {x.shape} and {y.shape}")
    act_fp32 = run_onnx(fp32_path, x)
    act_variant = run_onnx(variant_path, x)
    acc_fp32 = _accuracy(rest, act_fp32, y)
    acc_variant = _accuracy(rest, act_variant, y)
    err = float(np.max(np.abs(act_variant.astype(np.float64) - act_fp32)))
    scale = float(np.max(np.abs(act_fp32))) or 1.0
    return {
        "fp32_accuracy": acc_fp32,
        "variant_accuracy": acc_variant,
        "change_points": 100.0 * (acc_variant - acc_fp32),
        "activation_max_abs_err": err,
        "activation_rel_err": err / scale,
        "n": len(x),
    }


def split_accuracy(
    onnx_path: str | Path, *, rest: Callable[[Any], Any], x: np.ndarray, y: np.ndarray
) -> float:
    """Returns the accuracy of ``rest(onnxruntime edge(x))`` against labels ``y``."""
    return _accuracy(rest, run_onnx(onnx_path, np.asarray(x, dtype=np.float32)), np.asarray(y))


def _accuracy(rest: Callable[[Any], Any], activation: np.ndarray, y: np.ndarray) -> float:
    import torch

    correct = 0
    with torch.inference_mode():
        for i in range(0, len(activation), _EVAL_BATCH):
            logits = rest(torch.from_numpy(activation[i : i + _EVAL_BATCH]))
            correct += int((logits.argmax(dim=1).numpy() == y[i : i + _EVAL_BATCH]).sum())
    return correct / len(activation)


def _input_name(onnx_path: Path) -> str:
    return _session(onnx_path).get_inputs()[0].name


def _session(onnx_path: str | Path, *, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(
        str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
    )
