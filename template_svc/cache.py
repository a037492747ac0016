"""In-process caches of immutable things: loaded versions and compiled templates.

No Redis here on purpose: a version never changes once written (the database forbids
it), so each replica can keep what it loaded or compiled without ever invalidating it,
and a compiled Jinja template cannot be shared between processes anyway. What does
change, the "current version" pointer, is never cached: it is read from PostgreSQL on
every request so a new version is seen at once by every replica.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

DEFAULT_ENTRIES = 1024


class LruCache(Generic[K, V]):
    """A bounded least-recently-used map; used from the event loop only, so no lock."""

    def __init__(self, max_entries: int = DEFAULT_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        """The value for ``key`` (now the most recently used), or None."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Store ``value``, evicting the least recently used entry when full."""
        self._entries[key] = value
        self._entries.move_to_end(key)
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
