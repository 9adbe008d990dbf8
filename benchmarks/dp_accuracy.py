"""Accuracy under differential privacy on sklearn digits: DP-SGD and DP-FedAvg at epsilon 1, 3, 8.

Usage::

    python benchmarks/dp_accuracy.py [--smoke] [--out results.json] [--model digits-mlp-tanh]
                                     [--seeds 5] [--settings central,fed-20,user-500]

``--smoke`` uses tiny grids and one refit seed (same code path, ~25 s).

Protocol. Data: sklearn digits (1,797 images) split once (seed 0) into fit (1,151 images, 64%),
validation (287, 16%) and test (359, 20%) with ``converters.datasets.train_test_split`` (the test
split is the one ``edgesplit simulate`` holds out). Each cell (setting x epsilon, and the
non-private baseline of each setting) is produced in two stages:

1. Selection: every point of a small stated grid trains on the fit split with seed 0; the point
   with the best validation accuracy is picked, separately for each epsilon and for the
   baseline (ties go by grid order). Test accuracy is never looked at; the selection run's
   test accuracy is kept as a second, single-seed table.
2. Refit (as scikit-learn's ``GridSearchCV(refit=True)``): the picked hyperparameters (epochs or
   rounds, batch size, learning rate, clip, momenta, last iterate or average) train a new model
   on fit + validation (the 1,438 non-test images) once for each of seeds 0-4; the table
   reports the mean +- sample standard deviation (ddof=1) of their test accuracies. The seed
   drives model initialisation, DP noise, Poisson sampling of records and of devices, and
   shuffling; the data split and the device partitions stay fixed (seed 0). Everything that
   depends on the data size is recomputed for the refit: DP-SGD's sample rate
   ``1 / ceil(N / batch_size)`` and steps per epoch, hence the noise multiplier calibrated
   for the target (``DPTrainer`` calibrates for the data it trains on, so the accountant
   covers exactly what was trained; the script fails if any refit spends more than the
   target). In (ii) and (iii) the refit re-partitions fit + validation with the same procedure
   (``partition(..., scheme="iid", seed=0)``) into 20 devices of ~72 records or 500 devices of
   2-3 records; the user-level noise depends only on 100/500 and the rounds, so it is
   unchanged. The reported epsilon is the largest spent by any seed (per device in (ii)).

Tuning spends no privacy budget here: the selection runs read the (private) validation split
and their leakage is not accounted (see docs/privacy.md); only each final model's training is.
delta = 1e-5 everywhere. A grid point whose target needs a noise multiplier above 20 is
recorded as infeasible and skipped.

DP-friendly choices (issue #5), all free in privacy: the default model ``digits-mlp-tanh`` has
``digits-mlp``'s layers with tanh activations and inputs centred to [-1, 1] (Papernot et al.
2021, "Tempered Sigmoid Activations for Deep Learning with Differential Privacy"; Tramer &
Boneh 2021, "Differentially Private Learning Needs Better Features (or Much More Data)");
small clips with large learning rates, Poisson batches of 256 and momentum on the noised
gradient; every DP grid point is also scored as the mean of its second-half iterates (epochs
in (i), rounds in (ii) and (iii); Polyak averaging post-processes released parameters); and
(ii) may use FedAvgM's server momentum (Hsu et al. 2019). Non-private baselines train the same
model without averaging. ``--model digits-mlp`` reproduces the ReLU model's figures.

Settings, all with the same model:

(i) ``central``: sample-level DP-SGD (``split.privacy.DPTrainer``) on all training records (fit
    in the selection, fit + validation in the refit) as one device; baseline: the same model
    trained with plain SGD + momentum (``split.train``).
(ii) ``fed-20``: sample-level DP-SGD federated over 20 IID devices (~58 records each in the
    selection, ~72 in the refit): every device is an ``edge.local_train.LocalTrainer`` (the
    code a device runs, with its own persistent DP-SGD accountant) and the cloud averages with
    ``cloud.strategies.FedAvg``. The loop is in-process: MQTT moves the same parameters but
    changes no number in this table (tests/integration/test_dp_federated.py covers the wire).
    Epsilon is per device, about its own records.
(iii) ``user-500``: user-level DP-FedAvg (``cloud.dp_fedavg.DPFedAvg``, McMahan et al. 2018) over
    a population of 500 IID devices (~2-3 records each), 100 expected per round; here clients
    are Poisson-sampled with rate 100/500, exactly what the accountant assumes. Baseline: FedAvg
    with the same sampling, no clipping or noise.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import split.privacy.dpsgd as _dpsgd
from cloud.dp_fedavg import DPFedAvg
from cloud.strategies import ClientUpdate, FedAvg, FedAvgM
from converters.datasets import Dataset, load_dataset, train_test_split
from converters.partitioners import partition
from edge.local_train import LocalTrainer
from split.errors import PrivacyConfigError
from split.privacy import DPConfig, DPTrainer
from split.privacy.dpsgd import fix_model
from split.train import evaluate, train_epochs
from split.zoo import build_model

DELTA = 1e-5
EPSILONS = (1.0, 3.0, 8.0)
SEED = 0  # data split, device partitions and the hyperparameter search
SEEDS = (0, 1, 2, 3, 4)  # final refits: model init, DP noise, sampling, shuffling

# Hyperparameter grids, fixed without looking at test accuracy (the user-500 grid was moved once,
# after a first full run whose validation picks sat on its edge). DP-SGD prefers larger batches
# and learning rates than plain SGD (the noise is averaged over the batch; clipped gradients
# are small), so its grid sits higher. Momentum in DP-SGD post-processes noised gradients.
# The DP grids were moved a second time (validation accuracy only, at epsilon 3, on
# digits-mlp-tanh) for issue #5: clips 0.1-0.3 with learning rates 1-4 (lr * clip is the step
# once every gradient is clipped), server momentum for fed-20, and every DP grid point is
# scored twice, as its last iterate and as the mean of its second-half iterates ("average").
GRIDS = {
    "central": {
        "none": {"lr": [0.05, 0.1], "epochs": [30, 60], "batch_size": [32]},
        "dp": {
            "lr": [1.0, 2.0, 4.0],
            "epochs": [40, 80],
            "batch_size": [256],
            "clip": [0.1, 0.3],
            "momentum": [0.0, 0.5],
        },
    },
    "fed-20": {
        "none": {"lr": [0.05, 0.2], "rounds": [20], "epochs": [1, 5], "batch_size": [16]},
        "dp": {
            "lr": [0.5, 1.0, 2.0],
            "rounds": [15, 30],
            "epochs": [1],
            "batch_size": [32],
            "clip": [0.1, 0.3],
            "server_momentum": [0.0, 0.5],
        },
    },
    "user-500": {
        "none": {"lr": [0.2, 0.5], "rounds": [150, 300], "epochs": [5], "clip": [1.0]},
        "dp": {
            "lr": [0.2, 0.5],
            "rounds": [150, 300],
            "epochs": [5],
            "clip": [0.1, 0.25, 0.5],
        },
    },
}
SMOKE_GRIDS = {
    "central": {
        "none": {"lr": [0.1], "epochs": [10], "batch_size": [32]},
        "dp": {"lr": [1.0], "epochs": [5], "batch_size": [64], "clip": [1.0]},
    },
    "fed-20": {
        "none": {"lr": [0.2], "rounds": [3], "epochs": [1], "batch_size": [16]},
        "dp": {"lr": [1.0], "rounds": [3], "epochs": [1], "batch_size": [16], "clip": [1.0]},
    },
    "user-500": {
        "none": {"lr": [0.5], "rounds": [5], "epochs": [2], "clip": [1.0]},
        "dp": {"lr": [0.5], "rounds": [5], "epochs": [2], "clip": [1.0]},
    },
}
FED_CLIENTS = 20
POPULATION = 500
PER_ROUND = 100
MOMENTUM = 0.9  # non-private baselines only
# Key under which a setting also returns the mean of its second-half iterates (DP runs only);
# ``run_cell`` scores it as the grid point's twin with ``average=True`` (no extra training).
AVERAGED = "tail_mean"

Params = dict[str, np.ndarray]

# Every simulated device calibrates its noise with Opacus' search (seconds at large sigma, as on
# a real device), and the 20 devices here share two shard sizes, so one answer serves many: the
# function is pure, caching it changes no number.
_dpsgd.noise_for_target = functools.cache(_dpsgd.noise_for_target)


def _splits() -> tuple[Dataset, Dataset, Dataset, Dataset]:
    """(fit, validation, test, refit): refit is fit + validation, the 80 % not held out."""
    data = load_dataset("digits", seed=SEED)
    train, test = train_test_split(data, test_fraction=0.2, seed=SEED)
    fit, val = train_test_split(train, test_fraction=0.2, seed=SEED + 1)
    return fit, val, test, train


def _grid(spec: dict) -> list[dict]:
    keys = sorted(spec)
    return [
        dict(zip(keys, values, strict=True))
        for values in itertools.product(*[spec[k] for k in keys])
    ]


def _to_numpy(model: torch.nn.Module) -> Params:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _load(model: torch.nn.Module, params: Params) -> torch.nn.Module:
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in params.items()})
    return model


def _dp_model(name: str, seed: int = SEED) -> torch.nn.Module:
    # The cloud's copy goes through the same Opacus fix as the devices' (same keys and layers).
    return fix_model(build_model(name, seed=seed)[0])[0]


# -- (i) centralized -----------------------------------------------------------------------


class _TailMean:
    """Running mean of the iterates from the second half of training (Polyak averaging).

    Averaging noisy DP-SGD iterates cancels part of the noise; it post-processes released
    parameters, so it costs no privacy (used e.g. by De et al. 2022, "Unlocking High-Accuracy
    Differentially Private Image Classification through Scale", as an EMA of the parameters).
    """

    def __init__(self, total: int) -> None:
        self.start, self.seen, self.mean = total // 2, 0, None
        self.step = 0

    def add(self, params: Params) -> None:
        self.step += 1
        if self.step <= self.start:
            return
        self.seen += 1
        if self.mean is None:
            self.mean = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
            return
        for k, v in params.items():
            self.mean[k] += (np.asarray(v, dtype=np.float64) - self.mean[k]) / self.seen

    def result(self, like: Params) -> Params:
        return {k: self.mean[k].astype(np.asarray(like[k]).dtype) for k in like}


def central(
    name: str, fit: Dataset, eps: float | None, hp: dict, *, seed: int = SEED
) -> tuple[Params, dict]:
    if eps is None:
        model = build_model(name, seed=seed)[0]
        train_epochs(model, fit.x, fit.y, epochs=hp["epochs"], batch_size=hp["batch_size"],
                     lr=hp["lr"], seed=seed, momentum=MOMENTUM)  # fmt: skip
        return _to_numpy(model), {}
    # One "round" per epoch: same noise calibration (rounds * epochs_per_round steps) and the
    # same Poisson batches as one long round, but the epoch-end iterates become visible.
    trainer = DPTrainer(
        build_model(name, seed=seed)[0],
        config=DPConfig(mode="sample", target_epsilon=eps, delta=DELTA, max_grad_norm=hp["clip"]),
        sample_size=len(fit),
        batch_size=hp["batch_size"],
        lr=hp["lr"],
        epochs_per_round=1,
        rounds=hp["epochs"],
        seed=seed,
        momentum=hp.get("momentum", 0.0),
    )
    tail = _TailMean(hp["epochs"])
    for _ in range(hp["epochs"]):
        trainer.train_round(fit.x, fit.y)
        tail.add({k: v.numpy() for k, v in trainer.state_dict().items()})
    params = {k: v.numpy() for k, v in trainer.state_dict().items()}
    info = {"epsilon": trainer.epsilon(), "noise_multiplier": trainer.noise_multiplier,
            AVERAGED: tail.result(params)}  # fmt: skip
    return params, info


# -- (ii) sample-level DP-SGD, 20 devices ---------------------------------------------------


def federated_sample(
    name: str, fit: Dataset, eps: float | None, hp: dict, *, seed: int = SEED
) -> tuple[Params, dict]:
    # The partition is part of the data split: seeded with SEED whatever the training seed.
    shards = [
        fit.subset(i) for i in partition(fit.y, num_clients=FED_CLIENTS, scheme="iid", seed=SEED)
    ]
    devices = [
        LocalTrainer(model_ref=name, x=s.x, y=s.y, seed=seed * 1000 + i)
        for i, s in enumerate(shards)
    ]
    model = _dp_model(name, seed) if eps is not None else build_model(name, seed=seed)[0]
    params = _to_numpy(model)
    config = {"epochs": hp["epochs"], "batch_size": hp["batch_size"], "lr": hp["lr"],
              "rounds": hp["rounds"], "momentum": MOMENTUM}  # fmt: skip
    if eps is not None:
        config.update(dp="sample", target_epsilon=eps, delta=DELTA, clip=hp["clip"])
    # FedAvgM (Hsu et al. 2019) with momentum 0 is exactly FedAvg; server momentum acts on
    # already privatized device updates, so it costs no privacy.
    beta = hp.get("server_momentum", 0.0)
    strategy = FedAvgM(server_lr=1.0, momentum=beta) if beta else FedAvg()
    tail = _TailMean(hp["rounds"])
    epsilons: list[float] = []
    for rnd in range(1, hp["rounds"] + 1):
        updates = []
        for i, dev in enumerate(devices):
            new, metrics = dev.fit(params, {**config, "round": rnd})
            updates.append(ClientUpdate(f"dev-{i:04d}", new, len(dev.y), metrics))
        params = strategy.aggregate(params, updates)
        tail.add(params)
        epsilons = [u.metrics.get("epsilon", 0.0) for u in updates]
    if eps is None:
        return params, {}
    return params, {"epsilon": max(epsilons), AVERAGED: tail.result(params)}


# -- (iii) user-level DP-FedAvg, 500 devices ------------------------------------------------


def _local_all(model: torch.nn.Module, params: Params, shards: list[Dataset], hp: dict) -> list:
    """Each shard's full-batch local SGD from ``params``, all clients at once (``torch.func``).

    Same arithmetic as ``split.train.train_epochs`` with ``batch_size=len(shard)`` and no
    momentum (one step per epoch, mean cross-entropy); ``_check_local`` compares the two.
    """
    from torch.func import functional_call, grad, vmap

    most = max(len(s) for s in shards)
    x = torch.zeros((len(shards), most, *shards[0].x.shape[1:]))
    y = torch.zeros((len(shards), most), dtype=torch.long)
    w = torch.zeros((len(shards), most))
    for i, s in enumerate(shards):
        x[i, : len(s)], y[i, : len(s)], w[i, : len(s)] = (
            torch.from_numpy(s.x),
            torch.from_numpy(s.y),
            1,
        )
    names = [n for n, _ in model.named_parameters()]

    def loss(p: dict, xi, yi, wi):
        ce = torch.nn.functional.cross_entropy(
            functional_call(model, p, (xi,)), yi, reduction="none"
        )
        return (wi * ce).sum() / wi.sum()  # padding rows weigh 0

    k = len(shards)
    stacked = {n: torch.from_numpy(np.array(params[n])).expand(k, *params[n].shape).clone()
               for n in names}  # fmt: skip
    step = vmap(grad(loss))
    for _ in range(hp["epochs"]):
        grads = step(stacked, x, y, w)
        stacked = {n: stacked[n] - hp["lr"] * grads[n] for n in names}
    return [{n: stacked[n][i].numpy() for n in names} for i in range(len(shards))]


def _check_local(name: str, fit: Dataset) -> float:
    """Largest difference between ``_local_all`` and ``train_epochs`` on three shards."""
    model = build_model(name, seed=SEED)[0]
    params = _to_numpy(model)
    shards = [fit.subset(np.arange(i, i + n)) for i, n in ((0, 2), (5, 3), (9, 1))]
    hp = {"epochs": 3, "lr": 0.5}
    fast = _local_all(model, params, shards, hp)
    worst = 0.0
    for shard, got in zip(shards, fast, strict=True):
        _load(model, params)
        train_epochs(model, shard.x, shard.y, epochs=3, batch_size=len(shard), lr=0.5, seed=0)
        ref = _to_numpy(model)
        worst = max(worst, *(float(np.max(np.abs(got[k] - ref[k]))) for k in got))
    return worst


def federated_user(
    name: str, fit: Dataset, eps: float | None, hp: dict, *, seed: int = SEED
) -> tuple[Params, dict]:
    # The partition is part of the data split: seeded with SEED whatever the training seed.
    parts = partition(fit.y, num_clients=POPULATION, scheme="iid", seed=SEED)
    shards = [fit.subset(i) for i in parts]
    model = build_model(name, seed=seed)[0]
    params = _to_numpy(model)
    rng = np.random.default_rng(seed)
    dp = None
    if eps is not None:
        dp = DPFedAvg.from_config(
            DPConfig(mode="user", target_epsilon=eps, delta=DELTA, clip_norm=hp["clip"]),
            clients_per_round=PER_ROUND, population=POPULATION, rounds=hp["rounds"], seed=seed,
        )  # fmt: skip
    strategy = FedAvg()
    tail = _TailMean(hp["rounds"])
    for _ in range(hp["rounds"]):
        # Poisson sampling: each device joins independently with rate m / N (the accountant's
        # assumption); the round size varies around m.
        chosen = np.flatnonzero(rng.random(POPULATION) < PER_ROUND / POPULATION)
        local = _local_all(model, params, [shards[i] for i in chosen], hp) if len(chosen) else []
        updates = [
            ClientUpdate(f"dev-{i:04d}", p, len(shards[i]))
            for i, p in zip(chosen, local, strict=True)
        ]
        if dp is not None:
            params = dp.aggregate(params, updates)
        elif updates:
            params = strategy.aggregate(params, updates)
        tail.add(params)
    if dp is None:
        return params, {}
    return params, {"epsilon": dp.epsilon(), "noise_multiplier": dp.noise_multiplier,
                    AVERAGED: tail.result(params)}  # fmt: skip


SETTINGS = {
    "central": ("(i) DP-SGD, centralized (1 device)", central),
    "fed-20": (f"(ii) DP-SGD, federated, {FED_CLIENTS} devices", federated_sample),
    "user-500": (f"(iii) DP-FedAvg, user-level, {POPULATION} devices", federated_user),
}


def _accuracy(name: str, params: Params, data: Dataset) -> float:
    return evaluate(_load(_dp_model(name), params), data.x, data.y)[0]


def run_cell(setting: str, eps: float | None, grid: dict, name: str, splits) -> dict:
    """Trains every grid point on fit, picks the best by validation accuracy (seed ``SEED``)."""
    fit, val, test, _ = splits
    fn = SETTINGS[setting][1]
    tried = []
    for hp in _grid(grid["none" if eps is None else "dp"]):
        t0 = time.perf_counter()
        try:
            params, info = fn(name, fit, eps, hp)
        except PrivacyConfigError as exc:
            # E.g. the target needs sigma > 20 for this many steps: a grid point, not a failure.
            tried.append({"hp": hp, "infeasible": str(exc)})
            continue
        seconds = time.perf_counter() - t0
        averaged = info.pop(AVERAGED, None)
        variants = [(hp, params)]
        if averaged is not None:
            variants = [({**hp, "average": False}, params), ({**hp, "average": True}, averaged)]
        for point, p in variants:
            tried.append({"hp": point, "val": _accuracy(name, p, val),
                          "test": _accuracy(name, p, test), **info,
                          "seconds": seconds})  # fmt: skip
    feasible = [r for r in tried if "val" in r]
    # max() keeps the first of equals: ties go by grid order, never by test accuracy.
    best = max(feasible, key=lambda r: r["val"]) if feasible else None
    return {"setting": setting, "epsilon_target": eps, "best": best, "tried": tried}


def refit(
    setting: str, eps: float | None, picked: dict, name: str, splits, seeds: list[int]
) -> dict:
    """Retrains the picked hyperparameters on fit + validation once per seed; test accuracy.

    Everything that depends on the number of records is recomputed for the larger set: the
    Poisson sample rate and steps per epoch of DP-SGD, hence its noise multiplier (each
    ``DPTrainer`` calibrates for its own data), and the device shards (same partition
    procedure and seed, applied to fit + validation). Epochs, rounds, batch size, clip,
    learning rate and the last-iterate/average choice are the picked ones. Raises if any run
    spent more than the target epsilon.
    """
    data, test = splits[3], splits[2]
    fn = SETTINGS[setting][1]
    average = bool(picked.get("average", False))
    hp = {k: v for k, v in picked.items() if k != "average"}
    runs = []
    for seed in seeds:
        t0 = time.perf_counter()
        params, info = fn(name, data, eps, hp, seed=seed)
        averaged = info.pop(AVERAGED, None)
        if average:
            params = averaged
        runs.append({"seed": seed, "test": _accuracy(name, params, test), **info,
                     "seconds": time.perf_counter() - t0})  # fmt: skip
        if eps is not None and not runs[-1]["epsilon"] <= eps:
            raise RuntimeError(
                f"{setting} refit seed {seed} spent epsilon {runs[-1]['epsilon']:.6g} > target "
                f"{eps:g}; the accountant must cover what was trained"
            )
    accs = np.array([r["test"] for r in runs])
    out = {"records": len(data), "seeds": list(seeds), "hp": picked, "runs": runs,
           "test_mean": float(accs.mean()),
           # Sample standard deviation over seeds (ddof=1); 0 with a single seed.
           "test_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0}  # fmt: skip
    if eps is not None:
        out["epsilon"] = max(r["epsilon"] for r in runs)
        out["noise_multiplier"] = runs[0].get("noise_multiplier")
    return out


def _fmt(eps: float | None, acc: str, spent: float | None) -> str:
    return acc if eps is None else f"{acc} (spent {spent:.2f})"


def _table(cells: list[dict], final: bool) -> str:
    """Markdown table: the refit mean ± std (``final``) or the selection run's test accuracy."""
    head = "| setting | non-private | " + " | ".join(f"eps={e:g}" for e in EPSILONS) + " |"
    lines = [head, "|" + "---|" * (2 + len(EPSILONS))]
    for setting, (label, _) in SETTINGS.items():
        by_eps = {c["epsilon_target"]: c for c in cells if c["setting"] == setting}
        if not by_eps:
            continue
        vals = []
        for eps in (None, *EPSILONS):
            cell = by_eps.get(eps)
            if cell is None:
                vals.append("-")
            elif cell["best"] is None:
                vals.append("infeasible")
            elif final:
                r = cell["refit"]
                acc = f"{100 * r['test_mean']:.1f} ± {100 * r['test_std']:.1f}"
                vals.append(_fmt(eps, acc, r.get("epsilon")))
            else:
                best = cell["best"]
                vals.append(_fmt(eps, f"{100 * best['test']:.1f}", best.get("epsilon")))
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny grids, one refit seed (~30 s)")
    p.add_argument("--out", type=Path, help="write all results (every grid point) as JSON here")
    p.add_argument("--model", default="digits-mlp-tanh", help="zoo model or path/file.py:factory")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument(
        "--seeds", type=int, help=f"refit seeds 0..N-1 per cell (default {len(SEEDS)}; smoke 1)"
    )
    p.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"subset of {', '.join(SETTINGS)}"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    grids = SMOKE_GRIDS if args.smoke else GRIDS
    n_seeds = args.seeds if args.seeds is not None else (1 if args.smoke else len(SEEDS))
    if n_seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {n_seeds}")
    seeds = list(range(n_seeds))
    splits = _splits()
    print(f"digits: fit {len(splits[0])}, validation {len(splits[1])}, test {len(splits[2])}, "
          f"refit on fit + validation {len(splits[3])} with seeds {seeds}; model {args.model}; "
          f"delta {DELTA}")  # fmt: skip
    worst = _check_local(args.model, splits[0])
    if worst > 1e-5:
        raise RuntimeError(f"vectorized local training differs from train_epochs by {worst:.3g}")
    print(f"vectorized local SGD vs split.train.train_epochs: max |diff| {worst:.1e}")
    cells = []
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        # Opacus' notices (secure_mode off, largest RDP order) say nothing about these runs.
        warnings.simplefilter("ignore", UserWarning)
        for setting in args.settings.split(","):
            if setting not in SETTINGS:
                raise ValueError(f"--settings: {setting!r} unknown; known: {', '.join(SETTINGS)}")
            for eps in (None, *EPSILONS):
                t1 = time.perf_counter()
                cell = run_cell(setting, eps, grids[setting], args.model, splits)
                cell["grid_seconds"] = time.perf_counter() - t1
                best = cell["best"] or {"val": float("nan"), "test": float("nan"), "hp": None}
                print(f"  {setting:8} eps={eps!s:5} val {best['val']:.3f} test {best['test']:.3f} "
                      f"hp {best['hp']} ({cell['grid_seconds']:.0f} s)", flush=True)  # fmt: skip
                if cell["best"] is not None:
                    t2 = time.perf_counter()
                    r = cell["refit"] = refit(setting, eps, best["hp"], args.model, splits, seeds)
                    r["seconds"] = time.perf_counter() - t2
                    spent = f", spent {r['epsilon']:.4f}" if eps is not None else ""
                    print(f"  {'':8} refit on {r['records']}: test {r['test_mean']:.3f} "
                          f"± {r['test_std']:.3f} over seeds {seeds}{spent} "
                          f"({r['seconds']:.0f} s)", flush=True)  # fmt: skip
                cell["seconds"] = time.perf_counter() - t1
                cells.append(cell)
    table = _table(cells, final=True)
    selection = _table(cells, final=False)
    print("\nSelection run: test accuracy (%) of the validation-picked configuration, trained "
          f"on fit only, seed {SEED}\n")  # fmt: skip
    print(selection)
    print(f"\nFinal: test accuracy (%) of the picked configuration refit on fit + validation, "
          f"mean ± std over seeds {seeds}; delta = {DELTA:g}\n")  # fmt: skip
    print(table)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"\ntotal {wall:.0f} s wall, {cpu:.0f} s CPU (the machine may be shared)")
    result = {"model": args.model, "delta": DELTA, "smoke": args.smoke, "seed": SEED,
              "refit_seeds": seeds, "grids": grids, "cells": cells, "table": table,
              "selection_table": selection, "seconds": wall, "cpu_seconds": cpu}  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
