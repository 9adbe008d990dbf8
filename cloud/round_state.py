"""What the cloud collects during one federated round, guarded for the MQTT dispatcher thread."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from cloud.strategies import ClientUpdate


@dataclass
class RoundState:
    """Updates and outcomes of one round.

    The MQTT dispatcher thread adds updates and drops while the round thread waits on
    ``cond``; every counter is only changed under ``cond``'s lock.
    """

    round: int
    selected: frozenset[str]
    started: float = field(default_factory=time.monotonic)
    updates: dict[str, ClientUpdate] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)
    rejected: int = 0
    late: int = 0
    duplicates: int = 0
    reasons: list[str] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def pending(self) -> set[str]:
        return set(self.selected) - set(self.updates) - self.dropped

    def add_update(self, update: ClientUpdate) -> str | None:
        """Records an update; returns why it was not taken, or None."""
        with self.cond:
            cid = update.client_id
            if cid not in self.selected:
                self.rejected += 1
                return f"{cid} was not selected for round {self.round}"
            if cid in self.updates:
                self.duplicates += 1
                return f"duplicate update from {cid} for round {self.round}"
            if cid in self.dropped:
                self.late += 1
                return f"{cid} answered after being dropped from round {self.round}"
            self.updates[cid] = update
            self.cond.notify_all()
            return None

    def reject(self, reason: str) -> None:
        with self.cond:
            self.rejected += 1
            self.reasons.append(reason)
            self.cond.notify_all()

    def drop(self, device_id: str) -> bool:
        """Drops a selected device that vanished; True if it was still pending."""
        with self.cond:
            if device_id in self.selected and device_id not in self.updates:
                new = device_id not in self.dropped
                self.dropped.add(device_id)
                self.cond.notify_all()
                return new
            return False

    def wait(self, *, deadline: float) -> bool:
        """Waits until no selected device is pending or the deadline; True if all answered."""
        with self.cond:
            while self.pending():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.5))
            return True
