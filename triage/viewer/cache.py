"""A bounded in-memory cache: least recently used entries dropped first, sized in bytes.

The viewer keeps decoded slices (as served: compressed), series layouts and overlays laid
onto the source images here. Each entry says its own size; the total never exceeds the
budget (an entry larger than the whole budget is handed back but not kept). Concurrent
requests for a missing entry compute it once (the others wait for it), so that twenty slice
requests arriving together for a study just opened read its headers once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["ByteLRU", "CacheStats"]

T = TypeVar("T")


@dataclass(frozen=True)
class CacheStats:
    """What the cache holds and how it has done since it was made."""

    entries: int
    bytes: int
    capacity: int
    hits: int
    misses: int
    evictions: int


class ByteLRU:
    """A thread-safe least-recently-used cache bounded by the bytes of its entries.

    Args:
        capacity: the most bytes held (the sum of the sizes given); 0 holds nothing.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"the cache capacity must be 0 or more bytes, not {capacity}")
        self.capacity = int(capacity)
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._making: dict[Hashable, threading.Lock] = {}
        self._hits = self._misses = self._evictions = 0

    def get(self, key: Hashable) -> Any | None:
        """The entry (now the most recently used), or None."""
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return found[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        """Keeps ``value`` as ``nbytes`` bytes, dropping the least recently used entries to
        make room; a value larger than the capacity is not kept."""
        nbytes = max(0, int(nbytes))
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if nbytes > self.capacity:
                return
            while self._entries and self._bytes + nbytes > self.capacity:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped
                self._evictions += 1
            self._entries[key] = (value, nbytes)
            self._bytes += nbytes

    def get_or_make(self, key: Hashable, make: Callable[[], tuple[T, int]]) -> T:
        """The entry, made by ``make`` (which returns the value and its size in bytes) when
        missing; concurrent callers with the same key wait for the one making it. An
        exception from ``make`` reaches every caller that ran it and keeps nothing."""
        found = self.get(key)
        if found is not None:
            return found  # type: ignore[no-any-return]
        with self._lock:
            lock = self._making.setdefault(key, threading.Lock())
        with lock:
            try:
                with self._lock:
                    entry = self._entries.get(key)
                    if entry is not None:  # made while this caller waited
                        self._entries.move_to_end(key)
                        return entry[0]  # type: ignore[no-any-return]
                value, nbytes = make()
                self.put(key, value, nbytes)
                return value
            finally:
                with self._lock:
                    if self._making.get(key) is lock:
                        del self._making[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                entries=len(self._entries),
                bytes=self._bytes,
                capacity=self.capacity,
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
            )
