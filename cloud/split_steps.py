"""Split-learning step messages on the cloud: validated decoding and batching across devices."""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterator

import numpy as np

from cloud.errors import SplitProtocolError
from cloud.split_session import StepInput
from converters.tensor_codec import decode_tensors
from converters.wire import Envelope, MsgType

# (message type, decoded step, envelope it came in) - what the compute thread works on.
Work = tuple[MsgType, StepInput, Envelope]


def step_of(device: str, env: Envelope) -> int:
    """The step id in ``env.meta``; raises SplitProtocolError unless it is an int >= 0."""
    step = env.meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise SplitProtocolError(
            f"{env.type.name} from {device}: meta.step must be an int >= 0, got {step!r}"
        )
    return step


def session_of(env: Envelope) -> str | None:
    """The coordinator session a step names (``meta.session``, from the device's MODEL), or
    None if it names none (a device older than sessions in steps); raises SplitProtocolError
    unless it is a str of 1-64 characters."""
    session = env.meta.get("session")
    if session is None:
        return None
    if not isinstance(session, str) or not 1 <= len(session) <= 64:
        raise SplitProtocolError(
            f"{env.type.name} from {env.sender}: meta.session must be a str of 1-64 "
            f"characters, got {session!r}"[:300]
        )
    return session


def decode_activation(
    device: str,
    env: Envelope,
    *,
    batch_size: int,
    activation_shape: tuple[int, ...],
    with_labels: bool,
) -> StepInput:
    """Decodes an ACTIVATION; shape, dtype and finiteness are checked by the tensor codec.

    Raises:
        SplitProtocolError: bad step or batch size in meta.
        WireError: the body is not exactly ``activation`` (B, *activation_shape) float32 (and,
            with labels, ``labels`` (B,) int64), or holds NaN/Inf.
    """
    step = step_of(device, env)
    n = env.meta.get("batch")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= batch_size:
        raise SplitProtocolError(
            f"ACTIVATION from {device} step {step}: meta.batch must be an int in "
            f"[1, {batch_size}], got {n!r}"
        )
    expect = {"activation": ((n, *activation_shape), "float32")}
    if with_labels:
        expect["labels"] = ((n,), "int64")
    tensors = decode_tensors(env.body, expect=expect)
    return StepInput(device, step, tensors["activation"], tensors.get("labels"))


def grad_scale(grad: np.ndarray, codec: str) -> float:
    """A power of two lifting fp16 gradients out of the subnormal range (as in mixed-precision
    loss scaling): gradients at the cut are ~1e-4, where fp16 keeps only a few bits. Powers of
    two scale exactly; other codecs (float32; int8 with its own scales) get 1."""
    if codec != "fp16":
        return 1.0
    peak = float(np.abs(grad).max(initial=0.0))
    if not 0 < peak < math.inf:
        return 1.0
    return float(2.0 ** min(40, max(-40, math.floor(math.log2(2.0**14 / peak)))))


def unscale(device: str, env: Envelope, grad: np.ndarray) -> np.ndarray:
    """Undoes :func:`grad_scale` using ``meta.scale``; anything but a power of two is refused."""
    scale = env.meta.get("scale", 1.0)
    ok = isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 < scale < math.inf
    if not ok or math.frexp(scale)[0] != 0.5 or not 2.0**-40 <= scale <= 2.0**40:
        raise SplitProtocolError(
            f"{env.type.name} from {device}: meta.scale must be a power of two in "
            f"[2**-40, 2**40], got {scale!r}"
        )
    return grad / np.float32(scale) if scale != 1 else grad


def decode_logit_gradient(device: str, env: Envelope, shape: tuple[int, ...]) -> StepInput:
    """Decodes a LOGIT_GRADIENT whose ``grad`` must have the pending middle output's shape."""
    step = step_of(device, env)
    grad = decode_tensors(env.body, expect={"grad": (shape, "float32")})["grad"]
    return StepInput(device, step, unscale(device, env, grad), None)


