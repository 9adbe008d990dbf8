"""Edge-half latency and memory: torch eager vs onnxruntime fp32 vs onnxruntime static int8.

Usage::

    python benchmarks/edge_latency.py [--threads 1] [--smoke] [--out results.json]

For each zoo CNN (digits-cnn, mnist-cnn, mobilenet-mini) at its default cut, the edge half is
exported with ``converters.onnx_export.export_edge`` and quantized with
``converters.quantize.quantize_static_int8``. Per-sample latency is the best of several timed
repeats (the minimum is the least disturbed by other processes on a shared machine) at batch
1 and 64. torch and onnxruntime get the same number of intra-op threads (``--threads``).

Peak RSS compares two fresh processes doing the same inference (batch 64, 20 runs): one with
torch made unimportable running ``edge.runtime.EdgeModel``, one importing torch and running the
eager edge half; a bare Python + NumPy process is shown for scale.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

MODELS = ("digits-cnn", "mnist-cnn", "mobilenet-mini")
BATCHES = (1, 64)
GOAL_SPEEDUP_B1 = 2.0
GOAL_RSS_RATIO = 1 / 3

_RSS_PRELUDE = """
import resource, sys
import numpy as np
"""
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so a child launched from this
# (torch-loaded) process would report the parent's peak.
_RSS_EPILOGUE = """
try:
    with open("/proc/self/status") as fh:
        print(next(int(ln.split()[1]) for ln in fh if ln.startswith("VmHWM:")))  # KiB
except OSError:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux, bytes on macOS
"""
_RSS_BODIES = {
    "numpy only": "",
    "onnxruntime (torch blocked)": """
sys.modules["torch"] = None
from edge.runtime import EdgeModel
model = EdgeModel(sys.argv[1], threads=int(sys.argv[3]))
x = np.random.default_rng(0).uniform(size=(64, *model.input_shape)).astype(np.float32)
for _ in range(20):
    model.run(x)
""",
    "torch eager": """
import torch
from split.graph import split_model
from split.zoo import build_model
torch.set_num_threads(int(sys.argv[3]))
model, spec = build_model(sys.argv[2], seed=0)
model.eval()
sm = split_model(model, cut=spec.default_cut, example_input=torch.zeros(2, *spec.input_shape))
x = torch.from_numpy(
    np.random.default_rng(0).uniform(size=(64, *spec.input_shape)).astype(np.float32)
)
with torch.inference_mode():
    for _ in range(20):
        sm.edge(x)
""",
}


def _best_per_sample(fn, batch: int, *, min_time: float, repeats: int) -> float:
    """Best-of-``repeats`` seconds per sample; each repeat loops long enough to time reliably."""
    for _ in range(3):
        fn()  # warm-up: first calls allocate and pick kernels
    loops, start = 1, time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    loops = max(1, int(min_time / once))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter() - start) / loops)
    return best / batch


def _peak_rss_mib(kind: str, onnx_path: Path, model_name: str, threads: int) -> float:
    code = textwrap.dedent(_RSS_PRELUDE + _RSS_BODIES[kind] + _RSS_EPILOGUE)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(onnx_path), model_name, str(threads)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} subprocess failed: {proc.stderr.strip().splitlines()[-1:]}")
    return int(proc.stdout.strip().splitlines()[-1]) / 1024


def _calibration(spec, n: int) -> np.ndarray:
    from converters.datasets import load_digits, synthetic

    if tuple(spec.input_shape) == (1, 8, 8):
        return load_digits().x[:n]
    # No bundled MNIST: synthetic images in [0, 1] give the same op mix and value range.
    return synthetic(n=n, shape=tuple(spec.input_shape), num_classes=10, seed=0).x


def bench_model(name: str, workdir: Path, *, threads: int, smoke: bool) -> dict:
    """Times one zoo model's edge half in the three runtimes; returns a JSON-ready record."""
    import torch

    from converters.onnx_export import export_edge
    from converters.quantize import quantize_static_int8
    from edge.runtime import EdgeModel
    from split.graph import split_model
    from split.zoo import build_model

    torch.set_num_threads(threads)
    model, spec = build_model(name, seed=0)
    model.eval()
    sm = split_model(model, cut=spec.default_cut, example_input=torch.zeros(2, *spec.input_shape))
    fp32 = workdir / f"{name}.onnx"
    int8 = workdir / f"{name}.int8.onnx"
    report = export_edge(sm.edge, fp32, example_input=torch.zeros(2, *spec.input_shape))
    quantize_static_int8(fp32, int8, calibration=_calibration(spec, 64 if smoke else 256))
    runtimes = {
        "ort_fp32": EdgeModel(fp32, threads=threads),
        "ort_int8": EdgeModel(int8, threads=threads),
    }
    rng = np.random.default_rng(0)
    min_time, repeats = (0.02, 3) if smoke else (0.2, 7)
    record: dict = {
        "model": name,
        "cut": spec.default_cut,
        "input_shape": list(spec.input_shape),
        "activation_shape": report.activation_shape,
        "exporter": report.exporter,
        "latency_us": {},
    }
    for batch in BATCHES:
        x = rng.uniform(size=(batch, *spec.input_shape)).astype(np.float32)
        xt = torch.from_numpy(x)

        def torch_eager(xt=xt):
            with torch.inference_mode():
                sm.edge(xt)

        row = {"torch": _best_per_sample(torch_eager, batch, min_time=min_time, repeats=repeats)}
        for key, rt in runtimes.items():
            row[key] = _best_per_sample(
                lambda rt=rt, x=x: rt.run(x), batch, min_time=min_time, repeats=repeats
            )
        record["latency_us"][str(batch)] = {k: v * 1e6 for k, v in row.items()}
    record["rss_mib"] = {kind: _peak_rss_mib(kind, fp32, name, threads) for kind in _RSS_BODIES}
    return record


