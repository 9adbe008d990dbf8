"""A stale step message (an older step arriving after a later one was answered) is never trained."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from cloud.config import FederatedConfig
from cloud.split_trainer import SplitTrainer
from cloud.split_worker import SplitStepWorker
from converters.federation_data import device_ids, federated_split
from converters.mqtt import MqttConfig
from converters.wire import MsgType, decode
from edge.split_client import SplitClient, SplitClientOptions, round_seed
from split.train import train_epochs
from split.zoo import build_model

pytestmark = pytest.mark.integration

STEPS = (MsgType.ACTIVATION, MsgType.LOGIT_GRADIENT)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _config(tmp_path, **kw) -> FederatedConfig:
    base = dict(
        run_id="stale", model="digits-mlp", rounds=1, min_clients=1, local_epochs=1,
        batch_size=16, lr=0.1, momentum=0.9, round_timeout=60.0, register_timeout=15.0,
        out_dir=str(tmp_path / "run"), seed=0, prefix="st",
    )  # fmt: skip
    return FederatedConfig(**{**base, **kw})


def _resend_step_1_late(device: SplitClient) -> list:
    """Makes the device post its step-1 messages again right before its first step-3 message,
    i.e. after step 2 was answered: a resend that crossed its reply, arriving late."""
    post, first, resent = device.endpoint.post, {}, []

    def posting(topic, payload, **kw):
        env = decode(payload)
        step = env.meta.get("step")
        if env.type in STEPS and step == 1:
            first.setdefault(env.type, (topic, payload))
        if env.type in STEPS and step == 3 and not resent:
            # Step 1's shared-topic copy (step workers) overtakes nothing on the worker's topic.
            for old_topic, old in first.values():
                post(old_topic, old, **kw)
                resent.append(old_topic)
        post(topic, payload, **kw)

    device.endpoint.post = posting
    return resent


def _count_replies(endpoint) -> Counter:
    post, sent = endpoint.post, Counter()

    def posting(topic, payload, **kw):
        env = decode(payload)
        sent[(env.type, env.meta.get("step"))] += 1
        post(topic, payload, **kw)

    endpoint.post = posting
    return sent


def _assert_centralized(cfg, x, y, model: torch.nn.Module) -> None:
    """One device, one round: every topology computes exactly the unsplit model's SGD steps."""
    want, _ = build_model(cfg.model, seed=cfg.seed)
    train_epochs(
        want, x, y, epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
        momentum=cfg.momentum, seed=round_seed("dev-0000", 1),
    )  # fmt: skip
    got = model.state_dict()
    for k, v in want.state_dict().items():
        np.testing.assert_allclose(got[k].numpy(), v.numpy(), rtol=0, atol=2e-5, err_msg=k)


def _device(broker, cfg, shard) -> SplitClient:
    (dev,) = device_ids(1)
    c = SplitClient(
        options=SplitClientOptions(device_id=dev, prefix=cfg.prefix),
        mqtt=MqttConfig.from_url(broker.url, client_id=dev),
        x=shard.x,
        y=shard.y,
    )
    c.start()
    return c


@pytest.mark.parametrize("mode", ["vanilla", "ushaped"])
def test_a_late_older_step_is_counted_not_trained_nor_answered(mosquitto, tmp_path, mode):
    cfg = _config(tmp_path, mode=mode)
    (shard,), test = federated_split(
        cfg.dataset, clients=1, scheme="iid", seed=0, test_fraction=0.2
    )
    device = _device(mosquitto, cfg, shard)
    try:
        trainer = SplitTrainer(
            cfg, mqtt=MqttConfig.from_url(mosquitto.url, client_id="cloud"), test_set=test,
            expected_devices=1,
        )  # fmt: skip
        resent = _resend_step_1_late(device)
        replies = _count_replies(trainer.endpoint)
        summary = trainer.run()
    finally:
        device.stop()
    assert len(resent) == (2 if mode == "ushaped" else 1)
    _assert_centralized(cfg, shard.x, shard.y, trainer.model)
    (row,) = map(json.loads, Path(cfg.out_dir, "metrics.jsonl").read_text().splitlines())
    assert row["status"] == "ok" and row["rejected"] == 0, row
    assert row["duplicates"] == len(resent), row
    step_1 = {k: n for k, n in replies.items() if k[1] == 1}
    assert all(n == 1 for n in step_1.values()), step_1  # the stale copies got no reply
    assert device.rejected == 0, device.reasons
    assert summary["accuracy"] > 0.5


def test_a_first_step_resent_on_the_shared_topic_is_not_trained_again_by_its_worker(
    mosquitto, tmp_path
):
    cfg = _config(tmp_path, mode="splitfed-v1", split_workers=1)
    (shard,), test = federated_split(
        cfg.dataset, clients=1, scheme="iid", seed=0, test_fraction=0.2
    )
    device = _device(mosquitto, cfg, shard)
    worker = SplitStepWorker(
        worker_id="w0", group="g", prefix=cfg.prefix,
        mqtt=MqttConfig.from_url(mosquitto.url, client_id="w0"),
    ).start()  # fmt: skip
    try:
        trainer = SplitTrainer(
            cfg, mqtt=MqttConfig.from_url(mosquitto.url, client_id="cloud"), test_set=test,
            expected_devices=1,
        )  # fmt: skip
        resent = _resend_step_1_late(device)
        replies = _count_replies(worker.endpoint)
        trainer.run()
    finally:
        device.stop()
        worker.stop()
    assert resent == ["st/steps/dev-0000"]  # the shared pick-up topic
    _assert_centralized(cfg, shard.x, shard.y, trainer.model)
    assert worker.duplicates == 1 and worker.rejected == 0
    assert worker.steps_served == device.steps
    assert replies[(MsgType.GRADIENT, 1)] == 1
    assert device.rejected == 0, device.reasons
