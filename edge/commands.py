"""CLI subcommands owned by the edge package (registered through the edgesplit.commands group)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import EdgeInputError


def register(subparsers) -> None:
    """Adds this package's subcommands (``infer``, ``edge``) to the ``edgesplit`` parser."""
    from edge.agent_commands import register_agent_commands  # stdlib-only at import
    from edge.runtime import VARIANTS  # light: no onnxruntime import at module level

    register_agent_commands(subparsers)

    p = subparsers.add_parser(
        "infer",
        help="run a split model on a .npy batch (edge half in onnxruntime, then the cloud half)",
        description=(
            "Runs the exported edge half with onnxruntime, then the cloud half locally with "
            "torch, and prints the predicted class and probabilities per input row."
        ),
    )
    p.add_argument("directory", metavar="DIR", help="split directory (after `edgesplit export`)")
    p.add_argument(
        "input", metavar="INPUT.npy", help="float32 array (N, *input_shape) or one sample"
    )
    p.add_argument(
        "--variant",
        choices=[*VARIANTS, "pca"],
        default="fp32",
        help="edge ONNX variant (pca: edge.pca.onnx, remote only)",
    )
    p.add_argument(
        "--broker",
        help="ask a cloud `edgesplit serve` on this broker instead of running the "
        "cloud half here (this process then needs no torch)",
    )
    p.add_argument("--id", dest="device_id", help="device id (MQTT client id) with --broker")
    p.add_argument("--prefix", default="edgesplit", help="topic prefix of the service")
    p.add_argument("--codec", help="activation codec with --broker (default: the split's)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the reply")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_infer_command)


def infer(
    directory: str | Path, x: np.ndarray, *, variant: str = "fp32", threads: int | None = None
) -> dict[str, Any]:
    """Runs the whole split model on ``x``: edge half in onnxruntime, cloud half in torch.

    Args:
        directory: Split directory holding manifest.json, the edge ONNX variant and the torch
            checkpoints of the cloud half.
        x: A batch ``(N, *input_shape)`` or one sample ``input_shape`` (float, see EdgeModel).
        variant: Edge variant to run: fp32, int8 or fp16.
        threads: onnxruntime intra-op threads.

    Returns:
        ``{"variant", "model_hash", "activation_shape", "rows": [{"row", "class",
        "probabilities"}]}``.

    Raises:
        EdgeInputError: ``x`` does not fit the model.
        RuntimeError: torch is not installed (the cloud half needs it).
    """
    from edge.runtime import EdgeModel

    model = EdgeModel.from_dir(directory, variant=variant, threads=threads)
    activation = model.run(x)
    if activation.shape == model.activation_shape:  # one sample in: restore its batch axis
        activation = activation[None]
    probabilities = _cloud_probabilities(Path(directory), activation)
    return {
        "variant": variant,
        "model_hash": model.model_hash,
        "activation_shape": list(model.activation_shape),
        "rows": [
            {"row": i, "class": int(np.argmax(p)), "probabilities": [float(v) for v in p]}
            for i, p in enumerate(probabilities)
        ],
    }


def _cloud_probabilities(directory: Path, activation: np.ndarray) -> np.ndarray:
    try:
        import torch

        from split.store import load_split
    except ImportError as exc:
        raise RuntimeError(
            f"the cloud half needs torch, which is not importable here ({exc}); install "
            "edgesplit[cloud] on this machine or run the cloud half on a server"
        ) from None
    split_model, _, _ = load_split(directory)
    rest = [split_model.cloud] + ([split_model.head] if split_model.head is not None else [])
    with torch.inference_mode():
        out = torch.from_numpy(np.ascontiguousarray(activation, dtype=np.float32))
        for module in rest:
            module.eval()
            out = module(out)
        return torch.softmax(out.to(torch.float64), dim=1).numpy()


def _infer_command(args: argparse.Namespace) -> int:
    path = Path(args.input)
    if path.suffix != ".npy":
        raise ValueError(f"INPUT must be a .npy file, got {str(path)!r}")
    try:
        x = np.load(path, allow_pickle=False)
    except ValueError as exc:  # pickled object arrays, truncated files
        raise EdgeInputError(f"{path} is not a plain .npy array: {exc}") from None
    except OSError as exc:
        msg = f"INPUT must be a readable .npy file, got {str(path)!r}: {exc.strerror}"
        raise ValueError(msg) from None
    if args.broker is not None:  # --broker '' is a bad URL, not "run here"
        from edge.remote_infer import infer_remote

        if not args.device_id:
            raise ValueError("--broker needs --id DEVICE_ID (the device's MQTT client id)")
        result = infer_remote(
            args.directory,
            x,
            broker_url=args.broker,
            device_id=args.device_id,
            variant=args.variant,
            timeout=args.timeout,
            prefix=args.prefix,
            codec=args.codec,
        )
    elif args.variant == "pca":
        raise ValueError("--variant pca needs --broker (the cloud reconstructs PCA codes)")
    else:
        result = infer(args.directory, x, variant=args.variant, threads=args.threads)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"model {result['model_hash'][:16]}  variant {result['variant']}")
    for row in result["rows"]:
        probs = " ".join(f"{p:.3f}" for p in row["probabilities"])
        print(f"row {row['row']:>4}  class {row['class']:>3}  p=[{probs}]")
    return 0
