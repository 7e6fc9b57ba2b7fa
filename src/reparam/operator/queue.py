"""Concurrency slots for conversions: a pure, in-memory admission queue.

At most ``limit`` conversions hold a slot (their Job exists and has not finished)
at once, operator-wide. Resources above the limit wait and are admitted in
creation order (``metadata.creationTimestamp``, then namespace/name) as slots free.

Keys are opaque hashables (the operator uses ``(namespace, name)``). A key that
already has a running Job (adopted after a restart) takes a slot with
:meth:`SlotQueue.occupy` even above the limit: the Job runs anyway, and newer ones
wait until the count drops below the limit.

No I/O, no asyncio, no locks: the operator calls it from its event loop only.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Generic, TypeVar

#: A key: any hashable (the operator uses ``(namespace, name)``).
Key = TypeVar("Key", bound=Hashable)


class SlotQueue(Generic[Key]):
    """Slots held by running conversions plus an ordered waiting list."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self._running: set[Key] = set()
        self._waiting: dict[Key, Any] = {}

    @property
    def running(self) -> int:
        """Number of slots taken."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Number of keys waiting for a slot."""
        return len(self._waiting)

    def holds(self, key: Key) -> bool:
        """Whether ``key`` holds a slot."""
        return key in self._running

    def position(self, key: Key) -> int | None:
        """1-based position of a waiting ``key`` (``None`` when not waiting)."""
        if key not in self._waiting:
            return None
        order = self._waiting[key]
        return 1 + sum(1 for v in self._waiting.values() if v < order)

    def occupy(self, key: Key) -> None:
        """``key``'s Job already runs: it holds a slot, whatever the limit."""
        self._waiting.pop(key, None)
        self._running.add(key)

    def enqueue(self, key: Key, order: Any) -> None:
        """Put ``key`` in the waiting list (keeps its place if already there)."""
        if key not in self._running and key not in self._waiting:
            self._waiting[key] = order

    def request(self, key: Key, order: Any) -> list[Key]:
        """Ask a slot for ``key``; returns every key admitted by this call, in order.

        ``key`` holds a slot afterwards iff :meth:`holds` says so (it may have to wait
        behind older keys; those older keys may be in the returned list instead).
        """
        self.enqueue(key, order)
        return self._admit()

    def release(self, key: Key) -> list[Key]:
        """``key``'s conversion finished, or its resource is gone: free its slot (or its
        place in the queue) and return the keys admitted in its stead."""
        self._running.discard(key)
        self._waiting.pop(key, None)
        return self._admit()

    def set_limit(self, limit: int) -> list[Key]:
        """Change the limit; returns keys admitted by a raise."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        return self._admit()

    def _admit(self) -> list[Key]:
        admitted: list[Key] = []
        while self._waiting and len(self._running) < self.limit:
            key = min(self._waiting, key=lambda k: self._waiting[k])
            del self._waiting[key]
            self._running.add(key)
            admitted.append(key)
        return admitted
