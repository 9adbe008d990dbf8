"""FederatedConfig rules that depend on the mode, and values Python callers pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud.config import FederatedConfig
from converters.errors import ConfigError


def test_out_dir_may_be_a_path_and_stays_a_string(tmp_path):
    cfg = FederatedConfig(out_dir=tmp_path / "run")
    assert cfg.out_dir == str(tmp_path / "run") and isinstance(cfg.out_dir, str)
    assert FederatedConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="out_dir must be a non-empty path"):
        FederatedConfig(out_dir="")
    assert Path(FederatedConfig().out_dir).name  # the default is a real folder name


@pytest.mark.parametrize("mode", ["vanilla", "ushaped", "splitfed-v1", "splitfed-v2"])
def test_split_rounds_may_serve_fewer_devices_than_min_clients(mode):
    # The split trainer accepts min(min_clients, selected) updates: one device per round is the
    # classic vanilla split-learning set-up.
    cfg = FederatedConfig(mode=mode, clients_per_round=1, min_clients=2)
    assert cfg.clients_per_round == 1


def test_federated_rounds_refuse_fewer_devices_than_min_clients():
    with pytest.raises(ConfigError, match=r"clients_per_round must be 0 \(all\) or >= min_clien"):
        FederatedConfig(mode="fedavg", clients_per_round=1, min_clients=2)
