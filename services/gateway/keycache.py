"""The API keys a gateway instance checked lately, kept in the process for a short, bounded time so that the next
calls with the same key need no Redis read.

An entry is made only for a key that matched its stored hash (Authorizer._identify): it holds the sha256 of the
whole key (id and secret), and a lookup finds it only when the presented key hashes to the same digest, compared in
constant time, as the Redis path compares. A wrong secret for a cached id is a miss (the caller then goes to Redis
and is refused there), and a refusal is never kept: random keys sprayed at the gateway cost a Redis read each, as
without the cache, and cannot fill it or push valid keys out.

Bounds: an entry lives `seconds` from the moment its key was read from Redis, so a key revoked elsewhere (another
gateway instance, Redis by hand) is refused here at most that long after the revocation; the instance that revokes
a key forgets it at once (and keeps no answer read from Redis before that: see `epoch`). At most `size` entries:
when full, the one that would expire first goes.
"""

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Entry(Generic[T]):
    digest: str
    value: T
    expires: float


class KeyCache(Generic[T]):
    """key id -> (sha256 of the whole key, what the key is) for `seconds`; `seconds` 0 keeps nothing."""

    def __init__(self, seconds: float, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.size = size
        self._clock = clock
        self._entries: dict[str, _Entry[T]] = {}  # insertion order is expiry order: every entry lives `seconds`
        self.epoch = 0
        """Counts `forget` calls: a caller reads it before it asks Redis and hands it to `put`, which keeps nothing
        read before a key was forgotten (a revocation racing a read must not leave the revoked key cached)."""

    def get(self, key_id: str, digest: str) -> T | None:
        """What `put` kept for this key, when it is still fresh and `digest` is the digest it was kept with."""
        entry = self._entries.get(key_id)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            del self._entries[key_id]
            return None
        if not hmac.compare_digest(entry.digest, digest):
            return None
        return entry.value

    def put(self, key_id: str, digest: str, value: T, epoch: int) -> None:
        """Keeps `value` for the key whose whole-key sha256 is `digest`, checked against what Redis said after
        `epoch` was read (nothing is kept when a key was forgotten since)."""
        if self.seconds <= 0 or epoch != self.epoch:
            return
        entries = self._entries
        entries.pop(key_id, None)
        while len(entries) >= self.size:
            del entries[next(iter(entries))]
        entries[key_id] = _Entry(digest, value, self._clock() + self.seconds)

    def forget(self, key_id: str) -> None:
        """Drops a key (revoked through this instance: refused from the next call on)."""
        self.epoch += 1
        self._entries.pop(key_id, None)

    def __len__(self) -> int:
        return len(self._entries)
