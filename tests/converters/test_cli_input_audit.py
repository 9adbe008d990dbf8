"""Bad CLI input: exit code 2 and one stderr line naming the field, the rule and the value.

No traceback, no usage dump, and nothing already on disk is lost (run outputs, device state,
the working directory).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from converters.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dead_broker() -> str:
    """A loopback URL nothing listens on: connecting is refused at once."""
    return f"mqtt://127.0.0.1:{_free_port()}"


def _run(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


def _one_line(code: int, err: str, *parts: str) -> str:
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def _cli(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "converters.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    """An exported digits-mlp split directory (shared; tests copy it before writing)."""
    out = tmp_path_factory.mktemp("split") / "d"
    assert main(["split", "digits-mlp", "--out", str(out)]) == 0
    assert main(["export", str(out)]) == 0
    return out


# -- argparse ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, parts",
    [
        (["simulate", "--clients", "abc"], ["--clients", "'abc'"]),
        (["export", "d", "--quantize", "int4"], ["--quantize", "'int4'"]),
        (["broker-config", "--devices", "a"], ["--out"]),
    ],
)
def test_bad_flag_is_one_line_without_usage(capsys, argv, parts):
    _one_line(*_run(capsys, *argv), *parts)


# -- run config (cloud/config.py) ----------------------------------------------------------


@pytest.mark.parametrize(
    "toml, parts",
    [
        ('rounds = "ten"', ["rounds must be an int", "'ten'"]),
        ("rounds = true", ["rounds must be an int", "True"]),
        ('lr = "fast"', ["lr must be a number", "'fast'"]),
        ("model = 5", ["model must be a string", "5"]),
        ("strategy_args = 5", ["strategy_args must be a table", "5"]),
        ("he_key_bits = 4096.5", ["he_key_bits must be an int", "4096.5"]),
        ('codec = "bogus"', ["codec must be one of", "'bogus'"]),
        ('compress = "bogus"', ["compress must be", "'bogus'"]),
        ("round_timeout = inf", ["round_timeout must be a finite number", "inf"]),
        ("population = -1", ["population must be >= 0", "-1"]),
        ("seed = -1", ["seed must be >= 0", "-1"]),
        ('cut = "fc1"', ["cut needs a split mode", "'fc1'"]),
        ("min_clients = 5\nclients_per_round = 2", ["clients_per_round must be 0", "2"]),
        ('mode = "vanilla"\nsecure = "secagg"', ["secure needs mode 'fedavg'", "'secagg'"]),
    ],
)
def test_bad_config_values_name_the_key(capsys, tmp_path, dead_broker, toml, parts):
    path = tmp_path / "run.toml"
    path.write_text(f"[run]\n{toml}\n")
    argv = ["cloud", "--config", str(path), "--broker", dead_broker, "--out", str(tmp_path / "o")]
    _one_line(*_run(capsys, *argv), *parts)


def test_config_that_is_not_a_table_or_not_utf8(capsys, tmp_path):
    out = str(tmp_path / "o")
    (tmp_path / "a.toml").write_text("run = 5\n")
    (tmp_path / "b.toml").write_bytes(b"\xff\xfe[run]")
    code, err = _run(capsys, "cloud", "--config", str(tmp_path / "a.toml"), "--out", out)
    _one_line(code, err, "[run] must be a table", "got 5")
    code, err = _run(capsys, "cloud", "--config", str(tmp_path / "b.toml"), "--out", out)
    _one_line(code, err, "b.toml: not valid TOML")


@pytest.mark.parametrize("name", ["missing.toml", "", "."])
def test_unreadable_config_names_the_flag(capsys, tmp_path, dead_broker, name):
    path = str(tmp_path / name) if name else ""
    argv = ["cloud", "--config", path, "--broker", dead_broker, "--out", str(tmp_path / "o")]
    line = _one_line(*_run(capsys, *argv), "cannot be read", repr(path))
    assert line.startswith("edgesplit cloud: error: config "), line


@pytest.mark.parametrize(
    "flags, parts",
    [
        (["--out", ""], ["out_dir must be a non-empty path", "''"]),
        (["--expect", "-1"], ["--expect must be >= 0", "-1"]),
        (["--mode", "vanilla", "--cut", ""], ["cut=''", "not found"]),
    ],
)
def test_bad_cloud_flags(capsys, tmp_path, dead_broker, monkeypatch, flags, parts):
    monkeypatch.chdir(tmp_path)  # an accepted --out '' would write here
    argv = ["cloud", "--broker", dead_broker, "--out", str(tmp_path / "o"), *flags]
    _one_line(*_run(capsys, *argv), *parts)


def test_out_dir_that_is_a_file(capsys, tmp_path, dead_broker):
    (tmp_path / "f").write_text("x")
    code, err = _run(capsys, "cloud", "--broker", dead_broker, "--out", str(tmp_path / "f"))
    _one_line(code, err, "out_dir must be a directory", repr(str(tmp_path / "f")))


def test_unreachable_broker_keeps_the_previous_run_outputs(capsys, tmp_path, dead_broker):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"round": 1}\n')
    (out / "summary.json").write_text("{}")
    code, err = _run(capsys, "cloud", "--broker", dead_broker, "--out", str(out), "--quiet")
    _one_line(code, err, "connect to 127.0.0.1")
    assert (out / "metrics.jsonl").read_text() == '{"round": 1}\n'
    assert (out / "summary.json").exists()


# -- simulate: nothing starts before the run is known to be startable ------------------------


def test_simulate_with_unreachable_broker_is_one_line_and_keeps_device_state(tmp_path, dead_broker):
    out = tmp_path / "run"
    ledger = out / "device-state" / "run" / "dev-0000.dp-ledger.json"
    ledger.parent.mkdir(parents=True)
    ledger.write_text("{}")
    r = _cli(
        "simulate", "--broker", dead_broker, "--clients", "2", "--workers", "1",
        "--rounds", "1", "--quiet", "--out", str(out),
    )  # fmt: skip
    _one_line(r.returncode, r.stderr, "connect to 127.0.0.1")
    assert ledger.exists()


def test_simulate_bad_model_fails_before_devices_start(tmp_path, dead_broker):
    r = _cli(
        "simulate", "--broker", dead_broker, "--clients", "2", "--workers", "1",
        "--model", "nope", "--quiet", "--out", str(tmp_path / "run"),
    )  # fmt: skip
    _one_line(r.returncode, r.stderr, "model='nope'")


def test_simulate_fewer_clients_than_min_clients(capsys, tmp_path, dead_broker):
    argv = ["simulate", "--broker", dead_broker, "--clients", "2", "--min-clients", "5"]
    code, err = _run(capsys, *argv, "--out", str(tmp_path / "o"), "--quiet")
    _one_line(code, err, "clients must be >= min_clients=5", "got 2")


# -- broker URLs and TLS files ---------------------------------------------------------------


@pytest.mark.parametrize(
    "url, parts",
    [
        ("mqtt://127.0.0.1:99999", ["url must be mqtt", "'mqtt://127.0.0.1:99999'"]),
        ("mqtt://[::1", ["url must be mqtt", "'mqtt://[::1'"]),
        ("mqtt://127.0.0.1:0", ["url port must be in 1..65535", "'mqtt://127.0.0.1:0'"]),
    ],
)
def test_malformed_broker_url(capsys, tmp_path, url, parts):
    argv = ["edge", "--broker", url, "--id", "d1", "--data", "synthetic:20"]
    _one_line(*_run(capsys, *argv, "--state-dir", str(tmp_path)), *parts)


def test_bad_cafile(capsys, tmp_path, dead_broker):
    base = ["edge", "--broker", dead_broker, "--id", "d1", "--data", "synthetic:20"]
    missing = str(tmp_path / "missing.pem")
    code, err = _run(capsys, *base, "--state-dir", str(tmp_path), "--cafile", missing)
    _one_line(code, err, "tls_ca must be an existing file", repr(missing))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    code, err = _run(capsys, *base, "--state-dir", str(tmp_path), "--cafile", str(junk))
    _one_line(code, err, "TLS files must be loadable PEM", repr(str(junk)))


@pytest.mark.parametrize("kind", ["empty", "file"])
def test_bad_state_dir(capsys, tmp_path, dead_broker, kind):
    state = ""
    if kind == "file":
        state = str(tmp_path / "f")
        (tmp_path / "f").write_text("x")
    argv = ["edge", "--broker", dead_broker, "--id", "d1", "--data", "synthetic:20"]
    _one_line(*_run(capsys, *argv, "--state-dir", state), "--state-dir", repr(state))


def test_infer_with_empty_broker_is_a_bad_url_not_a_local_run(capsys, tmp_path, split_dir):
    import numpy as np

    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 1, 8, 8), np.float32))
    code, err = _run(capsys, "infer", str(split_dir), str(x), "--broker", "", "--id", "d1")
    _one_line(code, err, "url scheme must be mqtt or mqtts", "''")


# -- split / export ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, parts",
    [
        (["--cut", ""], ["cut=''", "not found"]),
        (["--seed", "-1"], ["--seed must be >= 0", "-1"]),
        (["--out", ""], ["--out", "must be a non-empty path"]),
    ],
)
def test_bad_split_flags(capsys, tmp_path, monkeypatch, flags, parts):
    monkeypatch.chdir(tmp_path)
    argv = ["split", "digits-mlp", "--out", str(tmp_path / "d"), *flags]
    _one_line(*_run(capsys, *argv), *parts)
    assert not (tmp_path / "d").exists() and not (tmp_path / "manifest.json").exists()


def test_split_weights_that_are_not_a_state_dict(capsys, tmp_path):
    junk = tmp_path / "w.pt"
    junk.write_text("not a checkpoint")
    code, err = _run(capsys, "split", "digits-mlp", "--weights", str(junk), "--list-cuts")
    _one_line(code, err, "--weights must be a state dict", repr(str(junk)))
    missing = str(tmp_path / "missing.pt")
    code, err = _run(capsys, "split", "digits-mlp", "--weights", missing, "--list-cuts")
    _one_line(code, err, "--weights must be a readable file", repr(missing))


@pytest.mark.parametrize(
    "flags, parts",
    [(["--opset", "99"], ["opset must be <=", "99"]), (["--seed", "-1"], ["seed must be >= 0"])],
)
def test_bad_export_flags_leave_the_manifest(capsys, tmp_path, split_dir, flags, parts):
    d = tmp_path / "d"
    shutil.copytree(split_dir, d)
    before = (d / "manifest.json").read_text()
    _one_line(*_run(capsys, "export", str(d), *flags), *parts)
    assert (d / "manifest.json").read_text() == before


# -- services ------------------------------------------------------------------------------


def test_serve_threads_named(capsys, tmp_path, dead_broker):
    code, err = _run(capsys, "serve", str(tmp_path), "--broker", dead_broker, "--threads", "0")
    _one_line(code, err, "--threads must be >= 1", "0")


def test_serve_workers_with_unreachable_broker_is_one_line(split_dir, dead_broker):
    r = _cli("serve", str(split_dir), "--broker", dead_broker, "--workers", "2")
    _one_line(r.returncode, r.stderr, "connect to 127.0.0.1")


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_split_worker_max_seconds(capsys, dead_broker, value):
    argv = ["split-worker", "--broker", dead_broker, "--id", "w1", "--max-seconds", value]
    _one_line(*_run(capsys, *argv), "--max-seconds must be a finite number >= 0", value)


@pytest.mark.parametrize(
    "flags, parts",
    [
        (["--tls", "--cafile", "MISSING", "--certfile", "MISSING", "--keyfile", "MISSING"],
         ["cafile must be an existing file", "MISSING"]),
        (["--cafile", "CA"], ["cafile needs tls=True", "CA"]),
        (["--bind", "foo bar"], ["bind must be an IP address or host name", "'foo bar'"]),
    ],
)  # fmt: skip
def test_bad_broker_config(capsys, tmp_path, flags, parts):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    subst = {"MISSING": str(tmp_path / "missing.pem"), "CA": str(ca)}
    flags = [subst.get(f, f) for f in flags]
    parts = [p.replace("MISSING", subst["MISSING"]).replace("CA", str(ca)) for p in parts]
    out = tmp_path / "conf"
    argv = ["broker-config", "--out", str(out), "--devices", "pi-01", *flags]
    _one_line(*_run(capsys, *argv), *parts)
    assert not out.exists()


def test_broker_config_empty_out_writes_nothing_here(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _run(capsys, "broker-config", "--out", "", "--devices", "pi-01")
    _one_line(code, err, "--out", "must be a non-empty path")
    assert list(tmp_path.iterdir()) == []


def test_broker_conf_missing(capsys, tmp_path):
    missing = str(tmp_path / "mosquitto.conf")
    code, err = _run(capsys, "broker", "--conf", missing)
    _one_line(code, err, "--conf must be an existing mosquitto.conf", repr(missing))


@pytest.mark.parametrize(
    ("flags", "want"),
    [
        (["--username", "alice"], ("alice", None)),
        (["--username", "alice", "--password", "pw"], ("alice", "pw")),
        (["--password", "pw"], ("d1", "pw")),  # the ACL's %u is the device id
        ([], (None, None)),
        (["--broker", "mqtt://alice:pw@127.0.0.1:1883"], ("alice", "pw")),
        (["--broker", "mqtt://alice:pw@127.0.0.1:1883", "--username", "alice"], ("alice", "pw")),
        # alice's password is never sent with bob's name
        (["--broker", "mqtt://alice:pw@127.0.0.1:1883", "--username", "bob"], ("bob", None)),
    ],
)
def test_edge_credentials_reach_the_broker_config(monkeypatch, tmp_path, flags, want):
    import edge.agent

    class BuiltError(Exception):
        pass

    seen = {}

    def agent(*, options, mqtt, x, y):
        seen["mqtt"] = mqtt
        raise BuiltError

    monkeypatch.setattr(edge.agent, "DeviceAgent", agent)
    argv = ["edge", "--broker", "mqtt://127.0.0.1:1883", "--id", "d1", "--data", "synthetic:20",
            "--state-dir", str(tmp_path), *flags]  # fmt: skip
    with pytest.raises(BuiltError):
        main(argv)
    assert (seen["mqtt"].username, seen["mqtt"].password) == want


@pytest.mark.parametrize(
    ("argv", "parts"),
    [
        (["split", "digits-mlp", "--out", "{f}"], ("argument --out: must be a directory",)),
        (["broker-config", "--devices", "2", "--out", "{f}"], ("argument --out", "(a file)")),
        (["export", "{f}"], ("DIR must be a split directory", "{f}")),
    ],
)
def test_a_file_where_a_directory_is_expected_names_the_flag(capsys, tmp_path, argv, parts):
    f = tmp_path / "a-file"
    f.write_text("keep me")
    code, err = _run(capsys, *(a.format(f=f) for a in argv))
    _one_line(code, err, *(p.format(f=f) for p in parts))
    assert f.read_text() == "keep me"


def test_a_multi_line_error_keeps_every_reason_on_one_line(capsys, tmp_path):
    factory = tmp_path / "net.py"
    factory.write_text(
        "def build():\n"
        "    raise ValueError('factory setup failed\\n\\n  '\n"
        "                     '\\x1b[31mthe real reason: no GPU\\x1b[0m')\n"
    )
    code, err = _run(capsys, "split", f"{factory}:build", "--input-shape", "1,8,8", "--list-cuts")
    line = _one_line(code, err, "factory setup failed | the real reason: no GPU")
    assert "\x1b" not in line


def test_one_line_joins_cuts_and_strips_escapes():
    from split.errors import one_line

    assert one_line("a\n\n  b  c\n\x1b[1mD\x1b[0m") == "a | b c | D"
    assert one_line("x" * 700, limit=20) == "x" * 17 + "..."
    assert one_line("") == ""
