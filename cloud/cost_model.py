"""Bytes on the wire: split learning (per-sample activations) vs federated averaging (weights)."""

from __future__ import annotations

import math

LABEL_BYTES = 8  # labels travel as int64
_SPLIT_MODES = ("vanilla", "ushaped", "splitfed-v1", "splitfed-v2")


def _numel(state: dict) -> int:
    return sum(int(v.numel()) for v in state.values())


def split_vs_fedavg_bytes(
    *,
    model,
    cut: str,
    input_shape: tuple[int, ...],
    samples_per_client: list[int],
    epochs: int,
    codec_bytes_per_value: float = 4,
    mode: str = "vanilla",
    head_cut: str | None = None,
    param_bytes_per_value: float = 4,
) -> dict:
    """Payload bytes of one round (``epochs`` local epochs) of split learning vs FedAvg.

    Split learning moves, per sample and epoch, the activation at the cut up and its gradient
    down (plus the int64 label up in vanilla / SplitFed; U-shaped instead moves the middle
    output down and its gradient up, and no label). Its device halves also travel once per
    round, down and up (``split_sync_bytes``). FedAvg moves the whole model down and up once
    per client and round, whatever the number of samples. Envelope and tensor headers (tens of
    bytes per message) are not counted.

    Args:
        model: a zoo name or an ``nn.Module``.
        cut: the edge/cloud cut point.
        input_shape: per-sample input shape.
        samples_per_client: training samples of each device.
        epochs: local epochs per round.
        codec_bytes_per_value: bytes per activation/gradient value (4 float32, 2 fp16, ~1 int8).
        mode: one of vanilla, ushaped, splitfed-v1, splitfed-v2.
        head_cut: U-shaped only: the cloud/head cut point.
        param_bytes_per_value: bytes per parameter value when weights travel (float32: 4).

    Returns:
        A dict with the per-sample sizes, ``split_bytes_per_epoch``, ``split_bytes`` (the
        round's activations and gradients), ``split_sync_bytes``, ``split_total_bytes``,
        ``fedavg_bytes``, ``ratio`` (split total / FedAvg) and ``cheaper``.

    Raises:
        ValueError: a bad argument (one line naming it).
    """
    import torch

    from split.graph import split_model
    from split.zoo import build_model

    if mode not in _SPLIT_MODES:
        raise ValueError(f"mode={mode!r} unknown; known split modes: {', '.join(_SPLIT_MODES)}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not samples_per_client or any(n < 0 for n in samples_per_client):
        raise ValueError(
            f"samples_per_client must be non-empty counts >= 0, got {samples_per_client}"
        )
    if not codec_bytes_per_value > 0 or not param_bytes_per_value > 0:
        raise ValueError(
            f"codec_bytes_per_value and param_bytes_per_value must be > 0, got "
            f"{codec_bytes_per_value}, {param_bytes_per_value}"
        )
    if isinstance(model, str):
        model, _ = build_model(model, seed=0, input_shape=tuple(input_shape))
    example = torch.zeros(2, *input_shape)
    sm = split_model(
        model, cut=cut, example_input=example, head_cut=head_cut if mode == "ushaped" else None
    )
    act = math.prod(sm.activation_shape)
    c = codec_bytes_per_value
    if mode == "ushaped":
        mid = math.prod(sm.head_activation_shape)
        up, down = act * c + mid * c, mid * c + act * c
    else:
        up, down = act * c + LABEL_BYTES, act * c
    clients, samples = len(samples_per_client), sum(samples_per_client)
    device_values = _numel(sm.edge.state_dict()) + (_numel(sm.head.state_dict()) if sm.head else 0)
    model_values = _numel(model.state_dict())
    per_epoch = samples * (up + down)
    split_bytes = epochs * per_epoch
    sync = 2 * device_values * param_bytes_per_value * clients
    fedavg = 2 * model_values * param_bytes_per_value * clients
    total = split_bytes + sync
    return {
        "mode": mode,
        "activation_values": act,
        "bytes_up_per_sample": up,
        "bytes_down_per_sample": down,
        "split_bytes_per_epoch": per_epoch,
        "split_bytes": split_bytes,
        "split_sync_bytes": sync,
        "split_total_bytes": total,
        "fedavg_bytes": fedavg,
        "ratio": total / fedavg if fedavg else math.inf,
        "cheaper": "split" if total < fedavg else "fedavg",
    }


def describe(cost: dict) -> str:
    """One line for the console, e.g. before a simulated split run."""
    mib = 2**20
    return (
        f"cost model ({cost['mode']}, per round): split {cost['split_total_bytes'] / mib:.2f} MiB "
        f"(activations {cost['split_bytes'] / 2**20:.2f} + halves "
        f"{cost['split_sync_bytes'] / 2**20:.2f}) vs FedAvg {cost['fedavg_bytes'] / 2**20:.2f} MiB"
        f" -> {cost['cheaper']} is cheaper ({cost['ratio']:.2f}x)"
    )
