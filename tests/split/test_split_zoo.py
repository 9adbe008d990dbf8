"""The model zoo: registry errors, seeded builds, stable names, user model files."""

from __future__ import annotations

import pytest
import torch

from split.errors import InputShapeError
from split.zoo import build_model, get_spec, list_models


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError) as info:
        get_spec("resnet-999")
    for name in list_models():
        assert name in str(info.value)
    with pytest.raises(ValueError, match="resnet-999"):
        build_model("resnet-999")


@pytest.mark.parametrize("name", list_models())
def test_seeded_build_is_deterministic_and_names_are_stable(name):
    a, spec = build_model(name, seed=11)
    b, _ = build_model(name, seed=11)
    c, _ = build_model(name, seed=12)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert list(sa) == list(sb) == list(sc)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    out = a.eval()(torch.zeros(2, *spec.input_shape))
    assert out.shape == (2, spec.num_classes)
    assert spec.default_cut  # every zoo model offers a default cut


def test_seed_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_model("digits-cnn", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_digits_models_are_small():
    for name in ("digits-mlp", "digits-cnn"):
        model, _ = build_model(name, seed=0)
        assert sum(p.numel() for p in model.parameters()) < 20_000


def test_mobilenet_accepts_colour_input():
    model, spec = build_model("mobilenet-mini", seed=0, input_shape=(3, 32, 32))
    assert spec.input_shape == (3, 32, 32)
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert spec.factory().stem[0].in_channels == 3


def test_wrong_input_shape_is_one_line():
    with pytest.raises(InputShapeError) as info:
        build_model("digits-cnn", input_shape=(3, 8, 8))
    assert str(info.value).startswith("input_shape=(3, 8, 8) does not fit model 'digits-cnn'")
    assert "\n" not in str(info.value)


def test_user_file_model(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 2))\n"
    )
    with pytest.raises(ValueError, match="defines no INPUT_SHAPE"):
        build_model(f"{path}:build")
    model, spec = build_model(f"{path}:build", input_shape=(3, 4), seed=0)
    assert spec.num_classes == 2 and spec.input_shape == (3, 4)
    assert spec.name == f"{path}:build"
    with pytest.raises(ValueError, match="has no callable 'missing'"):
        build_model(f"{path}:missing", input_shape=(3, 4))
    with pytest.raises(ValueError, match="not found"):
        build_model(f"{tmp_path / 'nope.py'}:build", input_shape=(3, 4))
