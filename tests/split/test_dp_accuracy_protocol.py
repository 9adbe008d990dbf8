"""benchmarks/dp_accuracy.py protocol: refit on fit + validation, seeds, exact accounting."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest

import split.privacy.dpsgd as dpsgd

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "dp_accuracy.py"


@pytest.fixture(scope="module")
def bench():
    # The script caches dpsgd.noise_for_target at import; undo it so other tests see the original.
    original = dpsgd.noise_for_target
    spec = importlib.util.spec_from_file_location("_dp_accuracy_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield module
    dpsgd.noise_for_target = original


@pytest.fixture(scope="module")
def splits(bench):
    return bench._splits()


def _rows(ds) -> set[bytes]:
    return {x.tobytes() + bytes([int(y)]) for x, y in zip(ds.x, ds.y, strict=True)}


def test_refit_split_is_fit_plus_validation_and_excludes_test(splits):
    fit, val, test, refit = splits
    assert len(refit) == len(fit) + len(val)
    assert sorted(_rows(refit)) == sorted(_rows(fit) | _rows(val))
    assert not _rows(refit) & _rows(test)


def test_central_refit_recalibrates_noise_and_stays_within_target(bench, splits):
    fit = splits[0]
    hp = {"batch_size": 256, "clip": 0.3, "epochs": 2, "lr": 1.0, "momentum": 0.0}
    _, on_fit = bench.central("digits-mlp-tanh", fit, 3.0, hp)
    out = bench.refit("central", 3.0, {**hp, "average": True}, "digits-mlp-tanh", splits, [0, 1])
    assert out["records"] == len(splits[3])
    assert [r["seed"] for r in out["runs"]] == [0, 1]
    assert all(r["epsilon"] <= 3.0 for r in out["runs"]) and out["epsilon"] <= 3.0
    # More records: a lower sample rate (1/6 instead of 1/5), so less noise for the same target.
    assert out["noise_multiplier"] < on_fit["noise_multiplier"]
    accs = [r["test"] for r in out["runs"]]
    assert accs[0] != accs[1]  # the seed reaches initialisation, sampling and noise
    assert out["test_mean"] == pytest.approx(np.mean(accs))
    assert out["test_std"] == pytest.approx(np.std(accs, ddof=1))


def test_federated_refit_repartitions_fit_plus_validation(bench, splits):
    hp = {"batch_size": 32, "clip": 0.3, "epochs": 1, "lr": 1.0, "rounds": 1}
    out = bench.refit("fed-20", 3.0, {**hp, "average": False}, "digits-mlp-tanh", splits, [0])
    assert out["records"] == len(splits[3])
    assert out["epsilon"] <= 3.0


def test_smoke_runs_the_refit_path_for_every_cell(bench, tmp_path):
    result = bench.main(["--smoke", "--settings", "central", "--out", str(tmp_path / "r.json")])
    assert result["refit_seeds"] == [0]
    assert len(result["cells"]) == 1 + len(bench.EPSILONS)
    for cell in result["cells"]:
        r = cell["refit"]
        assert r["records"] == 1438 and len(r["runs"]) == 1 and r["test_std"] == 0.0
        if cell["epsilon_target"] is not None:
            assert r["epsilon"] <= cell["epsilon_target"]
    assert "±" in result["table"] and (tmp_path / "r.json").exists()
