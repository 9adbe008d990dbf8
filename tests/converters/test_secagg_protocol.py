"""Secure aggregation without MQTT: Shamir, share encryption, masking, unmasking, bad input."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from cloud.errors import RoundFailedError
from cloud.secure.he_server import HE_FRAC_BITS
from cloud.secure.secagg_server import (
    parse_masked,
    parse_shares,
    parse_unmask,
    shortfall,
    unmask_sum,
)
from converters import secagg_protocol as sp
from converters.errors import WireError
from converters.wire import Envelope, MsgType
from edge.secure.secagg_client import SecAggClient
from kernels.masking import dequantize_sum, quantize_fixed, sum_mod

# -- Shamir ------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    secret=st.integers(0, 2**256 - 1),
    n=st.integers(1, 12),
    data=st.data(),
)
def test_any_t_shares_reconstruct(secret, n, data):
    t = data.draw(st.integers(1, n))
    xs = list(range(1, n + 1))
    shares = sp.split_secret(secret, threshold=t, xs=xs)
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=t, max_size=n, unique=True))
    assert sp.reconstruct_secret({x: shares[x] for x in subset}, threshold=t) == secret


def test_fewer_than_t_shares_are_refused_and_usually_wrong():
    shares = sp.split_secret(123456789, threshold=4, xs=[1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="need >= threshold=4 shares, got 3"):
        sp.reconstruct_secret({x: shares[x] for x in (1, 2, 3)}, threshold=4)
    # Interpolating t-1 shares as if the degree were lower gives a field element unrelated
    # to the secret (it would equal it only with probability ~2^-521).
    assert sp.reconstruct_secret({x: shares[x] for x in (1, 2, 3)}, threshold=3) != 123456789


def test_t_minus_1_shares_are_consistent_with_every_secret_exactly(monkeypatch):
    """Exhaustive over GF(31), t=3: for each secret, all 31^2 coefficient choices map the two
    shares held by a coalition onto all 31^2 share pairs exactly once, so the coalition's view
    has the same (uniform) distribution whatever the secret."""
    p, t, xs = 31, 3, [4, 9, 17]
    for secret in (0, 1, 17, 30):
        views = []
        for coeffs in itertools.product(range(p), repeat=t - 1):
            it = iter(coeffs)
            monkeypatch.setattr(sp.secrets, "randbelow", lambda _n, it=it: next(it))
            shares = sp.split_secret(secret, threshold=t, xs=xs, prime=p)
            views.append((shares[4], shares[17]))
        assert sorted(views) == sorted(itertools.product(range(p), repeat=2)), secret
        monkeypatch.undo()


def test_t_minus_1_shares_look_uniform_with_real_randomness():
    p, t, xs, trials = 31, 3, [1, 2, 3], 12_000
    for secret in (0, 30):
        counts = np.zeros((p, p))
        for _ in range(trials):
            s = sp.split_secret(secret, threshold=t, xs=xs, prime=p)
            counts[s[1], s[3]] += 1
        # Chi-square against uniform over 961 cells; fails for a broken sampler (e.g. fixed
        # coefficients concentrate everything in one cell).
        assert stats.chisquare(counts.ravel()).pvalue > 1e-4, secret


def test_split_validates_its_inputs():
    with pytest.raises(ValueError, match="threshold must be an int in"):
        sp.split_secret(1, threshold=4, xs=[1, 2, 3])
    with pytest.raises(ValueError, match="xs must be distinct"):
        sp.split_secret(1, threshold=2, xs=[1, 1, 2])
    with pytest.raises(ValueError, match="secret must be an int in"):
        sp.split_secret(sp.PRIME, threshold=2, xs=[1, 2])


def test_threshold_default_is_a_majority():
    assert [sp.threshold_for(n) for n in (1, 2, 3, 4, 5, 10)] == [1, 2, 2, 3, 3, 6]
    assert sp.threshold_for(10, 8) == 8 and sp.threshold_for(4, 9) == 4


# -- share encryption and framing ---------------------------------------------------------------


def test_sealed_share_round_trip_and_tamper_detection():
    a, b = sp.generate_private_key(), sp.generate_private_key()
    k_ab = sp.agree(a, sp.public_bytes(b), info=b"x")
    assert k_ab == sp.agree(b, sp.public_bytes(a), info=b"x")
    assert k_ab != sp.agree(b, sp.public_bytes(a), info=b"y")
    blob = sp.seal(k_ab, b"secret share", aad=b"ctx")
    assert sp.open_sealed(k_ab, blob, aad=b"ctx", what="s") == b"secret share"
    bad = bytearray(blob)
    bad[20] ^= 1
    with pytest.raises(WireError, match="share from dev-1 failed its AES-GCM tag"):
        sp.open_sealed(k_ab, bytes(bad), aad=b"ctx", what="share from dev-1")
    with pytest.raises(WireError, match="AES-GCM tag"):
        sp.open_sealed(k_ab, blob, aad=b"other round", what="s")
    assert sp.seal(k_ab, b"m", aad=b"") != sp.seal(k_ab, b"m", aad=b"")  # fresh nonces


def test_low_order_x25519_key_is_rejected():
    with pytest.raises(WireError, match="X25519 public key"):
        sp.agree(sp.generate_private_key(), b"\x00" * 32, info=b"x")


def test_map_framing_round_trip_and_rejections():
    m = {"dev-0001": b"abc", "dev-0000": b"", "pi.7": b"\x00" * 300}
    assert sp.unpack_map(sp.pack_map(m)) == m
    good = sp.pack_map(m)
    for bad, msg in [
        (b"XXXX" + good[4:], "map must start"),
        (good[:-1], "truncated"),
        (good + b"\x00", "trailing"),
        (good[:9] + b"de", "truncated"),
    ]:
        with pytest.raises(WireError, match=msg):
            sp.unpack_map(bad)
    dup = b"ESM1" + (2).to_bytes(4, "big") + (b"\x01a" + (1).to_bytes(4, "big") + b"x") * 2
    with pytest.raises(WireError, match="appears twice"):
        sp.unpack_map(dup)
    with pytest.raises(WireError, match="must be 3 bytes"):
        sp.unpack_map(sp.pack_map({"a": b"1234"}), value_len=3)


# -- fixed point ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n,clip", [(1, 1.0), (10, 4.0), (64, 4.0), (1000, 0.5)])
def test_fixed_point_plan_is_the_finest_that_cannot_wrap(n, clip):
    plan = sp.FixedPointPlan.for_devices(n, clip=clip)
    assert n * clip * 2**plan.frac_bits < 2**31
    assert plan.frac_bits == 30 or n * clip * 2 ** (plan.frac_bits + 1) >= 2**31
    # Extremes: n devices at +clip (and at -clip) decode without wrapping.
    for sign in (1, -1):
        q = quantize_fixed(np.full(5, sign * clip), frac_bits=plan.frac_bits, clip=clip)
        total = dequantize_sum(sum_mod(np.stack([q] * n)), frac_bits=plan.frac_bits, n_summands=n)
        np.testing.assert_allclose(total, sign * n * clip, atol=plan.precision)


def test_fixed_point_plan_rejects_wrapping_settings():
    with pytest.raises(ValueError, match=r"n_devices \* clip \* 2\*\*frac_bits must be < 2\*\*31"):
        sp.FixedPointPlan(clip=4.0, frac_bits=28, n_devices=10)


# -- the protocol, pure --------------------------------------------------------------------------


def _devices(n):
    return [f"dev-{i:04d}" for i in range(n)]


def _graph(ids, k, seed="seed"):
    return sp.neighbour_graph(ids, k=k, seed=seed, run_id="r1", round_=3)


def _run(n, t, *, drop_before_masked=(), drop_before_unmask=(), tamper=None, values=None, k=None):
    """Runs all four steps between SecAggClients and the cloud's parsers; returns the sum and
    what the unit test compares it with. ``k``: SecAgg+ degree (None: plain SecAgg)."""
    rng = np.random.default_rng(7)
    ids = _devices(n)
    clients = {
        d: SecAggClient(
            device_id=d, run_id="r1", round_=3, threshold=t, neighbours=k, graph_seed="seed"
        )
        for d in ids
    }
    graph = _graph(ids, k) if k else None
    adverts = {d: c.advertise() for d, c in clients.items()}
    shares = {d: parse_shares(d, sp.pack_map(c.share_keys(adverts)), set(adverts),
                              graph[d] if graph else None)
              for d, c in clients.items()}  # fmt: skip
    u2 = sorted(shares)
    rejected = []
    for v in u2:
        inbox = {u: shares[u][v] for u in u2 if v in shares[u]}
        if tamper and v == tamper[1]:
            blob = bytearray(inbox[tamper[0]])
            blob[-1] ^= 0x80
            inbox[tamper[0]] = bytes(blob)
        rejected += clients[v].receive_shares(inbox)
    plan = sp.FixedPointPlan.for_devices(n, clip=1.0)
    floats = values or {d: rng.uniform(-1, 1, 257) for d in ids}
    x = {d: quantize_fixed(floats[d], frac_bits=plan.frac_bits, clip=1.0) for d in ids}
    masked = {
        d: parse_masked(clients[d].masked_input(x[d]).astype("<u4").tobytes(), 257)
        for d in ids
        if d not in drop_before_masked
    }
    survivors = sorted(masked)
    dropped = sorted(set(u2) - set(survivors))
    responders = [d for d in survivors if d not in drop_before_unmask]
    near = {u: (graph[u] | {u}) if graph else set(ids) for u in ids}
    responses = {
        u: parse_unmask(
            sp.pack_map(clients[u].unmask([v for v in survivors if v in near[u]],
                                          [v for v in dropped if v in near[u]])),
            set(survivors), set(dropped), near[u])
        for u in responders
    }  # fmt: skip
    total = unmask_sum(
        run_id="r1", round_=3, threshold=t, adverts=adverts, u2=u2, masked=masked,
        responses=responses, graph=graph,
    )  # fmt: skip
    return total, x, floats, survivors, plan, rejected, masked


@pytest.mark.parametrize("dropouts", [0, 1, 3])  # n - t = 3
def test_unmasked_sum_equals_plain_sum_with_dropouts(dropouts):
    n, t = 7, 4
    drop = tuple(_devices(n)[1 : 1 + dropouts])
    total, x, floats, survivors, plan, rejected, _ = _run(n, t, drop_before_masked=drop)
    assert survivors == [d for d in _devices(n) if d not in drop]
    assert rejected == []
    assert np.array_equal(total, sum_mod(np.stack([x[d] for d in survivors])))  # exact mod 2^32
    decoded = dequantize_sum(total, frac_bits=plan.frac_bits, n_summands=len(survivors))
    want = np.sum([floats[d] for d in survivors], axis=0)
    assert np.max(np.abs(decoded - want)) <= plan.precision


def test_survivors_that_vanish_before_unmasking_are_covered_by_the_others():
    n, t = 7, 4
    devs = _devices(n)
    total, x, _, survivors, *_ = _run(
        n, t, drop_before_masked=(devs[0],), drop_before_unmask=(devs[2], devs[5])
    )
    assert devs[2] in survivors  # its input counts although it never answered step 4
    assert np.array_equal(total, sum_mod(np.stack([x[d] for d in survivors])))


def test_too_few_survivors_fail_with_the_round_message():
    devs = _devices(5)
    with pytest.raises(RoundFailedError) as info:
        _run(5, 3, drop_before_masked=(devs[0],), drop_before_unmask=devs[1:3])
    assert str(info.value) == "round 3: 2 survivors < threshold 3; the previous model stays"


def test_a_share_failing_its_tag_is_rejected_and_the_round_still_unmasks():
    devs = _devices(6)
    total, x, _, survivors, _, rejected, _ = _run(
        6, 4, drop_before_masked=(devs[1],), tamper=(devs[1], devs[4])
    )
    assert len(rejected) == 1 and "share from dev-0001 failed its AES-GCM tag" in rejected[0]
    assert np.array_equal(total, sum_mod(np.stack([x[d] for d in survivors])))


def test_device_never_reveals_both_shares_of_one_device():
    ids = _devices(4)
    cs = {d: SecAggClient(device_id=d, run_id="r", round_=1, threshold=3) for d in ids}
    adv = {d: c.advertise() for d, c in cs.items()}
    out = {d: c.share_keys(adv) for d, c in cs.items()}
    for v in ids:
        cs[v].receive_shares({u: out[u][v] for u in ids if u != v})
    c = cs[ids[0]]
    with pytest.raises(WireError, match="must partition U2"):
        c.unmask(ids, [ids[3]])  # dev-0003 both survivor and dropped
    first = c.unmask(ids[:3], [ids[3]])
    assert {k: v[:1] for k, v in first.items()} == {
        ids[0]: b"b",
        ids[1]: b"b",
        ids[2]: b"b",
        ids[3]: b"s",
    }
    with pytest.raises(WireError, match="already answered once"):
        c.unmask(ids, [])  # a second request could ask for the b-share of dev-0003


def test_masked_input_is_independent_of_the_input():
    """The server's view of one device's masked vector is uniform on Z_{2^32} whatever the input:
    two very different inputs give masked vectors that a KS test cannot tell apart from
    uniform or from each other, while the raw quantized inputs are plainly not uniform."""
    n, size = 3, 20_000
    ids = _devices(n)
    zeros = {d: np.zeros(size) for d in ids}
    big = {d: np.full(size, 0.9) for d in ids}
    views = []
    for values in (zeros, big):
        clients = {d: SecAggClient(device_id=d, run_id="r", round_=1, threshold=2) for d in ids}
        adv = {d: c.advertise() for d, c in clients.items()}
        out = {d: c.share_keys(adv) for d, c in clients.items()}
        for v in ids:
            clients[v].receive_shares({u: out[u][v] for u in ids if u != v})
        q = quantize_fixed(values[ids[0]], frac_bits=20, clip=1.0)
        views.append((q, clients[ids[0]].masked_input(q).astype(np.float64) / 2**32))
    for raw, view in views:
        assert stats.kstest(view, "uniform").pvalue > 1e-3
        assert stats.kstest(raw.astype(np.float64) / 2**32, "uniform").pvalue < 1e-10
    assert stats.ks_2samp(views[0][1], views[1][1]).pvalue > 1e-3
    # Mean and variance of U(0,1): 1/2 and 1/12.
    for _, view in views:
        assert abs(view.mean() - 0.5) < 5 * math.sqrt(1 / 12 / size)
        assert abs(view.var() - 1 / 12) < 0.005


# -- SecAgg+ (Bell et al., CCS'20): the k-regular neighbour graph ------------------------------


@pytest.mark.parametrize("n,k", [(2, 0), (7, 0), (20, 5), (21, 5), (100, 0), (33, 8), (9, 20)])
def test_neighbour_graph_is_k_regular_symmetric_and_deterministic(n, k):
    ids = _devices(n)
    want = sp.neighbour_count(n, k)
    graph = _graph(list(reversed(ids)), k)
    assert sorted(graph) == ids
    assert all(len(nb) == want and d not in nb for d, nb in graph.items())
    assert all(d in graph[v] for d, nb in graph.items() for v in nb)  # undirected
    assert graph == _graph(ids, k)  # same public inputs, same graph, whatever the order
    if want < n - 1:
        assert graph != _graph(ids, k, seed="another round seed")


def test_neighbour_count_defaults_to_logarithmic_and_complete_for_small_n():
    assert [sp.neighbour_count(n) for n in (1, 2, 4, 10, 20, 100, 1000)] == [
        0, 1, 3, 9, 11, 15, 21,
    ]  # fmt: skip
    assert sp.neighbour_count(21, 5) == 6  # odd k on odd n rounds up to a valid degree
    assert sp.neighbour_count(8, 50) == 7
    assert _graph(_devices(8), 7) == {d: frozenset(_devices(8)) - {d} for d in _devices(8)}


def test_cloud_and_devices_derive_the_same_neighbourhoods():
    ids = _devices(20)
    clients = {
        d: SecAggClient(device_id=d, run_id="r1", round_=3, threshold=4, neighbours=5,
                        graph_seed="seed")
        for d in ids
    }  # fmt: skip
    adverts = {d: c.advertise() for d, c in clients.items()}
    graph = _graph(ids, 5)
    for d, c in clients.items():
        assert set(c.share_keys(adverts)) == graph[d] == c.neighbours


def _spread_dropouts(graph, t, count):
    """Up to ``count`` devices whose removal leaves every closed neighbourhood >= t alive."""
    dropped = []
    for d in sorted(graph)[: bool(count) * len(graph)]:
        trial = set(dropped) | {d}
        if all(len((nb | {v}) - trial) >= t for v, nb in graph.items()):
            dropped.append(d)
        if len(dropped) == count:
            break
    return tuple(dropped)


@pytest.mark.parametrize("dropouts", [0, 1, 4])
def test_secaggplus_unmasked_sum_equals_plain_sum_with_dropouts(dropouts):
    n, k = 20, 5
    t = sp.threshold_for(k + 1)
    graph = _graph(_devices(n), k)
    drop = _spread_dropouts(graph, t, dropouts)
    assert len(drop) == dropouts
    total, x, floats, survivors, plan, rejected, _ = _run(n, t, k=k, drop_before_masked=drop)
    assert survivors == [d for d in _devices(n) if d not in drop] and rejected == []
    assert np.array_equal(total, sum_mod(np.stack([x[d] for d in survivors])))  # exact mod 2^32
    decoded = dequantize_sum(total, frac_bits=plan.frac_bits, n_summands=len(survivors))
    want = np.sum([floats[d] for d in survivors], axis=0)
    assert np.max(np.abs(decoded - want)) <= plan.precision


def test_secaggplus_survivor_that_vanishes_before_unmasking_is_covered_by_its_neighbours():
    n, k = 20, 5
    t = sp.threshold_for(k + 1)
    drop = _spread_dropouts(_graph(_devices(n), k), t, 1)
    total, x, _, survivors, *_ = _run(
        n, t, k=k, drop_before_masked=drop, drop_before_unmask=(_devices(n)[7],)
    )
    assert np.array_equal(total, sum_mod(np.stack([x[d] for d in survivors])))


def test_secaggplus_full_degree_is_plain_secagg():
    n = 7
    for k in (n - 1, 50):
        c = SecAggClient(device_id="dev-0000", run_id="r1", round_=3, threshold=4, neighbours=k)
        ids = _devices(n)
        pub = [sp.public_bytes(sp.generate_private_key()) for _ in range(2 * n)]
        keys = {d: pub[2 * i] + pub[2 * i + 1] for i, d in enumerate(ids[1:])}
        keys["dev-0000"] = c.advertise()
        assert set(c.share_keys(keys)) == set(ids[1:])
    total, x, _, survivors, *_ = _run(n, 4, k=n - 1, drop_before_masked=(ids[2],))
    assert np.array_equal(total, sum_mod(np.stack([x[d] for d in survivors])))


def test_secaggplus_pairwise_masks_run_only_along_graph_edges():
    """A device's masked input is exactly x + PRG(b) + sum over its k neighbours of +-PRG(s_uv):
    no mask with a non-neighbour; the masks still cancel in the sum."""
    from kernels.masking import add_masks, expand_mask

    n, k, size = 12, 4, 64
    ids = _devices(n)
    clients = {
        d: SecAggClient(device_id=d, run_id="r1", round_=3, threshold=3, neighbours=k,
                        graph_seed="seed")
        for d in ids
    }  # fmt: skip
    adverts = {d: c.advertise() for d, c in clients.items()}
    out = {d: c.share_keys(adverts) for d, c in clients.items()}
    for v in ids:
        clients[v].receive_shares({u: out[u][v] for u in ids if v in out[u]})
    graph = _graph(ids, k)
    u = ids[0]
    x = np.arange(size, dtype=np.uint32)
    c = clients[u]
    masks = [(expand_mask(c._b, size), 1)]
    for v in sorted(graph[u]):
        lo, hi = sorted((u, v))
        seed = sp.agree(c._s, adverts[v][32:], info=sp.context("r1", 3, "mask", lo, hi))
        masks.append((expand_mask(seed, size), 1 if u < v else -1))
    assert np.array_equal(c.masked_input(x), add_masks(x, masks))
    masked = np.stack([clients[d].masked_input(x) for d in ids])
    selfs = [(expand_mask(clients[d]._b, size), -1) for d in ids]
    assert np.array_equal(add_masks(sum_mod(masked), selfs), sum_mod(np.stack([x] * n)))


def test_secaggplus_masked_input_still_looks_uniform():
    n, k, size = 10, 2, 20_000
    ids = _devices(n)
    views = []
    for value in (0.0, 0.9):
        clients = {
            d: SecAggClient(device_id=d, run_id="r", round_=1, threshold=2, neighbours=k,
                            graph_seed="g")
            for d in ids
        }  # fmt: skip
        adv = {d: c.advertise() for d, c in clients.items()}
        out = {d: c.share_keys(adv) for d, c in clients.items()}
        for v in ids:
            clients[v].receive_shares({u: out[u][v] for u in ids if v in out[u]})
        q = quantize_fixed(np.full(size, value), frac_bits=20, clip=1.0)
        views.append(clients[ids[0]].masked_input(q).astype(np.float64) / 2**32)
    for view in views:
        assert stats.kstest(view, "uniform").pvalue > 1e-3
        assert abs(view.mean() - 0.5) < 5 * math.sqrt(1 / 12 / size)
    assert stats.ks_2samp(views[0], views[1]).pvalue > 1e-3


def test_secaggplus_too_many_dropouts_in_one_neighbourhood_fail_cleanly():
    n, k = 20, 5
    t = sp.threshold_for(k + 1)  # 4 of each closed neighbourhood of 6
    ids = _devices(n)
    graph = _graph(ids, k)
    victim = ids[0]
    drop = tuple(sorted(graph[victim])[: k + 1 - t + 1])  # 3 of its neighbours: 3 alive < 4
    survivors = [d for d in ids if d not in drop]
    assert shortfall(3, t, graph, ids, survivors) == (
        f"round 3: 3 survivors in the neighbourhood of {victim} < threshold 4; "
        "the previous model stays"
    )
    assert shortfall(3, t, graph, ids, ids) is None
    # Without the cloud's pre-check, unmasking itself refuses with a one-line reason.
    reason = r"^round 3: \d [bs]-shares of dev-\d+ < threshold 4; the previous model stays$"
    with pytest.raises(RoundFailedError, match=reason):
        _run(n, t, k=k, drop_before_masked=drop[:2], drop_before_unmask=drop[2:])


def test_secaggplus_cloud_parsers_enforce_the_graph():
    graph = _graph(_devices(20), 5)
    d = "dev-0000"
    other = sorted(set(graph) - graph[d] - {d})[0]
    blob = b"\x00" * 160
    with pytest.raises(WireError, match="addressed to its 5 neighbours"):
        parse_shares(d, sp.pack_map({v: blob for v in graph[d] | {other}}), set(graph), graph[d])
    share = b"b" + sp.share_to_bytes(5)
    with pytest.raises(WireError, match=f"share for {other} from a device that is not"):
        parse_unmask(sp.pack_map({other: share}), set(graph), set(), graph[d] | {d})


def test_cloud_parsers_reject_malformed_step_messages():
    u1 = {"a", "b", "c"}
    ok = {"b": b"\x00" * 160, "c": b"\x01" * 160}
    assert parse_shares("a", sp.pack_map(ok), u1) == ok
    with pytest.raises(WireError, match="addressed to the other 2"):
        parse_shares("a", sp.pack_map({"b": b"\x00" * 160}), u1)
    with pytest.raises(WireError, match="must be 160 bytes"):
        parse_shares("a", sp.pack_map({"b": b"\x00" * 159, "c": b"\x00" * 160}), u1)
    with pytest.raises(WireError, match="masked vector must have length 10"):
        parse_masked(b"\x00" * 36, 10)
    share = sp.share_to_bytes(5)
    with pytest.raises(WireError, match="share for b must be of kind 's'"):
        parse_unmask(sp.pack_map({"b": b"b" + share}), {"a"}, {"b"})


# -- cloud aggregators and device sessions wired together in-process (no MQTT) -------------------

RUN = "r1"


class _Net:
    """Devices as edge.secure sessions wired straight to a cloud.secure aggregator.

    ``tamper(device, env) -> [envs]`` rewrites what a device sends (bad input injection).
    """

    def __init__(self, mode, samples, **config):
        from cloud.config import FederatedConfig
        from cloud.secure import get_secure
        from edge.secure import make_session

        cfg = FederatedConfig(run_id=RUN, secure=mode, **config)
        self.samples = samples
        self.agg = get_secure(mode, config=cfg, broadcast=self._broadcast, num_samples=samples.get)
        self.sessions = {
            d: make_session(mode, device_id=d, num_samples=n, reply=self._reply_from(d))
            for d, n in samples.items()
        }
        self.sent: list[tuple[dict, bytes]] = []  # everything devices sent, as the cloud saw it
        self.device_errors: list[str] = []
        self.tamper = lambda d, env: [env]
        self.state = None

    def _reply_from(self, device):
        def reply(req, msg_type, meta, body):
            env = req.reply(type=msg_type, sender=device, seq=1, meta=meta, body=body)
            for e in self.tamper(device, env):
                self.sent.append((e.meta, e.body))
                self.agg.on_message(device, e, self.state)

        return reply

    def _deliver(self, device, env):
        try:
            self.sessions[device].on_message(env)
        except WireError as exc:  # the agent logs, counts and drops these
            self.device_errors.append(str(exc))

    def _broadcast(self, messages):
        for device, msg_type, meta, body in messages:
            env = Envelope(
                type=msg_type, run_id=RUN, round=self.state.round, sender="cloud", seq=1,
                meta=meta, body=body,
            )  # fmt: skip
            self._deliver(device, env)
        return set()

    def round(self, round_, params, trained, *, wait=1.5):
        from cloud.round_state import RoundState

        ids = sorted(trained)
        self.state = RoundState(round=round_, selected=frozenset(ids))
        deadline = time.monotonic() + wait
        self.agg.prepare(ids, self.state, params, deadline)
        cfg = self.agg.client_config(ids)
        model = Envelope(
            type=MsgType.MODEL, run_id=RUN, round=round_, sender="cloud", seq=1,
            meta={"config": cfg},
        )  # fmt: skip
        for d in ids:
            if hasattr(self.sessions[d], "on_model"):
                self.sessions[d].on_model(model)
        for d in ids:
            self.sessions[d].submit_update(model, params, trained[d], {"train_seconds": 0.1})
        return self.agg.run(self.state, params, deadline)


def _params(rng, scale=1.0):
    return {"w": rng.normal(0, scale, (30, 7)).astype(np.float32), "b": rng.normal(0, 1, 7)}


def _oracle(before, trained, samples, contributors, clip=4.0):
    """Plain NumPy FedAvg of clipped deltas over ``contributors``, weights n_i / N_selected."""
    total = sum(samples[d] for d in trained)
    flat = sp.flatten_params(before)
    acc = sum(samples[d] / total * np.clip(sp.flatten_params(trained[d]) - flat, -clip, clip)
              for d in contributors)  # fmt: skip
    return acc / (sum(samples[d] for d in contributors) / total)


def _bound(frac_bits, samples, contributors):
    """Decoding error of the average: k summands within 2^-(f+1) each, divided by their weight."""
    weight = sum(samples[d] for d in contributors) / sum(samples.values())
    return len(contributors) * 2.0 ** -(frac_bits + 1) / weight + 1e-12


def _secagg_case(seed=3, n=6):
    rng = np.random.default_rng(seed)
    samples = {d: int(rng.integers(20, 200)) for d in _devices(n)}
    before = _params(rng)
    # Some coordinates move by more than the clip (4.0), so clipping is exercised too.
    trained = {d: {k: v + rng.normal(0, 2.5, v.shape).astype(v.dtype) for k, v in before.items()}
               for d in samples}  # fmt: skip
    return samples, before, trained


def test_secagg_round_in_process_matches_weighted_fedavg_of_clipped_deltas():
    samples, before, trained = _secagg_case()
    net = _Net("secagg", samples)
    out = net.round(1, before, trained)
    assert out.reason is None and out.contributors == sorted(samples)
    want = _oracle(before, trained, samples, samples)
    plan = sp.FixedPointPlan.for_devices(len(samples), clip=4.0)
    assert np.max(np.abs(out.delta - want)) <= _bound(plan.frac_bits, samples, samples)
    assert net.state.rejected == net.state.duplicates == 0


def test_secagg_bad_inputs_are_rejected_counted_and_the_round_completes(caplog):
    samples, before, trained = _secagg_case(seed=4)
    net = _Net("secagg", samples)
    ids = sorted(samples)

    def tamper(device, env):
        if env.type == MsgType.MASKED_UPDATE and device == ids[2]:
            return [env, env]  # sends twice
        if env.type == MsgType.MASKED_UPDATE and device == ids[4]:
            return [env.reply(type=env.type, sender=device, seq=2, meta=env.meta,
                              body=env.body[:-4])]  # fmt: skip
        if env.type == MsgType.KEY_SHARE and device == ids[1]:
            shares = sp.unpack_map(env.body)
            blob = bytearray(shares[ids[3]])
            blob[30] ^= 1  # the relay (or the network) flips a bit of one encrypted share
            shares[ids[3]] = bytes(blob)
            return [env.reply(type=env.type, sender=device, seq=2, meta=env.meta,
                              body=sp.pack_map(shares))]  # fmt: skip
        return [env]

    net.tamper = tamper
    out = net.round(1, before, trained)
    assert out.reason is None
    assert out.contributors == [d for d in ids if d != ids[4]]  # the bad vector is not in
    assert net.state.duplicates == 1 and net.state.rejected == 1
    assert "masked vector must have length 217" in net.state.reasons[0]
    assert net.sessions[ids[3]].rejected == 1  # the share that failed its AES-GCM tag
    assert any("failed its AES-GCM tag" in r.message for r in caplog.records)
    want = _oracle(before, trained, samples, out.contributors)
    frac = sp.FixedPointPlan.for_devices(6, clip=4.0).frac_bits
    assert np.max(np.abs(out.delta - want)) <= _bound(frac, samples, out.contributors)


def test_distributed_dp_noise_hook_is_applied_before_masking():
    samples, before, trained = _secagg_case(seed=8, n=4)
    net = _Net("secagg", samples)
    for session in net.sessions.values():
        session.noise = lambda v: v + 0.01  # stand-in for a device's share of Gaussian noise
    out = net.round(1, before, trained)
    want = _oracle(before, trained, samples, samples)
    frac = sp.FixedPointPlan.for_devices(4, clip=4.0).frac_bits
    # Four shares of 0.01 each, on the weighted sum (total weight 1 here).
    assert np.max(np.abs(out.delta - (want + 0.04))) <= _bound(frac, samples, samples)


@pytest.fixture(scope="module")
def he_net():
    """One HE federation for the module: the 2048-bit key is generated once, on a device."""
    rng = np.random.default_rng(5)
    samples = {d: int(rng.integers(20, 200)) for d in _devices(5)}
    net = _Net("he-paillier", samples)
    yield net
    for session in net.sessions.values():
        session.close()


def test_he_round_in_process_key_stays_on_devices_and_sum_matches(he_net):
    from kernels import PaillierKeyPair, decrypt_batch

    _, before, trained = _secagg_case(seed=6, n=4)  # dev-0004 sits this round out
    samples = {d: he_net.samples[d] for d in trained}
    out = he_net.round(1, before, trained)
    assert out.reason is None and out.contributors == sorted(samples)
    want = _oracle(before, trained, samples, samples)
    assert np.max(np.abs(out.delta - want)) <= _bound(HE_FRAC_BITS, samples, samples)
    # The devices share one key pair, generated by the first; the cloud holds the public part.
    fps = {he_net.sessions[d].keypair.public.fingerprint for d in trained}
    assert fps == {he_net.agg.public_key.fingerprint}
    assert he_net.sessions["dev-0004"].keypair is None
    assert not any(isinstance(v, PaillierKeyPair) for v in vars(he_net.agg).values())
    secret = he_net.sessions["dev-0000"].keypair.export_secret()
    for meta, body in he_net.sent:
        assert secret[-64:] not in body and secret[-64:].hex() not in str(meta)
    with pytest.raises(TypeError, match="a public key cannot decrypt"):
        decrypt_batch(he_net.agg.public_key, [2])


def test_he_bad_ciphertexts_are_rejected_and_the_round_completes(he_net):
    from kernels import PaillierKeyPair, encrypt_batch, serialize_ciphertexts

    _, before, trained = _secagg_case(seed=7, n=5)
    samples = he_net.samples
    ids = sorted(samples)
    pk = he_net.agg.public_key
    other = PaillierKeyPair.generate(512, insecure_test_key=True)

    def tamper(device, env):
        if env.type != MsgType.CIPHERTEXT or env.meta.get("phase") != "update":
            return [env]
        count = int.from_bytes(env.body[13:17], "big")
        if device == ids[0]:  # under another key
            body = serialize_ciphertexts(other, encrypt_batch(other, [1] * count))
        elif device == ids[1]:  # n shares a factor with n: outside Z*_{n^2}
            width = (pk.nsquare.bit_length() + 7) // 8
            body = env.body[:19] + pk.n.to_bytes(width, "big") + env.body[19 + width :]
        elif device == ids[2]:
            return [env, env]  # twice
        else:
            return [env]
        return [env.reply(type=env.type, sender=device, seq=2, meta=env.meta, body=body)]

    he_net.tamper = tamper
    try:
        out = he_net.round(2, before, trained)
    finally:
        he_net.tamper = lambda d, env: [env]
    reasons = he_net.state.reasons
    assert he_net.state.rejected == 2 and he_net.state.duplicates == 1, reasons
    assert "fingerprint" in reasons[0] and "Z*_(n^2)" in reasons[1], reasons
    assert out.contributors == ids[2:]
    # dev-0004 joined in this round and got the same key from a holder, via the relay.
    newcomer = he_net.sessions["dev-0004"].keypair
    assert newcomer.public.fingerprint == he_net.agg.public_key.fingerprint
    want = _oracle(before, trained, samples, ids[2:])
    assert np.max(np.abs(out.delta - want)) <= _bound(HE_FRAC_BITS, samples, ids[2:])


def test_he_key_share_failing_its_tag_or_fingerprint_is_refused():
    import base64

    from edge.secure.he_client import HeSession

    out = []
    holder = HeSession(device_id="a", num_samples=1, reply=lambda *m: out.append(m))
    peer = HeSession(device_id="b", num_samples=1, reply=lambda *m: out.append(m))
    peer.on_message(Envelope(type=MsgType.KEY_ADVERTISE, run_id=RUN, round=1, sender="cloud",
                             seq=1, meta={"phase": "he-hello"}))  # fmt: skip
    b_key = out[-1][3]
    holder.on_message(Envelope(type=MsgType.HE_PUBLIC_CONTEXT, run_id=RUN, round=1,
                               sender="cloud", seq=2, meta={"phase": "generate", "bits": 2048},
                               body=sp.pack_map({"b": b_key})))  # fmt: skip
    meta, body = out[-1][2], out[-1][3]
    share = sp.unpack_map(body)["b"]
    holder_key = base64.b64encode(sp.public_bytes(holder._x25519)).decode()

    def install(blob, fingerprint):
        peer.on_message(Envelope(
            type=MsgType.HE_PUBLIC_CONTEXT, run_id=RUN, round=1, sender="cloud", seq=3,
            meta={"phase": "install", "holder": "a", "holder_key": holder_key,
                  "fingerprint": fingerprint}, body=blob))  # fmt: skip

    bad = bytearray(share)
    bad[40] ^= 4
    with pytest.raises(WireError, match="federation key share from a failed its AES-GCM tag"):
        install(bytes(bad), meta["fingerprint"])
    with pytest.raises(WireError, match="!= announced 0000000000000000"):
        install(share, "0000000000000000")
    assert peer.keypair is None
    install(share, meta["fingerprint"])
    assert peer.keypair.public.fingerprint == holder.keypair.public.fingerprint
    assert out[-1][2] == {"phase": "installed", "fingerprint": meta["fingerprint"]}


def test_secaggplus_round_in_process_matches_weighted_fedavg_of_clipped_deltas():
    samples, before, trained = _secagg_case(seed=9, n=12)
    net = _Net("secagg", samples, secagg_neighbours=4)
    out = net.round(1, before, trained)
    cfg = net.agg._round_cfg
    assert (cfg["secure_neighbours"], cfg["secure_threshold"]) == (4, 3)
    assert out.reason is None and out.contributors == sorted(samples)
    want = _oracle(before, trained, samples, samples)
    plan = sp.FixedPointPlan.for_devices(len(samples), clip=4.0)
    assert np.max(np.abs(out.delta - want)) <= _bound(plan.frac_bits, samples, samples)
    assert net.state.rejected == net.state.duplicates == 0 and net.device_errors == []
    # Each device was told only about its own closed neighbourhood, and shared with it only.
    graph = sp.neighbour_graph(samples, k=4, seed=cfg["secure_graph_seed"], run_id=RUN, round_=1)
    for d, session in net.sessions.items():
        assert session._client.neighbours == graph[d]


def test_secaggplus_round_in_process_fails_cleanly_when_a_neighbourhood_is_short():
    samples, before, trained = _secagg_case(seed=10, n=12)
    net = _Net("secagg", samples, secagg_neighbours=4)
    silent = set()

    def tamper(device, env):
        if env.type == MsgType.MASKED_UPDATE:
            if not silent:
                cfg = net.agg._round_cfg
                graph = sp.neighbour_graph(
                    samples, k=4, seed=cfg["secure_graph_seed"], run_id=RUN, round_=1
                )
                silent.update(sorted(graph["dev-0000"])[:3])  # 2 of 5 left < t = 3
            if device in silent:
                return []  # crashed after sharing keys
        return [env]

    net.tamper = tamper
    out = net.round(1, before, trained, wait=1.0)
    assert out.delta is None
    assert out.reason == (
        "round 1: 2 survivors in the neighbourhood of dev-0000 < threshold 3; "
        "the previous model stays"
    )
