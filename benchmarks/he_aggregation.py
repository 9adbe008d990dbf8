"""HE aggregation throughput: 10 devices encrypt, a server sums, a device decrypts (values/s).

Compares python-paillier (``phe``, with gmpy2) against edgesplit's packed Paillier on the
pure-Python reference backend and on the Cython/GMP backend, all with 2048-bit keys, in one
process on local compute only (no network). Figures are serial compute time summed over all
parties, like the anchor in docs REFERENCES.md (phe: ~7-8 values/s); the Cython backend splits
each batch over the machine's cores. ``phe`` and the reference are measured on fewer values and
extrapolated linearly to values/s (their cost is per value / per ciphertext, so this is exact up
to noise); the report says so. The online-only row precomputes the encryption randomness with
:class:`kernels.RandomnessPool` first and times the rest.

Usage:
    python benchmarks/he_aggregation.py            # full run (~1-2 minutes on 2 cores)
    python benchmarks/he_aggregation.py --smoke    # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

import kernels
from kernels import _backend


def _ours(kp, x: np.ndarray, spec, pool=None) -> tuple[float, dict[str, float], float]:
    """Runs encrypt-by-devices + sum + decrypt; returns (seconds, phases, max abs error)."""
    devices, n_values = x.shape
    c0 = time.process_time()
    t0 = time.perf_counter()
    cts = [
        kernels.encrypt_batch(kp, kernels.encode_pack(row, spec), randomness_pool=pool) for row in x
    ]
    t1 = time.perf_counter()
    summed = kernels.sum_ciphertexts(kp.public_only(), cts)
    t2 = time.perf_counter()
    plain = kernels.decrypt_batch(kp, summed)
    out = kernels.unpack_decode(plain, spec, n_values=n_values, n_summands=devices)
    t3 = time.perf_counter()
    cpu = time.process_time() - c0
    err = float(np.max(np.abs(out - x.sum(axis=0))))
    return t3 - t0, {"encrypt": t1 - t0, "sum": t2 - t1, "decrypt": t3 - t2, "cpu": cpu}, err


def _phe(x: np.ndarray, bits: int) -> tuple[float, dict[str, float], float]:
    import phe

    pk, sk = phe.generate_paillier_keypair(n_length=bits)
    c0 = time.process_time()
    t0 = time.perf_counter()
    cts = [[pk.encrypt(float(v)) for v in row] for row in x]
    t1 = time.perf_counter()
    summed = [sum(col[1:], col[0]) for col in zip(*cts, strict=True)]
    t2 = time.perf_counter()
    out = np.array([sk.decrypt(c) for c in summed])
    t3 = time.perf_counter()
    cpu = time.process_time() - c0
    err = float(np.max(np.abs(out - x.sum(axis=0))))
    return t3 - t0, {"encrypt": t1 - t0, "sum": t2 - t1, "decrypt": t3 - t2, "cpu": cpu}, err


def run(
    *,
    values: int,
    phe_values: int,
    ref_values: int,
    devices: int = 10,
    bits: int = 2048,
    value_bits: int = 32,
    frac_bits: int = 16,
    seed: int = 0,
) -> list[dict]:
    """Runs every configuration and returns one result row per configuration."""
    gen = np.random.default_rng(seed)
    kp = kernels.PaillierKeyPair.generate(bits)
    spec = kernels.PackingSpec.for_key(
        kp.public, value_bits=value_bits, frac_bits=frac_bits, max_summands=devices
    )
    bound = devices * 2.0 ** -(spec.frac_bits + 1)
    rows = []

    def add(name, measured, secs, phases, err, note, check_bound=True):
        if check_bound and err > bound + 1e-9:
            raise AssertionError(f"{name}: max error {err} exceeds fixed-point bound {bound}")
        rows.append(
            {
                "config": name,
                "values_measured": measured,
                "seconds": round(secs, 4),
                "values_per_s": measured / secs,
                "values_per_cpu_s": measured / phases["cpu"],
                "phases_s": {k: round(v, 4) for k, v in phases.items()},
                "max_abs_error": err,
                "note": note,
            }
        )

    if phe_values:
        x = gen.normal(0.0, 10.0, size=(devices, phe_values))
        secs, phases, err = _phe(x, bits)
        add(
            "phe (python-paillier + gmpy2)",
            phe_values,
            secs,
            phases,
            err,
            "measured on fewer values, extrapolated",
            check_bound=False,
        )

    x = gen.normal(0.0, 10.0, size=(devices, ref_values))
    with _backend.forced("python"):
        secs, phases, err = _ours(kp, x, spec)
    add(
        "edgesplit reference (Python ints)",
        ref_values,
        secs,
        phases,
        err,
        "packing+CRT; measured on fewer values, extrapolated",
    )

    if "cython" in _backend.available("paillier"):
        x = gen.normal(0.0, 10.0, size=(devices, values))
        with _backend.forced("cython"):
            secs, phases, err = _ours(kp, x, spec)
            add("edgesplit cython/GMP", values, secs, phases, err, "packing+CRT, all cores")
            n_cts = devices * spec.n_plaintexts(values)
            pool = kernels.RandomnessPool(kp, capacity=n_cts, background=False)
            t0 = time.perf_counter()
            pool.fill()
            offline = time.perf_counter() - t0
            secs, phases, err = _ours(kp, x, spec, pool=pool)
            pool.close()
            phases["offline_pool_fill"] = offline
            add(
                "edgesplit cython/GMP online (pool)",
                values,
                secs,
                phases,
                err,
                "randomness precomputed offline (not timed)",
            )
    phe_rate = rows[0]["values_per_s"] if phe_values else None
    phe_cpu_rate = rows[0]["values_per_cpu_s"] if phe_values else None
    for row in rows:
        row["vs_phe"] = row["values_per_s"] / phe_rate if phe_rate else None
        row["vs_phe_cpu"] = row["values_per_cpu_s"] / phe_cpu_rate if phe_cpu_rate else None
        row.update(
            bits=bits,
            devices=devices,
            slots_per_ciphertext=spec.slots_per_ciphertext,
            value_bits=spec.value_bits,
            frac_bits=spec.frac_bits,
        )
    return rows


def _print(rows: list[dict]) -> None:
    print(
        f"{'configuration':38} {'values':>8} {'wall s':>8} {'values/s':>10} {'x phe':>7} "
        f"{'values/cpu-s':>13} {'x phe cpu':>10}"
    )
    for r in rows:
        ratio = f"{r['vs_phe']:.0f}" if r["vs_phe"] else "-"
        ratio_cpu = f"{r['vs_phe_cpu']:.0f}" if r["vs_phe_cpu"] else "-"
        print(
            f"{r['config']:38} {r['values_measured']:>8} {r['seconds']:>8.2f} "
            f"{r['values_per_s']:>10.1f} {ratio:>7} {r['values_per_cpu_s']:>13.1f} {ratio_cpu:>10}"
        )
    print(
        "phe and reference rows: measured on fewer values, values/s extrapolated linearly; "
        "wall = end to end using all cores, cpu = summed CPU time of all threads"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    """Command-line entry point; prints a table and writes JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="seconds-long CI version")
    parser.add_argument("--values", type=int, default=100_000, help="vector length (ours)")
    parser.add_argument("--phe-values", type=int, default=200, help="vector length for phe")
    parser.add_argument("--ref-values", type=int, default=1100, help="length for the reference")
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--bits", type=int, default=2048)
    parser.add_argument("--value-bits", type=int, default=32, help="fixed-point payload bits")
    parser.add_argument("--frac-bits", type=int, default=16, help="fixed-point fraction bits")
    parser.add_argument("--out", type=Path, default=Path("bench-results/he_aggregation.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.values, args.phe_values, args.ref_values = 2000, 4, 110
    try:
        import phe  # noqa: F401
    except ImportError:
        print("phe not installed (pip install phe); skipping the baseline")
        args.phe_values = 0
    rows = run(
        values=args.values,
        phe_values=args.phe_values,
        ref_values=args.ref_values,
        devices=args.devices,
        bits=args.bits,
        value_bits=args.value_bits,
        frac_bits=args.frac_bits,
    )
    _print(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpus": os.cpu_count(), "python": platform.python_version(), "smoke": args.smoke}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
