"""A bounded cache of verified tokens, keyed by the SHA-256 of the token (the raw token
is never kept). Entries die with their token (``exp`` + leeway) and all at once when a
signing key leaves the key set. When full, the oldest insertion is evicted (FIFO: O(1),
and under a flood of distinct tokens no entry outlives ``max_entries`` newer ones)."""

from __future__ import annotations

import hashlib

from trustmesh.identity.svid import VerifiedIdentity


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class VerifiedTokenCache:
    def __init__(self, max_entries: int = 100_000, leeway: float = 10.0) -> None:
        if max_entries < 1:
            raise ValueError("cache size must be at least 1")
        self.max_entries = max_entries
        self.leeway = leeway
        self._entries: dict[bytes, VerifiedIdentity] = {}
        self.hits = 0
        self.misses = 0

    def get(self, digest: bytes, now: float) -> VerifiedIdentity | None:
        identity = self._entries.get(digest)
        if identity is None:
            self.misses += 1
            return None
        if now > identity.expires_at + self.leeway:
            del self._entries[digest]
            self.misses += 1
            return None
        self.hits += 1
        return identity

    def put(self, digest: bytes, identity: VerifiedIdentity) -> None:
        entries = self._entries
        if digest not in entries and len(entries) >= self.max_entries:
            del entries[next(iter(entries))]
        entries[digest] = identity

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
