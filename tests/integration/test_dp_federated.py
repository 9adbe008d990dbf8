"""Differential privacy end to end: devices <-> real Mosquitto <-> cloud, and bad DP flags."""

from __future__ import annotations

import json
import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from converters.cli import main
from converters.federation_data import device_ids

pytestmark = [
    pytest.mark.integration,
    # The oracle's own Opacus calls warn that a larger RDP order might be tighter; irrelevant.
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning"),
]


def _rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _opacus_steps_per_epoch(n: int, batch_size: int) -> tuple[float, int]:
    """(sample rate, steps per epoch) exactly as Opacus' DP data loader derives them for N rows."""
    data = TensorDataset(torch.zeros(n, 1))
    loader = DPDataLoader.from_data_loader(DataLoader(data, batch_size=batch_size))
    return loader.sample_rate, len(loader)


def _expected_sample_epsilon(n: int, config, rounds_done: int) -> float:
    """Epsilon of one device after ``rounds_done`` rounds, recomputed from Opacus alone."""
    q, per_epoch = _opacus_steps_per_epoch(n, config.batch_size)
    planned = config.rounds * config.local_epochs * per_epoch
    sigma = get_noise_multiplier(
        target_epsilon=config.target_epsilon,
        target_delta=config.delta,
        sample_rate=q,
        steps=planned,
        accountant="rdp",
    )
    acc = RDPAccountant()
    for _ in range(rounds_done * config.local_epochs * per_epoch):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=config.delta)


def test_sample_level_dp_epsilon_matches_opacus_per_device(federation, fast_config, tmp_path):
    config = fast_config.replace(
        rounds=3, local_epochs=3, batch_size=16, lr=0.5, dp="sample", target_epsilon=3.0, delta=1e-4
    )
    # Unequal shards (465, 296, 228, 449 rows): each device has its own sample rate and noise.
    fed = federation(config, clients=4, partition="dirichlet:1.0")
    server = fed.server()
    summary = server.run()

    rows = _rows(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["status"] == "ok" and r["clients_ok"] == 4 for r in rows)
    sizes = {dev: len(shard) for dev, shard in zip(device_ids(4), fed.shards, strict=True)}
    # What each device reported over MQTT in its last update, per device.
    reported = server.privacy.device_epsilon
    assert set(reported) == set(sizes)
    assert len({round(v, 12) for v in reported.values()}) == 4
    for dev, n in sizes.items():
        expected = _expected_sample_epsilon(n, config, rounds_done=3)
        assert reported[dev] == pytest.approx(expected, rel=1e-9), dev
        assert reported[dev] <= config.target_epsilon
    # Every metrics row carries the run's epsilon: the largest any device has spent so far.
    for r in rows:
        expected = max(_expected_sample_epsilon(n, config, r["round"]) for n in sizes.values())
        assert r["epsilon"] == pytest.approx(expected, rel=1e-9), r
        assert 0 < r["epsilon"] <= config.target_epsilon
    assert rows[0]["epsilon"] < rows[1]["epsilon"] < rows[2]["epsilon"]
    assert summary["epsilon"] == rows[-1]["epsilon"]
    assert summary["dp"] == "sample" and summary["stopped"] is None
    assert summary["accuracy"] > 0.3  # learns something despite the noise (10 classes)


# A device restarted across a resume (as `edgesplit simulate --resume` does: new device
# processes) must continue its DP-SGD ledger from its state folder, not start from epsilon 0.
def test_sample_level_epsilon_never_drops_when_devices_restart_across_resume(
    federation, fast_config, tmp_path
):
    config = fast_config.replace(
        rounds=4, local_epochs=1, batch_size=32, dp="sample", noise_multiplier=1.0, delta=1e-4
    )
    first = federation(config, clients=2, partition="iid")
    first.server(config.replace(rounds=2)).run()
    first.close()  # the device processes end; their in-memory ledgers are gone
    again = federation(config, clients=2, partition="iid")
    again.server(config).run(resume=True)

    eps = [r["epsilon"] for r in _rows(tmp_path / "run")]
    assert len(eps) == 4
    # Oracle: four rounds' steps at the same (sigma, q) on the same records.
    q, per_epoch = _opacus_steps_per_epoch(min(len(s) for s in first.shards), 32)
    acc = RDPAccountant()
    for _ in range(4 * per_epoch):
        acc.step(noise_multiplier=1.0, sample_rate=q)
    assert eps == sorted(eps), eps
    assert eps[-1] == pytest.approx(acc.get_epsilon(delta=1e-4), rel=1e-6)


def _user_config(fast_config, *, rounds: int):
    return fast_config.replace(
        rounds=rounds,
        local_epochs=1,
        dp="user",
        target_epsilon=2.0,
        delta=1e-3,
        clip=1.0,
        clients_per_round=3,
    )


