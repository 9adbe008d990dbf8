"""The deployment path: `edgesplit cloud` and `edgesplit edge` as separate processes on a broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from converters.datasets import save_npz
from converters.federation_data import federated_split

pytestmark = pytest.mark.integration


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "converters.cli", *args]


@pytest.mark.parametrize("mode", ["fedavg", "vanilla"])
def test_cloud_and_edge_processes_train_together(mosquitto, tmp_path, mode):
    shards, _ = federated_split("digits", clients=2, scheme="iid", seed=0, test_fraction=0.2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    devices = []
    for i, shard in enumerate(shards):
        path = tmp_path / f"pi-0{i}.npz"
        save_npz(shard, path)
        cmd = _cli(
            "edge",
            "--broker",
            mosquitto.url,
            "--id",
            f"pi-0{i}",
            "--data",
            str(path),
            "--once",
            "--state-dir",
            str(tmp_path / "state"),
            *(["--split"] if mode != "fedavg" else []),
        )
        devices.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        )
    out = tmp_path / "run"
    cloud = subprocess.run(
        _cli(
            "cloud",
            "--broker",
            mosquitto.url,
            "--expect",
            "2",
            "--rounds",
            "2",
            "--mode",
            mode,
            "--model",
            "digits-mlp",
            "--local-epochs",
            "2",
            "--out",
            str(out),
            "--json",
            "--quiet",
        ),
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    logs = []
    for d in devices:
        try:
            logs.append(d.communicate(timeout=60)[0].decode())
        except subprocess.TimeoutExpired:
            d.kill()
            logs.append(d.communicate()[0].decode())
    assert cloud.returncode == 0, cloud.stdout + cloud.stderr + "\n".join(logs)
    summary = json.loads(cloud.stdout)
    assert summary["rounds_ok"] == 2
    assert summary["accuracy"] > 0.5
    assert all(d.returncode == 0 for d in devices), logs
    assert all("trained 2 round(s)" in log for log in logs), logs
