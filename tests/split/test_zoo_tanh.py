"""digits-mlp-tanh: the DP-friendly zoo model (tanh, centred inputs) and DP-SGD on it."""

from __future__ import annotations

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

from split.privacy import DPConfig, DPTrainer, fix_model
from split.zoo import build_model

DELTA = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # Shared 2-core CI box: torch's thread pool spinning slows these tiny models down.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_same_parameter_shapes_as_digits_mlp():
    tanh, spec = build_model("digits-mlp-tanh", seed=0)
    relu, relu_spec = build_model("digits-mlp", seed=0)
    shapes = {k: v.shape for k, v in tanh.state_dict().items()}
    assert shapes == {k: v.shape for k, v in relu.state_dict().items()}
    assert (spec.input_shape, spec.num_classes, spec.default_cut, spec.dataset) == (
        relu_spec.input_shape,
        relu_spec.num_classes,
        relu_spec.default_cut,
        relu_spec.dataset,
    )
    assert [type(m) for m in tanh.modules() if not list(m.children())].count(nn.Tanh) == 2


def test_forward_centres_inputs_then_applies_tanh():
    model, _ = build_model("digits-mlp-tanh", seed=3)
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    h = torch.tanh(model.fc1(x.flatten(1) * 2 - 1))
    expected = model.fc3(torch.tanh(model.fc2(h)))
    torch.testing.assert_close(model.eval()(x), expected, rtol=0, atol=1e-6)


def test_opacus_needs_no_fix_and_epsilon_matches_its_accountant():
    model, _ = build_model("digits-mlp-tanh", seed=0)
    fixed, report = fix_model(model)
    assert report == []
    assert [type(m) for m in fixed.modules()] == [type(m) for m in model.modules()]
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(300, 1, 8, 8, generator=gen).numpy()
    y = torch.randint(0, 10, (300,), generator=gen).numpy()
    # The benchmark's central setting: one round per epoch, small clip, momentum.
    trainer = DPTrainer(
        model,
        config=DPConfig(mode="sample", target_epsilon=3.0, delta=DELTA, max_grad_norm=0.3),
        sample_size=len(x),
        batch_size=64,
        lr=2.0,
        epochs_per_round=1,
        rounds=3,
        seed=0,
        momentum=0.5,
    )
    steps = sum(trainer.train_round(x, y)["steps"] for _ in range(3))
    oracle = RDPAccountant()
    for _ in range(steps):
        oracle.step(noise_multiplier=trainer.noise_multiplier, sample_rate=trainer.sample_rate)
    assert steps == 3 * trainer.steps_per_epoch
    assert trainer.epsilon() == oracle.get_epsilon(DELTA) <= 3.0
    assert all(torch.isfinite(v).all() for v in trainer.state_dict().values())
