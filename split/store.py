"""Split directories: a manifest plus the weights needed to rebuild both halves."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from split.errors import ManifestError
from split.graph import SplitModel, split_model
from split.manifest import MANIFEST_SCHEMA, Manifest
from split.zoo import build_model, is_file_ref

MODEL_FILE = "model.pt"
CLOUD_FILE = "cloud.pt"
HEAD_FILE = "head.pt"
# A user model file is copied in, so the directory rebuilds without the original path.
MODEL_SOURCE_FILE = "model_def.py"

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.float64: "float64"}


def _dtype_of(module: nn.Module) -> str:
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return _DTYPE_NAMES.get(tensor.dtype, "float32")
    return "float32"


def save_split(
    sm: SplitModel,
    model: nn.Module,
    *,
    model_ref: str,
    num_classes: int,
    out_dir: str | os.PathLike,
    extra: dict | None = None,
) -> Manifest:
    """Writes a split directory: ``manifest.json``, ``model.pt``, ``cloud.pt`` [, ``head.pt``].

    Args:
        sm: The halves (cut from ``model``).
        model: The unsplit model; its full state dict goes to ``model.pt``.
        model_ref: Zoo name or ``file.py:factory``; the file is copied into the directory as
            ``model_def.py`` (so it must not import sibling modules of its own).
        num_classes: Number of output logits.
        out_dir: Directory to create or update.
        extra: Free-form metadata stored in the manifest.

    Returns:
        The manifest written, with every artifact hashed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = dict(extra or {})
    ref = model_ref
    artifacts = []
    if is_file_ref(model_ref):
        path_str, _, attr = model_ref.rpartition(":")
        shutil.copyfile(path_str, out / MODEL_SOURCE_FILE)
        ref = f"{MODEL_SOURCE_FILE}:{attr}"
        extra.setdefault("model_source", model_ref)
        artifacts.append(MODEL_SOURCE_FILE)
    torch.save(model.state_dict(), out / MODEL_FILE)
    torch.save(sm.cloud.state_dict(), out / CLOUD_FILE)
    artifacts += [MODEL_FILE, CLOUD_FILE]
    if sm.head is not None:
        torch.save(sm.head.state_dict(), out / HEAD_FILE)
        artifacts.append(HEAD_FILE)
    dtype = _dtype_of(sm.edge) if any(True for _ in sm.edge.parameters()) else _dtype_of(model)
    extra.setdefault(
        "parameters",
        {
            "edge": sum(p.numel() for p in sm.edge.parameters()),
            "cloud": sum(p.numel() for p in sm.cloud.parameters()),
            "head": sum(p.numel() for p in sm.head.parameters()) if sm.head is not None else 0,
        },
    )
    if sm.head_activation_shape is not None:
        extra.setdefault("head_activation_shape", list(sm.head_activation_shape))
    manifest = Manifest(
        schema_version=MANIFEST_SCHEMA,
        model=ref,
        cut=sm.cut,
        head_cut=sm.head_cut,
        input_shape=list(sm.input_shape),
        input_dtype=dtype,
        activation_shape=list(sm.activation_shape),
        activation_dtype=dtype,
        num_classes=int(num_classes),
        opset=None,
        artifacts={},
        extra=extra,
    )
    for name in artifacts:
        manifest.add_artifact(out, name)
    manifest.save(out)
    return manifest


def _load_state(directory: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return torch.load(directory / name, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ManifestError(f"{name} in {directory} cannot be read: {exc}") from None


def _load_into(module: nn.Module, state: dict, name: str, ref: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ManifestError(f"{name} does not fit model {ref!r}: {first}") from None


def load_split(directory: str | os.PathLike) -> tuple[SplitModel, nn.Module, Manifest]:
    """Rebuilds the model and its halves from a split directory, after checking every hash.

    ``cloud.pt`` and ``head.pt`` are loaded after ``model.pt``, so a cloud that updates only its
    half (and re-hashes it) is picked up. Weights load with ``weights_only=True``, but a directory
    made from a user model file runs its ``model_def.py``: load only directories you trust (the
    hashes detect corruption, not a forger who rewrites the manifest too).

    Returns:
        (halves, unsplit model, manifest); the modules are in eval mode and share weights.

    Raises:
        ManifestError: Bad manifest, missing/altered artifact, or weights that do not fit.
    """
    directory = Path(directory)
    manifest = Manifest.load(directory)
    manifest.verify(directory)
    model, _ = build_model(
        manifest.model, input_shape=tuple(manifest.input_shape), base_dir=directory
    )
    dtype = getattr(torch, manifest.input_dtype)
    model.to(dtype)
    if MODEL_FILE not in manifest.artifacts:
        raise ManifestError(f"manifest in {directory} lists no {MODEL_FILE}")
    _load_into(model, _load_state(directory, MODEL_FILE), MODEL_FILE, manifest.model)
    example = torch.zeros((1, *manifest.input_shape), dtype=dtype)
    sm = split_model(model, cut=manifest.cut, head_cut=manifest.head_cut, example_input=example)
    if list(sm.activation_shape) != manifest.activation_shape:
        raise ManifestError(
            f"activation_shape in manifest is {manifest.activation_shape}, but the rebuilt "
            f"model gives {list(sm.activation_shape)} at cut={manifest.cut!r}"
        )
    for name, half in ((CLOUD_FILE, sm.cloud), (HEAD_FILE, sm.head)):
        if half is not None and name in manifest.artifacts:
            _load_into(half, _load_state(directory, name), name, manifest.model)
    model.eval()
    return sm, model, manifest
