"""CLI subcommands owned by the split package (registered through the edgesplit.commands group)."""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

from split.errors import one_line

# torch-side modules are imported inside the handler: a device install can still list commands.

DIGITS_TEST_FRACTION = 0.25


def _path(text: str) -> Path:
    if not text:  # Path("") would be the working directory
        raise argparse.ArgumentTypeError(f"must be a non-empty path, got {text!r}")
    return Path(text)


def _out_dir(text: str) -> Path:
    path = _path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"must be a directory, got {text!r} (a file)")
    return path


def register(subparsers) -> None:
    """Adds this package's subcommands to the ``edgesplit`` parser."""
    p = subparsers.add_parser(
        "split",
        help="cut a model into edge/cloud halves and write a split directory",
        description=(
            "Cut a model (zoo name or file.py:factory) after a named layer and write a split "
            "directory (manifest.json, model.pt, cloud.pt), or list its cut points."
        ),
    )
    p.add_argument("model", help="zoo name (e.g. digits-cnn) or path/to/file.py:factory")
    p.add_argument("--cut", help="cut after this layer (default: the model's default cut)")
    p.add_argument("--head-cut", help="U-shaped: layers after this one stay on the device")
    p.add_argument("--out", type=_out_dir, help="split directory to write")
    p.add_argument("--weights", type=_path, help="state dict (.pt) to load before splitting")
    p.add_argument("--train-epochs", type=int, default=0, help="train centrally first (digits)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, shuffling, data split")
    p.add_argument("--input-shape", help="per-sample input shape, e.g. 1,8,8 (file models)")
    p.add_argument("--list-cuts", action="store_true", help="print the cut points and costs")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run_split)


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--input-shape must be comma-separated ints, got {text!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"--input-shape must be positive ints, got {text!r}")
    return shape


def _digits(seed: int):
    """sklearn digits split stratified into train / held-out; also returns the held-out indices.

    The indices go into the manifest so ``edgesplit export`` reports accuracy on exactly the
    samples this model never trained on.
    """
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    idx_tr, idx_te = train_test_split(
        np.arange(len(x)), test_size=DIGITS_TEST_FRACTION, random_state=seed, stratify=data.target
    )
    return x[idx_tr], x[idx_te], data.target[idx_tr], data.target[idx_te], np.sort(idx_te)


def _train(model, spec, args) -> dict:
    from split.train import evaluate, train_centralized

    if args.train_epochs < 0:
        raise ValueError(f"--train-epochs must be >= 0, got {args.train_epochs}")
    if spec.dataset != "digits" or spec.input_shape != (1, 8, 8):
        raise ValueError(
            f"model {args.model!r} trains on {spec.dataset!r} data, which is not bundled; "
            "train it elsewhere and pass --weights PATH.pt"
        )
    x_tr, x_te, y_tr, y_te, test_idx = _digits(args.seed)
    train_centralized(model, x_tr, y_tr, epochs=args.train_epochs, momentum=0.9, seed=args.seed)
    accuracy, loss = evaluate(model, x_te, y_te)
    return {
        "dataset": "digits",
        "epochs": args.train_epochs,
        "train_samples": len(x_tr),
        "test_samples": len(x_te),
        "test_accuracy": round(accuracy, 4),
        "test_loss": round(loss, 4),
        "seed": args.seed,
        "test_indices": test_idx.tolist(),
    }


def _cut_table(infos, default_cut: str) -> str:
    header = ("cut", "activation", "fp32 B", "int8 B", "edge FLOPs", "cloud FLOPs", "edge W B")
    rows = [
        (
            ("*" if info.name == default_cut else " ") + info.name,
            "x".join(str(d) for d in info.activation_shape),
            str(info.activation_bytes["float32"]),
            str(info.activation_bytes["int8"]),
            f"{info.edge_flops:,}",
            f"{info.cloud_flops:,}",
            f"{info.edge_param_bytes:,}",
        )
        for info in infos
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
    lines.append("(* default cut; FLOPs and bytes per sample)")
    return "\n".join(lines)


def run_split(args: argparse.Namespace) -> int:
    """Handler of ``edgesplit split``; returns the exit code."""
    import torch

    from split.cuts import list_cuts
    from split.graph import split_model
    from split.store import save_split
    from split.zoo import build_model

    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    shape = _parse_shape(args.input_shape)
    model, spec = build_model(args.model, seed=args.seed, input_shape=shape)
    example = torch.zeros((1, *spec.input_shape))
    if args.weights is not None:
        try:
            state = torch.load(args.weights, map_location="cpu", weights_only=True)
        except OSError as exc:
            msg = f"--weights must be a readable file, got {str(args.weights)!r}: {exc.strerror}"
            raise ValueError(msg) from None
        except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:  # not a torch state dict
            why = one_line(str(exc)) or type(exc).__name__
            raise ValueError(
                f"--weights must be a state dict saved by torch.save, got "
                f"{str(args.weights)!r}: {why}"
            ) from None
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            msg = f"--weights {args.weights} does not fit {args.model!r}: {one_line(str(exc))}"
            raise ValueError(msg) from None
    if args.list_cuts:
        infos = list_cuts(model, example)
        if args.json:
            print(json.dumps([info.as_dict() for info in infos], indent=2))
        else:
            print(_cut_table(infos, spec.default_cut))
        return 0
    if args.out is None:
        raise ValueError("--out DIR is required to write a split (or pass --list-cuts)")
    cut = args.cut if args.cut is not None else spec.default_cut  # --cut '' names no layer
    if args.cut is None and not cut:
        from split.graph import valid_cuts

        raise ValueError(
            f"model {args.model!r} has no default cut; pass --cut, one of: "
            + ", ".join(valid_cuts(model, example))
        )
    # Split before training so a bad cut fails fast; the halves share the model's weights.
    sm = split_model(model, cut=cut, head_cut=args.head_cut, example_input=example)
    training = _train(model, spec, args) if args.train_epochs else None
    extra = {"seed": args.seed}
    if training is not None:
        extra["training"] = training
    if args.weights is not None:
        extra["weights"] = str(args.weights)
    manifest = save_split(
        sm, model, model_ref=args.model, num_classes=spec.num_classes, out_dir=args.out, extra=extra
    )
    if args.json:
        summary = {"out": str(args.out), "digest": manifest.digest(), **manifest.to_dict()}
        print(json.dumps(summary, indent=2))
        return 0
    params = manifest.extra["parameters"]
    print(f"wrote {args.out}: model {args.model}, cut {cut}", end="")
    print(f", head_cut {args.head_cut}" if args.head_cut else "")
    print(
        f"  activation {tuple(sm.activation_shape)} per sample; parameters edge {params['edge']}, "
        f"cloud {params['cloud']}, head {params['head']}"
    )
    if training is not None:
        print(
            f"  trained {training['epochs']} epochs on digits: held-out accuracy "
            f"{training['test_accuracy']:.4f}"
        )
    print(f"  manifest digest {manifest.digest()}")
    return 0
