"""The cloud half of split learning: forward/backward/step on the activations devices send."""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from cloud.errors import SplitProtocolError

# Split modes: how devices run (one after another or in parallel) and how the cloud half is held.
SEQUENTIAL_MODES = ("vanilla", "ushaped")
PARALLEL_MODES = ("splitfed-v1", "splitfed-v2")
SPLIT_MODES = SEQUENTIAL_MODES + PARALLEL_MODES


@dataclass(frozen=True)
class StepInput:
    """One device's batch at the cut, as decoded from an ACTIVATION message."""

    device: str
    step: int
    activation: np.ndarray
    labels: np.ndarray | None  # None in U-shaped mode: labels stay on the device


@dataclass
class ComputeStats:
    """What the cloud half did: batches, samples, devices per batch and time spent computing."""

    calls: int = 0
    samples: int = 0
    device_batches: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, *, samples: int, devices: int, seconds: float, call: bool = True) -> None:
        with self._lock:
            self.calls += int(call)
            self.samples += samples
            self.device_batches += devices
            self.seconds += seconds

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "cloud_calls": self.calls,
                "cloud_samples": self.samples,
                "devices_per_call": self.device_batches / self.calls if self.calls else 0.0,
                "cloud_compute_seconds": self.seconds,
            }


class CloudHalf:
    """The cloud's share of the model during one round, for one split mode.

    vanilla / U-shaped / SplitFed V2 train one shared cloud half; V1 gives every device its own
    copy, averaged at the end of the round. Each device session gets a fresh SGD optimizer, as a
    federated device gets one per round, so a one-device vanilla run takes exactly the steps of
    centralized training (the oracle the tests compare against).

    Args:
        mode: one of :data:`SPLIT_MODES`.
        module: the cloud half (shared with the cloud's full model, so evaluation sees it).
        lr: SGD learning rate.
        momentum: SGD momentum.
        num_classes: labels must be in ``[0, num_classes)``.
    """

    def __init__(self, *, mode: str, module, lr: float, momentum: float, num_classes: int) -> None:
        import torch

        if mode not in SPLIT_MODES:
            raise ValueError(f"mode={mode!r} unknown; known split modes: {', '.join(SPLIT_MODES)}")
        self._torch = torch
        self.mode = mode
        self.module = module
        self.lr, self.momentum = lr, momentum
        self.num_classes = num_classes
        self.stats = ComputeStats()
        self._lock = threading.Lock()
        self._copies: dict[str, object] = {}
        self._opts: dict[str, object] = {}
        self._shared_opt = None
        # U-shaped: (device, step) -> (activation leaf, middle output) awaiting LOGIT_GRADIENT.
        self._pending: dict[tuple[str, int], tuple[object, object]] = {}

    # -- sessions --------------------------------------------------------------------------

    def begin_round(self) -> None:
        """Forgets every device session; optimizers start fresh, V1 copies from ``module``."""
        with self._lock:
            self._copies.clear()
            self._opts.clear()
            self._pending.clear()
            self._shared_opt = None

    def drop(self, device: str) -> None:
        """Drops a vanished device's session (its V1 copy and half-finished U-shaped steps)."""
        with self._lock:
            self._copies.pop(device, None)
            self._opts.pop(device, None)
            for key in [k for k in self._pending if k[0] == device]:
                del self._pending[key]

    def _sgd(self, module):
        return self._torch.optim.SGD(module.parameters(), lr=self.lr, momentum=self.momentum)

    def _session(self, device: str):
        """(module, optimizer) that trains on ``device``'s activations."""
        with self._lock:
            if self.mode == "splitfed-v2":
                if self._shared_opt is None:
                    self._shared_opt = self._sgd(self.module)
                return self.module, self._shared_opt
            if device not in self._opts:
                module = self.module
                if self.mode == "splitfed-v1":
                    module = self._copies[device] = copy.deepcopy(self.module)
                self._opts[device] = self._sgd(module)
            module = self._copies.get(device, self.module)
            return module, self._opts[device]

    def copies(self) -> dict[str, dict[str, np.ndarray]]:
        """V1: each device's cloud-half parameters (state-dict names) after its training."""
        with self._lock:
            return {
                d: {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
                for d, m in self._copies.items()
            }

    # -- steps -----------------------------------------------------------------------------

    def _check_labels(self, item: StepInput) -> None:
        y = item.labels
        if y is None or y.size == 0:
            raise SplitProtocolError(f"{item.device} step {item.step}: labels missing")
        if y.min() < 0 or y.max() >= self.num_classes:
            raise SplitProtocolError(
                f"{item.device} step {item.step}: labels must be in [0, {self.num_classes}), "
                f"got range [{int(y.min())}, {int(y.max())}]"
            )

    def train_step(self, items: list[StepInput]) -> list[np.ndarray]:
        """Vanilla / SplitFed: loss on the cloud, one optimizer step, gradients at the cut.

        Several items (SplitFed V2 only: one shared cloud half) run as ONE forward/backward on
        the concatenated batch. The loss is the mean over all samples, so the cloud step is a
        large-batch step; each device's gradient is rescaled by ``N / n_i`` so that it equals
        the gradient of that device's own mean loss, what it would get served alone.

        Returns:
            The gradient w.r.t. each item's activation, in ``items`` order.
        """
        torch = self._torch
        ys = [it.labels for it in items]
        y = None
        if all(v is not None and v.size for v in ys):
            y = ys[0] if len(ys) == 1 else np.concatenate(ys)
            if y.min() < 0 or y.max() >= self.num_classes:
                y = None
        if y is None:  # name the first device and step at fault
            for item in items:
                self._check_labels(item)
        if len(items) > 1 and self.mode != "splitfed-v2":
            raise SplitProtocolError(f"mode {self.mode} serves one device per step")
        t0 = time.perf_counter()
        module, opt = self._session(items[0].device)
        # One leaf for the whole batch (concatenated in NumPy): each device's gradient is then a
        # slice of its gradient, the same numbers torch.cat of per-device leaves would give.
        x = (
            items[0].activation
            if len(items) == 1
            else np.concatenate([it.activation for it in items])
        )
        act = torch.from_numpy(x).requires_grad_(True)
        labels = torch.from_numpy(y.astype(np.int64))
        loss = torch.nn.functional.cross_entropy(module(act), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total = len(labels)
        g = act.grad.numpy()
        if len(items) == 1:
            grads = [g]
        else:
            grads, start = [], 0
            for it in items:
                n = len(it.activation)
                grads.append(g[start : start + n] * (total / n))
                start += n
        self.stats.add(samples=total, devices=len(items), seconds=time.perf_counter() - t0)
        return grads

    def u_forward(self, item: StepInput) -> np.ndarray:
        """U-shaped: the middle output for the device's head; the graph waits for its gradient."""
        torch = self._torch
        t0 = time.perf_counter()
        module, _ = self._session(item.device)
        act = torch.from_numpy(item.activation).requires_grad_(True)
        out = module(act)
        with self._lock:
            self._pending[(item.device, item.step)] = (act, out)
        self.stats.add(samples=len(act), devices=1, seconds=time.perf_counter() - t0)
        return out.detach().numpy().copy()

    def u_output_shape(self, device: str, step: int) -> tuple[int, ...]:
        """Shape of the middle output of a pending step (what its LOGIT_GRADIENT must match)."""
        with self._lock:
            pending = self._pending.get((device, step))
        if pending is None:
            raise SplitProtocolError(
                f"LOGIT_GRADIENT from {device} for unknown step {step}; no forward is pending"
            )
        return tuple(pending[1].shape)

    def u_backward(self, device: str, step: int, grad: np.ndarray) -> np.ndarray:
        """U-shaped: backward from the device's gradient, optimizer step, gradient at the cut."""
        torch = self._torch
        with self._lock:
            pending = self._pending.pop((device, step), None)
        if pending is None:
            raise SplitProtocolError(
                f"LOGIT_GRADIENT from {device} for unknown step {step}; no forward is pending"
            )
        t0 = time.perf_counter()
        act, out = pending
        _, opt = self._session(device)
        opt.zero_grad(set_to_none=True)
        out.backward(torch.from_numpy(grad))
        opt.step()
        # The backward half of a U-shaped step: time counts, the step was counted at forward.
        self.stats.add(samples=0, devices=0, seconds=time.perf_counter() - t0, call=False)
        return act.grad.numpy()
