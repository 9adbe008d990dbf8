"""Cutting a model into edge / cloud (/ head) halves with torch.fx."""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from split.errors import InputShapeError, SplitPointError

_COMPUTE_OPS = ("call_module", "call_function", "call_method")


@dataclass
class CutGraph:
    """A traced model with shapes and the places it can be cut.

    Attributes:
        gm: The traced model; it shares every submodule and parameter with the original.
        nodes: The graph's nodes in execution order.
        cuts: Valid cut points in execution order: canonical name -> node index.
        aliases: Every accepted name (canonical names, inner module names ending at the same
            node, fx node names) -> node index, for valid points only.
        blocked: Names of points that exist but cannot be cut -> the tensors crossing there.
    """

    gm: fx.GraphModule
    nodes: list[fx.Node]
    cuts: dict[str, int]
    aliases: dict[str, int]
    blocked: dict[str, list[str]]

    def shape(self, index: int) -> tuple[int, ...] | None:
        """Per-sample output shape of node ``index`` (None if it is not a single tensor)."""
        meta = self.nodes[index].meta.get("tensor_meta")
        return tuple(meta.shape[1:]) if isinstance(meta, TensorMetadata) else None

    def resolve(self, cut: str, *, role: str = "cut") -> int:
        """Returns the node index of a cut name, or raises SplitPointError listing valid ones."""
        if cut in self.aliases:
            return self.aliases[cut]
        valid = ", ".join(self.cuts) or "(none)"
        if cut in self.blocked:
            crossing = ", ".join(self.blocked[cut])
            raise SplitPointError(
                f"{role}={cut!r} cannot split the model: {len(self.blocked[cut])} tensors cross "
                f"there ({crossing}), e.g. a live skip connection; valid cut points: {valid}"
            )
        raise SplitPointError(f"{role}={cut!r} not found; valid cut points: {valid}")


def _module_ranges(nodes: list[fx.Node]) -> tuple[dict[str, int], set[str]]:
    """Last node index of every module call, and module names called more than once."""
    last: dict[str, int] = {}
    keys: dict[str, set[str]] = {}
    for i, node in enumerate(nodes):
        for key, (qualname, _) in node.meta.get("nn_module_stack", {}).items():
            if qualname:
                last[qualname] = i
                keys.setdefault(qualname, set()).add(key)
    return last, {name for name, ks in keys.items() if len(ks) > 1}


def _names_at(node: fx.Node, index: int, last: dict[str, int], ambiguous: set[str]) -> list[str]:
    """Candidate names of the point after ``node``, the preferred (outermost module) first."""
    names = [
        qualname
        for qualname, _ in node.meta.get("nn_module_stack", {}).values()
        if qualname and last.get(qualname) == index and qualname not in ambiguous
    ]
    if node.op == "call_module" and node.target not in ambiguous and node.target not in names:
        names.append(str(node.target))
    if node.name not in names:
        names.append(node.name)
    return names


def trace_cuts(model: nn.Module, example_input: torch.Tensor) -> CutGraph:
    """Traces ``model``, propagates shapes for ``example_input`` and finds the valid cuts.

    A cut after node k is valid when exactly one tensor crosses it: node k's output is the only
    value computed at or before k that is still used after k (parameters read by ``get_attr``
    are re-read on each side, so they do not count).

    Raises:
        SplitPointError: The model cannot be traced by torch.fx.
        InputShapeError: ``example_input`` does not fit the model.
    """
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:
        raise SplitPointError(
            f"model {type(model).__name__} cannot be traced by torch.fx ({exc}); move "
            "data-dependent control flow into a leaf module"
        ) from None
    # Shape propagation runs the model: eval mode so BatchNorm running statistics stay as they are.
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputShapeError(
            f"example_input of shape {tuple(example_input.shape)} does not fit model "
            f"{type(model).__name__}: {msg}"
        ) from None
    finally:
        for module, mode in flags:
            module.training = mode

    nodes = list(gm.graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=-1) for n in nodes}
    last_compute = max((i for i, n in enumerate(nodes) if n.op in _COMPUTE_OPS), default=-1)
    mod_last, ambiguous = _module_ranges(nodes)

    cuts: dict[str, int] = {}
    aliases: dict[str, int] = {}
    blocked: dict[str, list[str]] = {}
    live: dict[fx.Node, None] = {}  # insertion-ordered set
    for i, node in enumerate(nodes):
        if node.op not in ("get_attr", "output") and node.users:
            live[node] = None
        for arg in node.all_input_nodes:
            if last_use[arg] == i:
                live.pop(arg, None)
        if node.op not in _COMPUTE_OPS or i >= last_compute:
            continue
        names = _names_at(node, i, mod_last, ambiguous)
        single = list(live) == [node] and isinstance(node.meta.get("tensor_meta"), TensorMetadata)
        for name in names:
            if name in aliases or name in blocked:
                continue  # an earlier point already owns this name
            if single:
                aliases[name] = i
            else:
                blocked[name] = [n.name for n in live]
        if single and names[0] not in cuts and aliases.get(names[0]) == i:
            cuts[names[0]] = i
    return CutGraph(gm=gm, nodes=nodes, cuts=cuts, aliases=aliases, blocked=blocked)


