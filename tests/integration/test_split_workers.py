"""SplitFed V1 with step workers on a real Mosquitto: shared pick-up, sticky sessions, failover."""

from __future__ import annotations

import dataclasses
import json
import threading

import numpy as np
import pytest
import torch

from cloud.config import FederatedConfig
from cloud.split_trainer import SplitTrainer
from cloud.split_worker import SplitStepWorker
from converters.errors import ConfigError
from converters.federation_data import device_ids, federated_split
from converters.mqtt import MqttConfig, MqttEndpoint
from converters.tensor_codec import encode_tensors
from converters.topics import Topics
from converters.wire import Envelope, MsgType, encode
from edge.split_client import SplitClient, SplitClientOptions

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _config(tmp_path, name: str, **kw) -> FederatedConfig:
    base = dict(
        run_id="sw", model="digits-mlp", mode="splitfed-v1", rounds=2, min_clients=1,
        local_epochs=1, batch_size=16, lr=0.1, momentum=0.9, round_timeout=60.0,
        register_timeout=15.0, out_dir=str(tmp_path / name), seed=0, prefix=f"sw-{name}",
    )  # fmt: skip
    return FederatedConfig(**{**base, **kw})


class Federation:
    """Devices, optional step workers and the coordinator on one broker."""

    def __init__(
        self, broker, config, *, clients: int, workers: int = 0, step_timeout=30.0, max_chunk=None
    ):
        self.config = config
        shards, test = federated_split(
            config.dataset, clients=clients, scheme="iid", seed=0, test_fraction=0.2
        )
        self.devices = []
        for dev, shard in zip(device_ids(clients), shards, strict=True):
            opts = SplitClientOptions(
                device_id=dev, prefix=config.prefix, step_timeout=step_timeout, step_resend=5.0
            )
            mqtt = MqttConfig.from_url(broker.url, client_id=dev)
            if max_chunk is not None:  # frames this small make every step a multi-frame stream
                mqtt = dataclasses.replace(mqtt, max_chunk=max_chunk)
            c = SplitClient(options=opts, mqtt=mqtt, x=shard.x, y=shard.y)
            self.devices.append(c.start() or c)
        self.workers = [
            SplitStepWorker(
                worker_id=f"w{i}",
                group="g",
                prefix=config.prefix,
                mqtt=MqttConfig.from_url(broker.url, client_id=f"w{i}"),
            ).start()  # fmt: skip
            for i in range(workers)
        ]
        self.trainer = SplitTrainer(
            config, mqtt=MqttConfig.from_url(broker.url, client_id="cloud"), test_set=test,
            expected_devices=clients, on_round=self._on_round,
        )  # fmt: skip
        self.after_round = None

    def _on_round(self, row):
        if self.after_round is not None:
            self.after_round(row)

    def rows(self) -> list[dict]:
        with open(f"{self.config.out_dir}/metrics.jsonl") as f:
            return [json.loads(line) for line in f]

    def close(self) -> None:
        for c in self.devices:
            c.stop()
        for w in self.workers:
            if w.endpoint.connected:
                w.stop()


@pytest.fixture
def federation(mosquitto):
    made = []

    def make(config, **kw):
        f = Federation(mosquitto, config, **kw)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


@pytest.mark.parametrize("step_qos", [1, 0])
def test_step_workers_train_exactly_what_the_in_process_cloud_trains(
    federation, tmp_path, step_qos
):
    # V1 gives every device its own cloud-half copy, so who serves a device's steps changes no
    # number: two workers sharing the sessions must end with the in-process run's model.
    local = federation(_config(tmp_path, "local"), clients=4)
    local.trainer.run()
    local.close()  # the next run reuses the device ids (MQTT client ids)
    fed = federation(
        _config(tmp_path, "workers", split_workers=2, step_qos=step_qos), clients=4, workers=2
    )
    summary = fed.trainer.run()
    want = local.trainer.model.state_dict()
    for k, v in fed.trainer.model.state_dict().items():
        np.testing.assert_allclose(v.numpy(), want[k].numpy(), rtol=0, atol=1e-6, err_msg=k)
    rows = fed.rows()
    assert [r["status"] for r in rows] == ["ok", "ok"]
    # The coordinator reports the bytes its workers carried: about what the in-process cloud
    # counted itself (the workers count envelopes, the endpoint also frame headers).
    for r, ref in zip(rows, local.rows(), strict=True):
        ratio = (r["bytes_up"] + r["bytes_down"]) / (ref["bytes_up"] + ref["bytes_down"])
        assert 0.9 < ratio < 1.1, (r, ref)
        assert r["samples"] == ref["samples"]
    assert all(r["clients_ok"] == 4 and r["step_workers"] == 2 for r in rows), rows
    # The shared subscription spread the sessions; each session stayed with one worker.
    w0, w1 = fed.workers
    assert w0._qos == w1._qos == step_qos  # their replies go at the run's step QoS
    assert w0.sessions and w1.sessions and not (w0.sessions & w1.sessions)
    assert len(w0.sessions | w1.sessions) == 8  # 4 devices x 2 rounds
    steps = sum(c.steps for c in fed.devices)
    assert w0.steps_served + w1.steps_served == steps
    assert summary["accuracy"] > 0.7 and w0.rejected == w1.rejected == 0


