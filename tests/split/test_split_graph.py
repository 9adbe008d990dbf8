"""cloud(edge(x)) against the unsplit model on every zoo model and cut, plus cut validity."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from split.errors import InputShapeError, SplitPointError
from split.graph import merge_state, split_model, split_state, trace_cuts, valid_cuts
from split.zoo import build_model, list_models


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models on a shared 2-core machine: one intra-op thread is ~8x faster than two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _zoo_cuts() -> list[tuple[str, str]]:
    pairs = []
    for name in list_models():
        model, spec = build_model(name, seed=0)
        pairs += [(name, c) for c in valid_cuts(model, torch.zeros(1, *spec.input_shape))]
    return pairs


ZOO_CUTS = _zoo_cuts()


def _model(name: str, dtype=torch.float32, seed: int = 0):
    model, spec = build_model(name, seed=seed)
    model.to(dtype)
    # Non-trivial BatchNorm statistics so eval mode is not the identity transform.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            g = torch.Generator().manual_seed(seed)
            m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=dtype))
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=dtype) + 0.5)
    return model, spec


def _input(spec, batch: int, dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *spec.input_shape, generator=g, dtype=dtype)


@pytest.mark.parametrize(("name", "cut"), ZOO_CUTS)
def test_composition_matches_unsplit_model(name, cut):
    for dtype in (torch.float64, torch.float32):
        model, spec = _model(name, dtype)
        x = _input(spec, 5, dtype)
        sm = split_model(model, cut=cut, example_input=x[:1])
        model.eval()
        sm.eval()
        with torch.no_grad():
            expected = model(x)
            act = sm.edge(x)
            got = sm.cloud(act)
        assert tuple(act.shape[1:]) == sm.activation_shape
        if dtype is torch.float64:
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list_models())
def test_train_mode_forward_and_gradients_match(name):
    model, spec = _model(name, torch.float64)
    twin = copy.deepcopy(model)
    x = _input(spec, 6, torch.float64)
    cut = spec.default_cut
    sm = split_model(twin, cut=cut, example_input=x[:1])
    model.train()
    sm.train()
    out_full, out_split = model(x), sm.forward(x)
    assert torch.equal(out_full, out_split)
    out_full.square().sum().backward()
    out_split.square().sum().backward()
    for (key, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), key


@pytest.mark.parametrize("name", list_models())
def test_u_shape_matches_for_all_cut_pairs(name):
    model, spec = _model(name, torch.float64)
    model.eval()
    x = _input(spec, 3, torch.float64)
    cuts = valid_cuts(model, x[:1])
    pairs = list(itertools.combinations(cuts, 2))
    if len(pairs) > 40:  # mobilenet-mini: a spread of pairs keeps the test fast
        pairs = pairs[::5]
    expected = model(x)
    for cut, head_cut in pairs:
        sm = split_model(model, cut=cut, head_cut=head_cut, example_input=x[:1])
        sm.eval()
        mid = sm.cloud(sm.edge(x))
        assert tuple(mid.shape[1:]) == sm.head_activation_shape
        assert torch.equal(sm.head(mid), expected), (cut, head_cut)


def test_bad_cut_lists_valid_points():
    model, spec = build_model("digits-cnn", seed=0)
    x = torch.zeros(1, *spec.input_shape)
    with pytest.raises(SplitPointError) as info:
        split_model(model, cut="layer9", example_input=x)
    valid = ", ".join(valid_cuts(model, x))
    assert str(info.value) == f"cut='layer9' not found; valid cut points: {valid}"


def test_head_cut_must_follow_cut():
    model, spec = build_model("digits-mlp", seed=0)
    x = torch.zeros(1, *spec.input_shape)
    with pytest.raises(SplitPointError, match="head_cut='fc1' must come after cut='fc2'"):
        split_model(model, cut="fc2", head_cut="fc1", example_input=x)


def test_cut_inside_residual_block_is_refused():
    model, spec = build_model("mobilenet-mini", seed=0)
    x = torch.zeros(1, *spec.input_shape)
    cuts = valid_cuts(model, x)
    # block1 and block3/4 have skip ADDs (stride 1, same width); block2 has none.
    assert not any(c.startswith(("block1.", "block3.", "block4.")) for c in cuts)
    assert {"block1", "block2", "block3", "block4"} <= set(cuts)
    assert any(c.startswith("block2.conv.") for c in cuts)
    with pytest.raises(SplitPointError, match=r"cut='block1.conv.3' cannot split.*2 tensors"):
        split_model(model, cut="block1.conv.3", example_input=x)


class _Toy(nn.Module):
    """a -> b -> (b + c(b)) -> d: the skip makes the cut after c invalid."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.ReLU()
        self.c = nn.Linear(4, 4)
        self.d = nn.Linear(4, 2)

    def forward(self, x):
        h = self.b(self.a(x))
        return self.d(torch.relu(h + self.c(h)))


