"""Tests for the device's activation noise: clip bound, noise statistics, Opacus epsilon, config."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from opacus.accountants import RDPAccountant

from cloud.commands import _add_run_flags, config_from_args
from cloud.config import FederatedConfig
from converters.errors import ConfigError
from split.errors import PrivacyConfigError
from split.privacy.activation_noise import (
    ActivationNoise,
    NoisyActivation,
    activation_epsilon,
    clip_per_sample,
)

DELTA = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# -- clipping ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    a=arrays(
        np.float32,
        st.tuples(st.integers(1, 6), st.integers(1, 5), st.integers(1, 4)),
        elements=st.floats(-1e4, 1e4, width=32),
    ),
    clip=st.floats(1e-3, 1e3),
)
def test_clip_bound_holds_per_sample(a, clip):
    x = torch.from_numpy(a)
    got = clip_per_sample(x, clip).numpy().astype(np.float64)
    norms = np.linalg.norm(a.reshape(len(a), -1).astype(np.float64), axis=1)
    out_norms = np.linalg.norm(got.reshape(len(a), -1), axis=1)
    assert np.all(out_norms <= clip * (1 + 1e-5))
    for i, n in enumerate(norms):
        if n <= clip:  # under the bound: untouched (up to the 1e-6 guard)
            np.testing.assert_allclose(got[i], a[i], rtol=1e-5, atol=1e-6)
        else:  # above: same direction, norm exactly clip
            assert out_norms[i] == pytest.approx(clip, rel=1e-5, abs=2e-6)  # guard: <= 1e-6 short
            np.testing.assert_allclose(got[i] * n / out_norms[i], a[i], rtol=1e-3, atol=1e-3)


def test_clip_gradient_matches_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64) * torch.tensor([[0.1], [3.0], [0.5], [9.0]])
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: clip_per_sample(t, 1.0), (x,))


# -- noise ------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_noise_mean_and_std_within_five_standard_errors(training):
    clip, sigma = 0.5, 1.3
    layer = ActivationNoise(clip=clip, noise_multiplier=sigma, seed=7).layer()
    layer.train(training)  # noise in eval mode too: an un-noised release is unprotected
    act = torch.randn(4000, 16, generator=torch.Generator().manual_seed(1)) * 3
    noise = (layer(act) - clip_per_sample(act, clip)).detach().numpy().astype(np.float64).ravel()
    n, std = noise.size, sigma * clip
    assert abs(noise.mean()) < 5 * std / math.sqrt(n)
    assert abs(noise.std() - std) < 5 * std / math.sqrt(2 * n)


def test_same_seed_same_noise_and_default_seed_is_fresh():
    noise = ActivationNoise(clip=1.0, noise_multiplier=1.0, seed=3)
    x = torch.ones(8, 4)
    a, b = noise.layer()(x), noise.layer()(x)
    assert torch.equal(a, b)
    layer = noise.layer()
    assert not torch.equal(layer(x), layer(x))  # the generator advances between batches
    fresh = ActivationNoise(clip=1.0, noise_multiplier=1.0)
    assert not torch.equal(fresh.layer()(x), fresh.layer()(x))


def test_gradient_flows_through_the_noise_layer():
    torch.manual_seed(0)
    x = (torch.randn(5, 8) * 4).requires_grad_(True)
    g = torch.randn(5, 8)
    ActivationNoise(clip=1.0, noise_multiplier=2.0, seed=0).layer()(x).backward(g)
    y = x.detach().clone().requires_grad_(True)
    clip_per_sample(y, 1.0).backward(g)  # the noise is additive: it passes gradients unchanged
    torch.testing.assert_close(x.grad, y.grad)


def test_no_noise_config_is_the_identity():
    x = torch.randn(3, 2, 4)
    layer = ActivationNoise().layer()
    assert isinstance(layer, NoisyActivation) and not layer.noise.enabled
    assert layer(x) is x
    assert ActivationNoise().effective_noise_multiplier == 0.0
    assert activation_epsilon(ActivationNoise(), releases=0, delta=DELTA) == 0.0
    assert activation_epsilon(ActivationNoise(), releases=3, delta=DELTA) == math.inf
    cfg = FederatedConfig()
    assert (cfg.act_noise_clip, cfg.act_noise_multiplier) == (0.0, 0.0)


# -- accounting -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("clip", "sigma", "releases"), [(1.0, 1.0, 1), (0.5, 4.0, 10), (3.0, 2.5, 40), (1.0, 8.0, 3)]
)
def test_epsilon_equals_a_fresh_opacus_rdp_accountant(clip, sigma, releases):
    noise = ActivationNoise(clip=clip, noise_multiplier=sigma)
    # Replace-one neighbours: sensitivity 2 * clip, so Opacus sees sigma * clip / (2 * clip).
    assert noise.sensitivity == 2 * clip
    acc = RDPAccountant()
    for _ in range(releases):
        acc.step(noise_multiplier=sigma / 2, sample_rate=1.0)
    want = acc.get_epsilon(DELTA)
    assert activation_epsilon(noise, releases=releases, delta=DELTA) == want
    more = activation_epsilon(noise, releases=releases + 1, delta=DELTA)
    assert more > want  # each release spends budget


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"clip": -1.0, "noise_multiplier": 1.0}, "clip must be a finite number >= 0, got -1.0"),
        ({"clip": 1.0, "noise_multiplier": math.nan}, "noise_multiplier must be a finite"),
        ({"clip": math.inf, "noise_multiplier": 1.0}, "clip must be a finite number >= 0, got inf"),
        ({"clip": "1", "noise_multiplier": 1.0}, "clip must be a finite number >= 0, got '1'"),
        ({"clip": 1.0, "noise_multiplier": 0.0}, "must both be > 0 .* or both 0"),
        ({"clip": 0.0, "noise_multiplier": 2.0}, "must both be > 0 .* or both 0"),
    ],
)
def test_bad_activation_noise_is_a_one_line_error(kw, match):
    with pytest.raises(PrivacyConfigError, match=match) as err:
        ActivationNoise(**kw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"act_noise_clip": -0.5}, "act_noise_clip must be a finite number >= 0, got -0.5"),
        ({"act_noise_multiplier": math.inf}, "act_noise_multiplier must be a finite number"),
        ({"act_noise_clip": math.nan}, "act_noise_clip must be a finite number"),
        ({"act_noise_clip": 1.0}, r"must both be > 0 \(noise on\) or both 0 \(off\), got \(1.0"),
        ({"act_noise_multiplier": 1.0}, "must both be > 0"),
        ({"act_noise_clip": 1.0, "act_noise_multiplier": 1.0, "mode": "fedavg"}, "split mode"),
    ],
)
def test_bad_config_is_a_one_line_error(kw, match):
    kw = {"mode": "vanilla", **kw}
    with pytest.raises(ConfigError, match=match) as err:
        FederatedConfig(**kw)
    assert "\n" not in str(err.value)


def test_cli_flags_map_onto_the_config():
    p = argparse.ArgumentParser()
    _add_run_flags(p)
    args = p.parse_args(
        ["--mode", "vanilla", "--act-noise-clip", "2.5", "--act-noise-multiplier", "0.8"]
    )
    cfg = config_from_args(args)
    assert (cfg.act_noise_clip, cfg.act_noise_multiplier) == (2.5, 0.8)


def test_cloud_row_epsilon_never_under_reports_a_silent_device(tmp_path):
    from cloud.split_trainer import SplitTrainer
    from cloud.strategies import ClientUpdate
    from converters.datasets import Dataset
    from converters.mqtt import MqttConfig

    cfg = FederatedConfig(
        mode="vanilla", local_epochs=3, act_noise_clip=2.0, act_noise_multiplier=3.0,
        out_dir=str(tmp_path),
    )  # fmt: skip
    test = Dataset(np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, np.int64), 10, "t")
    trainer = SplitTrainer(
        cfg, mqtt=MqttConfig.from_url("mqtt://127.0.0.1:1", client_id="cloud"), test_set=test
    )
    noise = ActivationNoise(clip=2.0, noise_multiplier=3.0)
    one, two = (activation_epsilon(noise, releases=3 * k, delta=cfg.delta) for k in (1, 2))
    trainer._act_releases = {"a": 3, "b": 6}  # "b" trained twice but its UPDATE never came
    ok = ClientUpdate("a", {}, 1, {"act_epsilon": one})
    assert trainer._act_noise_epsilon([ok]) == two
    bad = ClientUpdate("a", {}, 1, {"act_epsilon": "low"})
    assert trainer._act_noise_epsilon([bad]) == math.inf
