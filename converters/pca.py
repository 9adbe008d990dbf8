"""A frozen PCA projection of cut-layer activations: fitted once, shipped inside the edge ONNX."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.errors import CodecError, ConfigError

PCA_FILE = "pca.npz"
PCA_ONNX_FILE = "edge.pca.onnx"
CODE_NAME = "code"  # output of edge.pca.onnx


@dataclass(frozen=True, eq=False)
class PcaProjection:
    """A frozen PCA fitted once offline: ``code = (a - mean) @ components.T``.

    Attributes:
        mean: Per-feature mean of the flattened training activations, shape ``(F,)``.
        components: Orthonormal rows, shape ``(D, F)``, largest variance first.
        explained: Share of the training variance each component keeps, shape ``(D,)``.
    """

    mean: np.ndarray
    components: np.ndarray
    explained: np.ndarray

    def __post_init__(self) -> None:
        m, c = np.asarray(self.mean), np.asarray(self.components)
        if m.ndim != 1 or c.ndim != 2 or c.shape[1] != m.shape[0] or c.shape[0] < 1:
            raise ConfigError(
                f"pca mean (F,) and components (D, F) must agree, got {m.shape}, {c.shape}"
            )
        if not (np.isfinite(m).all() and np.isfinite(c).all()):
            raise ConfigError("pca mean and components must be finite")
        gram = c.astype(np.float64) @ c.T.astype(np.float64)
        if np.abs(gram - np.eye(len(c))).max() > 1e-3:
            raise ConfigError("pca components must be orthonormal rows (C @ C.T = I within 1e-3)")
        object.__setattr__(self, "mean", m.astype(np.float32))
        object.__setattr__(self, "components", c.astype(np.float32))
        object.__setattr__(self, "explained", np.asarray(self.explained, np.float64))

    @property
    def dim(self) -> int:
        """Code size D."""
        return int(self.components.shape[0])

    @property
    def features(self) -> int:
        """Flattened activation size F."""
        return int(self.components.shape[1])

    def project(self, a: np.ndarray) -> np.ndarray:
        """Codes ``(N, D)`` for activations ``(N, ...)`` with F features per sample."""
        flat = np.asarray(a, np.float32).reshape(len(a), -1)
        if flat.shape[1] != self.features:
            raise CodecError(f"pca needs {self.features} features per sample, got {flat.shape[1]}")
        return (flat - self.mean) @ self.components.T

    def reconstruct(self, codes: np.ndarray) -> np.ndarray:
        """Flat activations ``(N, F)`` back from codes ``(N, D)``."""
        return np.asarray(codes, np.float32) @ self.components + self.mean

    def save(self, path: str | Path) -> None:
        """Writes an ``.npz`` (no pickles) with mean, components and explained variance."""
        with open(path, "wb") as fh:
            np.savez(fh, mean=self.mean, components=self.components, explained=self.explained)

    @classmethod
    def load(cls, path: str | Path) -> PcaProjection:
        """Reads what :meth:`save` wrote; raises ConfigError if it is not a valid projection."""
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(mean=z["mean"], components=z["components"], explained=z["explained"])
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"{path} is not a PCA projection: {exc}") from None


def fit_pca(activations: np.ndarray, dim: int) -> PcaProjection:
    """Fits a PCA once on training activations ``(N, ...)``; signs fixed for reproducibility.

    Raises:
        ConfigError: ``dim`` outside ``[1, min(N, F)]`` or non-finite activations.
    """
    flat = np.asarray(activations, np.float64).reshape(len(activations), -1)
    n, f = flat.shape
    if not 1 <= dim <= min(n, f):
        raise ConfigError(f"pca dim must be in [1, min(N={n}, F={f})], got {dim}")
    if not np.isfinite(flat).all():
        raise ConfigError("pca training activations must be finite")
    mean = flat.mean(axis=0)
    _, s, vt = np.linalg.svd(flat - mean, full_matrices=False)
    comps = vt[:dim]
    # SVD signs are arbitrary; make each component's largest entry positive.
    signs = np.sign(comps[np.arange(dim), np.abs(comps).argmax(axis=1)])
    comps = comps * signs[:, None]
    var = s**2
    return PcaProjection(mean=mean, components=comps, explained=var[:dim] / max(var.sum(), 1e-300))


def export_pca_onnx(edge_onnx: str | Path, projection: PcaProjection, out_path: str | Path) -> None:
    """Appends ``Flatten -> Sub(mean) -> MatMul(components.T)`` to the edge graph.

    The new graph's single output ``code`` has shape ``(N, D)``; the activation output is gone.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(edge_onnx))
    graph = model.graph
    old = graph.output[0]
    nodes = [
        helper.make_node("Flatten", [old.name], ["pca_flat"], axis=1, name="pca_flatten"),
        helper.make_node("Sub", ["pca_flat", "pca_mean"], ["pca_centered"], name="pca_sub"),
        helper.make_node("MatMul", ["pca_centered", "pca_basis"], [CODE_NAME], name="pca_matmul"),
    ]
    graph.initializer.extend(
        [
            numpy_helper.from_array(projection.mean, "pca_mean"),
            numpy_helper.from_array(np.ascontiguousarray(projection.components.T), "pca_basis"),
        ]
    )
    graph.node.extend(nodes)
    batch = old.type.tensor_type.shape.dim[0]
    out = helper.make_tensor_value_info(CODE_NAME, TensorProto.FLOAT, [None, projection.dim])
    out.type.tensor_type.shape.dim[0].CopyFrom(batch)
    del graph.output[:]
    graph.output.append(out)
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))


