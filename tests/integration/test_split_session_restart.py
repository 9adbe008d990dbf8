"""A coordinator restarted with the same run id repeats a round; its step workers stay up.

The new session (e.g. ``edgesplit cloud --resume`` after a crash in round 1, which has no
checkpoint yet) runs round 1 again. The worker that served the old session's round 1 must ask
for the new session's cloud half and serve every step of it, old step numbers included.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cloud.config import FederatedConfig
from cloud.split_trainer import SplitTrainer
from cloud.split_worker import SplitStepWorker
from converters.federation_data import device_ids, federated_split
from converters.mqtt import MqttConfig
from edge.split_client import SplitClient, SplitClientOptions

pytestmark = pytest.mark.integration

CLIENTS = 2


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _config(tmp_path, name: str, **kw) -> FederatedConfig:
    base = dict(
        run_id="again", model="digits-mlp", mode="splitfed-v1", rounds=1, min_clients=CLIENTS,
        local_epochs=1, batch_size=16, lr=0.1, momentum=0.9, round_timeout=60.0,
        register_timeout=15.0, out_dir=str(tmp_path / name), seed=0, prefix="rs",
    )  # fmt: skip
    return FederatedConfig(**{**base, **kw})


def _devices(broker, prefix: str, shards) -> list[SplitClient]:
    devices = []
    for dev, shard in zip(device_ids(CLIENTS), shards, strict=True):
        # A short step_timeout: without sessions the repeated round's steps got no reply.
        opts = SplitClientOptions(device_id=dev, prefix=prefix, step_timeout=5.0, step_resend=1.0)
        c = SplitClient(options=opts, mqtt=MqttConfig.from_url(broker.url, client_id=dev),
                        x=shard.x, y=shard.y)  # fmt: skip
        c.start()
        devices.append(c)
    return devices


def _trainer(broker, cfg, test) -> SplitTrainer:
    return SplitTrainer(
        cfg, mqtt=MqttConfig.from_url(broker.url, client_id="cloud"), test_set=test,
        expected_devices=CLIENTS,
    )  # fmt: skip


def test_a_restarted_coordinator_repeating_a_round_gets_it_trained_by_the_same_worker(
    mosquitto, tmp_path
):
    shards, test = federated_split(
        "digits", clients=CLIENTS, scheme="iid", seed=0, test_fraction=0.2
    )
    # The oracle: the in-process coordinator trains the new session's round (seed 1).
    devices = _devices(mosquitto, "rs-local", shards)
    try:
        local = _trainer(mosquitto, _config(tmp_path, "local", seed=1, prefix="rs-local"), test)
        local.run()
    finally:
        for c in devices:
            c.stop()  # the next federation reuses the device ids (MQTT client ids)

    devices = _devices(mosquitto, "rs", shards)
    worker = SplitStepWorker(
        worker_id="w0", group="g", prefix="rs",
        mqtt=MqttConfig.from_url(mosquitto.url, client_id="w0"),
    ).start()  # fmt: skip
    try:
        old = _trainer(mosquitto, _config(tmp_path, "old", split_workers=1), test)
        old.run()
        # Same run id, a new session: round 1 again, from another model (seed 1).
        new = _trainer(mosquitto, _config(tmp_path, "new", split_workers=1, seed=1), test)
        summary = new.run()
    finally:
        for c in devices:
            c.stop()
        worker.stop()
    assert old.session != new.session
    (row,) = map(json.loads, Path(new.config.out_dir, "metrics.jsonl").read_text().splitlines())
    assert row["status"] == "ok" and row["clients_ok"] == CLIENTS, row
    want = local.model.state_dict()
    for k, v in new.model.state_dict().items():
        np.testing.assert_allclose(v.numpy(), want[k].numpy(), rtol=0, atol=1e-6, err_msg=k)
    # One half per session of the repeated round; no step was taken for stale or refused.
    assert list(worker._halves) == [("again", 1, old.session), ("again", 1, new.session)]
    assert worker.rejected == 0 and worker.duplicates == 0, worker.reasons
    assert worker.steps_served == sum(c.steps for c in devices)
    assert all(c.rejected == 0 for c in devices), [c.reasons for c in devices]
    assert summary["accuracy"] > 0.5
