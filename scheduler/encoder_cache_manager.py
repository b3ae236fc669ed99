"""Encoder-output accounting: which media embeddings the model runner holds, who needs them, what to evict.

Sizes are in embedding rows. Entries nobody needs any more stay cached (a later request with the
same media reuses them) until their room is wanted; evicted ids are told to the runner.
"""

from __future__ import annotations

from collections import OrderedDict


class EncoderCacheManager:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"encoder cache capacity must be at least 1 row, got {capacity}")
        self.capacity = capacity
        self._rows: dict[str, int] = {}  # cached (or being encoded this step) identifier -> rows
        self._users: dict[str, set[str]] = {}  # identifier -> requests that still need it
        self._unused: OrderedDict[str, None] = OrderedDict()  # cached, needed by nobody; LRU first
        self._freed: list[str] = []  # evicted since the last take_freed()
        self.num_hits = 0
        self.num_encoded = 0

    @property
    def used_rows(self) -> int:
        return sum(self._rows.values())

    def lookup(self, request_id: str, identifier: str) -> bool:
        """True if the runner has (or is computing) this output; the request is then one of its users."""
        if identifier not in self._rows:
            return False
        if request_id not in self._users[identifier]:
            self._users[identifier].add(request_id)
            self.num_hits += 1
        self._unused.pop(identifier, None)
        return True

    def can_allocate(self, rows: int, pending_rows: int = 0) -> bool:
        """Would `rows` more fit after evicting unused entries? An item larger than the whole cache
        is allowed when nothing else is in use, so no media item is ever unschedulable."""
        in_use = self.used_rows - sum(self._rows[i] for i in self._unused) + pending_rows
        return in_use + rows <= self.capacity or in_use == 0

    def allocate(self, request_id: str, identifier: str, rows: int) -> None:
        """Reserve room for an output about to be encoded this step, evicting unused entries (LRU)."""
        while self._unused and self.used_rows + rows > self.capacity:
            victim, _ = self._unused.popitem(last=False)
            del self._rows[victim], self._users[victim]
            self._freed.append(victim)
        self._rows[identifier] = rows
        self._users[identifier] = {request_id}
        self.num_encoded += 1

    def release(self, request_id: str, identifier: str) -> None:
        """The request no longer needs this output (its rows are computed, or it left)."""
        users = self._users.get(identifier)
        if users is None or request_id not in users:
            return
        users.discard(request_id)
        if not users:
            self._unused[identifier] = None

    def take_freed(self) -> list[str]:
        freed, self._freed = self._freed, []
        return freed
