"""Exports a model's edge half to one self-contained ONNX file and verifies it against torch."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from converters.errors import ExportError

if TYPE_CHECKING:  # torch stays a lazy import: this module is importable on a torch-free box
    import torch
    from torch import nn

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "activation"
# Batch 1 and 7 catch exporters that specialised the batch dimension on the example batch of 2.
BATCH_SIZES_CHECKED = (1, 2, 7)
MIN_OPSET = 13
DEFAULT_OPSET = 18
_VERIFY_CHUNK = 256


@dataclass(frozen=True)
class ExportReport:
    """What ``export_edge`` wrote and how closely onnxruntime matched torch.

    Attributes:
        path: The ONNX file written.
        opset: ONNX opset of the graph.
        exporter: ``"dynamo"`` (torch.export based) or ``"torchscript"`` (legacy exporter, used
            when dynamo fails or writes a graph that cannot be lowered to ``opset``).
        max_abs_err_random: Max |onnxruntime - torch| over random inputs at every checked batch.
        max_abs_err_real: The same over ``real_inputs``, or None when none were given.
        batch_sizes_checked: Batch sizes run through both runtimes (random inputs).
        tolerance: The bound both errors had to meet.
        input_shape: Per-sample input shape.
        activation_shape: Per-sample output (cut activation) shape.
        size_bytes: Size of the ONNX file.
        sha256: Hex digest of the ONNX file.
        fallback_reason: Why the dynamo exporter's graph was abandoned, when it was.
    """

    path: str
    opset: int
    exporter: str
    max_abs_err_random: float
    max_abs_err_real: float | None
    batch_sizes_checked: list[int]
    tolerance: float
    input_shape: list[int] = field(default_factory=list)
    activation_shape: list[int] = field(default_factory=list)
    size_bytes: int = 0
    sha256: str = ""
    fallback_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict (stored in ``manifest.extra["export"]``)."""
        return asdict(self)


