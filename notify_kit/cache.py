"""A bounded in-process cache, least recently used out first, with optional expiry.

For small hot lookups that are cheaper to keep than to fetch: API keys and template
summaries in the gateway (with a TTL, so changes show up within it), immutable template
versions and compiled templates in template_svc (no TTL: they never change). Used from
the event loop only, so no lock. Eviction is one entry at a time, so a flood of new
keys (say, guessed API keys) cannot flush the entries that are in use. Expired entries
are misses for ``lookup`` but stay (within the size bound) for ``stale``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

DEFAULT_ENTRIES = 1024


class LruCache(Generic[K, V]):
    """At most ``max_entries`` values, each kept for ``ttl`` seconds (None: forever)."""

    def __init__(self, max_entries: int = DEFAULT_ENTRIES, *, ttl: float | None = None) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._ttl = ttl
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def lookup(self, key: K) -> tuple[V] | None:
        """``(value,)`` if present and fresh (so a cached ``None`` is a hit), else None."""
        hit = self._entries.get(key)
        if hit is None or hit[0] < time.monotonic():
            return None  # an expired entry stays until evicted, for ``stale``
        self._entries.move_to_end(key)
        return (hit[1],)

    def stale(self, key: K) -> tuple[V] | None:
        """``(value,)`` even when expired (until evicted): the last known value, for when
        the source is down and yesterday's answer beats none."""
        hit = self._entries.get(key)
        return None if hit is None else (hit[1],)

    def get(self, key: K) -> V | None:
        """The value for ``key`` (now the most recently used), or None."""
        hit = self.lookup(key)
        return None if hit is None else hit[0]

    def put(self, key: K, value: V) -> None:
        """Store ``value``, evicting the least recently used entry when full."""
        expires = float("inf") if self._ttl is None else time.monotonic() + self._ttl
        self._entries[key] = (expires, value)
        self._entries.move_to_end(key)
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
