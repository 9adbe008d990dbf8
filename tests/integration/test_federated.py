"""Federated rounds end to end: devices <-> real Mosquitto <-> cloud trainer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from converters.federation_data import federated_split
from split.train import evaluate, train_centralized
from split.zoo import build_model

pytestmark = pytest.mark.integration


def _rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_fedavg_10_devices_3_rounds_learns_digits(federation, fast_config, tmp_path):
    config = fast_config.replace(rounds=3)
    fed = federation(config, clients=10, partition="iid")
    summary = fed.server().run()

    rows = _rows(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["status"] == "ok" and r["clients_ok"] == 10 for r in rows)
    # Oracle: the same model trained centrally on the union of the shards, same data passes.
    model, _ = build_model(config.model, seed=config.seed)
    x = np.concatenate([s.x for s in fed.shards])
    y = np.concatenate([s.y for s in fed.shards])
    train_centralized(
        model,
        x,
        y,
        epochs=config.rounds * config.local_epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        momentum=config.momentum,
        seed=0,
    )
    central = evaluate(model, fed.test.x, fed.test.y)[0]
    assert summary["accuracy"] > 0.85
    assert summary["accuracy"] > central - 0.08, (summary["accuracy"], central)
    # Bytes on the wire: each round moves the model down and back up to 10 devices.
    raw = sum(v.nbytes for v in fed.server().params.values())
    for r in rows:
        assert 10 * raw <= r["bytes_down"] <= 1.05 * 10 * raw + 20_000
        assert 10 * raw <= r["bytes_up"] <= 1.05 * 10 * raw + 20_000
    assert (tmp_path / "run" / "rounds.png").stat().st_size > 1000
    summary_file = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {"accuracy", "rounds", "bytes_up", "bytes_down", "seconds"} <= set(summary_file)


def test_devices_vanishing_mid_round_are_dropped_and_round_goes_on(
    federation, fast_config, tmp_path
):
    config = fast_config.replace(rounds=3, min_clients=2)
    fed = federation(config, clients=8, partition="iid", vanish_prob=0.3)
    summary = fed.server().run()
    rows = _rows(tmp_path / "run")
    dropped = sum(r["clients_dropped"] for r in rows)
    crashes = sum(a.crashes for a in fed.agents)
    assert crashes > 0, "seeded dropout should crash some device"
    assert dropped == crashes
    assert all(r["status"] == "ok" for r in rows)
    assert all(r["clients_ok"] + r["clients_dropped"] == r["clients_selected"] for r in rows)
    assert summary["accuracy"] > 0.7
    # Rounds end when the last will arrives, not at the deadline.
    assert all(r["seconds"] < config.round_timeout / 2 for r in rows)


def test_resume_continues_exactly_where_it_stopped(federation, fast_config, tmp_path):
    full = fast_config.replace(rounds=4, out_dir=str(tmp_path / "full"), run_id="full")
    fed = federation(full, clients=4, partition="iid")
    server_full = fed.server()
    server_full.run()

    part = full.replace(out_dir=str(tmp_path / "part"), run_id="part")
    server_a = fed.server(part.replace(rounds=2))
    server_a.run()
    server_b = fed.server(part)
    server_b.run(resume=True)

    assert server_b.round == 4
    rows = _rows(tmp_path / "part")
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    for k, v in server_full.params.items():
        np.testing.assert_array_equal(server_b.params[k], v, err_msg=k)


def test_user_level_dp_ledger_survives_resume(federation, fast_config, tmp_path):
    from opacus.accountants import RDPAccountant

    cfg = fast_config.replace(
        rounds=3, dp="user", noise_multiplier=1.0, clip=1.0, delta=1e-3, clients_per_round=3
    )
    fed = federation(cfg, clients=6, partition="iid")
    fed.server(cfg.replace(rounds=2)).run()
    server = fed.server(cfg)
    summary = server.run(resume=True)

    acc = RDPAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=1.0, sample_rate=3 / 6)
    assert summary["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-3), rel=1e-12)
    eps = [r["epsilon"] for r in _rows(tmp_path / "run")]
    assert eps[0] < eps[1] < eps[2]


def test_centralized_and_federated_use_the_same_test_split():
    shards, test = federated_split("digits", clients=5, scheme="iid", seed=3, test_fraction=0.2)
    shards2, test2 = federated_split("digits", clients=5, scheme="iid", seed=3, test_fraction=0.2)
    assert np.array_equal(test.y, test2.y)
    assert all(np.array_equal(a.x, b.x) for a, b in zip(shards, shards2, strict=True))
    assert sum(len(s) for s in shards) + len(test) == 1797
