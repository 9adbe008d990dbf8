"""One-machine federation: a broker, the cloud trainer and N devices in worker processes.

Devices run in separate processes (``python -m edge.simworker``), each a real MQTT client with
its own connection and client id; the cloud reaches them only through the broker. The cloud
never imports the device code: the process boundary is the only link.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cloud.broker import EmbeddedBroker, start_default_broker
from cloud.config import FederatedConfig
from cloud.server import FederatedServer
from converters.federation_data import federated_split
from converters.mqtt import MqttConfig, probe_broker
from converters.partitioners import parse_scheme

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SimulationOptions:
    """How the simulated federation is laid out.

    Attributes:
        clients: number of devices.
        partition: data partition scheme (``iid``, ``dirichlet:ALPHA``, ``shards:K``).
        dropout: chance that a selected device crashes mid-round.
        workers: device worker processes (default: one per core).
        broker_url: an existing broker; None starts the default one (Mosquitto if installed,
            else the embedded amqtt broker).
        broker: "auto", "mosquitto" or "embedded" when starting one.
    """

    clients: int = 20
    partition: str = "dirichlet:0.5"
    dropout: float = 0.0
    workers: int = 0
    broker_url: str | None = None
    broker: str = "auto"

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ValueError(f"clients must be >= 1, got {self.clients}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        parse_scheme(self.partition)


def _spawn_workers(
    config: FederatedConfig, opts: SimulationOptions, url: str
) -> list[subprocess.Popen]:
    workers = opts.workers or min(os.cpu_count() or 1, opts.clients)
    per = -(-opts.clients // workers)
    procs = []
    for w in range(workers):
        first = w * per
        count = min(per, opts.clients - first)
        if count <= 0:
            break
        cmd = [
            sys.executable, "-m", "edge.simworker",
            "--broker", url,
            "--prefix", config.prefix,
            "--dataset", config.dataset,
            "--clients", str(opts.clients),
            "--partition", opts.partition,
            "--seed", str(config.seed),
            "--test-fraction", str(config.test_fraction),
            "--first", str(first),
            "--count", str(count),
            "--dropout", str(opts.dropout),
            "--state-dir", str(Path(config.out_dir) / "device-state"),
            "--max-seconds", str(config.register_timeout + config.rounds * config.round_timeout),
            "--mode", config.mode,
        ]  # fmt: skip
        procs.append(subprocess.Popen(cmd))
    return procs


def _spawn_step_workers(config: FederatedConfig, url: str) -> list[subprocess.Popen]:
    """``config.split_workers`` step worker processes, each subscribed before it returns."""
    procs = []
    for i in range(config.split_workers):
        cmd = [
            sys.executable, "-m", "converters.cli", "split-worker", "--broker", url,
            "--id", f"steps-{i:02d}", "--prefix", config.prefix,
            "--max-seconds", str(config.register_timeout + config.rounds * config.round_timeout),
        ]  # fmt: skip
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    for p in procs:
        line = p.stdout.readline()  # "ready <id>" once subscribed, "" if it died
        if not line.startswith("ready"):
            _stop_workers(procs, grace=0.1)
            raise RuntimeError(f"a step worker did not start (exit code {p.poll()})")
    return procs


def simulate(
    config: FederatedConfig,
    options: SimulationOptions,
    *,
    resume: bool = False,
    on_round: Callable[[dict], None] | None = None,
) -> dict:
    """Runs a whole simulated federation and returns the run summary.

    Raises:
        BrokerError: the broker could not be started.
        ValueError: a bad configuration value (one line naming it).
    """
    if options.clients < config.min_clients:
        raise ValueError(
            f"clients must be >= min_clients={config.min_clients} (fewer fails every round), "
            f"got {options.clients}"
        )
    _, test = federated_split(
        config.dataset,
        clients=options.clients,
        scheme=options.partition,
        seed=config.seed,
        test_fraction=config.test_fraction,
    )
    broker = None
    if options.broker_url is None:
        broker = start_default_broker(prefer=options.broker)
        url = broker.url
        log.info("started %s broker at %s", type(broker).__name__, url)
    else:
        url = options.broker_url
    procs: list[subprocess.Popen] = []
    try:
        if config.split_workers and isinstance(broker, EmbeddedBroker):
            raise ValueError(
                "split_workers needs MQTT shared subscriptions, which the embedded broker lacks; "
                "install mosquitto or pass --broker-kind mosquitto / --broker URL"
            )
        # The trainer before any device: a bad model, strategy or cut fails here, alone.
        if config.mode == "fedavg":
            server = FederatedServer(
                config,
                mqtt=MqttConfig.from_url(url, client_id="cloud"),
                test_set=test,
                expected_devices=options.clients,
                on_round=on_round,
            )
        else:
            server = _split_trainer(config, options, url, test, on_round)
        if broker is None:
            # unreachable: one error, not one traceback per device worker
            probe_broker(MqttConfig.from_url(url, client_id="cloud"))
        if not resume:
            # Simulated devices are new devices: an earlier run's DP ledgers are not theirs.
            shutil.rmtree(Path(config.out_dir) / "device-state", ignore_errors=True)
        procs = _spawn_step_workers(config, url)
        procs += _spawn_workers(config, options, url)
        t0 = time.monotonic()
        summary = server.run(resume=resume)
        summary.update(
            clients=options.clients,
            partition=options.partition,
            dropout=options.dropout,
            broker=type(broker).__name__ if broker else url,
            wall_seconds=time.monotonic() - t0,
        )
        return summary
    finally:
        _stop_workers(procs)
        if broker is not None:
            broker.stop()


def _split_trainer(config, options, url, test, on_round):
    """The split-learning trainer for ``config.mode``; prints the cost model's verdict first."""
    from cloud.cost_model import describe, split_vs_fedavg_bytes
    from cloud.split_trainer import SplitTrainer

    trainer = SplitTrainer(
        config,
        mqtt=MqttConfig.from_url(url, client_id="cloud"),
        test_set=test,
        expected_devices=options.clients,
        on_round=on_round,
    )
    shards, _ = federated_split(
        config.dataset,
        clients=options.clients,
        scheme=options.partition,
        seed=config.seed,
        test_fraction=config.test_fraction,
    )
    cost = split_vs_fedavg_bytes(
        model=trainer.model,
        cut=trainer.cut,
        head_cut=trainer.head_cut,
        mode=config.mode,
        input_shape=trainer.spec.input_shape,
        samples_per_client=[len(s) for s in shards],
        epochs=config.local_epochs,
        codec_bytes_per_value={"float32": 4, "fp16": 2, "int8": 1}[config.act_codec],
    )
    print(describe(cost), flush=True)
    return trainer


def _stop_workers(procs: list[subprocess.Popen], *, grace: float = 10.0) -> None:
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()


def centralized_reference(config: FederatedConfig, options: SimulationOptions) -> float:
    """Test accuracy of the same model trained centrally on the union of the device shards.

    The reference the federated result is compared with: same model, same seed, same total
    number of passes over the data (rounds x local epochs), same test set.
    """
    import numpy as np

    from split.train import evaluate, train_centralized
    from split.zoo import build_model

    shards, test = federated_split(
        config.dataset,
        clients=options.clients,
        scheme=options.partition,
        seed=config.seed,
        test_fraction=config.test_fraction,
    )
    x = np.concatenate([s.x for s in shards])
    y = np.concatenate([s.y for s in shards])
    model, _ = build_model(config.model, seed=config.seed)
    train_centralized(
        model,
        x,
        y,
        epochs=config.rounds * config.local_epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        momentum=config.momentum,
        seed=config.seed,
    )
    return evaluate(model, test.x, test.y)[0]
