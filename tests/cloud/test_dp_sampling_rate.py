"""User-level DP when devices go offline: each round is accounted with the rate it really used.

The accountant plans q = m / population, but the server samples m of the devices online; with
fewer online each takes part with probability m / online > q. The oracle is Opacus'
RDPAccountant stepped by hand with the (noise, rate) sequence the rounds really used.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from cloud.checkpoint import load_checkpoint, save_checkpoint
from cloud.config import FederatedConfig
from cloud.errors import PrivacyBudgetExceededError
from cloud.privacy_round import RoundPrivacy
from cloud.strategies import ClientUpdate, get_strategy

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning")

DELTA = 1e-3
FEDAVG = get_strategy("fedavg")


def _params() -> dict[str, np.ndarray]:
    return {"w": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)}


def _updates(rng, params, k: int) -> list[ClientUpdate]:
    return [
        ClientUpdate(
            client_id=f"dev-{i}",
            params={n: (v + rng.normal(size=v.shape)).astype(v.dtype) for n, v in params.items()},
            num_samples=10,
        )
        for i in range(k)
    ]


def _oracle(steps: list[tuple[float, float]]) -> float:
    acc = RDPAccountant()
    for sigma, q in steps:
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=DELTA)


def _round(rp: RoundPrivacy, rng, params, *, online: int) -> dict:
    """One server round: the pre-round check, then the selection of m of ``online``."""
    rp.before_round(num_selected=0, population=online)
    k = min(rp.config.clients_per_round, online)
    rp.before_round(num_selected=k, population=online)
    return rp.aggregate(FEDAVG, params, _updates(rng, params, k))


def _user(**kw) -> FederatedConfig:
    base = dict(dp="user", noise_multiplier=1.0, delta=DELTA, clients_per_round=3, rounds=5)
    return FederatedConfig(**{**base, **kw})


def test_rounds_with_fewer_devices_online_are_accounted_with_the_real_rate(caplog):
    rng = np.random.default_rng(0)
    rp, params = RoundPrivacy(_user()), _params()
    caplog.set_level(logging.INFO, logger="cloud.privacy_round")
    # 6 online at the first round: planned q = 3/6; then 4, then 3, then 8 (more than planned).
    for online in (6, 4, 3, 8):
        params = _round(rp, rng, params, online=online)
    assert rp.dp_fedavg.sample_rate == 3 / 6
    real = [(1.0, 3 / 6), (1.0, 3 / 4), (1.0, 3 / 3), (1.0, 3 / 6)]
    assert rp.dp_fedavg.ledger.state_dict()["history"] == [[s, q, 1] for s, q in real]
    assert rp.epsilon([]) == pytest.approx(_oracle(real), rel=1e-12)
    # What the planned rate alone would have reported: less than the truth.
    assert rp.epsilon([]) > _oracle([(1.0, 3 / 6)] * 4) * 1.05
    higher = [r.getMessage() for r in caplog.records if "accounted with sampling rate" in r.message]
    assert len(higher) == 2, higher
    assert "0.75 (3 of 4 device(s) online) > planned 0.5" in higher[0]
    assert "1 (3 of 3 device(s) online)" in higher[1]


def test_budget_stops_before_a_round_that_passes_the_target_at_its_real_rate():
    rng = np.random.default_rng(1)
    cfg = _user(noise_multiplier=None, target_epsilon=2.0, rounds=3)
    rp, params = RoundPrivacy(cfg), _params()
    for _ in range(2):
        params = _round(rp, rng, params, online=6)
    sigma = rp.dp_fedavg.noise_multiplier  # calibrated so that 3 rounds at 3/6 fit the target
    done = [(sigma, 0.5)] * 2
    assert _oracle([*done, (sigma, 0.5)]) <= cfg.target_epsilon < _oracle([*done, (sigma, 1.0)])

    rp.before_round(num_selected=0, population=6)
    assert rp.budget_exhausted() is None  # everyone online: the planned round still fits
    # Before the selection a momentary dip (1 online while others reconnect) does not stop the
    # run: the server waits for min_clients and the real rate is checked after the draw.
    rp.before_round(num_selected=0, population=1)
    assert rp.budget_exhausted() is None
    rp.before_round(num_selected=3, population=3)  # the draw: 3 of the 3 online
    reason = rp.budget_exhausted()
    assert reason is not None and "\n" not in reason
    assert "at sampling rate 1 (3 of 3 device(s) online)" in reason
    assert "target_epsilon=2.0" in reason
    # If devices vanish between the check and the selection, aggregate refuses the round itself.
    rp.before_round(num_selected=3, population=3)
    with pytest.raises(PrivacyBudgetExceededError, match=r"sample_rate=1 "):
        rp.aggregate(FEDAVG, params, _updates(rng, params, 3))
    assert rp.dp_fedavg.ledger.state_dict()["history"] == [[sigma, 0.5, 2]]
    assert rp.epsilon([]) == pytest.approx(_oracle(done), rel=1e-12)


def test_resume_restores_a_mixed_rate_ledger_and_keeps_the_plan(tmp_path):
    cfg = _user()
    first, params, rng = RoundPrivacy(cfg), _params(), np.random.default_rng(2)
    for online in (6, 4):
        params = _round(first, rng, params, online=online)
    save_checkpoint(tmp_path / "ckpt.npz", {"privacy": first.state_dict()})

    resumed = RoundPrivacy(cfg)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ckpt.npz")["privacy"])
    # Only 4 devices online at the resume: the plan stays m / population = 3/6, not 3/4.
    after_first = _round(first, np.random.default_rng(3), params, online=4)
    after_resumed = _round(resumed, np.random.default_rng(3), params, online=4)

    assert resumed.dp_fedavg.population == first.dp_fedavg.population == 6
    assert resumed.dp_fedavg.state_dict() == first.dp_fedavg.state_dict()
    steps = [(1.0, 3 / 6), (1.0, 3 / 4), (1.0, 3 / 4)]
    assert resumed.dp_fedavg.ledger.state_dict()["history"] == [[1.0, 0.5, 1], [1.0, 0.75, 2]]
    assert resumed.epsilon([]) == first.epsilon([]) == pytest.approx(_oracle(steps), rel=1e-12)
    for k, v in after_first.items():
        np.testing.assert_array_equal(after_resumed[k], v, err_msg=k)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_dp_fedavg_refuses_a_sampling_rate_outside_0_1(bad):
    rp = RoundPrivacy(_user())
    rp.before_round(num_selected=0, population=6)
    with pytest.raises(ValueError, match=r"sample_rate must be in \(0, 1\]"):
        rp.dp_fedavg.aggregate(_params(), [], sample_rate=bad)
    assert rp.dp_fedavg.ledger.steps == 0
