"""The manifest of a split directory: what was cut where, and the hash of every artifact."""

# Devices read manifests, so this module must import without torch (stdlib only).

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from split.errors import ManifestError

MANIFEST_SCHEMA = 1
MANIFEST_FILE = "manifest.json"
DTYPES = ("float32", "float16", "float64", "int8", "uint8")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_shape(value: object) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value)
    )


def _bad_filename(name: object) -> bool:
    # Artifacts are looked up inside the split directory only: no paths, no traversal.
    return (
        not isinstance(name, str)
        or not name
        or name in (".", "..", MANIFEST_FILE)
        or "/" in name
        or "\\" in name
        or name.startswith(".")
    )


@dataclass
class Manifest:
    """Describes a split directory; devices and the cloud compare its ``digest()``.

    Attributes:
        schema_version: Must equal ``MANIFEST_SCHEMA``; other versions are rejected.
        model: Zoo name or ``file.py:factory`` reference the model is rebuilt from.
        cut: Edge/cloud cut point.
        head_cut: Cloud/head cut point for U-shaped learning, or None.
        input_shape: Per-sample input shape.
        input_dtype: dtype of the edge input, e.g. "float32".
        activation_shape: Per-sample shape of the tensor crossing ``cut``.
        activation_dtype: dtype the activation is computed in.
        num_classes: Number of output logits.
        opset: ONNX opset of exported halves, or None before export.
        artifacts: File name (inside the directory) -> SHA-256 hex of its bytes.
        extra: Free-form JSON metadata (export report, quantization, training record).
    """

    schema_version: int
    model: str
    cut: str
    head_cut: str | None
    input_shape: list[int]
    input_dtype: str
    activation_shape: list[int]
    activation_dtype: str
    num_classes: int
    opset: int | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.input_shape = list(self.input_shape)
        self.activation_shape = list(self.activation_shape)
        self.validate()

    def problems(self) -> list[str]:
        """Every rule the fields break, as short phrases (empty when valid)."""
        out = []
        if self.schema_version != MANIFEST_SCHEMA:
            out.append(
                f"schema_version must be {MANIFEST_SCHEMA}, got {self.schema_version!r} "
                "(written by another edgesplit version?)"
            )
        for name in ("model", "cut"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                out.append(f"{name} must be a non-empty string, got {value!r}")
        if self.head_cut is not None and (not isinstance(self.head_cut, str) or not self.head_cut):
            out.append(f"head_cut must be null or a non-empty string, got {self.head_cut!r}")
        for name in ("input_shape", "activation_shape"):
            if not _is_shape(getattr(self, name)):
                out.append(f"{name} must be a list of positive ints, got {getattr(self, name)!r}")
        for name in ("input_dtype", "activation_dtype"):
            value = getattr(self, name)
            if value not in DTYPES:
                out.append(f"{name} must be one of {', '.join(DTYPES)}, got {value!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            out.append(f"num_classes must be an int >= 1, got {self.num_classes!r}")
        if self.opset is not None and (not isinstance(self.opset, int) or self.opset < 7):
            out.append(f"opset must be null or an int >= 7, got {self.opset!r}")
        if not isinstance(self.artifacts, dict):
            out.append(f"artifacts must be an object, got {type(self.artifacts).__name__}")
        else:
            for name, digest in self.artifacts.items():
                if _bad_filename(name):
                    out.append(f"artifact name must be a plain file name, got {name!r}")
                if not isinstance(digest, str) or not _HEX64.match(digest):
                    out.append(f"artifact {name!r} must have a sha256 hex digest, got {digest!r}")
        if not isinstance(self.extra, dict):
            out.append(f"extra must be an object, got {type(self.extra).__name__}")
        return out

    def validate(self) -> None:
        """Raises ManifestError listing every broken rule at once."""
        found = self.problems()
        if found:
            raise ManifestError("invalid manifest: " + "; ".join(found))

    @property
    def activation_numel(self) -> int:
        """Elements per sample in the activation crossing the cut."""
        return math.prod(self.activation_shape)

    def to_dict(self) -> dict:
        """The manifest as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> Manifest:
        """Builds a manifest from parsed JSON, rejecting missing and unknown fields.

        Raises:
            ManifestError: Not an object, missing/unknown fields, or a broken rule.
        """
        if not isinstance(data, dict):
            raise ManifestError(f"manifest must be a JSON object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        # The version decides which fields exist, so check it before the field set.
        version = data.get("schema_version")
        if version != MANIFEST_SCHEMA:
            raise ManifestError(
                f"manifest schema_version must be {MANIFEST_SCHEMA}, got {version!r} "
                "(written by another edgesplit version?)"
            )
        required = [n for n in names if n not in ("opset", "artifacts", "extra")]
        missing = [n for n in required if n not in data]
        unknown = sorted(set(data) - set(names))
        if missing or unknown:
            parts = []
            if missing:
                parts.append("missing fields: " + ", ".join(missing))
            if unknown:
                parts.append("unknown fields: " + ", ".join(unknown))
            raise ManifestError("invalid manifest: " + "; ".join(parts))
        return cls(**data)

    def canonical_json(self) -> str:
        """Key-sorted, whitespace-free JSON: the same bytes on every platform."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def digest(self) -> str:
        """SHA-256 hex of ``canonical_json()``: the model hash devices and cloud compare."""
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()

    def save(self, directory: str | os.PathLike) -> Path:
        """Validates and writes ``manifest.json`` into ``directory`` (atomically).

        Returns:
            The path written.
        """
        self.validate()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / MANIFEST_FILE
        tmp = directory / f".{MANIFEST_FILE}.tmp"
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", "utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Manifest:
        """Reads and validates ``directory/manifest.json``.

        Raises:
            ManifestError: The file is missing, not JSON, or breaks a rule.
        """
        path = Path(directory) / MANIFEST_FILE
        try:
            text = path.read_text("utf-8")
        except FileNotFoundError:
            raise ManifestError(f"{path} not found (not a split directory?)") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path} is not valid JSON: {exc}") from None
        try:
            return cls.from_dict(data)
        except ManifestError as exc:
            raise ManifestError(f"{path}: {exc}") from None
        except TypeError as exc:
            raise ManifestError(f"{path}: invalid manifest: {exc}") from None

    def add_artifact(self, directory: str | os.PathLike, filename: str) -> str:
        """Hashes ``directory/filename`` and records it; returns the hex digest.

        Raises:
            ManifestError: ``filename`` is not a plain file name or does not exist.
        """
        if _bad_filename(filename):
            raise ManifestError(f"artifact name must be a plain file name, got {filename!r}")
        path = Path(directory) / filename
        if not path.is_file():
            raise ManifestError(f"artifact {filename!r} not found in {directory}")
        self.artifacts[filename] = sha256_file(path)
        return self.artifacts[filename]

    def verify(self, directory: str | os.PathLike) -> None:
        """Checks every artifact exists in ``directory`` and matches its recorded hash.

        Raises:
            ManifestError: Names every missing or altered file.
        """
        problems = []
        for name, expected in sorted(self.artifacts.items()):
            path = Path(directory) / name
            if not path.is_file():
                problems.append(f"{name} is missing")
            elif sha256_file(path) != expected:
                problems.append(f"{name} does not match its sha256 (altered or corrupt)")
        if problems:
            raise ManifestError(f"split directory {directory}: " + "; ".join(problems))
