"""FedAvgM against FedAvg and against the server-momentum recurrence written out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.errors import StrategyError
from cloud.strategies import ClientUpdate, get_strategy


def _round(rng, global_params, n_clients=4):
    return [
        ClientUpdate(
            client_id=f"c{i}",
            params={
                k: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype)
                for k, v in global_params.items()
            },
            num_samples=int(rng.integers(1, 50)),
        )
        for i in range(n_clients)
    ]


def _weighted(updates, k):
    w = np.array([u.num_samples for u in updates], float)
    return (
        sum(wi * u.params[k].astype(np.float64) for wi, u in zip(w, updates, strict=True)) / w.sum()
    )


def test_zero_momentum_unit_lr_is_fedavg(rng):
    g = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}
    ups = _round(rng, g)
    a = get_strategy("fedavgm", momentum=0.0, server_lr=1.0).aggregate(g, ups)
    b = get_strategy("fedavg").aggregate(g, ups)
    for k in g:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6)


def test_momentum_recurrence_over_three_rounds_and_resume(rng):
    beta, lr = 0.7, 1.3
    g = {"w": rng.normal(size=(5,)).astype(np.float32)}
    s = get_strategy("fedavgm", momentum=beta, server_lr=lr)
    x, v = g["w"].astype(np.float64), np.zeros(5)
    for r in range(3):
        ups = _round(rng, g)
        if r == 2:  # resume mid-run from the checkpointed velocity
            state = s.state_dict()
            s = get_strategy("fedavgm", momentum=beta, server_lr=lr)
            s.load_state_dict(state)
        g = s.aggregate(g, ups)
        v = beta * v + (_weighted(ups, "w") - x)
        x = x + lr * v
        np.testing.assert_allclose(g["w"], x.astype(np.float32), rtol=1e-6, atol=1e-6)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="momentum"):
        get_strategy("fedavgm", momentum=1.0)
    with pytest.raises(StrategyError, match="finite"):
        get_strategy("fedavgm").load_state_dict({"v": {"w": np.array([np.nan])}})