def export_edge(
    edge: nn.Module,
    path: str | Path,
    *,
    example_input: torch.Tensor,
    real_inputs: np.ndarray | None = None,
    opset: int = DEFAULT_OPSET,
    tolerance: float = 1e-4,
) -> ExportReport:
    """Exports ``edge`` to a single ONNX file with a dynamic batch axis, then verifies it.

    The torch.export-based (dynamo) exporter is tried first. It writes its own opset (18) whatever
    is asked, so a lower ``opset`` goes through onnx's version converter; if dynamo fails, or the
    converter cannot lower its graph, the legacy TorchScript exporter writes ``opset`` instead and
    the report says which one wrote the file. The graph is checked with ``onnx.checker`` and run
    in onnxruntime against torch on seeded random inputs at batch sizes 1, 2 and 7 and on
    ``real_inputs`` when given. The file is written beside ``path`` and moved onto it only when
    every check passed, so a failed export leaves a previous file at ``path`` as it was.

    Args:
        edge: The edge half (put in eval mode for the export; its mode is restored after).
        path: Destination ``.onnx`` file; weights are stored inside it (no ``.data`` side file).
        example_input: One input batch, or one sample shaped like the per-sample input; only its
            per-sample shape and values are used (the export always traces a batch of 2).
        real_inputs: Optional real samples ``(N, *input_shape)`` to verify on as well.
        opset: ONNX opset version, >= 13.
        tolerance: Max absolute error allowed between onnxruntime and torch.

    Returns:
        The ExportReport.

    Raises:
        ExportError: The model cannot be exported (naming the unsupported op when one is to
            blame), no exporter can write ``opset`` for it, or the exported graph disagrees with
            torch by more than ``tolerance``.
        ValueError: A bad argument.
    """
    import torch

    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}, got {opset}")
    import onnx

    # Above what the installed onnx knows the exporter silently writes its default opset.
    if opset > onnx.defs.onnx_opset_version():
        raise ValueError(f"opset must be <= {onnx.defs.onnx_opset_version()}, got {opset}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"path must end in .onnx, got {str(path)!r}")
    example = _example_batch(torch, example_input)
    input_shape = list(example.shape[1:])
    if real_inputs is not None:
        real_inputs = np.asarray(real_inputs, dtype=np.float32)
        if list(real_inputs.shape[1:]) != input_shape or real_inputs.shape[0] == 0:
            raise ValueError(
                f"real_inputs must have shape (N>=1, {', '.join(map(str, input_shape))}), "
                f"got {tuple(real_inputs.shape)}"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    # Staged beside ``path`` (same filesystem, so the final move is atomic): a failed export or
    # check must not replace the caller's previous file with a half-verified one.
    fd, staged_name = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    staged = Path(staged_name)
    was_training = edge.training
    edge.eval()
    try:
        try:
            exporter, fallback_reason = _export(torch, edge, example, staged, opset)
            reference = _torch_runner(torch, edge)
            _check_graph(staged, path)
            rng = np.random.default_rng(0)
            err_random = 0.0
            for batch in BATCH_SIZES_CHECKED:
                x = rng.standard_normal((batch, *input_shape), dtype=np.float32)
                err_random = max(err_random, max_abs_error(staged, reference, x))
            err_real = None
            if real_inputs is not None:
                err_real = max_abs_error(staged, reference, real_inputs)
            activation_shape = list(reference(example.numpy()).shape[1:])
        finally:
            edge.train(was_training)
        for label, err in (("random", err_random), ("real", err_real)):
            if err is not None and not err <= tolerance:
                raise ExportError(
                    f"onnxruntime disagrees with torch on {label} inputs: max abs err {err:.3g} "
                    f"> tolerance {tolerance:g} ({exporter} exporter, {path}); the edge half may "
                    "hold a random or training-only layer active in eval mode"
                )
        data = staged.read_bytes()
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
        staged.with_name(staged.name + ".data").unlink(missing_ok=True)
    report = ExportReport(
        path=str(path),
        opset=opset,
        exporter=exporter,
        max_abs_err_random=float(err_random),
        max_abs_err_real=None if err_real is None else float(err_real),
        batch_sizes_checked=list(BATCH_SIZES_CHECKED),
        tolerance=tolerance,
        input_shape=input_shape,
        activation_shape=activation_shape,
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        fallback_reason=fallback_reason,
    )
    log.debug("exported %s", report)
    return report


def max_abs_error(
    onnx_path: str | Path, reference: Callable[[np.ndarray], np.ndarray], x: np.ndarray
) -> float:
    """Returns max |onnxruntime(x) - reference(x)| for a float32 batch, run in chunks.

    Raises:
        ExportError: The output shapes differ.
    """
    session = _session(onnx_path)
    err = 0.0
    for start in range(0, len(x), _VERIFY_CHUNK):
        chunk = np.ascontiguousarray(x[start : start + _VERIFY_CHUNK], dtype=np.float32)
        got = session.run(None, {session.get_inputs()[0].name: chunk})[0]
        want = reference(chunk)
        if got.shape != want.shape:
            raise ExportError(
                f"onnxruntime output shape {got.shape} != torch output shape {want.shape} "
                f"for input {chunk.shape} ({onnx_path})"
            )
        err = max(err, float(np.max(np.abs(got.astype(np.float64) - want))))
    return err


def _example_batch(torch, example_input) -> torch.Tensor:
    """Returns a float32 batch of exactly 2 built from ``example_input``.

    A batch of 1 would let torch.export specialise the batch dimension to the constant 1.
    """
    x = torch.as_tensor(example_input).detach().to(torch.float32).cpu()
    if x.ndim == 0:
        raise ValueError("example_input must be a tensor with a batch axis, got a scalar")
    if x.shape[0] >= 2:
        return x[:2].clone()
    gen = torch.Generator().manual_seed(0)
    if x.shape[0] == 1:
        return torch.cat([x, torch.randn(x.shape, generator=gen)])
    raise ValueError(f"example_input batch must be >= 1, got shape {tuple(x.shape)}")


def _torch_runner(torch, edge: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = edge(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return out.detach().to(torch.float64).numpy()

    return run


def _export(torch, edge, example, path: Path, opset: int) -> tuple[str, str | None]:
    """Writes ``path`` declaring ``opset``; returns (exporter, why dynamo was abandoned or None).

    The dynamo graph is kept when it declares ``opset`` or onnx's version converter lowers it
    there; otherwise the TorchScript exporter, which writes any opset >= 7 natively, is tried.
    """
    dynamo_opset = None
    try:
        _export_dynamo(torch, edge, example, path, opset)
    except Exception as exc:  # the exporter raises many unrelated types; all mean "fall back"
        dynamo_reason = describe_export_failure(exc)
        log.info("dynamo ONNX exporter failed (%s); trying the TorchScript exporter", dynamo_reason)
    else:
        dynamo_opset, lowering_failure = _ensure_opset(path, opset)
        if lowering_failure is None:
            return "dynamo", None
        dynamo_reason = (
            f"opset {opset}: the dynamo exporter wrote opset {dynamo_opset} and onnx's version "
            f"converter cannot lower it ({lowering_failure})"
        )
        log.info("%s; trying the TorchScript exporter", dynamo_reason)
    try:
        _export_torchscript(torch, edge, example, path, opset)
        written = _graph_opset(_load(path))
    except Exception as exc:
        if dynamo_opset is None:
            raise ExportError(
                f"cannot export the edge half to ONNX opset {opset}: dynamo exporter: "
                f"{dynamo_reason}; TorchScript exporter: {describe_export_failure(exc)}; replace "
                "that op or choose a cut whose edge half avoids it"
            ) from exc
        raise ExportError(
            f"{dynamo_reason}; the TorchScript exporter failed too "
            f"({describe_export_failure(exc)}); {_opset_hint(dynamo_opset)}"
        ) from exc
    if written != opset:  # never a report (and manifest) naming an opset the graph lacks
        if dynamo_opset is None:
            raise ExportError(
                f"opset {opset}: dynamo exporter: {dynamo_reason}; the TorchScript exporter "
                f"wrote opset {written}"
            )
        raise ExportError(
            f"{dynamo_reason}; the TorchScript exporter wrote opset {written}; "
            f"{_opset_hint(dynamo_opset)}"
        )
    return "torchscript", dynamo_reason


def _opset_hint(opset: int) -> str:
    default = " (the default)" if opset == DEFAULT_OPSET else ""
    return f"ask for opset {opset}{default}, which the dynamo exporter writes without conversion"


def _export_dynamo(torch, edge, example, path: Path, opset: int) -> None:
    _quietly(
        torch.onnx.export,
        edge,
        (example,),
        str(path),
        dynamo=True,
        external_data=False,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
    )


def _export_torchscript(torch, edge, example, path: Path, opset: int) -> None:
    _quietly(
        torch.onnx.export,
        edge,
        (example,),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
    )


# Loggers the exporter chats on (optimizer passes at INFO, "torchvision is not installed" at
# WARNING); under the CLI's INFO logging they would bury the result table.
_CHATTY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")


def _quietly(fn, *args, **kwargs):
    """Calls an exporter with its progress prints, logs and deprecation warnings silenced.

    Failures still surface as exceptions, which ``describe_export_failure`` condenses.
    """
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# Patterns that name the culprit op in the exporters' (long, multi-part) messages.
_OP_PATTERNS = (
    re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'"),
    re.compile(r"Exporting the operator '([^']+)' to ONNX"),
    re.compile(r"target=torch\.ops\.([\w.]+?)(?:\.default)?\]"),
    re.compile(r"Unsupported: .*?(torch\.[\w.]+)"),
)


def describe_export_failure(exc: BaseException) -> str:
    """Returns a one-line reason for an exporter failure, naming the unsupported op if known."""
    chain = _exception_chain(exc)
    for pattern in _OP_PATTERNS:
        for item in chain:
            match = pattern.search(str(item))
            if match:
                return f"unsupported operator '{match.group(1)}'"
    deepest = chain[-1]
    first_line = next((ln.strip() for ln in str(deepest).splitlines() if ln.strip()), "")
    return f"{type(deepest).__name__}: {first_line[:200]}"


def _exception_chain(exc: BaseException) -> Sequence[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _graph_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


# onnx's version converter: "... adapter_lookup: Assertion `false` failed: No Adapter From
# Version $14 for Reshape" (the C++ source line is noise to a user).
_NO_ADAPTER = re.compile(r"No Adapter From Version \$(\d+) for (\w+)")


def _load(path: Path):
    import onnx

    return onnx.load(str(path))


def _ensure_opset(path: Path, opset: int) -> tuple[int, str | None]:
    """Makes the graph at ``path`` declare ``opset`` with onnx's version converter.

    The dynamo exporter writes its own opset (18 with torch 2.x) whatever was asked, and the
    manifest must never name an opset the graph does not declare.

    Returns:
        (the opset the graph was written at, None) when ``path`` now declares ``opset``, else
        (that opset, a one-line reason the converter could not lower it); ``path`` is then
        left as written.
    """
    import onnx
    from onnx import version_converter

    model = _load(path)
    actual = _graph_opset(model)
    if actual == opset:
        return actual, None
    try:
        converted = version_converter.convert_version(model, opset)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises bare RuntimeErrors per unsupported op
        match = _NO_ADAPTER.search(str(exc))
        if match:
            return actual, f"no {match.group(2)} adapter below opset {match.group(1)}"
        return actual, describe_export_failure(exc)
    if _graph_opset(converted) != opset:
        return actual, f"it gave opset {_graph_opset(converted)}"
    onnx.save(converted, str(path))
    log.info("edge graph lowered from opset %d to %d by onnx's version converter", actual, opset)
    return actual, None


def _check_graph(path: Path, destination: Path) -> None:
    """Checks the staged graph at ``path``; messages name ``destination``, the file asked for."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises ValidationError, InferenceError, ...
        raise ExportError(f"exported graph for {destination} fails onnx.checker: {exc}") from exc
    if path.with_name(path.name + ".data").exists():
        raise ExportError(
            f"exporter wrote external weights beside the graph for {destination}; expected one file"
        )


def _session(onnx_path: str | Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    return ort.InferenceSession(
        str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
    )