def attach_pca(directory: str | Path, x_train: np.ndarray, *, dim: int) -> PcaProjection:
    """Fits a PCA on the edge activations of ``x_train`` and stores it in a split directory.

    Writes ``pca.npz`` and ``edge.pca.onnx`` (from the exported ``edge.onnx``), hashes both into
    the manifest (so the model hash covers the projection) and records the fit under
    ``manifest.extra["pca"]``. Re-running ``edgesplit export`` makes both stale: fit again.
    """
    import onnxruntime as ort

    from split.manifest import Manifest, sha256_file

    directory = Path(directory)
    manifest = Manifest.load(directory)
    edge_path = directory / "edge.onnx"
    if not edge_path.is_file() or sha256_file(edge_path) != manifest.artifacts.get("edge.onnx"):
        raise ConfigError(f"{edge_path} is missing or not the manifest's; run edgesplit export")
    session = ort.InferenceSession(str(edge_path), providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(x_train, dtype=np.float32)
    proj = fit_pca(session.run(None, {session.get_inputs()[0].name: x})[0], dim)
    proj.save(directory / PCA_FILE)
    export_pca_onnx(edge_path, proj, directory / PCA_ONNX_FILE)
    for name in (PCA_FILE, PCA_ONNX_FILE):
        manifest.add_artifact(directory, name)
    manifest.extra["pca"] = {
        "dim": dim,
        "features": proj.features,
        "fit_samples": len(x_train),
        "explained_variance": float(proj.explained.sum()),
        "edge_onnx_sha256": manifest.artifacts["edge.onnx"],
    }
    manifest.save(directory)
    return proj


def load_pca(directory: str | Path) -> PcaProjection | None:
    """The split directory's frozen projection, or None if it has none.

    Raises:
        ConfigError: The projection was fitted on another ``edge.onnx`` (re-exported since).
    """
    from split.manifest import Manifest, sha256_file

    manifest = Manifest.load(directory)
    record = manifest.extra.get("pca")
    if record is None or PCA_FILE not in manifest.artifacts:
        return None
    if record.get("edge_onnx_sha256") != manifest.artifacts.get("edge.onnx"):
        raise ConfigError(
            f"{directory}/{PCA_FILE} was fitted on another edge.onnx; run attach_pca again "
            f"(recorded for {str(record.get('edge_onnx_sha256'))[:16]}...)"
        )
    path = Path(directory) / PCA_FILE
    if not path.is_file() or sha256_file(path) != manifest.artifacts[PCA_FILE]:
        raise ConfigError(f"{path} is missing or does not match its manifest sha256")
    return PcaProjection.load(path)
