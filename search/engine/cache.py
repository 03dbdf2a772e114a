"""A small in-memory cache for query vectors and rendered tile images."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

# Texts and facet values are re-read after this long, so corpora added without a reindex show up.
CACHE_SECONDS = 60.0


class LRU:
    """A thread-safe least-recently-used map bounded by the summed ``size`` of its values."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: Any, size: int = 1) -> None:
        if size > self.capacity:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._used -= old[1]
            self._items[key] = (value, size)
            self._used += size
            while self._used > self.capacity:
                _, (_, dropped) = self._items.popitem(last=False)
                self._used -= dropped
