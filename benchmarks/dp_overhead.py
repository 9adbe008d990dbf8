"""Differential-privacy overhead: DP-SGD step vs plain SGD step, and accountant time per round.

Also a U-shaped split step's device work with sample-level DP (split/privacy/split_dp.py)
against the same step without it.

Usage::

    python benchmarks/dp_overhead.py [--threads 1] [--smoke] [--out results.json]

Step time: one optimizer step (zero_grad, forward, loss, backward, step) on the same model and
the same fixed batch, plain ``torch.optim.SGD`` against the privatized module and DP optimizer
that :class:`split.privacy.DPTrainer` builds (Opacus hooks: per-sample gradients, per-sample
clipping, Gaussian noise, one accountant step through the optimizer hook). Each figure is the
minimum over several timed repeats (least disturbed by other processes on a shared machine).
Round time: a whole ``DPTrainer.train_round`` (Poisson-sampled epoch) against a plain epoch
with a shuffled ``DataLoader`` of the same batch size.

Accountant time: 100 federated rounds of user-level DP-FedAvg accounting (one step per round)
and of device DP-SGD accounting (one epoch of steps per round), each round = ``ledger.step``
+ ``ledger.epsilon()``, for the Opacus RDP and PRV accountants.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from split.privacy import DPConfig, DPTrainer, PrivacyLedger, budget

DELTA = 1e-5


def digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    )


def cifar_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


MODELS = {
    "digits-cnn (1x8x8)": (digits_cnn, (1, 8, 8)),
    "cifar-cnn (3x32x32)": (cifar_cnn, (3, 32, 32)),
}


def _best(fn, repeats: int, inner: int) -> float:
    """Minimum over ``repeats`` of the mean time of ``inner`` calls, in seconds."""
    fn()  # warm-up: first backward allocates and builds kernels
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return min(times)


def step_overhead(name: str, *, n: int, batch: int, repeats: int, inner: int) -> dict:
    build, shape = MODELS[name]
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(n, *shape)).astype(np.float32)
    y = rng.integers(0, 10, size=n)
    xb, yb = torch.as_tensor(x[:batch]), torch.as_tensor(y[:batch])
    loss_fn = nn.CrossEntropyLoss()

    torch.manual_seed(0)
    plain = build()
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)

    def plain_step():
        opt.zero_grad(set_to_none=True)
        loss_fn(plain(xb), yb).backward()
        opt.step()

    torch.manual_seed(0)
    cfg = DPConfig(mode="sample", noise_multiplier=1.0, max_grad_norm=1.0)
    trainer = DPTrainer(
        build(), config=cfg, sample_size=n, batch_size=batch, lr=0.1,
        epochs_per_round=1, rounds=None, seed=0,
    )  # fmt: skip
    round_dp = trainer.train_round(x, y)  # privatizes the model on the first round
    dp_module, dp_opt = trainer._module, trainer._optimizer  # benchmark-only peek

    def dp_step():
        dp_opt.zero_grad(set_to_none=True)
        loss_fn(dp_module(xb), yb).backward()
        dp_opt.step()

    t_plain = _best(plain_step, repeats, inner)
    t_dp = _best(dp_step, repeats, inner)

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.as_tensor(x), torch.as_tensor(y)),
        batch_size=batch,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )

    def plain_epoch():
        for a, b in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(plain(a), b).backward()
            opt.step()

    t_plain_round = _best(plain_epoch, max(2, repeats // 3), 1)
    t_dp_round = _best(lambda: trainer.train_round(x, y), max(2, repeats // 3), 1)

    # train_round ends with ledger.epsilon(); shown apart to separate training from accounting.
    def uncached_epsilon():
        budget._cached_epsilon.cache_clear()  # benchmark-only: time the real Opacus call
        trainer.epsilon()

    t_eps = _best(uncached_epsilon, max(2, repeats // 3), 1)
    return {
        "model": name,
        "batch": batch,
        "plain_step_ms": 1e3 * t_plain,
        "dp_step_ms": 1e3 * t_dp,
        "step_ratio": t_dp / t_plain,
        "steps_per_round": round_dp["steps"],
        "plain_round_ms": 1e3 * t_plain_round,
        "dp_round_ms": 1e3 * t_dp_round,
        "round_ratio": t_dp_round / t_plain_round,
        "epsilon_ms": 1e3 * t_eps,
    }


def split_step_overhead(*, batch: int, repeats: int, inner: int) -> dict:
    """A U-shaped device's share of one split step (digits-mlp-tanh), plain vs sample-level DP.

    Device work only: edge forward, (DP: activation clip + noise), head forward/backward, (DP:
    loss-gradient clip + noise), edge backward, optimizer step (DP: Opacus per-sample clip +
    noise over both halves). The cloud's middle runs in between, outside the timer, on the
    same tensors in both variants.
    """
    from split.graph import split_template
    from split.privacy.split_dp import SplitDP, SplitDPTrainer

    rng = np.random.default_rng(0)
    xb = torch.as_tensor(rng.uniform(size=(batch, 1, 8, 8)).astype(np.float32))
    yb = torch.as_tensor(rng.integers(0, 10, size=batch))
    dp = SplitDP(act_clip=1.0, act_sigma=2.0, grad_clip=1.0, grad_sigma=2.0, param_clip=1.0,
                 param_sigma=2.0, delta=DELTA)  # fmt: skip

    def make(private: bool):
        torch.manual_seed(0)
        sm = split_template("digits-mlp-tanh", "act1", "act2")
        if private:
            trainer = SplitDPTrainer(sm.edge, sm.head, dp, num_samples=1400, seed=0)
            opt = trainer.optimizer(lr=0.05, momentum=0.0, batch_size=batch)
        else:
            trainer = None
            opt = torch.optim.SGD([*sm.edge.parameters(), *sm.head.parameters()], lr=0.05)
        spent = [0.0]

        def step():
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            x = xb.detach().requires_grad_(True) if trainer else xb
            act = sm.edge(x)
            sent = trainer.noise_activation(act) if trainer else act
            a = sent.detach().requires_grad_(True)
            t1 = time.perf_counter()
            mid = sm.cloud(a)  # the cloud's part, not timed
            m = mid.detach().requires_grad_(True)
            t2 = time.perf_counter()
            nn.functional.cross_entropy(sm.head(m), yb).backward()
            g = trainer.noise_loss_gradient(m.grad) if trainer else m.grad
            t3 = time.perf_counter()
            mid.backward(g)  # cloud
            t4 = time.perf_counter()
            sent.backward(a.grad)
            opt.step()
            spent[0] += (t1 - t0) + (t3 - t2) + (time.perf_counter() - t4)

        return step, spent

    out = {}
    for name, private in (("plain", False), ("dp", True)):
        step, spent = make(private)
        step()  # warm-up
        best = []
        for _ in range(repeats):
            spent[0] = 0.0
            for _ in range(inner):
                step()
            best.append(spent[0] / inner)
        out[name] = min(best)
    return {
        "model": "digits-mlp-tanh (U-shaped)",
        "batch": batch,
        "plain_device_ms": 1e3 * out["plain"],
        "dp_device_ms": 1e3 * out["dp"],
        "ratio": out["dp"] / out["plain"],
    }


def accountant_time(name: str, *, rounds: int, scenario: str) -> dict:
    if scenario == "user-level (q=0.01, 1 step/round)":
        q, steps = 0.01, 1
    else:  # device DP-SGD: 1400 records, batch 64 -> 22 steps per local epoch
        q, steps = 1 / 22, 22
    ledger = PrivacyLedger(accountant=name, delta=DELTA)
    per_round = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        ledger.step(noise_multiplier=1.0, sample_rate=q, steps=steps)
        eps = ledger.epsilon()
        per_round.append(time.perf_counter() - t0)
    return {
        "accountant": name,
        "scenario": scenario,
        "rounds": rounds,
        "mean_ms_per_round": 1e3 * float(np.mean(per_round)),
        "max_ms_per_round": 1e3 * float(np.max(per_round)),
        "total_s": float(np.sum(per_round)),
        "final_epsilon": eps,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="seconds-long CI run")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Opacus' hooks on the first layer trip torch's "no inputs require grad" notice each run.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    repeats, inner, rounds = (2, 3, 5) if args.smoke else (9, 20, 100)
    n = 256 if args.smoke else 1400
    models = list(MODELS)[:1] if args.smoke else list(MODELS)

    steps = [step_overhead(m, n=n, batch=64, repeats=repeats, inner=inner) for m in models]
    print(f"DP-SGD vs plain SGD, batch 64, {args.threads} thread(s), best of {repeats}")
    print(f"{'model':22} {'plain ms':>9} {'DP ms':>8} {'ratio':>6} | {'round plain':>11} "
          f"{'round DP':>9} {'ratio':>6} {'of it eps':>9}")  # fmt: skip
    for r in steps:
        print(
            f"{r['model']:22} {r['plain_step_ms']:9.2f} {r['dp_step_ms']:8.2f} "
            f"{r['step_ratio']:6.2f} | {r['plain_round_ms']:9.1f}ms {r['dp_round_ms']:7.1f}ms "
            f"{r['round_ratio']:6.2f} {r['epsilon_ms']:7.1f}ms"
        )
    split = split_step_overhead(batch=16, repeats=repeats, inner=inner)
    print(
        f"\nsplit step, device work only, {split['model']}, batch {split['batch']}: plain "
        f"{split['plain_device_ms']:.3f} ms, sample-level DP {split['dp_device_ms']:.3f} ms "
        f"({split['ratio']:.2f}x)"
    )
    scenarios = ["user-level (q=0.01, 1 step/round)", "device (q=1/22, 22 steps/round)"]
    acc = [accountant_time(a, rounds=rounds, scenario=s) for s in scenarios for a in ("rdp", "prv")]
    print(f"\nAccountant time per round over {rounds} rounds (step + get_epsilon), delta={DELTA}")
    print(f"{'scenario':36} {'acct':>4} {'mean ms':>8} {'max ms':>8} {'total s':>8} {'eps':>7}")
    for r in acc:
        print(
            f"{r['scenario']:36} {r['accountant']:>4} {r['mean_ms_per_round']:8.1f} "
            f"{r['max_ms_per_round']:8.1f} {r['total_s']:8.2f} {r['final_epsilon']:7.3f}"
        )
    results = {"threads": args.threads, "smoke": args.smoke, "steps": steps, "split": split,
               "accountants": acc}  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
