"""Cost of each cut point: FLOPs on each side, device weight bytes, bytes sent per sample."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.pooling import (
    _AdaptiveAvgPoolNd,
    _AdaptiveMaxPoolNd,
    _AvgPoolNd,
    _LPPoolNd,
    _MaxPoolNd,
)

from split.graph import CutGraph, trace_cuts

# Bytes of one element per wire dtype; int8 additionally carries float32 scales (see below).
_ITEM_BYTES = {"float32": 4, "float16": 2, "int8": 1}
_SCALE_BYTES = 4

_POOLS = (_MaxPoolNd, _AvgPoolNd, _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _LPPoolNd)
# Pure data movement or metadata: no arithmetic, so no FLOPs.
_FREE_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout)
_FREE_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    torch.cat,
    torch.stack,
    operator.getitem,
    getattr,
    nn.functional.dropout,
}
_FREE_METHODS = {
    "view",
    "reshape",
    "flatten",
    "size",
    "dim",
    "permute",
    "transpose",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "expand",
    "view_as",
    "type",
    "to",
}


@dataclass(frozen=True)
class CutInfo:
    """What cutting at one point costs.

    FLOPs are per sample: multiply-accumulates for convolutions and linear layers, one per
    output element for elementwise work (activations, BatchNorm, adds), one per input element
    for pooling, none for reshapes.

    Attributes:
        name: Cut point name, as accepted by ``split_model``.
        edge_flops: Work done on the device up to and including the cut.
        cloud_flops: Work done in the cloud after the cut.
        edge_param_bytes: Bytes of the edge half's parameters and buffers (its state dict).
        activation_shape: Per-sample shape of the tensor crossing the cut.
        activation_bytes: Bytes per sample on the wire by dtype. ``int8`` adds one float32 scale
            per channel (dimension 0) for activations with channels, one per tensor otherwise.
        cloud_param_bytes: Bytes of the cloud half's parameters and buffers.
    """

    name: str
    edge_flops: int
    cloud_flops: int
    edge_param_bytes: int
    activation_shape: tuple[int, ...]
    activation_bytes: dict[str, int]
    cloud_param_bytes: int = 0

    def as_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        return {
            "name": self.name,
            "edge_flops": self.edge_flops,
            "cloud_flops": self.cloud_flops,
            "edge_param_bytes": self.edge_param_bytes,
            "cloud_param_bytes": self.cloud_param_bytes,
            "activation_shape": list(self.activation_shape),
            "activation_bytes": dict(self.activation_bytes),
        }


def activation_bytes(shape: tuple[int, ...]) -> dict[str, int]:
    """Per-sample wire size of an activation of ``shape`` as float32, float16 and int8."""
    numel = math.prod(shape)
    scales = shape[0] if len(shape) >= 2 else 1
    sizes = {dtype: numel * size for dtype, size in _ITEM_BYTES.items()}
    sizes["int8"] += scales * _SCALE_BYTES
    return sizes


def _numel(node: fx.Node | object) -> int:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return math.prod(shape[1:]) if shape is not None else 0


def _arg_shape(node: fx.Node, i: int) -> tuple[int, ...] | None:
    arg = node.args[i] if len(node.args) > i else None
    meta = arg.meta.get("tensor_meta") if isinstance(arg, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def node_flops(node: fx.Node, module: nn.Module | None) -> int:
    """Per-sample FLOPs of one graph node (see ``CutInfo`` for what counts)."""
    if node.op == "call_module":
        if isinstance(module, _ConvTransposeNd):
            kernel = math.prod(module.kernel_size)
            return _numel(node.args[0]) * module.out_channels // module.groups * kernel
        if isinstance(module, _ConvNd):
            kernel = math.prod(module.kernel_size)
            return _numel(node) * module.in_channels // module.groups * kernel
        if isinstance(module, nn.Linear):
            return _numel(node) * module.in_features
        if isinstance(module, _POOLS):
            return _numel(node.args[0])
        if isinstance(module, _FREE_MODULES):
            return 0
        return _numel(node)
    if node.op == "call_function":
        if node.target in _FREE_FUNCTIONS:
            return 0
        weight = _arg_shape(node, 1)
        if node.target is nn.functional.linear and weight is not None:
            return _numel(node) * weight[1]
        if node.target in (nn.functional.conv1d, nn.functional.conv2d, nn.functional.conv3d):
            return _numel(node) * math.prod(weight[1:]) if weight is not None else 0
        if node.target in (torch.matmul, torch.mm, torch.bmm, operator.matmul):
            first = _arg_shape(node, 0)
            return _numel(node) * first[-1] if first else 0
        return _numel(node)
    if node.op == "call_method":
        return 0 if node.target in _FREE_METHODS else _numel(node)
    return 0


def _state_tensors(cg: CutGraph, start: int, end: int) -> dict[str, torch.Tensor]:
    """Parameters and buffers read by nodes[start..end], by their state-dict name."""
    tensors: dict[str, torch.Tensor] = {}
    for node in cg.nodes[start : end + 1]:
        if node.op == "call_module":
            module = cg.gm.get_submodule(str(node.target))
            for key, t in [*module.named_parameters(), *module.named_buffers()]:
                tensors[f"{node.target}.{key}"] = t
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                tensors[str(arg.target)] = _attr(cg.gm, str(arg.target))
    return tensors


def _attr(root: nn.Module, target: str) -> torch.Tensor:
    obj: object = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


def _bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(
        t.numel() * t.element_size() for t in tensors.values() if isinstance(t, torch.Tensor)
    )


def list_cuts(model: nn.Module, example_input: torch.Tensor) -> list[CutInfo]:
    """Every valid cut point of ``model`` with its costs, in execution order."""
    cg = trace_cuts(model, example_input)
    flops = [
        node_flops(n, cg.gm.get_submodule(str(n.target)) if n.op == "call_module" else None)
        for n in cg.nodes
    ]
    total = sum(flops)
    last = len(cg.nodes) - 1
    infos = []
    for name, k in cg.cuts.items():
        edge = sum(flops[: k + 1])
        shape = cg.shape(k)
        infos.append(
            CutInfo(
                name=name,
                edge_flops=edge,
                cloud_flops=total - edge,
                edge_param_bytes=_bytes(_state_tensors(cg, 0, k)),
                activation_shape=shape,
                activation_bytes=activation_bytes(shape),
                cloud_param_bytes=_bytes(_state_tensors(cg, k + 1, last)),
            )
        )
    return infos


def total_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """Per-sample FLOPs of the whole model, counted as in ``CutInfo``."""
    cg = trace_cuts(model, example_input)
    return sum(
        node_flops(n, cg.gm.get_submodule(str(n.target)) if n.op == "call_module" else None)
        for n in cg.nodes
    )
