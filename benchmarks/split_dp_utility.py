"""Accuracy of split learning under sample-level DP (every step message noised) on digits.

Usage::

    python benchmarks/split_dp_utility.py [--seeds 3] [--smoke] [--out results.json]

Each cell is ``edgesplit simulate`` (embedded-free: the Mosquitto or embedded broker that
``simulate`` picks, on loopback) with ``--dp sample --target-epsilon E``: devices clip and noise
their cut activations, U-shaped devices their loss gradients, SplitFed devices randomize their
labels once (half the budget), and DP-SGD (Opacus) trains the device halves; the epsilon is the
joint replace-one ledger of :mod:`split.privacy.split_dp`, as reported by the run. The
non-private column is the same command without ``--dp``. Printed: test accuracy (mean +- std
over seeds) and the epsilon the run reported.

The figures are what one gets with the defaults below (digits-mlp-tanh, 5 iid devices, 3 rounds
of 1 local epoch, batch 16, lr 0.05, clips 1): no hyperparameter search, no claim of optimality.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

COMMON = [
    "--model", "digits-mlp-tanh", "--partition", "iid", "--local-epochs", "1",
    "--batch-size", "16", "--lr", "0.05", "--momentum", "0", "--clip", "1",
    "--quiet", "--json",
]  # fmt: skip


def run(mode: str, eps: float | None, seed: int, clients: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "converters.cli", "simulate", "--mode", mode,
               "--clients", str(clients), "--rounds", str(rounds), "--seed", str(seed),
               "--out", out, *COMMON]  # fmt: skip
        if eps is not None:
            cmd += ["--dp", "sample", "--target-epsilon", str(eps), "--act-noise-clip", "1"]
            if mode == "ushaped":
                cmd += ["--grad-noise-clip", "1"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        return json.loads(done.stdout[done.stdout.index("{") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="seconds-long CI run")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    modes = ["ushaped"] if args.smoke else ["ushaped", "splitfed-v2"]
    epsilons = [None, 8.0] if args.smoke else [None, 8.0, 64.0, 512.0]
    seeds = range(1 if args.smoke else args.seeds)
    clients, rounds = (2, 1) if args.smoke else (5, 3)
    table: dict[str, dict[str, dict]] = {}
    for mode in modes:
        for eps in epsilons:
            accs, spent = [], []
            for seed in seeds:
                summary = run(mode, eps, seed, clients, rounds)
                accs.append(summary["accuracy"])
                spent.append(summary.get("epsilon") if eps is not None else None)
            key = "non-private" if eps is None else f"eps {eps:g}"
            table.setdefault(mode, {})[key] = {
                "accuracy_mean": float(np.mean(accs)),
                "accuracy_std": float(np.std(accs)),
                "epsilon": max(spent) if eps is not None else None,
                "seeds": len(accs),
            }
            cell = table[mode][key]
            print(
                f"{mode:12s} {key:12s} accuracy {100 * cell['accuracy_mean']:5.1f} +- "
                f"{100 * cell['accuracy_std']:.1f}  epsilon "
                f"{cell['epsilon'] if cell['epsilon'] is not None else 'inf'}",
                flush=True,
            )
    if args.out:
        args.out.write_text(json.dumps({"smoke": args.smoke, "table": table}, indent=2))


if __name__ == "__main__":
    main()
