"""Manifest validation, round trip, digests and tamper detection; torch-free import."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from split.errors import ManifestError
from split.manifest import MANIFEST_SCHEMA, Manifest, sha256_file


def _manifest(**overrides) -> Manifest:
    fields = dict(
        schema_version=MANIFEST_SCHEMA,
        model="digits-cnn",
        cut="pool2",
        head_cut=None,
        input_shape=[1, 8, 8],
        input_dtype="float32",
        activation_shape=[16, 2, 2],
        activation_dtype="float32",
        num_classes=10,
        opset=None,
        artifacts={},
        extra={"note": "test"},
    )
    fields.update(overrides)
    return Manifest(**fields)


def test_sha256_file_matches_hashlib(tmp_path, rng):
    data = rng.bytes(3 * (1 << 20) + 17)  # spans several read chunks
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_round_trip_and_digest(tmp_path, rng):
    m = _manifest()
    (tmp_path / "model.pt").write_bytes(rng.bytes(1000))
    digest = m.add_artifact(tmp_path, "model.pt")
    assert digest == hashlib.sha256((tmp_path / "model.pt").read_bytes()).hexdigest()
    m.save(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert loaded == m
    assert loaded.digest() == m.digest()
    expected = hashlib.sha256(
        json.dumps(m.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    assert m.digest() == expected
    loaded.verify(tmp_path)
    loaded.cut = "pool1"
    assert loaded.digest() != m.digest()


def test_tampered_artifact_is_named(tmp_path, rng):
    m = _manifest()
    for name in ("model.pt", "cloud.pt"):
        (tmp_path / name).write_bytes(rng.bytes(256))
        m.add_artifact(tmp_path, name)
    m.verify(tmp_path)
    raw = bytearray((tmp_path / "model.pt").read_bytes())
    raw[100] ^= 0x01
    (tmp_path / "model.pt").write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match=r"model\.pt does not match its sha256") as info:
        m.verify(tmp_path)
    assert "cloud.pt" not in str(info.value)
    (tmp_path / "cloud.pt").unlink()
    with pytest.raises(ManifestError, match=r"cloud\.pt is missing"):
        m.verify(tmp_path)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ManifestError) as info:
        _manifest(cut="", input_shape=[1, 0], input_dtype="float8", num_classes=0, opset=3)
    msg = str(info.value)
    assert "\n" not in msg
    for field in (
        "cut must be",
        "input_shape must be",
        "input_dtype must be",
        "num_classes",
        "opset",
    ):
        assert field in msg


@pytest.mark.parametrize("name", ["../evil.pt", "/etc/passwd", "sub/x.pt", "manifest.json", ""])
def test_artifact_names_cannot_escape_directory(tmp_path, name):
    with pytest.raises(ManifestError, match="plain file name"):
        _manifest().add_artifact(tmp_path, name)
    with pytest.raises(ManifestError, match="plain file name"):
        _manifest(artifacts={name: "0" * 64})


def test_load_rejects_other_versions_and_bad_json(tmp_path):
    m = _manifest()
    m.save(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["schema_version"] = MANIFEST_SCHEMA + 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=f"schema_version must be {MANIFEST_SCHEMA}, got 2"):
        Manifest.load(tmp_path)
    data["schema_version"] = MANIFEST_SCHEMA
    data["colour"] = "red"
    del data["cut"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="missing fields: cut; unknown fields: colour"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(tmp_path)
    with pytest.raises(ManifestError, match="not found"):
        Manifest.load(tmp_path / "nowhere")


def test_split_and_manifest_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import split, split.manifest, split.errors, split.commands\n"
        "assert split.Manifest is split.manifest.Manifest\n"
        "assert 'split.graph' not in sys.modules\n"
        "try:\n    split.split_model\nexcept ImportError:\n    pass\n"
        "else:\n    raise SystemExit('torch-side export imported without torch')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_public_exports_are_sorted_and_resolve():
    import split

    assert split.__all__ == sorted(split.__all__)
    for name in split.__all__:
        assert getattr(split, name) is not None
