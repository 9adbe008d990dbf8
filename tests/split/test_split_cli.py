"""``edgesplit split`` through the dispatcher: listing cuts, writing directories, errors."""

from __future__ import annotations

import json

import pytest
import torch

from converters.cli import main
from split.graph import valid_cuts
from split.manifest import Manifest
from split.store import load_split
from split.zoo import build_model


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["digits-cnn", "mobilenet-mini"])
def test_list_cuts_json(capsys, name):
    assert main(["split", name, "--list-cuts", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    model, spec = build_model(name, seed=0)
    assert [r["name"] for r in rows] == valid_cuts(model, torch.zeros(1, *spec.input_shape))
    assert all(
        r["edge_flops"] + r["cloud_flops"] == rows[0]["edge_flops"] + rows[0]["cloud_flops"]
        for r in rows
    )


def test_list_cuts_table(capsys):
    assert main(["split", "digits-mlp", "--list-cuts"]) == 0
    out = capsys.readouterr().out
    assert "*act1" in out  # the default cut is marked
    assert "fc2" in out


def test_split_writes_loadable_directory(tmp_path, capsys):
    out = tmp_path / "d"
    code = main(["split", "digits-cnn", "--cut", "pool1", "--out", str(out), "--seed", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    manifest = Manifest.load(out)
    assert manifest.digest() in printed
    assert manifest.cut == "pool1"
    sm, model, _ = load_split(out)
    reference, _ = build_model("digits-cnn", seed=3)
    reference.eval()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(sm.forward(x), reference(x))


def test_split_with_training_and_json(tmp_path, capsys):
    out = tmp_path / "d"
    args = ["split", "digits-mlp", "--out", str(out), "--train-epochs", "3", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["cut"] == "act1" and summary["head_cut"] is None
    assert summary["digest"] == Manifest.load(out).digest()
    assert summary["extra"]["training"]["test_accuracy"] > 0.8


def test_split_u_shape(tmp_path, capsys):
    out = tmp_path / "u"
    args = ["split", "digits-mlp", "--cut", "act1", "--head-cut", "act2", "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    assert (out / "head.pt").exists()
    sm, _, manifest = load_split(out)
    assert manifest.head_cut == "act2" and sm.head is not None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["split", "no-such-model", "--list-cuts"], "known models: digits-cnn, digits-mlp"),
        (["split", "digits-cnn", "--cut", "layer9", "--out", "X"], "valid cut points: conv1"),
        (["split", "digits-cnn", "--list-cuts", "--input-shape", "3,8,8"], "does not fit model"),
        (["split", "mnist-cnn", "--out", "X", "--train-epochs", "1"], "pass --weights"),
        (["split", "digits-cnn"], "--out DIR is required"),
    ],
)
def test_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgesplit split: error: ")
    assert message in err
    assert "\n" not in err
    assert not (tmp_path / "X").exists()  # nothing written on error


def test_weights_are_loaded_and_checked(tmp_path, capsys):
    source, _ = build_model("digits-mlp", seed=42)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "d"
    assert (
        main(["split", "digits-mlp", "--weights", str(tmp_path / "w.pt"), "--out", str(out)]) == 0
    )
    _, model, _ = load_split(out)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    code = main(["split", "digits-cnn", "--weights", str(tmp_path / "w.pt"), "--out", str(out)])
    assert code == 2
    assert "does not fit 'digits-cnn'" in capsys.readouterr().err
