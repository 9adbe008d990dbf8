"""Privacy accounting across rounds on a real Mosquitto: secure rounds and devices going offline."""

from __future__ import annotations

import json
import time

import pytest
from opacus.accountants import RDPAccountant

from cloud.checkpoint import load_checkpoint

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning"),
]


def _rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# Secure rounds used to report only the largest epsilon of that round's contributors and never
# fed RoundPrivacy's per-device ledger view (nor the checkpoint, nor its rules).
def test_secagg_with_sample_dp_reports_and_checkpoints_every_devices_epsilon(
    federation, fast_config, tmp_path
):
    config = fast_config.replace(
        rounds=2, local_epochs=1, dp="sample", noise_multiplier=1.0, delta=1e-4, secure="secagg"
    )
    fed = federation(config, clients=3, partition="dirichlet:1.0")  # unequal shards
    server = fed.server()
    summary = server.run()

    rows = _rows(tmp_path / "run")
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    reported = server.privacy.device_epsilon
    assert set(reported) == {a.id for a in fed.agents}
    assert all(0 < e < float("inf") for e in reported.values()), reported
    assert rows[0]["epsilon"] <= rows[1]["epsilon"] == max(reported.values())
    assert summary["epsilon"] == rows[-1]["epsilon"]
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.npz")["privacy"]["device_epsilon"]
    assert saved == reported


# DP-FedAvg plans q = m / population at the first round; when devices then go offline the
# server samples m of fewer devices, and those rounds must be accounted with m / online.
def test_user_level_rounds_after_devices_go_offline_use_the_real_rate(
    federation, fast_config, tmp_path
):
    config = fast_config.replace(
        rounds=3, local_epochs=1, dp="user", noise_multiplier=1.0, delta=1e-3, clients_per_round=3
    )
    fed = federation(config, clients=6, partition="iid")
    server = fed.server()

    def after_round(row: dict) -> None:
        if row["round"] != 1:
            return
        for agent in fed.agents[4:]:
            agent.stop()  # publishes its retained offline presence
        deadline = time.monotonic() + 10
        while len(server.registry.online()) > 4 and time.monotonic() < deadline:
            time.sleep(0.05)

    server.on_round = after_round
    summary = server.run()

    rows = _rows(tmp_path / "run")
    assert [(r["status"], r["clients_selected"]) for r in rows] == [("ok", 3)] * 3, rows
    oracle = RDPAccountant()
    for row, online in zip(rows, (6, 4, 4), strict=True):
        oracle.step(noise_multiplier=1.0, sample_rate=3 / online)
        assert row["epsilon"] == pytest.approx(oracle.get_epsilon(delta=1e-3), rel=1e-9), row
    assert summary["epsilon"] == rows[-1]["epsilon"]
    ledger = load_checkpoint(tmp_path / "run" / "checkpoint.npz")["privacy"]["dp_fedavg"]["ledger"]
    assert ledger["history"] == [[1.0, 0.5, 1], [1.0, 0.75, 2]]