def _expected_user_epsilon(config, *, population: int, planned: int, done: int) -> float:
    """User-level epsilon after ``done`` rounds at the noise calibrated for ``planned``."""
    q = config.clients_per_round / population
    sigma = get_noise_multiplier(
        target_epsilon=config.target_epsilon,
        target_delta=config.delta,
        sample_rate=q,
        steps=planned,
        accountant="rdp",
    )
    acc = RDPAccountant()
    for _ in range(done):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=config.delta)


def test_user_level_dp_target_epsilon_is_met_and_matches_opacus(federation, fast_config, tmp_path):
    config = _user_config(fast_config, rounds=3)
    fed = federation(config, clients=6, partition="iid")
    summary = fed.server().run()

    rows = _rows(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["status"] == "ok" and r["clients_ok"] == 3 for r in rows)
    for r in rows:
        expected = _expected_user_epsilon(config, population=6, planned=3, done=r["round"])
        assert r["epsilon"] == pytest.approx(expected, rel=1e-9), r
        assert r["epsilon"] <= config.target_epsilon
    # Opacus' noise search stops within 0.01 below the target: the budget is used, not wasted.
    assert summary["epsilon"] >= config.target_epsilon - 0.011
    assert summary["stopped"] is None


# A fresh run calibrates its noise so that exactly `rounds` rounds fit the target, so the budget
# can only run out when a finished run is resumed with more rounds (the ledger in the checkpoint
# has spent almost all of epsilon). The resumed run must stop before any round past the budget.
def test_user_level_dp_stops_at_its_budget_when_rounds_are_extended(
    federation, fast_config, tmp_path
):
    base = _user_config(fast_config, rounds=2)
    fed = federation(base, clients=6, partition="iid")
    first = fed.server().run()
    assert first["stopped"] is None and first["rounds_ok"] == 2
    spent = first["epsilon"]
    assert spent == pytest.approx(
        _expected_user_epsilon(base, population=6, planned=2, done=2), rel=1e-9
    )
    assert spent <= base.target_epsilon

    summary = fed.server(base.replace(rounds=5)).run(resume=True)

    assert summary["stopped"] is not None
    assert "privacy budget" in summary["stopped"]
    assert f"target_epsilon={base.target_epsilon}" in summary["stopped"]
    rows = _rows(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2]  # no round ran past the budget
    assert all(r["epsilon"] <= base.target_epsilon for r in rows)
    assert summary["epsilon"] == pytest.approx(spent, rel=1e-12)


# DP-FedAvg's accountant uses q = clients_per_round / population, but the server samples from
# the devices actually online (cloud/server.py _select). A `population` larger than the devices
# that exist makes the true inclusion rate (here 3/6) larger than the accounted one (3/12), so
# epsilon would be under-reported. The run must refuse such a population or account the real rate.
def test_user_level_epsilon_accounts_the_real_sampling_rate(federation, fast_config):
    config = fast_config.replace(
        rounds=2,
        local_epochs=1,
        dp="user",
        noise_multiplier=1.0,
        delta=1e-3,
        clients_per_round=3,
        population=12,
    )
    fed = federation(config, clients=6, partition="iid")
    try:
        summary = fed.server().run()
    except ValueError as exc:  # refusing the population up front is a valid fix too
        assert "population" in str(exc)
        return
    acc = RDPAccountant()
    for _ in range(2):
        acc.step(noise_multiplier=1.0, sample_rate=3 / 6)
    assert summary["epsilon"] >= acc.get_epsilon(delta=1e-3) * (1 - 1e-9)


@pytest.mark.parametrize(
    ("flags", "field", "value"),
    [
        (["--dp", "sample", "--noise-multiplier", "-0.5"], "noise_multiplier", "-0.5"),
        (["--dp", "user", "--noise-multiplier", "1.0", "--delta", "1.0"], "delta", "1.0"),
        (["--dp", "user", "--noise-multiplier", "1.0", "--delta", "2"], "delta", "2"),
        (
            ["--dp", "sample", "--noise-multiplier", "1.0", "--target-epsilon", "3"],
            "noise_multiplier / target_epsilon",
            "sample",
        ),
    ],
)
def test_bad_dp_config_through_simulate_cli_exits_2_with_one_line(
    flags, field, value, capsys, tmp_path
):
    argv = ["simulate", "--quiet", "--clients", "2", "--rounds", "1"]
    code = main([*argv, "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("edgesplit simulate: error: ")
    assert field in lines[0] and value in lines[0], lines[0]
    assert not (tmp_path / "run").exists()  # rejected before anything started


def test_simulate_cli_accepts_the_same_flags_when_valid():
    # The negative cases above fail on the values, not on argument parsing: the same flags
    # with valid values build a config.
    from cloud.commands import config_from_args
    from converters.cli import build_parser

    args = build_parser().parse_args(
        ["simulate", "--dp", "sample", "--noise-multiplier", "0.5", "--delta", "1e-5"]
    )
    config = config_from_args(args)
    assert (config.dp, config.noise_multiplier, config.delta) == ("sample", 0.5, 1e-5)
    assert math.isclose(config.clip, 1.0)
