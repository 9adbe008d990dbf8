"""Round checkpoints: one atomic ``.npz`` holding arrays and a JSON document for everything else.

A checkpoint is written after every completed round and replaced atomically (``os.replace``),
so a cloud killed at any moment resumes from the last completed round with the same model,
strategy state, RNG state and privacy ledger. No pickle: a checkpoint is data, never code.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

CHECKPOINT_SCHEMA = 1
_ARRAY = "__array__"


def _flatten(obj: Any, path: str, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(obj, np.ndarray):
        arrays[path] = obj
        return {_ARRAY: path}
    if isinstance(obj, dict):
        return {str(k): _flatten(v, f"{path}/{k}", arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{path}/{i}", arrays) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _unflatten(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_ARRAY}:
            return arrays[obj[_ARRAY]]
        return {k: _unflatten(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, arrays) for v in obj]
    return obj


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Writes ``state`` (nested dicts/lists of JSON values and NumPy arrays) atomically."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    doc = {"schema": CHECKPOINT_SCHEMA, "state": _flatten(state, "s", arrays)}
    buf = io.BytesIO()
    np.savez(buf, __doc__=np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8), **arrays)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """Reads a checkpoint written by :func:`save_checkpoint`.

    Raises:
        ValueError: the file is not a checkpoint or has an unknown schema.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"checkpoint {path}: unreadable: {exc}") from None
    raw = arrays.pop("__doc__", None)
    if raw is None:
        raise ValueError(f"checkpoint {path}: no __doc__ entry; not an edgesplit checkpoint")
    doc = json.loads(raw.tobytes().decode())
    if doc.get("schema") != CHECKPOINT_SCHEMA:
        raise ValueError(
            f"checkpoint {path}: schema {doc.get('schema')!r} not supported; "
            f"this build reads {CHECKPOINT_SCHEMA}"
        )
    return _unflatten(doc["state"], arrays)
