"""U-shaped split learning with sample-level DP on a real Mosquitto: every step noised,
the ledger on both sides, labels and losses never on the wire, budget stops on resume."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cloud.split_trainer import SplitTrainer
from cloud.strategies import ClientUpdate
from converters.mqtt import MqttConfig
from converters.tensor_codec import decode_tensors
from converters.wire import MsgType
from split.privacy.split_dp import SplitDP
from tests.integration.test_split_learning import Run, Sniffer, _config, label_leaks

pytestmark = pytest.mark.integration

DP = dict(
    model="digits-mlp-tanh", mode="ushaped", dp="sample", target_epsilon=8.0,
    act_noise_clip=1.0, grad_noise_clip=0.5, clip=1.0, lr=0.05, momentum=0.0,
)  # fmt: skip


@pytest.fixture
def split_run(mosquitto):
    made = []

    def make(config, **kw):
        made.append(Run(mosquitto, config, **kw))
        return made[-1]

    yield make
    for run in made:
        run.close()


def test_every_step_is_noised_and_both_sides_account_the_same_epsilon(
    split_run, mosquitto, tmp_path
):
    cfg = _config(tmp_path, rounds=2, local_epochs=1, **DP)
    sniffer = Sniffer(mosquitto, cfg.prefix)
    run = split_run(cfg, clients=2)
    summary = run.trainer.run()
    envs = sniffer.envelopes()

    plan = run.trainer.split_dp
    assert plan == SplitDP.for_target(target_epsilon=8.0, delta=cfg.delta, releases=2,
                                      act_clip=1.0, grad_clip=0.5, param_clip=1.0)  # fmt: skip
    rows = run.rows()
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for r in rows:  # one step per sample per epoch
        assert r["epsilon"] == plan.epsilon(r["round"] * cfg.local_epochs)
    assert summary["dp"] == "sample" and 7.5 < summary["epsilon"] <= 8.0
    assert summary["stopped"] is None

    ups = [e for e in envs if e.type == MsgType.UPDATE]
    assert len(ups) == 4
    for e in ups:
        m = e.meta["metrics"]
        assert m["epsilon"] == plan.epsilon(e.round) and m["releases"] == e.round
        assert "loss" not in m  # a loss on private samples is not covered by the ledger
    assert label_leaks(envs) == []

    # The wire carries clipped rows plus N(0, (sigma * clip)^2) per coordinate:
    # E||row||^2 = ||clipped||^2 + d (sigma clip)^2, with ||clipped|| <= clip.
    def check(rows: np.ndarray, clip: float, sigma: float) -> None:
        sq = (rows.reshape(len(rows), -1).astype(np.float64) ** 2).sum(axis=1)
        d, var = rows[0].size, (sigma * clip) ** 2
        se = 5 * var * np.sqrt(2 * d / len(sq))
        assert d * var - se < sq.mean() < d * var + clip**2 + se

    acts = [decode_tensors(e.body)["activation"] for e in envs if e.type == MsgType.ACTIVATION]
    check(np.concatenate(acts), 1.0, plan.act_sigma)
    grads = [
        decode_tensors(e.body)["grad"] * len(decode_tensors(e.body)["grad"]) / e.meta["scale"]
        for e in envs
        if e.type == MsgType.LOGIT_GRADIENT
    ]  # rows were sent as (per-sample gradient + noise) / b
    check(np.concatenate(grads), 0.5, plan.grad_sigma)
    assert len(acts) == len(grads) == sum(c.steps for c in run.clients)


def test_resumed_run_continues_the_ledger_and_stops_at_the_budget(split_run, tmp_path):
    cfg = _config(tmp_path, rounds=1, local_epochs=2, **DP)
    first = split_run(cfg, clients=2).trainer.run()
    assert 7.5 < first["epsilon"] <= 8.0

    more = cfg.replace(rounds=3)  # would re-plan for 3 rounds; the checkpoint's noise wins
    run = split_run(more, clients=2)
    assert run.trainer.split_dp != SplitDP.from_meta(first["split_dp"])
    summary = run.trainer.run(resume=True)
    assert run.trainer.split_dp == SplitDP.from_meta(first["split_dp"])
    assert summary["stopped"].startswith("privacy budget: another round would reach epsilon")
    assert summary["rounds_ok"] == 1 and summary["epsilon"] == first["epsilon"]


def test_a_device_reporting_an_impossible_epsilon_is_overruled(tmp_path, caplog):
    from converters.federation_data import federated_split

    cfg = _config(tmp_path, rounds=2, local_epochs=3, **DP)
    test_set = federated_split("digits", clients=1, scheme="iid", seed=0, test_fraction=0.2)[1]
    trainer = SplitTrainer(cfg, mqtt=MqttConfig(client_id="cloud", port=1), test_set=test_set)
    trainer._act_releases = {"dev-0000": 3, "dev-0001": 3}
    fake = [
        ClientUpdate("dev-0000", {}, 10, metrics={"epsilon": 0.01}),  # claims less than spent
        ClientUpdate("dev-0001", {}, 10, metrics={"epsilon": float("nan")}),
    ]
    with caplog.at_level(logging.WARNING):
        eps = trainer._split_dp_epsilon(fake)
    assert eps == trainer.split_dp.epsilon(3)
    assert "dev-0000 reported epsilon=0.01, but its 3 steps per sample give" in caplog.text
    assert "dev-0001 reported epsilon=nan" in caplog.text


def test_halves_opacus_cannot_privatize_are_refused_before_training(tmp_path):
    from converters.errors import ConfigError
    from converters.federation_data import federated_split

    cfg = _config(tmp_path, **{**DP, "model": "mobilenet-mini", "dataset": "synthetic"})
    test_set = federated_split("digits", clients=1, scheme="iid", seed=0, test_fraction=0.2)[1]
    with pytest.raises(ConfigError, match=r"cannot be privatized by Opacus; offending modules: e"):
        SplitTrainer(cfg, mqtt=MqttConfig(client_id="cloud", port=1), test_set=test_set)


@pytest.mark.parametrize("mode", ["splitfed-v2", "vanilla"])
def test_labels_on_the_wire_are_randomized_once_and_resent(split_run, mosquitto, tmp_path, mode):
    from edge.split_client import round_seed

    kw = {**DP, "mode": mode, "grad_noise_clip": 0.0}
    cfg = _config(tmp_path, rounds=2, local_epochs=2, **kw)
    sniffer = Sniffer(mosquitto, cfg.prefix)
    run = split_run(cfg, clients=2)
    summary = run.trainer.run()
    envs = sniffer.envelopes()

    plan = run.trainer.split_dp
    assert plan.label_epsilon == 4.0 and plan.num_classes == 10  # half of the target
    assert 7.5 < summary["epsilon"] <= 8.0
    assert [r["epsilon"] for r in run.rows()] == [plan.epsilon(2), plan.epsilon(4)]
    for client, shard in zip(run.clients, run.shards, strict=True):
        sent = client._dp._labels
        n, p = len(shard.y), plan.keep_probability
        assert abs((sent == shard.y).mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
        steps = {
            (e.round, e.meta["step"]): decode_tensors(e.body)["labels"]
            for e in envs
            if e.type == MsgType.ACTIVATION and e.sender == client.id
        }
        per_epoch = -(-n // cfg.batch_size)
        assert len(steps) == cfg.rounds * cfg.local_epochs * per_epoch
        for r in (1, 2):  # rebuild the device's batches: every label sent is the randomized one
            order_rng = np.random.default_rng(round_seed(client.id, r))
            step = 0
            for _ in range(cfg.local_epochs):
                order = order_rng.permutation(n)
                for start in range(0, n, cfg.batch_size):
                    step += 1
                    idx = order[start : start + cfg.batch_size]
                    np.testing.assert_array_equal(steps[(r, step)], sent[idx])
