"""Secure rounds with sample-level DP: the run's epsilon, the ledger rules and the checkpoint.

The secure aggregator is replaced by a scripted one (no broker): each round returns the sum and
the epsilons the contributors reported with their protected inputs, as SecAgg and Paillier HE do
(both hand the server a SecureOutcome, so one path serves both).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from cloud.config import FederatedConfig
from cloud.round_state import RoundState
from cloud.secure import SecureOutcome
from cloud.server import FederatedServer
from converters.federation_data import federated_split
from converters.mqtt import MqttConfig


class ScriptedSecure:
    """Stands in for cloud.secure: round r returns the r-th scripted outcome."""

    handles = frozenset()

    def __init__(self, outcomes: list[SecureOutcome]) -> None:
        self.outcomes = list(outcomes)

    def run(self, state, params, deadline) -> SecureOutcome:
        return self.outcomes.pop(0)


def _outcome(size: int, eps: dict[str, object]) -> SecureOutcome:
    return SecureOutcome(
        np.full(size, 0.01),
        contributors=sorted(eps),
        metrics={d: {"epsilon": e, "train_seconds": 0.1} for d, e in eps.items()},
    )


@pytest.fixture(scope="module")
def held_out():
    return federated_split("digits", clients=1, scheme="iid", seed=0, test_fraction=0.2)[1]


def _server(tmp_path, held_out) -> FederatedServer:
    config = FederatedConfig(
        run_id="secdp",
        model="digits-mlp",
        secure="secagg",
        dp="sample",
        target_epsilon=3.0,
        delta=1e-4,
        out_dir=str(tmp_path / "run"),
        seed=0,
    )
    return FederatedServer(config, mqtt=MqttConfig(client_id="cloud"), test_set=held_out)


def _play(server: FederatedServer, rounds: list[dict[str, object]]) -> list[tuple[dict, bool]]:
    """Runs the scripted rounds; returns each round's row and whether the model changed."""
    size = sum(v.size for v in server.params.values())
    server.secure = ScriptedSecure([_outcome(size, eps) for eps in rounds])
    out = []
    for eps in rounds:
        server.round += 1
        state = RoundState(round=server.round, selected=frozenset(eps))
        before = {k: v.copy() for k, v in server.params.items()}
        row = server._finish_secure_round(state, time.monotonic(), 0, 0)
        changed = any(not np.array_equal(server.params[k], v) for k, v in before.items())
        out.append((row, changed))
    return out


def test_secure_rounds_report_the_runs_epsilon_and_enforce_the_ledger_rules(tmp_path, held_out):
    server = _server(tmp_path, held_out)
    played = _play(
        server,
        [
            {"dev-a": 2.0, "dev-b": 1.0},
            {"dev-b": 1.5, "dev-c": 0.5},  # dev-a, the largest so far, sits this round out
            {"dev-b": 1.2, "dev-c": 0.7},  # dev-b's ledger went down: a reset device
            {"dev-c": 3.5, "dev-d": float("nan")},  # overspent, and no number at all
            {"dev-b": 1.6, "dev-d": 2.5},
        ],
    )
    rows = [row for row, _ in played]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "failed", "ok"]
    # The run's epsilon: the largest any device ever reported, never going down; an overspent
    # report counts too (it was released to the cloud inside the sum).
    assert [r["epsilon"] for r in rows] == [2.0, 2.0, 2.0, 3.5, 3.5]

    # A bad report fails the round in one line naming the device, the rule and the value, and
    # the summed update (which cannot be taken apart) is not applied.
    assert [changed for _, changed in played] == [True, True, False, False, True]
    for row in rows[2:4]:
        assert "\n" not in row["error"] and row["accuracy"] is None
    assert rows[2]["error"].startswith("round 3: device dev-b: epsilon 1.2 < 1.5 it reported")
    assert rows[2]["rejected"] == 1
    err = rows[3]["error"]
    assert "device dev-c: epsilon 3.5 exceeds target_epsilon=3.0" in err
    assert "device dev-d: metrics.epsilon must be >= 0, got nan" in err
    assert rows[3]["rejected"] == 2

    # The valid (and overspent) reports of a failed round still count: the cloud learned
    # their sum.
    want = {"dev-a": 2.0, "dev-b": 1.6, "dev-c": 3.5, "dev-d": 2.5}
    assert server.privacy.device_epsilon == want

    # The checkpoint carries the per-device ledger view; a resumed cloud keeps enforcing it.
    server._checkpoint()
    resumed = _server(tmp_path, held_out)
    resumed._resume()
    assert resumed.privacy.device_epsilon == want
    (row, _), (low, _) = _play(resumed, [{"dev-d": 2.6}, {"dev-a": 1.9}])
    assert row["status"] == "ok" and row["epsilon"] == 3.5
    assert low["status"] == "failed" and "device dev-a: epsilon 1.9 < 2 it" in low["error"]
    assert resumed.privacy.device_epsilon == {**want, "dev-d": 2.6}