def test_first_steps_bigger_than_one_frame_claim_a_worker_then_stream_to_it(federation, tmp_path):
    local = federation(_config(tmp_path, "local"), clients=3)
    local.trainer.run()
    local.close()
    fed = federation(
        _config(tmp_path, "claims", split_workers=2), clients=3, workers=2, max_chunk=1024
    )
    grants = []

    def recording(worker):
        grant = worker._grant

        def wrapped(device, env):
            grants.append((worker.id, device))
            grant(device, env)

        return wrapped

    for w in fed.workers:
        w._grant = recording(w)
    fed.trainer.run()
    assert fed.devices[0].endpoint.fits_one_frame("x/steps/dev-0000", 16 * 64 * 4) is False
    want = local.trainer.model.state_dict()
    for k, v in fed.trainer.model.state_dict().items():
        np.testing.assert_allclose(v.numpy(), want[k].numpy(), rtol=0, atol=1e-6, err_msg=k)
    assert [r["status"] for r in fed.rows()] == ["ok", "ok"]
    assert len(grants) == 6  # one claim per device and round, answered by one worker
    owners = {}
    for w in fed.workers:
        for _run, round_, device in w.sessions:
            assert (round_, device) not in owners
            owners[(round_, device)] = w.id
    assert len(owners) == 6 and all(w.rejected == 0 for w in fed.workers)
    assert sorted(grants) == sorted((w, d) for (_, d), w in owners.items())


def test_a_killed_step_worker_loses_only_its_sessions_and_the_next_round_recovers(
    federation, tmp_path
):
    cfg = _config(tmp_path, "kill", split_workers=2, rounds=3, local_epochs=2)
    fed = federation(cfg, clients=4, workers=2, step_timeout=3.0)
    victim, survivor = fed.workers
    killed, swallowed, served_in_2 = threading.Event(), set(), []
    serve = victim._serve

    def dies_mid_round(device, env):
        if env.round == 2 and (killed.is_set() or len(served_in_2) >= 2):
            swallowed.add(device)
            if not killed.is_set():
                killed.set()
                victim.endpoint.drop_connection()  # like a killed process: no goodbye...
                threading.Thread(target=victim.stop).start()  # ...and no coming back
            return
        serve(device, env)
        if env.round == 2:
            served_in_2.append(device)  # it dies in the middle of round 2, after two steps

    victim._serve = dies_mid_round
    fed.trainer.run()
    rows = fed.rows()
    assert killed.is_set() and swallowed
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"], rows
    lost = swallowed | set(served_in_2)  # the victim's round-2 sessions
    assert rows[1]["clients_ok"] == 4 - len(lost), (lost, rows[1])
    # Round 3: every device's first step reaches the survivor, which serves them all.
    assert rows[2]["clients_ok"] == 4 and rows[2]["step_workers"] == 1
    assert {d for (_, r, d) in survivor.sessions if r == 3} == set(device_ids(4))


def test_split_workers_need_splitfed_v1():
    with pytest.raises(ConfigError, match="split_workers needs mode 'splitfed-v1'"):
        FederatedConfig(mode="splitfed-v2", split_workers=2)


def test_bad_messages_to_workers_and_coordinator_are_refused_and_the_round_goes_on(
    federation, mosquitto, tmp_path
):
    cfg = _config(tmp_path, "bad", split_workers=1, rounds=1)
    fed = federation(cfg, clients=2, workers=1)
    (worker,) = fed.workers
    rogue = MqttEndpoint(MqttConfig.from_url(mosquitto.url, client_id="rogue"))
    rogue.connect()
    topics = Topics(prefix=cfg.prefix)
    sent = threading.Event()

    def attack(row=None):
        if sent.is_set():
            return
        sent.set()
        act = encode_tensors({"activation": np.zeros((4, 64), np.float32),
                              "labels": np.zeros(4, np.int64)})  # fmt: skip

        def env(kind, sender, meta, body=b"", round_=1):
            return encode(Envelope(type=kind, run_id=cfg.run_id, round=round_, sender=sender,
                                   seq=1, meta=meta, body=body))  # fmt: skip

        rogue.post(topics.steps("dev-0000"), b"garbage")
        rogue.post(
            topics.steps("dev-0000"),  # another device's name in the envelope
            env(MsgType.ACTIVATION, "dev-0001", {"step": 1, "batch": 4}, act),
        )
        rogue.post(topics.steps("dev-0000"), env(MsgType.UPDATE, "dev-0000", {"step": 1}))
        rogue.post(topics.steps("dev-0000"), env(MsgType.ACTIVATION, "dev-0000", {"step": -3}))
        rogue.post(topics.steps("dev-0000"), env(MsgType.STEP_CLAIM, "dev-0000", {"step": 1}))
        half = encode_tensors({"nope": np.ones(3, np.float32)})
        rogue.send(
            topics.worker("w0", "up"),  # wrong tensors for the cloud half
            env(MsgType.HALF_UPDATE, "w0", {"device": "dev-0000"}, half),
            timeout=5,
        )
        rogue.send(
            topics.worker("w0", "up"),  # sender does not match the topic
            env(MsgType.HALF_UPDATE, "w9", {"device": "dev-0000"}, half),
            timeout=5,
        )

    # Strike while the round runs: after registration, before the devices finish.
    fed.trainer._announce_orig = fed.trainer._announce

    def announce(msg_type, status):
        fed.trainer._announce_orig(msg_type, status)
        if status == "running":
            attack()

    fed.trainer._announce = announce
    summary = fed.trainer.run()
    rogue.close()
    assert sent.is_set()
    (row,) = fed.rows()
    assert row["status"] == "ok" and row["clients_ok"] == 2, row
    assert worker.rejected == 5, worker.reasons
    assert any("does not match topic device" in r for r in worker.reasons)
    assert any("STEP_CLAIM on the shared topic) only, got UPDATE" in r for r in worker.reasons)
    assert any("STEP_CLAIM from dev-0000: meta.claim must be a str" in r for r in worker.reasons)
    assert any("meta.step must be an int >= 0, got -3" in r for r in worker.reasons)
    assert row["rejected"] >= 2, row  # the coordinator's two, counted in the round
    assert summary["accuracy"] > 0.5
