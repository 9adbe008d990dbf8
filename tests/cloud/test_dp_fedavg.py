"""Tests for user-level DP-FedAvg: clipping, noise, accounting, adaptive clip and resume."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

from cloud.dp_fedavg import DPFedAvg, clip_delta, global_norm
from cloud.errors import PrivacyBudgetExceededError, UpdateRejectedError
from split.errors import PrivacyBudgetExceededError as SplitBudgetError
from split.errors import PrivacyConfigError
from split.privacy.budget import DPConfig

SHAPES = {"conv.weight": (4, 1, 3, 3), "conv.bias": (4,), "fc.weight": (10, 16), "fc.bias": (10,)}


def make_global(rng) -> dict[str, np.ndarray]:
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    params["bn.num_batches_tracked"] = np.array(17, dtype=np.int64)
    return params


def make_updates(rng, global_params, n, scale=0.1):
    out = []
    for _ in range(n):
        local = {
            k: (v + scale * rng.normal(size=v.shape)).astype(v.dtype)
            for k, v in global_params.items()
            if v.dtype.kind == "f"
        }
        local["bn.num_batches_tracked"] = np.array(rng.integers(0, 100), dtype=np.int64)
        out.append((local, int(rng.integers(1, 500))))
    return out


def agg(**kw) -> DPFedAvg:
    base = dict(
        clip_norm=1.0,
        noise_multiplier=1.0,
        clients_per_round=10,
        population=1000,
        delta=1e-4,
        seed=0,
    )
    return DPFedAvg(**{**base, **kw})


@pytest.mark.parametrize(("name", "oracle_cls"), [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_equals_fresh_opacus_accountant(rng, name, oracle_cls):
    g = make_global(rng)
    a = agg(noise_multiplier=1.2, clients_per_round=20, population=2000, accountant=name)
    for _ in range(5):
        g = a.aggregate(g, make_updates(rng, g, 20))
    oracle = oracle_cls()
    for _ in range(5):
        oracle.step(noise_multiplier=1.2, sample_rate=20 / 2000)
    assert a.epsilon() == oracle.get_epsilon(1e-4)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    log_scale=st.floats(-8, 30),
    clip=st.floats(1e-3, 1e3),
)
def test_clipped_delta_norm_is_at_most_clip(seed, log_scale, clip):
    rng = np.random.default_rng(seed)
    delta = {
        k: (rng.normal(size=s) * 10.0**log_scale).astype(np.float32) for k, s in SHAPES.items()
    }
    clipped, norm = clip_delta(delta, clip)
    flat = np.concatenate([v.ravel() for v in clipped.values()])
    assert np.linalg.norm(flat) <= clip + 1e-6
    original = np.concatenate([np.asarray(v, np.float64).ravel() for v in delta.values()])
    # Oracle norm, rescaled so float64 cannot overflow even at 1e30 entries.
    peak = np.max(np.abs(original))
    assert norm == pytest.approx(peak * np.linalg.norm(original / peak), rel=1e-9)
    if norm <= clip:
        np.testing.assert_array_equal(flat, original)
    else:
        # Direction is kept: clipped = original * (clip / norm).
        np.testing.assert_allclose(flat, original * (clip / norm), rtol=1e-12)


def test_global_norm_of_empty_and_zero():
    assert global_norm({}) == 0.0
    assert global_norm({"a": np.zeros(3)}) == 0.0


def test_noiseless_aggregate_equals_plain_reference(rng):
    g = make_global(rng)
    ups = make_updates(rng, g, 7, scale=0.5)  # norms ~ 0.5*sqrt(246) ~ 8 > C: clipping is active
    a = agg(noise_multiplier=0.0, clip_norm=2.0)
    new = a.aggregate(g, ups)
    floats = [k for k in SHAPES]
    total = {k: np.zeros(SHAPES[k]) for k in floats}
    for local, _ in ups:
        d = {k: local[k].astype(np.float64) - g[k].astype(np.float64) for k in floats}
        n = np.sqrt(sum(np.sum(v**2) for v in d.values()))
        for k in floats:
            total[k] += d[k] * min(1.0, 2.0 / n)
    for k in floats:
        want = (g[k].astype(np.float64) + total[k] / 10).astype(np.float32)  # m = 10, not 7
        np.testing.assert_allclose(new[k], want, rtol=1e-6, atol=1e-7)
        assert new[k].dtype == np.float32
    assert new["bn.num_batches_tracked"] == 17 and new["bn.num_batches_tracked"].dtype == np.int64
    assert math.isinf(a.epsilon())


def test_noise_has_the_stated_mean_and_std():
    sigma, clip, m = 1.3, 0.7, 10
    g = {"w": np.zeros(40_000, dtype=np.float64)}
    a = DPFedAvg(
        clip_norm=clip,
        noise_multiplier=sigma,
        clients_per_round=m,
        population=10_000,
        delta=1e-5,
        seed=42,
    )
    noise = a.aggregate(g, [({"w": g["w"].copy()}, 1) for _ in range(m)])["w"]
    n, std = noise.size, sigma * clip / m
    # Standard errors of the sample mean and sample std of n iid N(0, std^2) draws.
    assert abs(noise.mean()) < 5 * std / math.sqrt(n)
    assert abs(noise.std() - std) < 5 * std / math.sqrt(2 * n)


def test_resume_is_exact_with_adaptive_clip(rng):
    g0 = make_global(rng)
    rounds = [
        make_updates(np.random.default_rng(r), g0, 12, scale=0.05 * (r + 1)) for r in range(6)
    ]
    kw = dict(
        clients_per_round=12,
        population=600,
        delta=1e-4,
        adaptive=True,
        count_noise=2.0,
        noise_multiplier=0.8,
    )
    whole = agg(**kw)
    g = g0
    for ups in rounds:
        g = whole.aggregate(g, ups)
    first = agg(**kw)
    h = g0
    for ups in rounds[:3]:
        h = first.aggregate(h, ups)
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = agg(**{**kw, "seed": 999})  # the seed is overridden by the saved RNG state
    resumed.load_state_dict(saved)
    for ups in rounds[3:]:
        h = resumed.aggregate(h, ups)
    for k in g:
        np.testing.assert_array_equal(g[k], h[k])
    assert resumed.epsilon() == whole.epsilon()
    assert resumed.clip_norm == whole.clip_norm != 1.0
    assert resumed.rounds == 6


def test_adaptive_clip_follows_geometric_update():
    g = {"w": np.zeros(4)}
    a = DPFedAvg(
        clip_norm=1.0,
        noise_multiplier=0.0,
        clients_per_round=4,
        population=100,
        delta=1e-3,
        seed=0,
        adaptive=True,
        target_quantile=0.5,
        clip_lr=0.2,
        count_noise=0.0,
    )
    norms = [0.5, 0.9, 1.5, 3.0]
    ups = [({"w": np.array([n, 0, 0, 0])}, 1) for n in norms]
    clip = 1.0
    for _ in range(3):
        frac = sum(n <= clip for n in norms) / 4
        a.aggregate(g, ups)
        clip *= math.exp(-0.2 * (frac - 0.5))
        assert a.clip_norm == pytest.approx(clip, rel=1e-12)


def test_adaptive_update_noise_keeps_total_privacy():
    a = agg(
        noise_multiplier=1.0, clients_per_round=100, population=10_000, delta=1e-5, adaptive=True
    )
    # Andrew et al. Thm 1: (z_delta^-2 + (2 sigma_b)^-2)^-1/2 == z.
    assert (a.update_noise**-2 + (2 * a.count_noise) ** -2) ** -0.5 == pytest.approx(1.0)
    assert a.update_noise > 1.0
    with pytest.raises(
        PrivacyConfigError, match=r"count_noise must be > noise_multiplier / 2 = 0.5"
    ):
        agg(noise_multiplier=1.0, clients_per_round=10, adaptive=True)


def test_budget_stop_before_exceeding_target(rng):
    cfg = DPConfig(mode="user", target_epsilon=2.0, delta=1e-4, clip_norm=0.5)
    a = DPFedAvg.from_config(cfg, clients_per_round=50, population=1000, rounds=8, seed=1)
    g = make_global(rng)
    for _ in range(8):
        g = a.aggregate(g, make_updates(rng, g, 50))
        assert a.epsilon() <= 2.0
    before = a.state_dict()
    with pytest.raises(
        PrivacyBudgetExceededError, match=r"> target_epsilon=2.0 in round 9"
    ) as info:
        a.aggregate(g, make_updates(rng, g, 50))
    assert isinstance(info.value, SplitBudgetError)
    assert a.state_dict() == before


def test_bad_updates_and_configs_are_rejected(rng):
    g = make_global(rng)
    bad = make_updates(rng, g, 2)
    bad[1][0]["fc.bias"][3] = np.nan
    with pytest.raises(UpdateRejectedError, match="update 1 key 'fc.bias' has non-finite values"):
        agg().aggregate(g, bad)
    short = make_updates(rng, g, 1)
    del short[0][0]["conv.bias"]
    with pytest.raises(UpdateRejectedError, match="update 0 key 'conv.bias' must have shape"):
        agg().aggregate(g, short)
    with pytest.raises(PrivacyConfigError, match="noise_multiplier must be >= 0, got -0.5"):
        agg(noise_multiplier=-0.5)
    with pytest.raises(PrivacyConfigError, match="clip_norm must be > 0, got nan"):
        agg(clip_norm=float("nan"))
    with pytest.raises(PrivacyConfigError, match=r"1/N = 0.001 for N=1000 records, got delta=0.01"):
        agg(delta=0.01)
    with pytest.raises(
        PrivacyConfigError,
        match=r"clients_per_round must be an int in \[1, population=1000\], got 0",
    ):
        agg(clients_per_round=0)
    with pytest.raises(ValueError, match="accountant must be one of rdp, prv"):
        agg(accountant="gdp")


@dataclass
class _Update:
    """Stands in for cloud.strategies.ClientUpdate (duck-typed: params, client_id)."""

    client_id: str
    params: dict
    num_samples: int


def test_update_objects_aggregate_like_tuples_and_name_the_client(rng):
    g = make_global(rng)
    ups = make_updates(rng, g, 5)
    objs = [_Update(f"dev{i}", p, n) for i, (p, n) in enumerate(ups)]
    from_tuples, from_objects = agg(seed=3).aggregate(g, ups), agg(seed=3).aggregate(g, objs)
    assert from_tuples.keys() == from_objects.keys() == g.keys()
    for k, v in from_tuples.items():
        np.testing.assert_array_equal(v, from_objects[k])
    objs[2].params["fc.weight"] = objs[2].params["fc.weight"] * np.inf
    with pytest.raises(UpdateRejectedError, match="client 'dev2' key 'fc.weight' has non-finite"):
        agg().aggregate(g, objs)
