"""CLI subcommands owned by the cloud package: ``simulate``, ``cloud`` and the broker tools."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from cloud.config import MODES, FederatedConfig, read_run_table
from converters.errors import ConfigError

# Settings that only mean something in a split mode: `--mode fedavg` drops the file's values
# so a split run's run.toml can be reused for a federated one (no flag can unset them).
_SPLIT_ONLY = ("cut", "head_cut")


def register(subparsers) -> None:
    """Adds this package's subcommands to the ``edgesplit`` parser."""
    from cloud.broker_commands import register_broker_commands
    from cloud.serve_commands import register_serve_commands
    from cloud.split_worker_commands import register_split_worker_commands

    sim = subparsers.add_parser(
        "simulate",
        help="run a whole federation on this machine (broker + cloud + devices)",
        description="Starts a broker, the cloud trainer and N devices (real MQTT clients in "
        "worker processes) and trains for the given rounds.",
    )
    _add_run_flags(sim)
    sim.add_argument("--clients", type=int, default=20, help="number of devices")
    sim.add_argument("--partition", default="dirichlet:0.5", help="iid | dirichlet:A | shards:K")
    sim.add_argument("--dropout", type=float, default=0.0, help="chance a device crashes per round")
    sim.add_argument("--workers", type=int, default=0, help="device processes (0: one per core)")
    sim.add_argument(
        "--broker-kind", default="auto", choices=["auto", "mosquitto", "embedded"],
        help="broker to start when --broker is not given",
    )  # fmt: skip
    sim.add_argument(
        "--reference", action="store_true",
        help="also train the same model centrally and report its accuracy",
    )  # fmt: skip
    sim.set_defaults(func=run_simulate)

    cloud = subparsers.add_parser(
        "cloud",
        help="run the cloud trainer against devices on a broker",
        description="Coordinates federated rounds with devices connected to --broker.",
    )
    _add_run_flags(cloud)
    cloud.add_argument("--expect", type=int, default=0, help="devices to wait for before round 1")
    cloud.set_defaults(func=run_cloud)
    register_broker_commands(subparsers)
    register_serve_commands(subparsers)
    register_split_worker_commands(subparsers)


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run.toml ([run] table); flags override it")
    p.add_argument("--broker", help="broker URL mqtt://host:port (default: start one)")
    p.add_argument("--name", dest="run_id", help="run id (also names runs/<name>/)")
    p.add_argument("--out", dest="out_dir", help="output directory (default runs/<name>)")
    p.add_argument("--model", help="zoo model or path/file.py:factory")
    p.add_argument("--dataset", help="digits | synthetic[:N] | file.npz | idx:IMAGES,LABELS")
    p.add_argument("--rounds", type=int)
    p.add_argument("--clients-per-round", type=int)
    p.add_argument("--fraction", type=float)
    p.add_argument("--min-clients", type=int)
    p.add_argument("--round-timeout", type=float)
    p.add_argument("--local-epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument(
        "--strategy", help="fedavg | fedprox | fedadam | fedyogi | median | trimmed-mean"
    )
    p.add_argument(
        "--strategy-arg", action="append", default=[], metavar="KEY=VALUE",
        help="strategy setting, e.g. mu=0.01 (repeatable)",
    )  # fmt: skip
    p.add_argument("--codec", choices=["float32", "fp16", "int8"])
    p.add_argument(
        "--mode", choices=list(MODES),
        help="fedavg (default) or a split-learning topology",
    )  # fmt: skip
    p.add_argument("--cut", help="split modes: edge/cloud cut point (default: the model's)")
    p.add_argument("--head-cut", help="ushaped: cloud/head cut point (default: the last one)")
    p.add_argument("--act-codec", choices=["float32", "fp16", "int8"], help="split activations")
    p.add_argument(
        "--split-workers", type=int,
        help="splitfed-v1: step workers serve the cloud half through the broker (simulate "
        "starts N; with cloud, start them with `edgesplit split-worker`)",
    )  # fmt: skip
    p.add_argument(
        "--step-qos", type=int, choices=[0, 1],
        help="split modes: MQTT QoS of one-frame step messages (0: no PUBACKs; a lost step is "
        "resent after step_resend seconds)",
    )  # fmt: skip
    p.add_argument("--dp", choices=["none", "sample", "user"])
    p.add_argument(
        "--secure",
        choices=["none", "secagg", "he-paillier"],
        help="secure aggregation: pairwise masking (Bonawitz et al.) or Paillier (Phong et al.)",
    )
    p.add_argument("--noise-multiplier", type=float)
    p.add_argument("--target-epsilon", type=float)
    p.add_argument("--delta", type=float)
    p.add_argument("--clip", type=float, help="clip norm (per sample or per update)")
    p.add_argument(
        "--act-noise-clip", type=float,
        help="split modes: clip each sample's cut activation to this L2 norm (0: off)",
    )  # fmt: skip
    p.add_argument(
        "--act-noise-multiplier", type=float,
        help="split modes: Gaussian noise std on activations / --act-noise-clip (0: off)",
    )  # fmt: skip
    p.add_argument(
        "--grad-noise-clip", type=float,
        help="ushaped with --dp sample: clip each sample's loss gradient sent to the cloud",
    )  # fmt: skip
    p.add_argument(
        "--grad-noise-multiplier", type=float,
        help="ushaped with --dp sample: its noise std / --grad-noise-clip (0: the calibrated or "
        "--noise-multiplier value)",
    )  # fmt: skip
    p.add_argument(
        "--label-epsilon", type=float,
        help="vanilla/splitfed with --dp sample: randomized response on labels at this epsilon "
        "(0: half of --target-epsilon)",
    )  # fmt: skip
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _strategy_args(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--strategy-arg must be KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def config_from_args(args: argparse.Namespace) -> FederatedConfig:
    """Builds the run config: defaults < run.toml < command-line flags.

    The file and the flags are merged first and validated once, so a file that is only valid
    together with the flags (``cut`` with ``--mode vanilla``) is accepted.
    """
    merged = read_run_table(args.config) if args.config is not None else {}
    changes = {}
    for f in fields(FederatedConfig):
        value = getattr(args, f.name, None)
        if value is not None and f.name != "strategy_args":
            changes[f.name] = value
    if args.strategy_arg:
        changes["strategy_args"] = _strategy_args(args.strategy_arg)
    if changes.get("dp") == "none":
        changes.setdefault("noise_multiplier", None)
    if changes.get("mode") == "fedavg":
        for name in _SPLIT_ONLY:
            changes.setdefault(name, None)
    if "run_id" in changes and "out_dir" not in changes:
        changes["out_dir"] = f"runs/{changes['run_id']}"
    return FederatedConfig.from_dict({**merged, **changes})


class _Progress:
    """A rich progress bar over rounds showing accuracy, epsilon and bytes."""

    def __init__(self, rounds: int, enabled: bool) -> None:
        self._bar = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._bar = Progress(
            TextColumn("[bold]rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            transient=False,
        )
        self._task = self._bar.add_task("waiting for devices", total=rounds)

    def __enter__(self):
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def update(self, row: dict) -> None:
        if self._bar is None:
            return
        acc = row.get("accuracy")
        eps = row.get("epsilon")
        desc = f"acc {acc:.3f}" if acc is not None else f"round {row['round']} {row.get('status')}"
        if eps is not None:
            desc += f"  eps {eps:.2f}"
        desc += f"  ok {row.get('clients_ok', 0)}/{row.get('clients_selected', 0)}"
        desc += f"  up {row.get('bytes_up', 0) / 2**20:.1f} MiB"
        self._bar.update(self._task, advance=1, description=desc)


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    eps = summary.get("epsilon")
    if summary.get("dp") in (None, "none"):
        eps_text = "inf (no differential privacy; use --dp sample|user)"
    elif eps is None:
        eps_text = "n/a"
    else:
        eps_text = f"{eps:.3f} (delta={summary.get('delta')})"
    acc = summary.get("accuracy")
    lines = [
        ("accuracy", f"{acc:.4f}" if acc is not None else "n/a (no round completed)"),
        ("epsilon", eps_text),
        ("rounds", f"{summary.get('rounds_ok')} ok of {summary.get('rounds')}"),
        ("bytes up", f"{summary['bytes_up']:,} ({summary['bytes_up'] / 2**20:.2f} MiB)"),
        ("bytes down", f"{summary['bytes_down']:,} ({summary['bytes_down'] / 2**20:.2f} MiB)"),
        ("seconds", f"{summary['seconds']:.1f}"),
    ]
    if summary.get("centralized_accuracy") is not None:
        lines.insert(1, ("centralized", f"{summary['centralized_accuracy']:.4f} (reference)"))
    if summary.get("stopped"):
        lines.append(("stopped", summary["stopped"]))
    if summary.get("out_dir"):
        lines.append(("outputs", summary["out_dir"]))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}")


def run_simulate(args: argparse.Namespace) -> int:
    from cloud.simulate import SimulationOptions, centralized_reference, simulate

    config = config_from_args(args)
    options = SimulationOptions(
        clients=args.clients,
        partition=args.partition,
        dropout=args.dropout,
        workers=args.workers,
        broker_url=args.broker,
        broker=args.broker_kind,
    )
    with _Progress(config.rounds, enabled=not (args.quiet or args.json)) as progress:
        summary = simulate(config, options, resume=args.resume, on_round=progress.update)
    if args.reference:
        summary["centralized_accuracy"] = centralized_reference(config, options)
    summary["out_dir"] = config.out_dir
    _print_summary(summary, args.json)
    return 0 if summary.get("rounds_ok") else 1


def run_cloud(args: argparse.Namespace) -> int:
    from cloud.broker import start_default_broker
    from cloud.server import FederatedServer
    from converters.datasets import load_dataset, train_test_split
    from converters.mqtt import MqttConfig

    if args.expect < 0:
        raise ValueError(f"--expect must be >= 0, got {args.expect}")
    config = config_from_args(args)
    data = load_dataset(config.dataset, seed=config.seed)
    _, test = train_test_split(data, test_fraction=config.test_fraction, seed=config.seed)
    broker = None
    url = args.broker
    if url is None:
        broker = start_default_broker()
        url = broker.url
        print(f"started broker at {url}")
    try:
        split = config.mode != "fedavg"
        trainer_cls = FederatedServer
        if split:
            from cloud.split_trainer import SplitTrainer

            trainer_cls = SplitTrainer
        server = trainer_cls(
            config,
            mqtt=MqttConfig.from_url(url, client_id="cloud"),
            test_set=test,
            expected_devices=args.expect or None,
        )
        with _Progress(config.rounds, enabled=not (args.quiet or args.json)) as progress:
            server.on_round = progress.update
            summary = server.run(resume=args.resume)
    finally:
        if broker is not None:
            broker.stop()
    summary["out_dir"] = config.out_dir
    _print_summary(summary, args.json)
    return 0 if summary.get("rounds_ok") else 1