def format_table(records: list[dict], threads: int) -> str:
    """Renders the records as the benchmark's printed table."""
    lines = [
        f"edge-half latency, microseconds per sample, best of repeats; {threads} intra-op "
        "thread(s) for torch and onnxruntime alike",
        f"{'model':<15} {'batch':>5} {'torch':>9} {'ort fp32':>9} {'ort int8':>9} "
        f"{'fp32 x':>7} {'int8 x':>7}",
    ]
    for r in records:
        for batch, row in r["latency_us"].items():
            lines.append(
                f"{r['model']:<15} {batch:>5} {row['torch']:>9.1f} {row['ort_fp32']:>9.1f} "
                f"{row['ort_int8']:>9.1f} {row['torch'] / row['ort_fp32']:>6.2f}x "
                f"{row['torch'] / row['ort_int8']:>6.2f}x"
            )
    lines.append("(x = speed-up over torch eager: torch time / onnxruntime time)")
    slower = [
        f"{r['model']}@{b}"
        for r in records
        for b, row in r["latency_us"].items()
        if row["ort_int8"] > row["ort_fp32"]
    ]
    if slower:
        lines.append(
            f"int8 slower than fp32 for {', '.join(slower)}: on edge halves this small (few "
            "channels) the quantize/dequantize steps cost more than the integer kernels save"
        )
    lines.append("")
    lines.append("peak RSS (MiB) of a fresh process running the edge half, batch 64 x 20")
    lines.append(
        f"{'model':<15} {'numpy only':>10} {'ort, no torch':>13} {'torch':>8} {'ratio':>6}"
    )
    for r in records:
        rss = r["rss_mib"]
        ratio = rss["onnxruntime (torch blocked)"] / rss["torch eager"]
        lines.append(
            f"{r['model']:<15} {rss['numpy only']:>10.1f} "
            f"{rss['onnxruntime (torch blocked)']:>13.1f} {rss['torch eager']:>8.1f} {ratio:>6.2f}"
        )
    speedups = [r["latency_us"]["1"]["torch"] / r["latency_us"]["1"]["ort_fp32"] for r in records]
    ratios = [
        r["rss_mib"]["onnxruntime (torch blocked)"] / r["rss_mib"]["torch eager"] for r in records
    ]
    lines.append("")
    lines.append(
        f"goal: ort fp32 >= {GOAL_SPEEDUP_B1:g}x torch at batch 1 -> min {min(speedups):.2f}x "
        f"({'met' if min(speedups) >= GOAL_SPEEDUP_B1 else 'NOT met'}); "
        f"torch-free RSS < 1/3 of torch -> max ratio {max(ratios):.2f} "
        f"({'met' if max(ratios) < GOAL_RSS_RATIO else 'NOT met'})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for both")
    parser.add_argument("--smoke", action="store_true", help="tiny fast run (CI): digits-cnn only")
    parser.add_argument("--out", type=Path, default=None, help="also save the results as JSON")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    models = MODELS[:1] if args.smoke else MODELS
    with tempfile.TemporaryDirectory(prefix="edgesplit-bench-") as tmp:
        records = [
            bench_model(name, Path(tmp), threads=args.threads, smoke=args.smoke) for name in models
        ]
    print(format_table(records, args.threads))
    if args.out is not None:
        args.out.write_text(json.dumps({"threads": args.threads, "models": records}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
