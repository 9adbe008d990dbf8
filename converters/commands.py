"""The ``export`` subcommand: edge half to ONNX, verified, optionally quantized, in the manifest."""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from converters.errors import ConfigError

log = logging.getLogger(__name__)

FP32_FILE = "edge.onnx"
# Real samples used for the parity check; enough to cover the data's value range.
_PARITY_SAMPLES = 512
# Zoo datasets that ship with the toolkit, so their data can be picked without asking.
_BUNDLED = {"digits": "digits"}


def register(subparsers) -> None:
    """Adds the ``export`` subcommand to the ``edgesplit`` parser."""
    from converters.quantize import QUANTIZERS

    p = subparsers.add_parser(
        "export",
        help="export a split directory's edge half to ONNX, verify it, optionally quantize it",
        description=(
            "Writes DIR/edge.onnx (one file, dynamic batch), checks onnxruntime against torch on "
            "random and real samples, optionally writes quantized variants and reports the "
            "whole split model's accuracy change on held-out data; records all in the manifest."
        ),
    )
    p.add_argument("directory", metavar="DIR", help="split directory (manifest.json, model.pt)")
    p.add_argument(
        "--quantize",
        action="append",
        choices=sorted(QUANTIZERS),
        default=[],
        help="also write this variant (repeatable); variants not named are dropped",
    )
    p.add_argument(
        "--calibration", type=int, default=256, metavar="N", help="int8 calibration samples"
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="SPEC",
        help="dataset for parity, calibration and accuracy (digits, idx:IMAGES,LABELS, file.npz);"
        " default: the model's bundled dataset if it has one",
    )
    p.add_argument(
        "--test-fraction", type=float, default=0.25, help="held-out share of --data (0.25)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the train/held-out split (default: the split directory's seed, else 0)",
    )
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |onnxruntime - torch|")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_export_command)