def valid_cuts(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Names of the points ``model`` can be cut at, in execution order."""
    return list(trace_cuts(model, example_input).cuts)


def _segment(
    root: nn.Module, cg: CutGraph, start: int, end: int, *, last: bool, class_name: str
) -> fx.GraphModule:
    """A GraphModule computing nodes[start..end] from the single tensor crossing into start."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if start > 0:
        crossing = cg.nodes[start - 1]
        env[crossing] = graph.placeholder(crossing.name)

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env:
            if node.op != "get_attr":
                raise AssertionError(f"{node.name} crosses the cut")  # excluded by trace_cuts
            env[node] = graph.node_copy(node)
        return env[node]

    for node in cg.nodes[start : end + 1]:
        if node.op == "get_attr" or (node.op == "output" and not last):
            continue
        env[node] = graph.node_copy(node, lookup)
    if not last:
        graph.output(env[cg.nodes[end]])
    graph.lint()
    return fx.GraphModule(root, graph, class_name=class_name)


@dataclass
class SplitModel:
    """The halves of a cut model: ``cloud(edge(x))`` or, U-shaped, ``head(cloud(edge(x)))``.

    The halves share their submodules (and so parameters and buffers) with the model they were
    cut from: training the halves trains that model, and their ``state_dict`` keys are the
    model's own names.

    Attributes:
        edge: Runs on the device up to and including ``cut``.
        cloud: Runs in the cloud after ``cut`` (up to ``head_cut`` when U-shaped).
        head: U-shaped only: runs on the device after ``head_cut`` so labels never leave it.
        cut: Name of the edge/cloud cut point.
        head_cut: Name of the cloud/head cut point, or None.
        input_shape: Per-sample model input shape.
        activation_shape: Per-sample shape of the tensor crossing ``cut``.
        head_activation_shape: Per-sample shape of the tensor crossing ``head_cut``, or None.
    """

    edge: nn.Module
    cloud: nn.Module
    head: nn.Module | None
    cut: str
    head_cut: str | None
    input_shape: tuple[int, ...]
    activation_shape: tuple[int, ...]
    head_activation_shape: tuple[int, ...] | None = field(default=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Runs the halves in sequence; equals the unsplit model's forward."""
        out = self.cloud(self.edge(x))
        return self.head(out) if self.head is not None else out

    __call__ = forward

    def halves(self) -> Iterator[nn.Module]:
        """The edge, cloud and (if any) head modules."""
        yield self.edge
        yield self.cloud
        if self.head is not None:
            yield self.head

    def train(self, mode: bool = True) -> SplitModel:
        """Sets train/eval mode on every half."""
        for half in self.halves():
            half.train(mode)
        return self

    def eval(self) -> SplitModel:
        """Sets eval mode on every half."""
        return self.train(False)

    def to(self, *args, **kwargs) -> SplitModel:
        """Moves/casts every half like ``nn.Module.to`` (the shared model follows)."""
        for half in self.halves():
            half.to(*args, **kwargs)
        return self

    def parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of all halves, each once."""
        for _, p in self.named_parameters():
            yield p

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(state-dict name, parameter) of all halves, each parameter once."""
        seen: set[int] = set()
        for half in self.halves():
            for name, p in half.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield name, p

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The merged state of all halves, keyed like the unsplit model."""
        return merge_state(
            self.edge.state_dict(),
            self.cloud.state_dict(),
            self.head.state_dict() if self.head is not None else None,
        )

    def load_state_dict(self, model_sd: Mapping[str, torch.Tensor]) -> None:
        """Loads a full-model state dict into the halves (strict: every half key must exist)."""
        parts = split_state(model_sd, self)
        for half, sd in zip(self.halves(), parts, strict=True):
            half.load_state_dict(sd)


def split_model(
    model: nn.Module,
    *,
    cut: str,
    example_input: torch.Tensor,
    head_cut: str | None = None,
) -> SplitModel:
    """Cuts ``model`` after the module (or fx node) named ``cut``.

    Args:
        model: Any fx-traceable model; its submodules are shared with the halves, not copied.
        cut: The edge computes everything up to and including this point's output.
        example_input: A batch (any size) used to trace shapes.
        head_cut: For U-shaped split learning, a later point after which the layers go back to
            the device as ``head``.

    Raises:
        SplitPointError: A cut name is unknown, crosses more than one tensor, or
            ``head_cut`` is not after ``cut``; the message lists the valid cut points.
    """
    cg = trace_cuts(model, example_input)
    k1 = cg.resolve(cut)
    end = len(cg.nodes) - 1
    if head_cut is None:
        edge = _segment(model, cg, 0, k1, last=False, class_name="EdgeHalf")
        cloud = _segment(model, cg, k1 + 1, end, last=True, class_name="CloudHalf")
        return SplitModel(edge, cloud, None, cut, None, _per_sample(example_input), cg.shape(k1))
    k2 = cg.resolve(head_cut, role="head_cut")
    if k2 <= k1:
        later = [name for name, i in cg.cuts.items() if i > k1]
        raise SplitPointError(
            f"head_cut={head_cut!r} must come after cut={cut!r}; valid head cuts: "
            + (", ".join(later) or "(none)")
        )
    return SplitModel(
        edge=_segment(model, cg, 0, k1, last=False, class_name="EdgeHalf"),
        cloud=_segment(model, cg, k1 + 1, k2, last=False, class_name="CloudHalf"),
        head=_segment(model, cg, k2 + 1, end, last=True, class_name="HeadHalf"),
        cut=cut,
        head_cut=head_cut,
        input_shape=_per_sample(example_input),
        activation_shape=cg.shape(k1),
        head_activation_shape=cg.shape(k2),
    )


def _per_sample(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape[1:])


def merge_state(
    edge_sd: Mapping[str, torch.Tensor],
    cloud_sd: Mapping[str, torch.Tensor],
    head_sd: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Joins the halves' state dicts into the unsplit model's state dict.

    Raises:
        ValueError: A key shared by two halves (a tied weight) has different values.
    """
    merged: dict[str, torch.Tensor] = {}
    for part in (edge_sd, cloud_sd, head_sd or {}):
        for key, value in part.items():
            if key in merged and not torch.equal(merged[key], value):
                raise ValueError(f"state key {key!r} is in two halves with different values")
            merged[key] = value
    return merged


def split_state(
    model_sd: Mapping[str, torch.Tensor], sm: SplitModel
) -> tuple[dict[str, torch.Tensor], ...]:
    """Splits an unsplit model's state dict into (edge, cloud[, head]) state dicts.

    Raises:
        ValueError: ``model_sd`` lacks keys a half needs (lists the first few).
    """
    parts = []
    for half in sm.halves():
        keys = list(half.state_dict().keys())
        missing = [k for k in keys if k not in model_sd]
        if missing:
            raise ValueError(
                f"model state dict lacks {len(missing)} keys of the split model, e.g. "
                + ", ".join(missing[:3])
            )
        parts.append({k: model_sd[k] for k in keys})
    return tuple(parts)


# torch.fx tracing patches nn.Module.__call__ (and module globals) process-wide, so a forward
# running in another thread meanwhile fails ("module is not installed as a submodule") or is
# traced into the wrong graph. Parties that build split models while others in the process
# train (simulated devices, step workers) therefore trace each model once, under a lock, and
# take deep copies of that template.
_TEMPLATE_LOCK = threading.Lock()
_TEMPLATES: dict[tuple[str, str, str | None], SplitModel] = {}


def split_template(model_ref: str, cut: str, head_cut: str | None = None) -> SplitModel:
    """A private copy of zoo model ``model_ref`` split at ``cut`` (weights: seed 0; callers
    load their own), traced at most once per process."""
    from split.zoo import build_model

    key = (model_ref, cut, head_cut)
    with _TEMPLATE_LOCK:
        if key not in _TEMPLATES:
            model, spec = build_model(model_ref, seed=0)
            example = torch.zeros(2, *spec.input_shape)
            _TEMPLATES[key] = split_model(model, cut=cut, example_input=example, head_cut=head_cut)
        return copy.deepcopy(_TEMPLATES[key])
