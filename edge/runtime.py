"""Runs the exported edge half with onnxruntime and NumPy only (no torch on the device)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from converters.quantize import VARIANT_FILES  # module imports NumPy only at load time
from edge.errors import ArtifactMissingError, EdgeInputError, ModelMismatchError
from split.manifest import Manifest, sha256_file  # stdlib-only module: safe without torch

__all__ = ["VARIANTS", "EdgeModel", "variant_file"]

# Variant name -> file name inside a split directory (written by ``edgesplit export``).
VARIANTS = VARIANT_FILES


def variant_file(variant: str) -> str:
    """Returns the file name of an edge variant.

    Raises:
        ValueError: Unknown variant; the message lists the known ones.
    """
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(
            f"variant={variant!r} is not a known edge variant; known: {', '.join(VARIANTS)}"
        ) from None


class EdgeModel:
    """The device's half of a split model, run by onnxruntime on the CPU.

    Inputs are validated before they reach the graph: float32 arrays of shape
    ``(N, *input_shape)`` or one sample ``input_shape``. Other float dtypes (float16, float64)
    are rounded to float32, the precision every variant's graph computes in (the fp16 variant
    keeps float32 IO), so nothing is lost that the model would have used; integer, bool and
    complex arrays are rejected because their scaling (raw 0..255 pixels vs the [0, 1] the
    model was trained on) cannot be guessed. NaN and Inf, including float64 values beyond the
    float32 range, are rejected.

    Args:
        onnx_path: The edge ONNX file.
        manifest: The split's manifest; gives the shapes and the model hash. Without it the
            shapes come from the graph and the hash is the file's SHA-256.
        threads: onnxruntime intra-op threads (None: onnxruntime's default, all cores).
    """

    def __init__(
        self,
        onnx_path: str | Path,
        *,
        manifest: Manifest | None = None,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        if threads is not None and (isinstance(threads, bool) or threads < 1):
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise ArtifactMissingError(f"edge model {self.onnx_path} not found")
        self.manifest = manifest
        self.threads = threads
        self.variant = "custom"  # from_dir names the variant it loaded
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
            # One graph, one stream of requests: inter-op threads would only contend.
            options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(self.onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        graph_in = self._session.get_inputs()[0]
        self._input_name = graph_in.name
        if graph_in.type != "tensor(float)":
            raise ModelMismatchError(
                f"edge model {self.onnx_path} takes {graph_in.type}, expected tensor(float)"
            )
        if manifest is not None:
            self.input_shape = tuple(int(d) for d in manifest.input_shape)
            self.activation_shape = tuple(int(d) for d in manifest.activation_shape)
            graph_out = self._session.get_outputs()[0]
            for what, dims, expected in (
                ("takes", tuple(graph_in.shape[1:]), self.input_shape),
                ("gives", tuple(graph_out.shape[1:]), self.activation_shape),
            ):
                # Symbolic dims (strings) cannot be compared; the batch axis is always one.
                if all(isinstance(d, int) for d in dims) and dims != expected:
                    raise ModelMismatchError(
                        f"edge model {self.onnx_path} {what} per-sample shape {dims}, "
                        f"manifest says {expected}"
                    )
        else:
            self.input_shape = _static_dims(graph_in.shape[1:], what="input", path=self.onnx_path)
            out = self._session.get_outputs()[0]
            self.activation_shape = _static_dims(out.shape[1:], what="output", path=self.onnx_path)

    @classmethod
    def from_dir(
        cls, directory: str | Path, *, variant: str = "fp32", threads: int | None = None
    ) -> EdgeModel:
        """Loads a variant of the edge half from a split directory, verifying its hash.

        Only ``manifest.json`` and the chosen ONNX file need to be present (a device holds no
        torch checkpoints).

        Args:
            directory: The split directory.
            variant: ``"fp32"`` (edge.onnx), ``"int8"`` (edge.int8.onnx) or ``"fp16"``.
            threads: onnxruntime intra-op threads.

        Raises:
            ValueError: Unknown variant.
            ArtifactMissingError: The variant was never exported or its file is absent.
            ModelMismatchError: The file's SHA-256 differs from the manifest's record.
        """
        filename = variant_file(variant)
        directory = Path(directory)
        manifest = Manifest.load(directory)
        expected = manifest.artifacts.get(filename)
        if expected is None:
            hint = f" --quantize {variant}" if variant != "fp32" else ""
            raise ArtifactMissingError(
                f"{directory} has no {filename} in its manifest; run `edgesplit export "
                f"{directory}{hint}` first"
            )
        path = directory / filename
        if not path.is_file():
            raise ArtifactMissingError(f"{path} not found (listed in {directory}/manifest.json)")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelMismatchError(
                f"{path} sha256 {actual[:16]}... does not match the manifest's {expected[:16]}...; "
                "the file was modified or belongs to another export"
            )
        model = cls(path, manifest=manifest, threads=threads)
        model.variant = variant
        return model

    @property
    def model_hash(self) -> str:
        """The manifest's digest (shared with the cloud), else the ONNX file's SHA-256."""
        if self.manifest is not None:
            return self.manifest.digest()
        return sha256_file(self.onnx_path)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Returns the cut activation for a batch ``(N, *input_shape)`` or a single sample.

        A single sample (no batch axis) gives a single activation (no batch axis).

        Raises:
            EdgeInputError: Wrong type, dtype, shape, empty batch, NaN or Inf.
        """
        batch, single = self._validate(x)
        out = self._session.run(None, {self._input_name: batch})[0]
        return out[0] if single else out

    __call__ = run

    def _validate(self, x: np.ndarray) -> tuple[np.ndarray, bool]:
        if not isinstance(x, np.ndarray):
            raise EdgeInputError(f"input must be a numpy.ndarray, got {type(x).__name__}")
        want = _fmt_shape(("N", *self.input_shape))
        if x.dtype.kind != "f":
            raise EdgeInputError(
                f"input dtype must be float32 (float16/float64 are rounded to it), got {x.dtype}"
                f"; scale integer data as in training (e.g. pixels / 255) first"
            )
        if x.shape == self.input_shape:
            single, x = True, x[None]
        elif x.shape[1:] == self.input_shape:
            single = False
        else:
            raise EdgeInputError(
                f"input shape must be {want} or {_fmt_shape(self.input_shape)}, "
                f"got {_fmt_shape(x.shape)} {x.dtype}"
            )
        if x.shape[0] == 0:
            raise EdgeInputError(f"input batch must hold >= 1 sample, got shape {x.shape}")
        with np.errstate(over="ignore"):  # overflow to inf is reported just below
            x = np.ascontiguousarray(x, dtype=np.float32)
        finite = np.isfinite(x)
        if not finite.all():
            bad_rows = np.flatnonzero(~finite.reshape(len(x), -1).all(axis=1))
            n_nan = int(np.isnan(x).sum())
            raise EdgeInputError(
                f"input must be finite, got {n_nan} NaN and {int((~finite).sum()) - n_nan} Inf "
                f"values (after rounding to float32) in rows {bad_rows[:10].tolist()}"
            )
        return x, single


def _static_dims(dims, *, what: str, path: Path) -> tuple[int, ...]:
    if not all(isinstance(d, int) for d in dims):
        raise ModelMismatchError(
            f"edge model {path} has a symbolic non-batch {what} shape {list(dims)}; "
            "pass its manifest"
        )
    return tuple(dims)


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"