def test_liveness_on_hand_built_graph():
    # Hand-derived: after a and b one tensor is live; after c both h and c(h) are;
    # add and relu are functional nodes named by fx; the output node d is never a cut.
    assert valid_cuts(_Toy(), torch.zeros(1, 4)) == ["a", "b", "add", "relu"]


def test_liveness_against_brute_force_oracle():
    """A point is valid iff copying the graph up to it leaves one value used later."""
    model, spec = build_model("mobilenet-mini", seed=0)
    cg = trace_cuts(model, torch.zeros(1, *spec.input_shape))
    valid_positions = set(cg.cuts.values())
    last = max(i for i, n in enumerate(cg.nodes) if n.op.startswith("call"))
    for k, node in enumerate(cg.nodes):
        if not node.op.startswith("call") or k >= last:
            continue
        crossing = {
            n for n in cg.nodes[: k + 1] for u in n.users if cg.nodes.index(u) > k
        }  # quadratic but obviously correct
        assert (crossing == {node}) == (k in valid_positions), node.name


@pytest.mark.parametrize("name", list_models())
def test_state_round_trip_between_full_model_and_halves(name):
    model, spec = _model(name, seed=3)
    x = _input(spec, 2, torch.float32)
    sm = split_model(model, cut=spec.default_cut, example_input=x[:1])
    full = model.state_dict()
    edge_sd, cloud_sd = split_state(full, sm)
    assert set(edge_sd) | set(cloud_sd) == set(full)
    merged = merge_state(edge_sd, cloud_sd)
    assert all(torch.equal(merged[k], full[k]) for k in full)
    # Halves' state dicts load into a freshly split model of another initialisation.
    other, _ = _model(name, seed=9)
    sm2 = split_model(other, cut=spec.default_cut, example_input=x[:1])
    sm2.edge.load_state_dict(sm.edge.state_dict())
    sm2.cloud.load_state_dict(sm.cloud.state_dict())
    model.eval()
    other.eval()
    assert torch.equal(other(x), model(x))


def test_u_shape_state_dicts_partition_model():
    model, spec = build_model("mobilenet-mini", seed=0)
    sm = split_model(
        model, cut="block1", head_cut="head", example_input=torch.zeros(1, *spec.input_shape)
    )
    parts = split_state(model.state_dict(), sm)
    assert len(parts) == 3
    keys = [set(p) for p in parts]
    assert keys[0] | keys[1] | keys[2] == set(model.state_dict())
    assert not (keys[0] & keys[1] or keys[1] & keys[2] or keys[0] & keys[2])
    assert set(sm.state_dict()) == set(model.state_dict())


def test_halves_share_weights_with_model():
    model, spec = build_model("digits-mlp", seed=0)
    sm = split_model(model, cut="act1", example_input=torch.zeros(1, *spec.input_shape))
    with torch.no_grad():
        sm.edge.fc1.weight.add_(1.0)
    assert torch.equal(sm.edge.fc1.weight, model.fc1.weight)
    assert len(list(sm.parameters())) == len(list(model.parameters()))


def test_merge_state_rejects_conflicting_tied_weight():
    a = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="'w' is in two halves"):
        merge_state(a, {"w": torch.ones(2)})


def test_wrong_example_input_is_one_line_error():
    model, _ = build_model("digits-cnn", seed=0)
    with pytest.raises(InputShapeError) as info:
        split_model(model, cut="conv1", example_input=torch.zeros(1, 3, 8, 8))
    assert "\n" not in str(info.value) and "(1, 3, 8, 8)" in str(info.value)


def test_split_model_to_float64_casts_shared_model():
    model, spec = build_model("digits-cnn", seed=0)
    sm = split_model(model, cut="pool2", example_input=torch.zeros(1, *spec.input_shape))
    sm.to(torch.float64).eval()
    x = torch.randn(2, *spec.input_shape, dtype=torch.float64)
    assert model.fc2.weight.dtype == torch.float64
    assert torch.equal(sm.forward(x), model.eval()(x))
