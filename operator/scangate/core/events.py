"""Events aggregated as Kubernetes' own recorder does (client-go's EventCorrelator): the
same event on the same object again raises `count` and `lastTimestamp` of the one Event
it made, rather than creating another, so a retried failure neither floods etcd nor
pushes everything else out of `kubectl describe`."""

from __future__ import annotations

from collections import OrderedDict

EventKey = tuple[str, str, str, str]
"""The involved object's uid, the type, the reason and the message."""

CAPACITY = 4096
"""Events remembered, least recently seen forgotten first (client-go's LRU size)."""


class EventCorrelator:
    """Which Event a repeated event goes to: bounded, so memory does not grow with the
    number of objects that ever had an Event."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[EventKey, tuple[str, int]] = OrderedDict()

    def previous(self, key: EventKey) -> tuple[str, int] | None:
        """The name and count of the Event `key` last went to, if it is remembered."""
        found = self._seen.get(key)
        if found is not None:
            self._seen.move_to_end(key)
        return found

    def record(self, key: EventKey, name: str, count: int) -> None:
        self._seen[key] = (name, count)
        self._seen.move_to_end(key)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def forget(self, key: EventKey) -> None:
        """The Event is gone (Events expire after an hour by default): the next is new."""
        self._seen.pop(key, None)