class StepQueue:
    """Work for the cloud half, grouped so that one call can serve many devices.

    Args:
        window: seconds to wait, after the first ACTIVATION, for other devices' ACTIVATIONs
            to join the same call; 0 serves one message at a time.
        max_devices: most devices per call.
        active: how many devices are training right now; the window closes early once each
            of them has a step in the batch, since no other activation can arrive.
    """

    def __init__(
        self, *, window: float, max_devices: int, active: Callable[[], int] | None = None
    ) -> None:
        self.window, self.max_devices = window, max_devices
        self._active = active or (lambda: max_devices)
        self._q: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, item: Work) -> None:
        self._q.put(item)

    def close(self) -> None:
        self._q.put(None)

    def batches(self) -> Iterator[list[Work]]:
        """Yields lists of work items until :meth:`close`; batched ones are all ACTIVATIONs
        from distinct devices (a device has one step in flight, so a repeat must wait)."""
        carry: list = []
        while True:
            first = carry.pop(0) if carry else self._q.get()
            if first is None:
                return
            batch = [first]
            if self.window > 0 and first[0] == MsgType.ACTIVATION:
                devices = {first[1].device}
                deadline = time.monotonic() + self.window
                while len(batch) < min(self.max_devices, self._active()):
                    left = deadline - time.monotonic()
                    try:
                        item = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
                    except queue.Empty:
                        break
                    if item is None or item[0] != MsgType.ACTIVATION or item[1].device in devices:
                        carry.append(item)
                        break
                    devices.add(item[1].device)
                    batch.append(item)
            yield batch


StepKey = tuple[int, int, MsgType]  # (round, step, uplink message type)

# Within a step the device sends its ACTIVATION before (U-shaped) its LOGIT_GRADIENT.
_UPLINK_ORDER = {MsgType.ACTIVATION: 0, MsgType.LOGIT_GRADIENT: 1}


def _older(key: StepKey, than: StepKey) -> bool:
    """True if ``key`` comes before ``than`` in the same round (the device numbers its steps
    upwards within a round; a new round, or a new run on a long-lived worker, starts again)."""
    if key[0] != than[0]:
        return False
    rank = _UPLINK_ORDER.get
    return (key[1], rank(key[2], 0)) < (than[1], rank(than[2], 0))


class StepLedger:
    """Which step messages are queued or answered, so a repeat is never trained on twice.

    Step messages travel as single frames without a transport ack (``MqttEndpoint.post``): the
    reply acknowledges them and a device that gets none resends the same step. QoS 1 may also
    deliver a message twice. A repeat of a queued step is ignored; a repeat of the last answered
    step gets the cached reply again. Each device has one step in flight, so one cached reply
    per device suffices: a step older than the last answered one (a resend that crossed its
    reply, or one that took another topic and arrives late) is STALE, neither trained nor
    answered, since the device has moved on. A refused step (an ERROR reply) keeps its own
    cached reply but moves nothing on: a device that gets it gives up the round, and a message
    that was not the device's (a bogus step id) must not make its real steps look stale.

    ``device`` is any hashable identity: the coordinator uses the device id (its ledger is per
    run and forgotten each round, and takes its own session's steps only), a step worker
    ``(run_id, session, device)``, or ``(run_id, device)`` for a step naming no session.
    """

    NEW, QUEUED, STALE = "new", "queued", "stale"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queued: set[tuple[Hashable, StepKey]] = set()
        self._answered: dict[Hashable, tuple[StepKey, bytes]] = {}
        self._refused: dict[Hashable, tuple[StepKey, bytes]] = {}

    def admit(self, device: Hashable, key: StepKey) -> str | bytes:
        """NEW (now queued), QUEUED (a repeat still waiting), STALE (older than the last
        answered step of the round) or the cached reply to resend."""
        with self._lock:
            for cache in (self._answered, self._refused):
                last = cache.get(device)
                if last is not None and last[0] == key:
                    return last[1]
            last = self._answered.get(device)
            if last is not None and _older(key, last[0]):
                return self.STALE
            if (device, key) in self._queued:
                return self.QUEUED
            self._queued.add((device, key))
            return self.NEW

    def answered(
        self, device: Hashable, key: StepKey, reply: bytes, *, refused: bool = False
    ) -> None:
        """Records the reply to a queued step; ``refused``: an ERROR, the step was not served."""
        with self._lock:
            self._queued.discard((device, key))
            if refused:
                self._refused[device] = (key, reply)
                return
            last = self._answered.get(device)
            if last is None or not _older(key, last[0]):  # never step back to an older step
                self._answered[device] = (key, reply)

    def forget(self, device: Hashable | None = None) -> None:
        """Forgets one device (it vanished) or everything (a new round)."""
        with self._lock:
            if device is None:
                self._queued.clear()
                self._answered.clear()
                self._refused.clear()
                return
            self._answered.pop(device, None)
            self._refused.pop(device, None)
            self._queued = {q for q in self._queued if q[0] != device}
