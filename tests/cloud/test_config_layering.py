"""Run config layering: defaults < run.toml < flags, validated once on the merged values."""

from __future__ import annotations

import socket

import pytest

from cloud.commands import config_from_args
from converters.cli import build_parser, main

SUBCOMMANDS = ["cloud", "simulate"]


def _config(tmp_path, subcommand: str, toml: str, *flags: str):
    path = tmp_path / "run.toml"
    path.write_text(toml)
    args = build_parser().parse_args([subcommand, "--config", str(path), *flags])
    return config_from_args(args)


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_flag_mode_makes_the_toml_cut_valid(tmp_path, subcommand):
    config = _config(tmp_path, subcommand, '[run]\ncut = "fc1"\n', "--mode", "vanilla")
    assert (config.mode, config.cut) == ("vanilla", "fc1")


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_flag_min_clients_makes_the_toml_clients_per_round_valid(tmp_path, subcommand):
    config = _config(tmp_path, subcommand, "[run]\nclients_per_round = 1\n", "--min-clients", "1")
    assert (config.clients_per_round, config.min_clients) == (1, 1)


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_split_toml_reused_with_flag_mode_fedavg(tmp_path, subcommand):
    # The cut points only mean something in a split mode: --mode fedavg drops the file's.
    toml = '[run]\nmode = "ushaped"\ncut = "fc1"\nhead_cut = "fc2"\nrounds = 3\n'
    config = _config(tmp_path, subcommand, toml, "--mode", "fedavg")
    assert (config.mode, config.cut, config.head_cut, config.rounds) == ("fedavg", None, None, 3)


def test_flag_overrides_a_toml_value(tmp_path):
    # The file alone is invalid (2 < min_clients=5); the flag's value replaces the file's.
    toml = "[run]\nmin_clients = 5\nclients_per_round = 2\n"
    config = _config(tmp_path, "cloud", toml, "--clients-per-round", "6")
    assert (config.clients_per_round, config.min_clients) == (6, 5)


def test_flag_dp_none_overrides_a_toml_dp(tmp_path):
    # dp = "sample" without a noise setting is invalid alone; --dp none turns it off.
    config = _config(tmp_path, "cloud", '[run]\ndp = "sample"\n', "--dp", "none")
    assert (config.dp, config.noise_multiplier) == ("none", None)


def test_toml_values_override_defaults(tmp_path):
    # Top-level table (no [run]); only valid together with the flag's split mode.
    toml = 'cut = "fc1"\nrounds = 3\nlr = 0.01\nmin_clients = 1\n'
    config = _config(tmp_path, "simulate", toml, "--mode", "splitfed-v2", "--rounds", "4")
    assert (config.mode, config.cut, config.rounds) == ("splitfed-v2", "fc1", 4)
    assert (config.lr, config.min_clients) == (0.01, 1)
    assert config.batch_size == 16  # untouched default


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_invalid_after_merging_is_one_line_naming_the_key(capsys, tmp_path, subcommand):
    # The file alone fails on cut; with --mode vanilla it is the flag's secure that is wrong.
    path = tmp_path / "run.toml"
    path.write_text('[run]\ncut = "fc1"\n')
    argv = [
        subcommand, "--config", str(path), "--broker", f"mqtt://127.0.0.1:{_free_port()}",
        "--out", str(tmp_path / "o"), "--mode", "vanilla", "--secure", "secagg",
    ]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"edgesplit {subcommand}: error: "), lines[0]
    assert "secure needs mode 'fedavg'" in lines[0] and "'secagg'" in lines[0], lines[0]
    assert not (tmp_path / "o").exists()