def export_split_dir(
    directory: str | Path,
    *,
    quantize: Sequence[str] = (),
    data: str | None = None,
    calibration: int = 256,
    test_fraction: float = 0.25,
    seed: int | None = None,
    opset: int = 18,
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """Exports, verifies and optionally quantizes the edge half of a split directory.

    Writes ``edge.onnx`` (and ``edge.int8.onnx`` / ``edge.fp16.onnx``), hashes them into the
    manifest, stores the export report under ``manifest.extra["export"]`` and sets
    ``manifest.opset``. Variants not requested are removed, since they were derived from the
    previous fp32 graph.

    Args:
        directory: A split directory written by ``split.store.save_split``.
        quantize: Variant names from ``converters.quantize.QUANTIZERS``.
        data: Dataset spec (``converters.datasets.load_dataset``) for the real-sample parity
            check, int8 calibration (train part) and accuracy (held-out part). None: the model's
            bundled dataset (digits) when it has one, else random inputs only.
        calibration: Number of training samples used to calibrate int8.
        test_fraction: Held-out share of the data.
        seed: Seed of the stratified train/held-out split
            (``converters.datasets.train_test_split``); None: ``manifest.extra["seed"]`` (the
            seed ``edgesplit split`` trained with), else 0.
        opset: ONNX opset.
        tolerance: Max |onnxruntime - torch| for the fp32 graph.

    Returns:
        A JSON-ready summary: ``export`` (the ExportReport), ``data``, ``fp32_accuracy`` and
        ``variants`` (per variant: file, size, accuracy change), ``model_hash``.

    Raises:
        ConfigError: Unusable data or arguments (int8 without data, shape mismatch).
        ExportError: Export or verification failed.
        ManifestError: The directory is not a valid split directory.
    """
    import torch

    from converters.onnx_export import export_edge
    from converters.quantize import VARIANT_FILES, accuracy_change, get_quantizer, split_accuracy
    from split.store import load_split

    quantize = list(dict.fromkeys(quantize))  # keep order, drop repeats
    for name in quantize:
        get_quantizer(name)  # unknown names fail before any work
    if calibration < 8:
        raise ConfigError(f"calibration must be >= 8 samples, got {calibration}")
    if seed is not None and seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    directory = Path(directory)
    sm, _, manifest = load_split(directory)
    sm.eval()
    if seed is None:
        seed = int(manifest.extra.get("seed", 0))
    train, test, data_spec = _load_data(manifest, data, test_fraction=test_fraction, seed=seed)
    if "int8" in quantize and train is None:
        raise ConfigError(
            "int8 quantization needs real calibration samples; pass --data SPEC "
            "(digits, idx:IMAGES,LABELS or file.npz)"
        )
    input_shape = tuple(manifest.input_shape)
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn((2, *input_shape), generator=gen)

    def rest(activation: torch.Tensor) -> torch.Tensor:
        out = sm.cloud(activation)
        return sm.head(out) if sm.head is not None else out

    # Files are written to a staging folder and moved in only when everything succeeded: a
    # half-finished export must not leave a file whose hash differs from the manifest's, which
    # would make the directory unloadable.
    with tempfile.TemporaryDirectory(prefix=".export-", dir=directory) as staging:
        staged = Path(staging)
        report = export_edge(
            sm.edge,
            staged / FP32_FILE,
            example_input=example,
            real_inputs=None if test is None else test.x[:_PARITY_SAMPLES],
            opset=opset,
            tolerance=tolerance,
        )
        fp32_accuracy = None
        if test is not None:
            fp32_accuracy = split_accuracy(staged / FP32_FILE, rest=rest, x=test.x, y=test.y)
        summary_variants: dict[str, dict[str, Any]] = {}
        for name in quantize:
            out = staged / VARIANT_FILES[name]
            calib = None if train is None else train.x[:calibration]
            get_quantizer(name)(staged / FP32_FILE, out, calibration=calib)
            entry: dict[str, Any] = {"file": out.name, "size_bytes": out.stat().st_size}
            if name == "int8":
                entry["calibration_samples"] = len(calib)
            if test is not None:
                entry.update(
                    accuracy_change(staged / FP32_FILE, out, rest=rest, x=test.x, y=test.y)
                )
            summary_variants[name] = entry
        for name, filename in VARIANT_FILES.items():
            if name == "fp32" or name in quantize:
                os.replace(staged / filename, directory / filename)
                manifest.add_artifact(directory, filename)
            else:  # derived from the previous fp32 graph: stale now
                manifest.artifacts.pop(filename, None)
                (directory / filename).unlink(missing_ok=True)
    manifest.opset = opset
    export_record = dict(report.to_dict(), path=FP32_FILE)
    export_record.update(
        data=data_spec,
        test_fraction=None if test is None else test_fraction,
        split_seed=None if test is None else seed,
        held_out_samples=None if test is None else len(test),
        fp32_accuracy=fp32_accuracy,
        variants=summary_variants,
    )
    manifest.extra["export"] = export_record
    manifest.save(directory)
    return {
        "directory": str(directory),
        "model": manifest.model,
        "cut": manifest.cut,
        "export": export_record,
        "model_hash": manifest.digest(),
    }


def _load_data(manifest, spec: str | None, *, test_fraction: float, seed: int):
    """Returns (train, held-out, spec) or (None, None, None) when no data applies."""
    from converters.datasets import load_dataset, train_test_split

    if spec is None:
        try:
            from split.zoo import get_spec

            spec = _BUNDLED.get(get_spec(manifest.model).dataset)
        except ValueError:  # a user model file: no known dataset
            spec = None
    if spec is None:
        return None, None, None
    ds = load_dataset(spec, seed=seed)
    if tuple(ds.x.shape[1:]) != tuple(manifest.input_shape):
        raise ConfigError(
            f"data={spec!r} has samples of shape {tuple(ds.x.shape[1:])}, the model takes "
            f"{tuple(manifest.input_shape)}; pass --data with matching samples"
        )
    held_out = (manifest.extra.get("training") or {}).get("test_indices")
    if held_out is not None and spec == _BUNDLED.get("digits"):
        # `edgesplit split --train-epochs` recorded which samples it held out: use exactly those.
        mask = np.zeros(len(ds), bool)
        mask[np.asarray(held_out, dtype=np.int64)] = True
        return ds.subset(np.flatnonzero(~mask)), ds.subset(np.flatnonzero(mask)), spec
    train, test = train_test_split(ds, test_fraction=test_fraction, seed=seed)
    return train, test, spec


def _export_command(args: argparse.Namespace) -> int:
    if not Path(args.directory).is_dir():
        raise ValueError(f"DIR must be a split directory, got {args.directory!r}")
    summary = export_split_dir(
        args.directory,
        quantize=args.quantize,
        data=args.data,
        calibration=args.calibration,
        test_fraction=args.test_fraction,
        seed=args.seed,
        opset=args.opset,
        tolerance=args.tolerance,
    )
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(format_summary(summary))
    return 0


def format_summary(summary: dict[str, Any]) -> str:
    """Renders ``export_split_dir``'s summary as a short plain-text table."""
    ex = summary["export"]
    real = ex["max_abs_err_real"]
    lines = [
        f"{summary['directory']}: {summary['model']} cut={summary['cut']}",
        f"edge.onnx  {ex['exporter']} exporter, opset {ex['opset']}, {ex['size_bytes']:,} bytes, "
        f"input {tuple(ex['input_shape'])} -> activation {tuple(ex['activation_shape'])}",
        f"parity     max|ort - torch| random {ex['max_abs_err_random']:.2e}, real "
        + ("n/a" if real is None else f"{real:.2e}")
        + f" (tolerance {ex['tolerance']:.0e}, batches {ex['batch_sizes_checked']})",
    ]
    if ex["fp32_accuracy"] is None:
        lines.append("accuracy   n/a (no data; pass --data SPEC)")
    else:
        lines.append(
            f"accuracy   fp32 {100 * ex['fp32_accuracy']:.2f}% on {ex['held_out_samples']} "
            f"held-out samples of {ex['data']}"
        )
    if ex["variants"]:
        lines.append(f"{'variant':<8} {'file':<16} {'bytes':>9} {'accuracy':>9} {'change':>8}")
        for name, v in ex["variants"].items():
            acc = f"{100 * v['variant_accuracy']:.2f}%" if "variant_accuracy" in v else "n/a"
            change = f"{v['change_points']:+.2f}pt" if "change_points" in v else "n/a"
            lines.append(f"{name:<8} {v['file']:<16} {v['size_bytes']:>9,} {acc:>9} {change:>8}")
    lines.append(f"model hash {summary['model_hash']}")
    return "\n".join(lines)
