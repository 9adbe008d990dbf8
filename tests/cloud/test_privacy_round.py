"""RoundPrivacy's checks on what devices report about their own privacy spending."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.config import FederatedConfig
from cloud.errors import UpdateRejectedError
from cloud.privacy_round import RoundPrivacy
from cloud.strategies import ClientUpdate, get_strategy
from converters.errors import ConfigError


def _update(dev, eps):
    return ClientUpdate(
        client_id=dev,
        params={"w": np.zeros(2, np.float32)},
        num_samples=5,
        metrics={"epsilon": eps},
    )


def test_a_ledger_that_goes_down_or_overspends_is_rejected():
    rp = RoundPrivacy(FederatedConfig(dp="sample", target_epsilon=3.0))
    params = {"w": np.zeros(2, np.float32)}
    rp.check_update(_update("a", 1.5))
    rp.aggregate(get_strategy("fedavg"), params, [_update("a", 1.5)])
    rp.check_update(_update("a", 2.0))  # grows: fine
    with pytest.raises(UpdateRejectedError, match=r"device a: epsilon 1\.2 < 1\.5"):
        rp.check_update(_update("a", 1.2))
    with pytest.raises(UpdateRejectedError, match="exceeds target_epsilon=3.0"):
        rp.check_update(_update("b", 3.5))
    # Refused, but released to the cloud: the run's epsilon shows it.
    assert rp.device_epsilon["b"] == 3.5 and rp.epsilon([]) == 3.5
    for bad in (None, -1.0, float("nan"), "2"):
        with pytest.raises(UpdateRejectedError, match="metrics.epsilon must be >= 0"):
            rp.check_update(_update("c", bad))


def test_without_sample_level_dp_nothing_is_checked():
    RoundPrivacy(FederatedConfig()).check_update(_update("a", -5))


def test_a_population_larger_than_the_online_devices_is_refused():
    rp = RoundPrivacy(FederatedConfig(dp="user", noise_multiplier=1.0, population=12, delta=1e-3))
    with pytest.raises(ConfigError, match="population=12 exceeds the 6 device"):
        rp.before_round(num_selected=0, population=6)
