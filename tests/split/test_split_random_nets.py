"""Hypothesis-generated networks (skips, concatenations, views): composition and cut oracles."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from split.cuts import list_cuts, total_flops
from split.graph import merge_state, split_model, split_state, trace_cuts

CONV_KINDS = ["conv", "res", "cat", "pool", "bnrelu", "frelu"]
FC_KINDS = ["fc", "frelu", "relu"]


class _RandomNet(nn.Module):
    """Builds the layers a plan names; ``forward`` applies them with their wiring."""

    def __init__(self, conv_plan, flatten, fc_plan, in_ch, side, classes) -> None:
        super().__init__()
        self.kinds: list[str] = []
        self.layers = nn.ModuleList()
        ch = in_ch
        for kind in conv_plan:
            if kind == "pool" and side < 2:
                continue
            layer: nn.Module
            if kind == "conv":
                layer = nn.Conv2d(ch, ch + 1, 3, padding=1)
                ch += 1
            elif kind == "res":
                layer = nn.Sequential(
                    nn.Conv2d(ch, ch, 1), nn.BatchNorm2d(ch), nn.ReLU(), nn.Conv2d(ch, ch, 3, 1, 1)
                )
            elif kind == "cat":
                layer = nn.Conv2d(ch, 2, 1)
                ch += 2
            elif kind == "pool":
                layer = nn.MaxPool2d(2)
                side //= 2
            elif kind == "bnrelu":
                layer = nn.Sequential(nn.BatchNorm2d(ch), nn.ReLU())
            else:
                layer = nn.Identity()
            self.kinds.append(kind)
            self.layers.append(layer)
        self.kinds.append(flatten)
        self.layers.append(nn.Flatten() if flatten == "flat" else nn.Identity())
        width = ch * side * side
        for kind in fc_plan:
            if kind == "fc":
                layer = nn.Linear(width, 6)
                width = 6
            else:
                layer = nn.ReLU() if kind == "relu" else nn.Identity()
            self.kinds.append(kind)
            self.layers.append(layer)
        self.kinds.append("fc")
        self.layers.append(nn.Linear(width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for kind, layer in zip(self.kinds, self.layers, strict=True):
            if kind == "res":
                x = x + layer(x)
            elif kind == "cat":
                x = torch.cat([x, layer(x)], dim=1)
            elif kind == "frelu":
                x = torch.relu(x)
            elif kind == "view":
                x = x.view(x.size(0), -1)
            else:
                x = layer(x)
        return x


plans = st.fixed_dictionaries(
    {
        "conv_plan": st.lists(st.sampled_from(CONV_KINDS), min_size=1, max_size=5),
        "flatten": st.sampled_from(["flat", "view"]),
        "fc_plan": st.lists(st.sampled_from(FC_KINDS), max_size=3),
        "in_ch": st.integers(1, 3),
        "side": st.sampled_from([2, 4, 6]),
        "classes": st.integers(2, 5),
    }
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans, seed=st.integers(0, 2**16))
def test_random_nets_split_exactly_where_one_tensor_crosses(plan, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _RandomNet(**plan)
        for p in net.parameters():
            nn.init.normal_(p, std=0.5)
        x = torch.randn(3, plan["in_ch"], plan["side"], plan["side"])
    net, x = net.double().eval(), x.double()
    cg = trace_cuts(net, x[:1])
    # Oracle: after node k exactly the node itself is used later (parameters excepted).
    order = {n: i for i, n in enumerate(cg.nodes)}
    last = max(i for i, n in enumerate(cg.nodes) if n.op.startswith("call"))
    for k, node in enumerate(cg.nodes):
        if not node.op.startswith("call") or k >= last:
            continue
        crossing = {
            n
            for n in cg.nodes[: k + 1]
            if n.op != "get_attr" and any(order[u] > k for u in n.users)
        }
        assert (crossing == {node}) == (k in cg.cuts.values()), node.name
    expected = net(x)
    total = total_flops(net, x[:1])
    for info in list_cuts(net, x[:1]):
        sm = split_model(net, cut=info.name, example_input=x[:1])
        assert torch.equal(sm.cloud(sm.edge(x)), expected), info.name
        assert info.edge_flops + info.cloud_flops == total
        edge_sd, cloud_sd = split_state(net.state_dict(), sm)
        assert set(merge_state(edge_sd, cloud_sd)) == set(net.state_dict())
