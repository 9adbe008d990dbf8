"""Killing the cloud process mid-run and restarting it with --resume loses no completed round."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration


def _rows(path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _cloud(broker_url, toml, *extra):
    cmd = [
        sys.executable,
        "-m",
        "converters.cli",
        "cloud",
        "--config",
        str(toml),
        "--broker",
        broker_url,
        "--expect",
        "3",
        "--quiet",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def test_kill_cloud_and_resume(federation, fast_config, tmp_path, mosquitto):
    out = tmp_path / "run"
    config = fast_config.replace(rounds=5, out_dir=str(out), run_id="restart")
    fed = federation(config, clients=3, partition="iid")
    toml = tmp_path / "run.toml"
    toml.write_text(
        "[run]\n"
        + "".join(
            f"{k} = {json.dumps(v)}\n"
            for k, v in config.to_dict().items()
            if v is not None and not isinstance(v, dict)
        )
    )
    first = _cloud(mosquitto.url, toml)
    deadline = time.monotonic() + 120
    while len(_rows(out / "metrics.jsonl")) < 2 and time.monotonic() < deadline:
        assert first.poll() is None, first.stdout.read().decode()
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    done_before = len(_rows(out / "metrics.jsonl"))
    assert 2 <= done_before < 5

    second = _cloud(mosquitto.url, toml, "--resume")
    output, _ = second.communicate(timeout=180)
    assert second.returncode == 0, output.decode()
    rows = _rows(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["status"] == "ok" for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_ok"] == 5
    # The same devices served both cloud processes (they re-registered with the new session).
    assert all(a.rounds_trained >= 5 for a in fed.agents)
