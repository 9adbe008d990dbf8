"""Tests for DPConfig, delta checks, noise calibration and the Opacus-backed PrivacyLedger."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from split.errors import PrivacyConfigError
from split.privacy.budget import DPConfig, PrivacyLedger, check_delta, noise_for_target

OPACUS = {"rdp": RDPAccountant, "prv": PRVAccountant}
DELTA = 1e-5


def opacus_epsilon(name: str, phases: list[tuple[float, float, int]], delta: float = DELTA):
    """Oracle: a fresh Opacus accountant stepped one step at a time."""
    acc = OPACUS[name]()
    for sigma, q, steps in phases:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("name", ["rdp", "prv"])
@pytest.mark.parametrize(
    "phases",
    [
        [(1.1, 0.01, 300)],
        [(0.8, 0.05, 40), (1.5, 0.02, 25)],
        [(2.0, 0.1, 7), (2.0, 0.1, 5), (0.9, 0.1, 3)],
    ],
)
def test_ledger_epsilon_equals_fresh_opacus_accountant(name, phases):
    ledger = PrivacyLedger(accountant=name, delta=DELTA)
    for sigma, q, steps in phases:
        ledger.step(noise_multiplier=sigma, sample_rate=q, steps=steps)
    assert ledger.epsilon() == opacus_epsilon(name, phases)


@settings(max_examples=50, deadline=None)
@given(
    phases=st.lists(
        st.tuples(
            st.sampled_from([0.5, 1.0, 2.5]), st.sampled_from([0.01, 0.2]), st.integers(0, 5)
        ),
        max_size=8,
    )
)
def test_bulk_steps_leave_the_same_history_as_opacus_single_steps(phases):
    ledger = PrivacyLedger(delta=DELTA)
    oracle = RDPAccountant()
    for sigma, q, steps in phases:
        ledger.step(noise_multiplier=sigma, sample_rate=q, steps=steps)
        for _ in range(steps):
            oracle.step(noise_multiplier=sigma, sample_rate=q)
    assert ledger.accountant.history == oracle.history
    assert ledger.steps == sum(steps for _, _, steps in phases)


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_ledger_resumes_exactly_through_json(name):
    phases = [(1.0, 0.02, 60), (1.3, 0.02, 40), (1.3, 0.05, 30)]
    whole = PrivacyLedger(accountant=name, delta=DELTA)
    first = PrivacyLedger(accountant=name, delta=DELTA)
    for sigma, q, steps in phases:
        whole.step(noise_multiplier=sigma, sample_rate=q, steps=steps)
    # Interrupt in the middle of the second phase.
    first.step(noise_multiplier=1.0, sample_rate=0.02, steps=60)
    first.step(noise_multiplier=1.3, sample_rate=0.02, steps=15)
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = PrivacyLedger(accountant=name, delta=DELTA)
    resumed.load_state_dict(saved)
    for _ in range(25):
        resumed.step(noise_multiplier=1.3, sample_rate=0.02)
    resumed.step(noise_multiplier=1.3, sample_rate=0.05, steps=30)
    assert resumed.epsilon() == whole.epsilon()
    assert resumed.state_dict() == whole.state_dict()


def test_ledger_state_rejects_other_accountant_or_delta():
    ledger = PrivacyLedger(accountant="rdp", delta=DELTA)
    ledger.step(noise_multiplier=1.0, sample_rate=0.1, steps=3)
    state = ledger.state_dict()
    with pytest.raises(PrivacyConfigError, match="mechanism must be 'prv', got 'rdp'"):
        PrivacyLedger(accountant="prv", delta=DELTA).load_state_dict(state)
    with pytest.raises(PrivacyConfigError, match="delta must be 0.0001, got 1e-05"):
        PrivacyLedger(accountant="rdp", delta=1e-4).load_state_dict(state)


def test_would_exceed_checks_a_copy_and_agrees_with_real_steps():
    ledger = PrivacyLedger(delta=DELTA)
    ledger.step(noise_multiplier=1.0, sample_rate=0.05, steps=50)
    before = ledger.state_dict()
    eps_now = ledger.epsilon()
    after = ledger.epsilon_after(noise_multiplier=1.0, sample_rate=0.05, steps=20)
    assert ledger.state_dict() == before
    assert after > eps_now
    assert ledger.would_exceed(
        target_epsilon=(eps_now + after) / 2, noise_multiplier=1.0, sample_rate=0.05, steps=20
    )
    assert not ledger.would_exceed(
        target_epsilon=after, noise_multiplier=1.0, sample_rate=0.05, steps=20
    )
    ledger.step(noise_multiplier=1.0, sample_rate=0.05, steps=20)
    assert ledger.epsilon() == after


def test_empty_and_noiseless_ledgers():
    ledger = PrivacyLedger(delta=DELTA)
    assert ledger.epsilon() == 0.0
    ledger.step(noise_multiplier=0.0, sample_rate=0.1)
    assert math.isinf(ledger.epsilon())


def test_unknown_accountant_lists_known_names():
    with pytest.raises(ValueError, match="known accountants: rdp, prv"):
        PrivacyLedger(accountant="moments", delta=DELTA)


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
@pytest.mark.parametrize("name", ["rdp", pytest.param("prv", marks=pytest.mark.slow)])
def test_noise_for_target_matches_opacus_and_meets_target(name):
    kw = dict(target_epsilon=2.0, delta=DELTA, sample_rate=0.04, steps=250)
    sigma = noise_for_target(**kw, accountant=name)
    assert sigma == get_noise_multiplier(
        target_epsilon=2.0, target_delta=DELTA, sample_rate=0.04, steps=250, accountant=name
    )
    eps = opacus_epsilon(name, [(sigma, 0.04, 250)])
    # Opacus' binary search stops within 0.01 below the target.
    assert 2.0 - 0.011 <= eps <= 2.0


def test_infeasible_target_reports_closest_setting_that_really_fits():
    with pytest.raises(PrivacyConfigError) as info:
        noise_for_target(target_epsilon=1.0, delta=DELTA, sample_rate=0.1, steps=100_000)
    msg = str(info.value)
    assert "\n" not in msg
    assert "target_epsilon=1.0 is infeasible for steps=100000" in msg
    reach = float(re.search(r"closest feasible: epsilon=([\d.e+]+)", msg).group(1))
    assert reach == pytest.approx(opacus_epsilon_fast(20.0, 0.1, 100_000), rel=1e-2)
    fit = int(re.search(r"at most steps=(\d+)", msg).group(1))
    assert opacus_epsilon_fast(20.0, 0.1, fit) <= 1.0 < opacus_epsilon_fast(20.0, 0.1, fit + 1)


def opacus_epsilon_fast(sigma: float, q: float, steps: int) -> float:
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(DELTA)


def test_infeasible_even_for_one_step():
    with pytest.raises(PrivacyConfigError, match="even steps=1 reaches epsilon="):
        noise_for_target(target_epsilon=0.01, delta=DELTA, sample_rate=0.01, steps=1000)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(noise_multiplier=-0.5), "noise_multiplier must be >= 0, got -0.5"),
        (dict(noise_multiplier=float("nan")), "noise_multiplier must be >= 0, got nan"),
        (dict(noise_multiplier=1.0, max_grad_norm=-1.0), "max_grad_norm must be > 0, got -1.0"),
        (dict(noise_multiplier=1.0, clip_norm=float("nan")), "clip_norm must be > 0, got nan"),
        (dict(noise_multiplier=1.0, delta=1.0), "delta must be in (0, 1), got 1.0"),
        (dict(), "exactly one of noise_multiplier / target_epsilon must be set"),
        (dict(noise_multiplier=1.0, target_epsilon=3.0), "exactly one of noise_multiplier"),
        (dict(target_epsilon=-1.0), "target_epsilon must be > 0, got -1.0"),
        (dict(noise_multiplier=1.0, accountant="gdp"), "accountant must be one of rdp, prv"),
        (dict(noise_multiplier=1.0, adaptive_clip=True), "adaptive_clip is only supported"),
        (dict(noise_multiplier=1.0, mode="batch"), "mode must be one of sample, user"),
    ],
)
def test_bad_configs_raise_one_line_errors(kwargs, message):
    kwargs = {"mode": "sample", **kwargs}
    with pytest.raises(PrivacyConfigError) as info:
        DPConfig(**kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_check_delta_names_delta_and_population():
    check_delta(1e-5, 1797)
    with pytest.raises(PrivacyConfigError, match=r"1/N = 0.001 for N=1000 records, got delta=0.01"):
        check_delta(1e-2, 1000)


def test_config_and_ledger_state_load_without_torch():
    code = (
        "import sys, json; sys.modules['torch'] = None\n"
        "from split.privacy.budget import DPConfig, PrivacyLedger\n"
        "DPConfig(mode='user', target_epsilon=2.0, adaptive_clip=True)\n"
        "import split.privacy\n"
        "print(split.privacy.DPConfig.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "DPConfig"


def test_noise_cap_is_respected_at_the_boundary():
    kw = dict(target_epsilon=2.0, delta=DELTA, sample_rate=0.04, steps=250)
    sigma = noise_for_target(**kw)
    assert noise_for_target(**kw, max_noise_multiplier=sigma) == sigma
    with pytest.raises(PrivacyConfigError, match=f"needs noise_multiplier > {sigma * 0.9}"):
        noise_for_target(**kw, max_noise_multiplier=sigma * 0.9)
