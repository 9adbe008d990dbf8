"""The cloud's view of the devices: who registered, who is online, how much data each has."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass
class DeviceInfo:
    device_id: str
    num_samples: int = 0
    online: bool = True
    registered_at: float = 0.0
    last_seen: float = 0.0


class DeviceRegistry:
    """Thread-safe registry fed by HELLO messages and retained presence (last wills)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceInfo] = {}
        self._changed = threading.Condition(self._lock)

    def register(self, device_id: str, *, num_samples: int) -> bool:
        """Records a HELLO; returns True if the device is new."""
        now = time.monotonic()
        with self._lock:
            info = self._devices.get(device_id)
            new = info is None
            if new:
                info = self._devices[device_id] = DeviceInfo(device_id, registered_at=now)
            info.num_samples, info.online, info.last_seen = num_samples, True, now
            self._changed.notify_all()
            return new

    def set_presence(self, device_id: str, online: bool) -> None:
        with self._lock:
            info = self._devices.get(device_id)
            if info is not None:
                info.online = online
                info.last_seen = time.monotonic()
                self._changed.notify_all()

    def is_registered(self, device_id: str) -> bool:
        with self._lock:
            return device_id in self._devices

    def online(self) -> list[str]:
        with self._lock:
            return sorted(d for d, info in self._devices.items() if info.online)

    def __len__(self) -> int:
        with self._lock:
            return len(self._devices)

    def wait_for(self, count: int, *, timeout: float) -> int:
        """Blocks until ``count`` devices are online or ``timeout`` passes; returns how many are."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                n = sum(info.online for info in self._devices.values())
                left = deadline - time.monotonic()
                if n >= count or left <= 0:
                    return n
                self._changed.wait(left)
