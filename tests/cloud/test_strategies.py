"""Aggregation strategies against oracles: loops, Reddi et al.'s formulas, NumPy, SciPy."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cloud.errors import RoundFailedError, StrategyError, UpdateRejectedError
from cloud.strategies import (
    STRATEGIES,
    ClientUpdate,
    FedAdam,
    FedYogi,
    get_strategy,
    validate_update,
)

SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4)


def _updates(seed: int, shape: tuple, ns: list[int], dtype=np.float32, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return [
        ClientUpdate(
            client_id=f"dev{i}",
            params={"w": (scale * rng.standard_normal(shape)).astype(dtype)},
            num_samples=n,
        )
        for i, n in enumerate(ns)
    ]


def _model(rng: np.random.Generator, n_clients: int):
    """A tiny 'model' with float32 weights, a float64 bias and an int64 BatchNorm counter."""
    glob = {
        "conv.weight": rng.standard_normal((2, 1, 3, 3)).astype(np.float32),
        "fc.bias": rng.standard_normal(4),
        "bn.num_batches_tracked": np.array(100, dtype=np.int64),
    }
    ups = []
    for i in range(n_clients):
        params = {
            "conv.weight": (glob["conv.weight"] + rng.normal(0, 0.1, (2, 1, 3, 3))).astype(
                np.float32
            ),
            "fc.bias": glob["fc.bias"] + rng.normal(0, 0.1, 4),
            "bn.num_batches_tracked": np.array(100 + 3 * (i + 1), dtype=np.int64),
        }
        ups.append(ClientUpdate(f"dev{i}", params, num_samples=int(rng.integers(1, 50))))
    return glob, ups


@settings(max_examples=40, deadline=None)
@given(
    shape=SHAPES,
    ns=st.lists(st.integers(1, 10_000), min_size=1, max_size=6),
    seed=st.integers(0, 2**32 - 1),
)
def test_fedavg_equals_weighted_mean_loop(shape, ns, seed):
    updates = _updates(seed, shape, ns)
    glob = {"w": np.zeros(shape, np.float32)}
    out = get_strategy("fedavg").aggregate(glob, updates)
    expected = np.zeros(shape, np.float64)
    for u in updates:
        expected = expected + u.num_samples * u.params["w"].astype(np.float64)
    expected = expected / sum(ns)
    assert out["w"].dtype == np.float32 and out["w"].shape == tuple(shape)
    np.testing.assert_allclose(out["w"], expected.astype(np.float32), rtol=1e-6, atol=1e-7)


def test_fedavg_keeps_dtypes_and_rounds_integer_buffers(rng):
    glob, ups = _model(rng, 5)
    out = get_strategy("fedavg").aggregate(glob, ups)
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in glob.items()}
    ns = np.array([u.num_samples for u in ups], dtype=np.float64)
    counts = np.array([int(u.params["bn.num_batches_tracked"]) for u in ups], dtype=np.float64)
    assert int(out["bn.num_batches_tracked"]) == int(np.rint((ns * counts).sum() / ns.sum()))
    # fc.bias is float64: compare tightly against the loop.
    expected = sum(n * u.params["fc.bias"] for n, u in zip(ns, ups, strict=True)) / ns.sum()
    np.testing.assert_allclose(out["fc.bias"], expected, rtol=1e-12)


def test_fedprox_aggregates_like_fedavg_and_sends_mu(rng):
    glob, ups = _model(rng, 4)
    prox = get_strategy("fedprox", mu=0.25)
    assert prox.client_config() == {"proximal_mu": 0.25}
    assert get_strategy("fedavg").client_config() == {}
    a, b = prox.aggregate(glob, ups), get_strategy("fedavg").aggregate(glob, ups)
    for k in glob:
        np.testing.assert_array_equal(a[k], b[k])


def _reddi_round(x, clients, ns, m, v, *, eta, b1, b2, tau, yogi, signs):
    """Reddi et al. 2021, Algorithm 2, written out element by element in plain Python."""
    x_new, m_new, v_new = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    total = float(sum(ns))
    for j in range(x.size):
        delta = sum(n * (c.flat[j] - x.flat[j]) for n, c in zip(ns, clients, strict=True)) / total
        mj = b1 * m.flat[j] + (1 - b1) * delta
        if yogi:
            diff = float(v.flat[j]) - float(delta) ** 2
            sign = (diff > 0) - (diff < 0)
            signs.add(sign)
            vj = v.flat[j] - (1 - b2) * delta**2 * sign
        else:
            vj = b2 * v.flat[j] + (1 - b2) * delta**2
        m_new.flat[j], v_new.flat[j] = mj, vj
        x_new.flat[j] = x.flat[j] + eta * mj / (vj**0.5 + tau)
    return x_new, m_new, v_new


@pytest.mark.parametrize("name,yogi", [("fedadam", False), ("fedyogi", True)])
@pytest.mark.parametrize("weighted", [True, False])
def test_fedopt_matches_reddi_formula_over_three_rounds(rng, name, yogi, weighted):
    hp = {"eta": 0.05, "beta1": 0.8, "beta2": 0.95, "tau": 1e-2}
    strat = get_strategy(name, weighted=weighted, **hp)
    x = rng.standard_normal((3, 5))
    m, v = np.zeros_like(x), np.full_like(x, hp["tau"] ** 2)  # m_{-1} = 0, v_{-1} = tau^2
    signs: set[int] = set()
    for r in range(3):
        # Client changes shrink 20x per round so Yogi's sign(v - delta^2) takes both values.
        clients = [x + rng.normal(0, 0.5 * (k + 1) * 0.05**r, x.shape) for k in range(4)]
        ns = [int(n) for n in rng.integers(1, 100, 4)]
        ups = [ClientUpdate(f"d{k}", {"w": clients[k]}, ns[k]) for k in range(4)]
        got = strat.aggregate({"w": x}, ups)["w"]
        x, m, v = _reddi_round(
            x,
            clients,
            ns if weighted else [1] * 4,
            m,
            v,
            eta=hp["eta"],
            b1=hp["beta1"],
            b2=hp["beta2"],
            tau=hp["tau"],
            yogi=yogi,
            signs=signs,
        )
        np.testing.assert_allclose(got, x, rtol=1e-12, atol=1e-14, err_msg=f"round {r}")
        x = got
    if yogi:
        assert signs == {-1, 1}


def test_fedadam_and_fedyogi_differ_after_the_first_round(rng):
    # Same first step from v = tau^2 (unless delta^2 < tau^2); they must diverge later, else
    # FedYogi would just be FedAdam.
    glob, ups = _model(rng, 3)
    adam, yogi = FedAdam(eta=0.1), FedYogi(eta=0.1)
    ga, gy = glob, glob
    for _ in range(3):
        ga, gy = adam.aggregate(ga, ups), yogi.aggregate(gy, ups)
    assert not np.allclose(ga["fc.bias"], gy["fc.bias"])


@settings(max_examples=40, deadline=None)
@given(shape=SHAPES, n=st.integers(1, 9), seed=st.integers(0, 2**32 - 1))
def test_median_equals_numpy_median(shape, n, seed):
    updates = _updates(seed, shape, [1] * n, dtype=np.float64)
    out = get_strategy("median").aggregate({"w": np.zeros(shape)}, updates)
    expected = np.median(np.stack([u.params["w"] for u in updates]), axis=0)
    np.testing.assert_array_equal(out["w"], expected)


@settings(max_examples=40, deadline=None)
@given(
    shape=SHAPES,
    n=st.integers(1, 12),
    beta=st.floats(0.0, 0.49),
    seed=st.integers(0, 2**32 - 1),
)
def test_trimmed_mean_equals_scipy(shape, n, beta, seed):
    updates = _updates(seed, shape, [1] * n, dtype=np.float64)
    out = get_strategy("trimmed-mean", beta=beta).aggregate({"w": np.zeros(shape)}, updates)
    stacked = np.stack([u.params["w"] for u in updates])
    expected = scipy.stats.trim_mean(stacked, beta, axis=0)
    np.testing.assert_allclose(out["w"], expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_returns_global_keys_shapes_dtypes(rng, name):
    glob, ups = _model(rng, 5)
    out = get_strategy(name).aggregate(glob, ups)
    assert list(out) == list(glob)
    for k in glob:
        assert out[k].shape == glob[k].shape and out[k].dtype == glob[k].dtype


def test_robust_strategies_resist_one_poisoned_update(rng):
    honest = [rng.normal(1.0, 0.1, 50) for _ in range(9)]
    poisoned = np.full(50, 1e6)
    ups = [ClientUpdate(f"d{i}", {"w": w}, 10) for i, w in enumerate([*honest, poisoned])]
    honest_mean = np.mean(honest, axis=0)
    glob = {"w": np.zeros(50)}
    for name, kw in [("median", {}), ("trimmed-mean", {"beta": 0.1})]:
        out = get_strategy(name, **kw).aggregate(glob, ups)["w"]
        assert np.max(np.abs(out - honest_mean)) < 0.2, name
    fedavg = get_strategy("fedavg").aggregate(glob, ups)["w"]
    assert np.min(np.abs(fedavg - honest_mean)) > 1e4


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_state_dict_round_trip_gives_identical_next_aggregate(rng, name):
    glob, _ = _model(rng, 4)
    rounds = [_model(np.random.default_rng(s), 4)[1] for s in range(4)]
    a = get_strategy(name, eta=0.1)
    g = glob
    for ups in rounds[:3]:
        g = a.aggregate(g, ups)
    state = a.state_dict()
    saved = copy.deepcopy(state)
    b = get_strategy(name, eta=0.1)
    b.load_state_dict(state)
    state["m"]["fc.bias"][:] = 123.0  # the strategy must not share arrays with its state dict
    out_a, out_b = a.aggregate(g, rounds[3]), b.aggregate(g, rounds[3])
    for k in glob:
        np.testing.assert_array_equal(out_a[k], out_b[k])
    assert saved["round"] == 3 and a.state_dict()["round"] == 4
    # A fresh strategy (no state) gives a different step: the state really matters.
    fresh = get_strategy(name, eta=0.1).aggregate(g, rounds[3])
    assert not np.array_equal(fresh["fc.bias"], out_a["fc.bias"])


def test_load_state_dict_rejects_bad_state(rng):
    glob, ups = _model(rng, 2)
    s = get_strategy("fedadam")
    s.aggregate(glob, ups)
    state = s.state_dict()
    with pytest.raises(StrategyError, match="keys"):
        get_strategy("fedadam").load_state_dict({"m": {}})
    bad = copy.deepcopy(state)
    bad["v"]["fc.bias"] = -np.ones(4)
    with pytest.raises(StrategyError, match="'fc.bias'.*v must be >= 0"):
        get_strategy("fedadam").load_state_dict(bad)
    with pytest.raises(StrategyError, match="no state"):
        get_strategy("median").load_state_dict(state)
    get_strategy("median").load_state_dict({})
    other = {"w": np.zeros(3)}
    with pytest.raises(StrategyError, match="model changed"):
        s.aggregate(other, [ClientUpdate("d", {"w": np.ones(3)}, 1)])


def _bad_variants(good: dict):
    yield "missing", {k: v for k, v in good.items() if k != "fc.bias"}, "fc.bias", 1
    yield "extra", {**good, "fc.extra": np.zeros(2)}, "fc.extra", 1
    yield "shape", {**good, "fc.bias": np.zeros(5)}, "fc.bias", 1
    yield "int dtype", {**good, "fc.bias": np.zeros(4, np.int32)}, "fc.bias", 1
    yield "nan", {**good, "fc.bias": np.array([0, np.nan, 0, 0])}, "fc.bias", 1
    inf = good["conv.weight"].copy()
    inf[0, 0, 1, 1] = np.inf
    yield "inf", {**good, "conv.weight": inf}, "conv.weight", 1
    floaty = {**good, "bn.num_batches_tracked": np.array(3.0)}
    yield "float counter", floaty, "bn.num_batches_tracked", 1
    yield "list", {**good, "fc.bias": [0.0] * 4}, "fc.bias", 1
    yield "zero samples", good, "num_samples", 0
    yield "bool samples", good, "num_samples", True


@pytest.mark.parametrize("case", range(10))
def test_invalid_updates_rejected_naming_client_and_key(rng, case):
    glob, ups = _model(rng, 4)
    label, params, key, n = list(_bad_variants(ups[2].params))[case]
    bad = ClientUpdate("phone-42", params, n)
    with pytest.raises(UpdateRejectedError) as info:
        validate_update(glob, bad)
    msg = str(info.value)
    assert "'phone-42'" in msg and key in msg and "\n" not in msg, label
    for name in ("fedavg", "median", "fedadam"):
        with pytest.raises(UpdateRejectedError, match="phone-42"):
            get_strategy(name).aggregate(glob, [*ups[:2], bad, *ups[3:]])
    for u in ups:  # the honest updates pass on their own, so the trainer can go on
        validate_update(glob, u)


def test_round_level_rules(rng):
    glob, ups = _model(rng, 3)
    with pytest.raises(RoundFailedError, match="at least 1"):
        get_strategy("fedavg").aggregate(glob, [])
    with pytest.raises(UpdateRejectedError, match="'dev1'.*duplicate"):
        get_strategy("fedavg").aggregate(glob, [*ups, ups[1]])


def test_registry_errors_are_one_line_and_list_options():
    with pytest.raises(ValueError) as info:
        get_strategy("krum")
    for name in STRATEGIES:
        assert name in str(info.value)
    with pytest.raises(StrategyError, match="'fedprox'.*unknown settings \\['beta'\\].*mu"):
        get_strategy("fedprox", beta=0.1)
    with pytest.raises(StrategyError, match="beta must be .* in \\[0, 0.5\\), got 0.5"):
        get_strategy("trimmed-mean", beta=0.5)
    with pytest.raises(StrategyError, match="eta must be .* > 0, got -1"):
        get_strategy("fedyogi", eta=-1)
    with pytest.raises(StrategyError, match="mu .* got nan"):
        get_strategy("fedprox", mu=float("nan"))
    assert sorted(STRATEGIES) == [
        "fedadam",
        "fedavg",
        "fedavgm",
        "fedprox",
        "fedyogi",
        "median",
        "trimmed-mean",
    ]


def test_strategies_import_without_torch():
    code = "import sys; sys.modules['torch'] = None; import cloud.strategies"
    subprocess.run([sys.executable, "-c", code], check=True)
