"""Split directories: save, reload, identical outputs; hashes guard the weights."""

from __future__ import annotations

import pytest
import torch

from split.errors import ManifestError
from split.graph import split_model
from split.manifest import Manifest
from split.store import load_split, save_split
from split.zoo import build_model


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb_bn(model, seed):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize(("name", "head_cut"), [("digits-cnn", None), ("mobilenet-mini", "head")])
def test_round_trip_gives_identical_outputs(tmp_path, name, head_cut):
    model, spec = build_model(name, seed=5)
    _perturb_bn(model, 5)
    x = torch.randn(4, *spec.input_shape, generator=torch.Generator().manual_seed(0))
    sm = split_model(model, cut=spec.default_cut, head_cut=head_cut, example_input=x[:1])
    manifest = save_split(
        sm, model, model_ref=name, num_classes=spec.num_classes, out_dir=tmp_path / "d"
    )
    expected_files = {"model.pt", "cloud.pt"} | ({"head.pt"} if head_cut else set())
    assert set(manifest.artifacts) == expected_files
    sm2, model2, manifest2 = load_split(tmp_path / "d")
    assert manifest2.digest() == manifest.digest()
    model.eval()
    sm2.eval()
    with torch.no_grad():
        assert torch.equal(model2(x), model(x))
        assert torch.equal(sm2.forward(x), model(x))
        assert torch.equal(sm2.edge(x), sm.edge(x))
    assert sm2.activation_shape == sm.activation_shape
    assert list(sm2.activation_shape) == manifest2.activation_shape


def test_tampered_weights_refuse_to_load(tmp_path):
    model, spec = build_model("digits-mlp", seed=0)
    sm = split_model(model, cut="act1", example_input=torch.zeros(1, *spec.input_shape))
    save_split(sm, model, model_ref="digits-mlp", num_classes=10, out_dir=tmp_path)
    raw = bytearray((tmp_path / "model.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "model.pt").write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match=r"model\.pt does not match"):
        load_split(tmp_path)


def test_updated_cloud_half_is_picked_up(tmp_path):
    model, spec = build_model("digits-mlp", seed=0)
    x = torch.zeros(1, *spec.input_shape)
    sm = split_model(model, cut="act1", example_input=x)
    manifest = save_split(sm, model, model_ref="digits-mlp", num_classes=10, out_dir=tmp_path)
    # The cloud trains its half and rewrites only cloud.pt (and its hash).
    trained, _ = build_model("digits-mlp", seed=1)
    cloud_sd = split_model(trained, cut="act1", example_input=x).cloud.state_dict()
    torch.save(cloud_sd, tmp_path / "cloud.pt")
    with pytest.raises(ManifestError, match=r"cloud\.pt"):
        load_split(tmp_path)
    manifest.add_artifact(tmp_path, "cloud.pt")
    manifest.save(tmp_path)
    sm2, model2, _ = load_split(tmp_path)
    assert torch.equal(model2.fc3.weight, trained.fc3.weight)
    assert torch.equal(model2.fc1.weight, model.fc1.weight)


def test_user_model_file_is_copied_in(tmp_path):
    src = tmp_path / "mymodel.py"
    src.write_text(
        "import torch.nn as nn\n"
        "INPUT_SHAPE = (5,)\nNUM_CLASSES = 3\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))\n"
    )
    model, spec = build_model(f"{src}:make", seed=2)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    sm = split_model(model, cut="1", example_input=x[:1])
    out = tmp_path / "split"
    manifest = save_split(sm, model, model_ref=f"{src}:make", num_classes=3, out_dir=out)
    assert manifest.model == "model_def.py:make"
    assert "model_def.py" in manifest.artifacts
    src.unlink()  # the directory must not need the original file
    sm2, model2, _ = load_split(out)
    with torch.no_grad():
        assert torch.equal(model2(x), model(x))
        assert torch.equal(sm2.forward(x), model(x))


def test_manifest_with_mismatched_activation_is_rejected(tmp_path):
    model, spec = build_model("digits-cnn", seed=0)
    sm = split_model(model, cut="pool2", example_input=torch.zeros(1, *spec.input_shape))
    save_split(sm, model, model_ref="digits-cnn", num_classes=10, out_dir=tmp_path)
    m = Manifest.load(tmp_path)
    m.activation_shape = [16, 4, 4]
    m.save(tmp_path)
    with pytest.raises(ManifestError, match="activation_shape in manifest is"):
        load_split(tmp_path)
