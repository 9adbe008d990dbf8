"""MQTT topic layout shared by devices and the cloud, with per-topic QoS, retain and ACL rules."""

from __future__ import annotations

import re
from dataclasses import dataclass

from converters.errors import WireError

_DEVICE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
DEVICE_KINDS = ("up", "down", "presence")


def validate_device_id(device_id: str) -> str:
    """Check that ``device_id`` can be used as one MQTT topic level and as an envelope sender.

    Args:
        device_id: 1 to 64 characters from ``[A-Za-z0-9_.-]``. This excludes the MQTT wildcards
            ``+``/``#``, the level separator ``/``, ``$`` and NUL, so the id can never widen a
            subscription or an ACL pattern.

    Returns:
        The id unchanged.

    Raises:
        WireError: if the id breaks the rule.
    """
    if not isinstance(device_id, str) or _DEVICE_ID.fullmatch(device_id) is None:
        raise WireError(f"device_id must be 1-64 characters from [A-Za-z0-9_.-], got {device_id!r}")
    return device_id


@dataclass(frozen=True)
class TopicRule:
    """Who uses a topic kind and how it is published.

    Attributes:
        publisher: "cloud" or "device".
        subscriber: "cloud", "device" or "all devices".
        qos: MQTT QoS to publish and subscribe with.
        retain: whether the broker keeps the last message (only ctrl and presence).
        carries: what travels on the topic.
    """

    publisher: str
    subscriber: str
    qos: int
    retain: bool
    carries: str


# QoS 1 by default: repeats are dropped by frame (sender, stream id, seq) and by round, step or
# request id, and QoS 2's extra round trip buys nothing once the transport acknowledges whole
# transfers itself. Later frames of a stream and, if configured, step and inference messages
# travel at QoS 0 (their reply is the acknowledgement).
TOPIC_RULES: dict[str, TopicRule] = {
    "ctrl": TopicRule(
        "cloud", "all devices", 1, True, "current round announcement (ROUND_START, final BYE)"
    ),
    "down": TopicRule(
        "cloud", "device", 1, False, "MODEL, GRADIENT, LOGITS, INFER_REPLY, grants, transport acks"
    ),
    "up": TopicRule(
        "device", "cloud", 1, False, "HELLO, UPDATE, ACTIVATION, LOGIT_GRADIENT, INFER_*, ERROR"
    ),
    "presence": TopicRule(
        "device", "cloud", 1, True, 'retained {"device", "status": "online"}; will "offline"'
    ),
}


