"""Split devices of ``edgesplit simulate`` keep their split-DP state across ``--resume``."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cloud import simulate as simulate_module
from cloud.config import FederatedConfig
from converters.federation_data import federated_split
from converters.mqtt import MqttConfig
from edge import simworker


def _worker_args(tmp_path, monkeypatch) -> list[str]:
    """The arguments ``simulate`` gives its one device worker process."""
    config = FederatedConfig(
        run_id="sim", mode="vanilla", rounds=1, out_dir=str(tmp_path / "runs" / "sim"), seed=0,
    )  # fmt: skip
    options = simulate_module.SimulationOptions(clients=2, partition="iid", workers=1)
    cmds = []
    monkeypatch.setattr(simulate_module.subprocess, "Popen", lambda cmd: cmds.append(cmd))
    simulate_module._spawn_workers(config, options, "mqtt://127.0.0.1:1")
    (cmd,) = cmds
    assert cmd[1:3] == ["-m", "edge.simworker"]
    return cmd[3:]


def test_simulated_split_devices_resume_with_the_same_labels_and_ledger(tmp_path, monkeypatch):
    """A resumed simulation starts new device processes; each must find its randomized labels
    and split-DP ledger in the run's device-state folder, or it would draw the labels again
    (spending label_epsilon uncounted) and restart its ledger."""
    from split.graph import split_template
    from split.privacy.split_dp import SplitDP

    args = simworker.build_parser().parse_args(_worker_args(tmp_path, monkeypatch))
    assert Path(args.state_dir) == tmp_path / "runs" / "sim" / "device-state"
    shards, _ = federated_split(
        args.dataset, clients=args.clients, scheme=args.partition, seed=args.seed,
        test_fraction=args.test_fraction,
    )  # fmt: skip
    dp = SplitDP(act_clip=1.0, act_sigma=2.0, param_clip=1.0, param_sigma=2.0, delta=1e-5,
                 label_epsilon=1.0, num_classes=10)  # fmt: skip
    cfg = {"dp": dp.to_meta()}
    executor = ThreadPoolExecutor(max_workers=1)

    def device(dev="dev-0000", i=0):
        mqtt = MqttConfig(client_id=dev, port=1)  # never connected
        return simworker._split_client(args, dev, mqtt, shards[i], executor)

    try:
        first = device()
        y = first.y
        trainer = first._setup_dp("sim", cfg, "vanilla", split_template("digits-mlp-tanh", "act1"))
        labels = trainer.released_labels(y).copy()
        assert (labels != y).any()
        for _ in range(2):
            trainer.begin_epoch()
            first._save_dp("sim")
        eps = trainer.epsilon()
        assert (Path(args.state_dir) / "sim" / "dev-0000.split-dp.json").is_file()

        again = device()  # the resumed simulation's new process: fresh generators
        sm = split_template("digits-mlp-tanh", "act1")
        back = again._setup_dp("sim", cfg, "vanilla", sm)
        np.testing.assert_array_equal(back.released_labels(y), labels)
        assert back.releases == 2 and back.epsilon() == eps
        other = device("dev-0001", 1)._setup_dp("sim", cfg, "vanilla", sm)
        assert other.releases == 0  # each device its own state
    finally:
        executor.shutdown(wait=False)
