"""Fixtures for device <-> broker <-> cloud tests: an in-process federation on a real broker."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from cloud.config import FederatedConfig
from cloud.server import FederatedServer
from converters.federation_data import device_ids, federated_split
from converters.mqtt import MqttConfig
from edge.agent import AgentOptions, DeviceAgent


class Federation:
    """Devices (real MQTT clients, one connection each) plus a cloud server, on one broker."""

    def __init__(
        self,
        broker,
        config: FederatedConfig,
        *,
        clients: int,
        partition: str,
        vanish_prob: float = 0.0,
        state_dir: str | None = None,
    ) -> None:
        self.broker, self.config = broker, config
        self.shards, self.test = federated_split(
            config.dataset,
            clients=clients,
            scheme=partition,
            seed=config.seed,
            test_fraction=config.test_fraction,
        )
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")
        self.agents = []
        for dev, shard in zip(device_ids(clients), self.shards, strict=True):
            agent = DeviceAgent(
                options=AgentOptions(
                    device_id=dev,
                    prefix=config.prefix,
                    vanish_prob=vanish_prob,
                    seed=config.seed,
                    state_dir=state_dir,
                ),
                mqtt=MqttConfig.from_url(broker.url, client_id=dev),
                x=shard.x,
                y=shard.y,
                executor=self.executor,
            )
            agent.start()
            self.agents.append(agent)

    def server(self, config: FederatedConfig | None = None) -> FederatedServer:
        return FederatedServer(
            config or self.config,
            mqtt=MqttConfig.from_url(self.broker.url, client_id="cloud"),
            test_set=self.test,
            expected_devices=len(self.agents),
        )

    def close(self) -> None:
        for a in self.agents:
            a.stop()
        self.executor.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def federation(mosquitto, tmp_path):
    torch.set_num_threads(1)
    made = []

    def make(config, **kw):
        # Devices keep restart-surviving state (DP ledgers) under the test's own folder.
        kw.setdefault("state_dir", str(tmp_path / "device-state"))
        fed = Federation(mosquitto, config, **kw)
        made.append(fed)
        return fed

    yield make
    for fed in made:
        fed.close()


@pytest.fixture
def fast_config(tmp_path):
    """A small, quick digits run (digits-mlp learns digits in seconds)."""
    return FederatedConfig(
        run_id="itest",
        model="digits-mlp",
        rounds=3,
        min_clients=2,
        local_epochs=5,
        batch_size=16,
        lr=0.1,
        momentum=0.9,
        round_timeout=30.0,
        register_timeout=15.0,
        out_dir=str(tmp_path / "run"),
        seed=0,
    )