def _check_level(value: str, field: str) -> None:
    """Reject text that would make a topic filter match more (or other) topics than intended."""
    if not isinstance(value, str) or not value:
        raise WireError(f"{field} must be a non-empty string, got {value!r}")
    if "+" in value or "#" in value:
        raise WireError(f"{field} must not contain the MQTT wildcards '+' or '#', got {value!r}")
    if "\x00" in value:
        raise WireError(f"{field} must not contain NUL, got {value!r}")
    if len(value.encode("utf-8")) > 1024:
        raise WireError(f"{field} must be at most 1024 UTF-8 bytes, got {len(value)} characters")


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix; the only place topic strings are built or parsed.

    Attributes:
        prefix: First topic level(s), e.g. ``"edgesplit"`` or ``"lab/site1/edgesplit"``. Must be
            non-empty, free of wildcards, not start with ``$`` (reserved for broker topics such
            as ``$SYS`` and ``$share``) and have no empty levels.
    """

    prefix: str = "edgesplit"

    def __post_init__(self) -> None:
        _check_level(self.prefix, "prefix")
        if self.prefix.startswith("$"):
            raise WireError(
                f"prefix must not start with '$' (broker-reserved), got {self.prefix!r}"
            )
        if "" in self.prefix.split("/"):
            raise WireError(
                f"prefix must not have empty levels (leading, trailing or double '/'), "
                f"got {self.prefix!r}"
            )

    def ctrl(self) -> str:
        """Cloud -> all devices; the retained current round announcement."""
        return f"{self.prefix}/ctrl"

    def down(self, device_id: str) -> str:
        """Cloud -> one device: models, gradients, replies, transport acks to the device."""
        return f"{self.prefix}/down/{validate_device_id(device_id)}"

    def up(self, device_id: str) -> str:
        """Device -> cloud: hello, updates, activations, transport acks to the cloud."""
        return f"{self.prefix}/up/{validate_device_id(device_id)}"

    def presence(self, device_id: str) -> str:
        """Device -> cloud, retained: "online" on connect, "offline" as the last will."""
        return f"{self.prefix}/presence/{validate_device_id(device_id)}"

    def up_wildcard(self) -> str:
        """Filter the cloud subscribes to for every device's uplink."""
        return f"{self.prefix}/up/+"

    def presence_wildcard(self) -> str:
        """Filter the cloud subscribes to for every device's presence."""
        return f"{self.prefix}/presence/+"

    def shared_up(self, group: str) -> str:
        """Shared subscription so several cloud workers split the uplink load (MQTT 5 / 3.1.1
        on Mosquitto >= 1.6).

        Args:
            group: share name; one topic level without wildcards.
        """
        _check_level(group, "group")
        if "/" in group:
            raise WireError(f"group must be a single topic level without '/', got {group!r}")
        return f"$share/{group}/{self.up_wildcard()}"

    # -- split-learning step workers (cloud.split_worker) ----------------------------------

    def steps(self, device_id: str, worker: str | None = None) -> str:
        """Device -> step workers: a session's first step (shared pick-up) or, once a worker
        has answered, every further step to that worker only (sticky routing)."""
        base = f"{self.prefix}/steps/{validate_device_id(device_id)}"
        return base if worker is None else f"{base}/{validate_device_id(worker)}"

    def shared_steps(self, group: str) -> str:
        """Shared subscription of the step workers of ``group``: each session start once."""
        _check_level(group, "group")
        if "/" in group:
            raise WireError(f"group must be a single topic level without '/', got {group!r}")
        return f"$share/{group}/{self.prefix}/steps/+"

    def worker_steps(self, worker: str) -> str:
        """Filter one step worker subscribes to for the sessions it owns."""
        return f"{self.prefix}/steps/+/{validate_device_id(worker)}"

    def worker(self, worker: str, direction: str) -> str:
        """Coordinator <-> one step worker (``direction`` "up": to the coordinator)."""
        if direction not in ("up", "down"):
            raise WireError(f"direction must be 'up' or 'down', got {direction!r}")
        return f"{self.prefix}/workers/{validate_device_id(worker)}/{direction}"

    def workers_up_wildcard(self) -> str:
        """Filter the coordinator subscribes to for every step worker's messages."""
        return f"{self.prefix}/workers/+/up"

    def parse_steps(self, topic: str) -> tuple[str, str | None]:
        """``(device_id, worker or None)`` of a step topic; WireError if it is not one."""
        head = f"{self.prefix}/steps/"
        parts = topic[len(head) :].split("/") if topic.startswith(head) else []
        if len(parts) not in (1, 2):
            raise WireError(f"topic {topic!r} is not a step topic under {self.prefix!r}")
        return validate_device_id(parts[0]), (
            validate_device_id(parts[1]) if len(parts) == 2 else None
        )

    def parse_worker(self, topic: str) -> str:
        """The worker id of a ``<prefix>/workers/<id>/up`` topic; WireError otherwise."""
        head = f"{self.prefix}/workers/"
        parts = topic[len(head) :].split("/") if topic.startswith(head) else []
        if len(parts) != 2 or parts[1] != "up":
            raise WireError(f"topic {topic!r} is not a worker uplink under {self.prefix!r}")
        return validate_device_id(parts[0])

    def parse_device(self, topic: str) -> tuple[str, str]:
        """Split a device topic into ``(kind, device_id)``.

        Args:
            topic: a topic as received, e.g. ``"edgesplit/up/pi-07"``.

        Returns:
            ``(kind, device_id)`` with kind one of ``"up"``, ``"down"``, ``"presence"``.

        Raises:
            WireError: if the topic is not a device topic under this prefix or the id is invalid.
        """
        head = self.prefix + "/"
        if not isinstance(topic, str) or not topic.startswith(head):
            raise WireError(f"topic {topic!r} is not under prefix {self.prefix!r}")
        parts = topic[len(head) :].split("/")
        if len(parts) != 2 or parts[0] not in DEVICE_KINDS:
            raise WireError(
                f"topic {topic!r} is not a device topic; expected "
                f"{self.prefix}/{{{','.join(DEVICE_KINDS)}}}/<device_id>"
            )
        return parts[0], validate_device_id(parts[1])

    def device_acl(self, device_id: str) -> dict[str, list[str]]:
        """Topics one device may use: read ctrl and its own downlink, write its own uplink and
        presence. Nothing else, so a device can neither read another device's model or gradients
        nor impersonate it.

        The broker enforces this; ``cloud.broker_config.acl_text`` writes the Mosquitto ACL
        (there a device may also read back its own presence, which reveals nothing new).

        Returns:
            ``{"read": [...], "write": [...]}`` with concrete topic names.
        """
        return {
            "read": [self.ctrl(), self.down(device_id)],
            "write": [
                self.up(device_id),
                self.presence(device_id),
                self.steps(device_id),
                f"{self.steps(device_id)}/+",
                f"{self.prefix}/infer/{device_id}/+",  # claimed inference streams
            ],
        }

    # -- split-inference streams (cloud.inference_service) ----------------------------------

    def infer_stream(self, device_id: str, worker: str) -> str:
        """Device -> one inference worker: a request too big for one frame, streamed whole once
        that worker granted the device's claim (claims travel on the shared uplink)."""
        return f"{self.prefix}/infer/{validate_device_id(device_id)}/{validate_device_id(worker)}"

    def worker_infer(self, worker: str) -> str:
        """Filter one inference worker subscribes to for the streams of the claims it granted."""
        return f"{self.prefix}/infer/+/{validate_device_id(worker)}"

    def parse_infer(self, topic: str) -> tuple[str, str]:
        """``(device_id, worker)`` of an inference stream topic; WireError if it is not one."""
        head = f"{self.prefix}/infer/"
        ok = isinstance(topic, str) and topic.startswith(head)
        parts = topic[len(head) :].split("/") if ok else []
        if len(parts) != 2:
            raise WireError(f"topic {topic!r} is not an inference stream under {self.prefix!r}")
        return validate_device_id(parts[0]), validate_device_id(parts[1])
