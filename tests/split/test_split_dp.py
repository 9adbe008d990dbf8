"""Sample-level DP in U-shaped split learning: accounting, calibration, per-sample gradients."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

from cloud.config import FederatedConfig
from converters.errors import ConfigError
from split.errors import PrivacyConfigError
from split.graph import split_template
from split.privacy.activation_noise import clip_per_sample
from split.privacy.split_dp import SplitDP, SplitDPTrainer, joint_noise_multiplier

DELTA = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _dp(**kw) -> SplitDP:
    base = dict(act_clip=1.0, act_sigma=2.0, grad_clip=0.5, grad_sigma=3.0, param_clip=1.0,
                param_sigma=1.5, delta=DELTA)  # fmt: skip
    return SplitDP(**{**base, **kw})


def _label_dp(**kw) -> SplitDP:
    base = dict(act_clip=1.0, act_sigma=2.0, param_clip=1.0, param_sigma=1.5, delta=DELTA,
                label_epsilon=2.0, num_classes=10)  # fmt: skip
    return SplitDP(**{**base, **kw})


# -- accounting -------------------------------------------------------------------------------


@pytest.mark.parametrize("releases", [1, 7, 40])
def test_epsilon_equals_opacus_accountant_for_the_joint_mechanism(releases):
    dp = _dp()
    acc = RDPAccountant()
    acc.history = [(dp.sigma_joint, 1.0, releases)]
    assert dp.epsilon(releases) == acc.get_epsilon(DELTA)


@pytest.mark.parametrize("releases", [1, 5, 30])
def test_joint_mechanism_equals_the_three_channels_composed_by_opacus(releases):
    # Oracle: each channel its own Gaussian at replace-one (sigma / 2), composed by Opacus.
    dp = _dp()
    acc = RDPAccountant()
    acc.history = [(s / 2, 1.0, releases) for s in (dp.act_sigma, dp.grad_sigma, dp.param_sigma)]
    assert dp.epsilon(releases) == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    assert joint_noise_multiplier((4.0,)) == 2.0  # one channel: sensitivity 2C halves sigma


def test_no_release_costs_nothing_and_more_releases_cost_more():
    dp = _dp()
    assert dp.epsilon(0) == 0.0
    assert dp.epsilon(1) < dp.epsilon(2) < dp.epsilon(10)


@pytest.mark.parametrize(("target", "releases"), [(8.0, 4), (3.0, 10), (30.0, 2)])
def test_calibration_meets_the_target_and_is_near_minimal(target, releases):
    dp = SplitDP.for_target(target_epsilon=target, delta=DELTA, releases=releases,
                            act_clip=1.0, grad_clip=1.0, param_clip=2.0)  # fmt: skip
    assert dp.act_sigma == dp.grad_sigma == dp.param_sigma
    assert dp.param_clip == 2.0
    assert dp.epsilon(releases) <= target
    less = dp.act_sigma * 0.97
    lower = SplitDP(**{**dp.to_meta(), "act_sigma": less, "grad_sigma": less, "param_sigma": less})
    assert lower.epsilon(releases) > target
    assert dp.epsilon(releases + 1) > target  # one more epoch would overspend


def test_infeasible_target_names_the_closest_feasible_setting():
    with pytest.raises(PrivacyConfigError, match=r"infeasible for 100000 steps.*closest feasible"):
        SplitDP.for_target(target_epsilon=0.5, delta=DELTA, releases=100_000,
                           act_clip=1.0, grad_clip=1.0, param_clip=1.0)  # fmt: skip


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"act_sigma": 0.0}, "act_sigma must be a finite number > 0"),
        ({"grad_clip": float("nan")}, "grad_clip must be a finite number > 0"),
        ({"param_sigma": -1.0}, "param_sigma must be"),
        ({"act_clip": True}, "act_clip must be"),
        ({"delta": 1.0}, r"delta must be in \(0, 1\)"),
    ],
)
def test_bad_settings_are_refused_with_the_field_named(change, match):
    with pytest.raises(PrivacyConfigError, match=match):
        _dp(**change)


def test_meta_round_trip_and_bad_meta():
    dp = _dp()
    assert SplitDP.from_meta(dp.to_meta()) == dp
    assert "label_epsilon" not in dp.to_meta()
    assert SplitDP.from_meta(_label_dp().to_meta()) == _label_dp()
    with pytest.raises(PrivacyConfigError, match="dp needs the keys"):
        SplitDP.from_meta({**dp.to_meta(), "extra": 1})
    with pytest.raises(PrivacyConfigError, match="dp must be an object"):
        SplitDP.from_meta([1, 2])


# -- device mechanics -------------------------------------------------------------------------


def test_loss_gradient_noise_is_clipped_rows_plus_gaussian_of_the_right_scale():
    dp = _dp(grad_clip=0.5, grad_sigma=1.3)
    sm = split_template("digits-mlp-tanh", "act1", "act2")
    trainer = SplitDPTrainer(sm.edge, sm.head, dp, num_samples=10_000, seed=5)
    b = 50
    grad = torch.randn(b, 400, generator=torch.Generator().manual_seed(1)) / b
    rows = clip_per_sample(grad * b, dp.grad_clip)
    assert torch.all(rows.flatten(1).norm(dim=1) <= dp.grad_clip * (1 + 1e-6))
    noise = (trainer.noise_loss_gradient(grad) * b - rows).double().numpy().ravel()
    std, n = dp.grad_sigma * dp.grad_clip, noise.size
    assert abs(noise.mean()) < 5 * std / math.sqrt(n)
    assert abs(noise.std() - std) < 5 * std / math.sqrt(2 * n)


def test_per_sample_gradients_equal_one_sample_at_a_time_autograd():
    """Opacus' per-sample gradients of both halves, through the cloud and both noised
    messages, equal plain autograd run on each sample alone with the same messages."""
    torch.manual_seed(0)
    dp = _dp(act_clip=0.8, grad_clip=0.4)
    sm = split_template("digits-mlp-tanh", "act1", "act2")
    edge0, head0 = copy.deepcopy(sm.edge), copy.deepcopy(sm.head)
    trainer = SplitDPTrainer(sm.edge, sm.head, dp, num_samples=1000, seed=3)
    b = 6
    x = torch.rand(b, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 3, 3, 9, 1, 5])
    with trainer.quiet():
        act = sm.edge(x)
        sent = trainer.noise_activation(act)
        noise = (sent - clip_per_sample(act, dp.act_clip)).detach()
        a = sent.detach().requires_grad_(True)
        mid = sm.cloud(a)
        m = mid.detach().requires_grad_(True)
        nn.functional.cross_entropy(sm.head(m), y).backward()
        g = trainer.noise_loss_gradient(m.grad)
        mid.backward(g)
        sent.backward(a.grad)
    got = {f"edge.{k}": p.grad_sample for k, p in sm.edge.named_parameters()}
    got |= {f"head.{k}": p.grad_sample for k, p in sm.head.named_parameters()}
    for i in range(b):
        edge, head = copy.deepcopy(edge0), copy.deepcopy(head0)
        nn.functional.cross_entropy(head(m[i : i + 1].detach()), y[i : i + 1]).backward()
        out = clip_per_sample(edge(x[i : i + 1]), dp.act_clip) + noise[i : i + 1]
        out.backward(a.grad[i : i + 1] * b)  # the cloud's row of the mean-loss gradient
        for k, p in edge.named_parameters():
            torch.testing.assert_close(got[f"edge.{k}"][i], p.grad, rtol=1e-4, atol=1e-6)
        for k, p in head.named_parameters():
            torch.testing.assert_close(got[f"head.{k}"][i], p.grad, rtol=1e-4, atol=1e-6)


def test_dp_optimizer_clips_each_sample_across_both_halves():
    dp = _dp(param_clip=0.05, param_sigma=1e-9)  # tiny noise: the update is the clipped mean
    sm = split_template("digits-mlp-tanh", "act1", "act2")
    trainer = SplitDPTrainer(sm.edge, sm.head, dp, num_samples=1000, seed=0)
    opt = trainer.optimizer(lr=1.0, momentum=0.0, batch_size=8)
    params = list(trainer.modules.parameters())
    before = [p.detach().clone() for p in params]
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    with trainer.quiet():
        nn.functional.cross_entropy(sm.head(sm.cloud(sm.edge(x))), y).backward()
    norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params]).norm(dim=0)
    assert torch.all(norms > dp.param_clip)  # every sample is clipped in this setting
    opt.step()
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params, strict=True)])
    assert step.norm() <= dp.param_clip * (1 + 1e-4)  # mean of clipped <= clip (lr 1)


def test_device_refuses_delta_too_large_and_modules_opacus_cannot_privatize():
    sm = split_template("digits-mlp-tanh", "act1", "act2")
    with pytest.raises(PrivacyConfigError, match=r"delta must be < 1/N"):
        SplitDPTrainer(sm.edge, sm.head, _dp(delta=0.01), num_samples=200)
    edge = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(PrivacyConfigError, match=r"offending modules: edge\.1 \(BatchNorm1d\)"):
        SplitDPTrainer(edge, nn.Linear(4, 2), _dp(), num_samples=1000)


def test_ledger_counts_epochs_and_matches_the_cloud_arithmetic():
    dp = _dp()
    sm = split_template("digits-mlp-tanh", "act1", "act2")
    trainer = SplitDPTrainer(sm.edge, sm.head, dp, num_samples=1000, seed=0)
    for _ in range(3):
        trainer.begin_epoch()
    assert trainer.releases == 3 and trainer.epsilon() == dp.epsilon(3)
    trainer.close()
    assert not any(hasattr(p, "grad_sample") for p in sm.edge.parameters())


# -- run configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"mode": "vanilla"}, "grad_noise_clip is for mode 'ushaped' only"),
        (
            {"mode": "splitfed-v1", "grad_noise_clip": 0.0, "label_epsilon": 9.0},
            r"label_epsilon must be < target_epsilon=8.0",
        ),
        (
            {
                "mode": "splitfed-v2",
                "grad_noise_clip": 0.0,
                "target_epsilon": None,
                "noise_multiplier": 3.0,
            },
            "label_epsilon must be > 0 .*labels cross the wire",
        ),
        ({"label_epsilon": 1.0}, "label_epsilon must be 0 in mode 'ushaped'"),
        ({"grad_noise_clip": 0.0}, r"grad_noise_clip must be > 0 with dp='sample'"),
        ({"act_noise_clip": 0.0}, r"act_noise_clip must be > 0"),
        ({"act_noise_multiplier": 2.0}, "must be 0 with target_epsilon"),
        ({"dp": "user"}, "must be 'sample' or 'none' in split mode"),
        (
            {"target_epsilon": None, "noise_multiplier": 0.0},
            r"noise_multiplier must be > 0 with dp='sample'",
        ),
    ],
)
def test_split_dp_config_errors_name_the_field(kw, match):
    base = dict(mode="ushaped", dp="sample", target_epsilon=8.0, act_noise_clip=1.0,
                grad_noise_clip=1.0)  # fmt: skip
    with pytest.raises(ConfigError, match=match):
        FederatedConfig(**{**base, **kw})


def test_grad_noise_needs_ushaped_sample_dp():
    with pytest.raises(ConfigError, match="grad_noise_clip needs dp='sample' in a split mode"):
        FederatedConfig(mode="ushaped", grad_noise_clip=1.0)
    cfg = FederatedConfig(mode="ushaped", dp="sample", noise_multiplier=2.0,
                          act_noise_clip=1.0, grad_noise_clip=0.5)  # fmt: skip
    assert cfg.grad_noise_multiplier == 0.0  # takes noise_multiplier at plan time
    assert np.isfinite(cfg.delta)


# -- labels on the wire (vanilla, SplitFed): randomized response ------------------------------


def test_label_channel_adds_randomized_response_epsilon_to_the_gaussian_part():
    dp = _label_dp()
    assert dp.channels == ("act", "param")
    acc = RDPAccountant()
    acc.history = [(s / 2, 1.0, 6) for s in (dp.act_sigma, dp.param_sigma)]
    assert dp.epsilon(6) == pytest.approx(acc.get_epsilon(DELTA) + 2.0, rel=1e-9)
    assert dp.epsilon(0) == 0.0
    assert dp.keep_probability == pytest.approx(math.e**2 / (math.e**2 + 9))
    plan = SplitDP.for_target(target_epsilon=8.0, delta=DELTA, releases=4, act_clip=1.0,
                              param_clip=1.0, label_epsilon=3.0, num_classes=10)  # fmt: skip
    assert plan.grad_clip is None and 7.9 < plan.epsilon(4) <= 8.0
    with pytest.raises(PrivacyConfigError, match="leaves nothing of target_epsilon"):
        SplitDP.for_target(target_epsilon=2.0, delta=DELTA, releases=4, act_clip=1.0,
                           param_clip=1.0, label_epsilon=2.0, num_classes=10)  # fmt: skip


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"label_epsilon": None}, "either grad_clip"),
        ({"grad_clip": 1.0, "grad_sigma": 1.0}, "either grad_clip"),
        ({"num_classes": 1}, "num_classes must be an int >= 2"),
        ({"label_epsilon": -1.0}, "label_epsilon must be a finite number > 0"),
    ],
)
def test_label_settings_are_checked(kw, match):
    with pytest.raises(PrivacyConfigError, match=match):
        _label_dp(**kw)


def test_randomized_response_keeps_labels_at_the_stated_rate_and_flips_uniformly():
    dp = _label_dp(label_epsilon=1.0, num_classes=4)
    sm = split_template("digits-mlp-tanh", "act1")
    trainer = SplitDPTrainer(sm.edge, None, dp, num_samples=40_000, seed=11)
    y = np.arange(40_000) % 4
    sent = trainer.released_labels(y)
    assert trainer.released_labels(y) is sent  # drawn once, resent as is
    p, n = dp.keep_probability, len(y)
    assert abs((sent == y).mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
    flipped = (sent - y)[sent != y] % 4  # offsets 1, 2, 3 equally likely
    counts = np.bincount(flipped, minlength=4)[1:]
    assert np.all(np.abs(counts / counts.sum() - 1 / 3) < 0.02)
    with pytest.raises(PrivacyConfigError, match="labels must be in"):
        SplitDPTrainer(sm.edge, None, dp, num_samples=1000, seed=1).released_labels(y + 1)


def test_vanilla_per_sample_gradients_equal_one_sample_at_a_time_autograd():
    torch.manual_seed(0)
    dp = _label_dp(act_clip=0.7)
    sm = split_template("digits-mlp-tanh", "act1")
    edge0 = copy.deepcopy(sm.edge)
    trainer = SplitDPTrainer(sm.edge, None, dp, num_samples=1000, seed=4)
    b = 5
    x = torch.rand(b, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    y = torch.from_numpy(trainer.released_labels(np.arange(1000) % 10)[:b])
    with trainer.quiet():
        act = sm.edge(x)
        sent = trainer.noise_activation(act)
        noise = (sent - clip_per_sample(act, dp.act_clip)).detach()
        a = sent.detach().requires_grad_(True)
        nn.functional.cross_entropy(sm.cloud(a), y).backward()  # the cloud's side
        sent.backward(a.grad)
    for i in range(b):
        edge = copy.deepcopy(edge0)
        out = clip_per_sample(edge(x[i : i + 1]), dp.act_clip) + noise[i : i + 1]
        out.backward(a.grad[i : i + 1] * b)
        for k, p in edge.named_parameters():
            got = dict(sm.edge.named_parameters())[k].grad_sample[i]
            torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(PrivacyConfigError, match="a head .* needs grad_clip"):
        SplitDPTrainer(copy.deepcopy(edge0), None, _dp(), num_samples=1000)
