"""FLOPs, weight bytes and activation bytes of cut points against independent oracles."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from split.cuts import list_cuts, node_flops, total_flops
from split.graph import split_model, trace_cuts, valid_cuts
from split.zoo import build_model, list_models


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_linear_flops_hand_oracle():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    infos = {c.name: c for c in list_cuts(model, torch.zeros(3, 64))}
    assert list(infos) == ["0", "1"]
    assert infos["0"].edge_flops == 64 * 32
    assert infos["0"].cloud_flops == 32 + 32 * 10  # ReLU one per element, then the MACs
    assert infos["1"].edge_flops == 64 * 32 + 32
    assert infos["0"].edge_param_bytes == (64 * 32 + 32) * 4
    assert infos["0"].cloud_param_bytes == (32 * 10 + 10) * 4


def test_conv_and_pool_flops_hand_oracle():
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.Conv2d(6, 6, 3, padding=1, groups=6),  # depthwise
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 3),
    )
    infos = {c.name: c for c in list_cuts(model, torch.zeros(1, 2, 8, 8))}
    conv = 8 * 8 * 6 * 2 * 9
    depthwise = 8 * 8 * 6 * 1 * 9
    pool = 6 * 8 * 8  # one per input element
    assert infos["0"].edge_flops == conv
    assert infos["1"].edge_flops == conv + depthwise
    assert infos["2"].edge_flops == conv + depthwise + pool
    assert infos["3"].edge_flops == infos["2"].edge_flops  # flatten is free
    assert infos["3"].cloud_flops == 96 * 3
    assert infos["2"].activation_shape == (6, 4, 4)


@pytest.mark.parametrize("name", list_models())
def test_mac_count_matches_torch_flop_counter(name):
    """torch counts 2 FLOPs per multiply-accumulate of conv/linear and ignores the rest."""
    model, spec = build_model(name, seed=0)
    model.eval()
    x = torch.zeros(1, *spec.input_shape)
    cg = trace_cuts(model, x)
    macs = 0
    for node in cg.nodes:
        if node.op == "call_module":
            module = cg.gm.get_submodule(str(node.target))
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                macs += node_flops(node, module)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    assert 2 * macs == counter.get_total_flops()


@pytest.mark.parametrize("name", list_models())
def test_every_cut_partitions_work_weights_and_sizes(name):
    model, spec = build_model(name, seed=0)
    x = torch.zeros(2, *spec.input_shape)
    infos = list_cuts(model, x[:1])
    total = total_flops(model, x[:1])
    assert [c.name for c in infos] == valid_cuts(model, x[:1])
    previous = 0
    for info in infos:
        assert info.edge_flops + info.cloud_flops == total
        assert info.edge_flops >= previous
        previous = info.edge_flops
        sm = split_model(model, cut=info.name, example_input=x[:1])
        edge_sd, cloud_sd = sm.edge.state_dict(), sm.cloud.state_dict()
        assert info.edge_param_bytes == sum(t.numel() * t.element_size() for t in edge_sd.values())
        assert info.cloud_param_bytes == sum(
            t.numel() * t.element_size() for t in cloud_sd.values()
        )
        with torch.no_grad():
            act = sm.edge(x)
        numel = act[0].numel()
        assert info.activation_shape == tuple(act.shape[1:])
        assert info.activation_bytes["float32"] == act[0].numpy().nbytes
        assert info.activation_bytes["float16"] == act[0].half().numpy().nbytes
        scales = act.shape[1] if act.dim() > 2 else 1
        assert info.activation_bytes["int8"] == numel + 4 * scales


def test_flops_are_per_sample():
    model, spec = build_model("digits-cnn", seed=0)
    one = total_flops(model, torch.zeros(1, *spec.input_shape))
    eight = total_flops(model, torch.zeros(8, *spec.input_shape))
    assert one == eight > 0


def test_as_dict_is_json_ready():
    import json

    model, spec = build_model("digits-mlp", seed=0)
    info = list_cuts(model, torch.zeros(1, *spec.input_shape))[0]
    data = json.loads(json.dumps(info.as_dict()))
    assert data["name"] == info.name
    assert data["activation_shape"] == list(info.activation_shape)
