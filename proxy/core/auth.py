"""Tenant keys: generated once, stored only as SHA-256 digests, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from proxy.errors import AuthenticationError, RateLimited

KEY_PREFIX = "tm-"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the tenant and a short, non-secret prefix of its key's digest."""

    tenant: str
    key_id: str


def new_key() -> str:
    """A fresh tenant key (256 bits of randomness)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    """Maps presented bearer keys to tenants without ever holding a key in clear.

    Lookup is by the SHA-256 of the presented key: an attacker cannot steer that digest, so the
    dict's hash lookup reveals nothing about stored digests; the final check is constant-time.
    """

    __slots__ = ("_by_digest",)

    def __init__(self, digests: Mapping[str, str]) -> None:
        # the Principal of each key is built once, not per request
        self._by_digest = {d: (Principal(tenant, d[:8]), d) for d, tenant in digests.items()}

    def __len__(self) -> int:
        return len(self._by_digest)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an `Authorization: Bearer <key>` header, or AuthenticationError."""
        if not authorization:
            raise AuthenticationError("Missing API key: send 'Authorization: Bearer <tenant key>'.")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationError("Malformed Authorization header: expected 'Bearer <key>'.")
        presented = digest(key)
        entry = self._by_digest.get(presented)
        if entry is None or not hmac.compare_digest(presented, entry[1]):
            raise AuthenticationError("Incorrect API key provided.")
        return entry[0]


class FailureLimiter:
    """Counts failed authentications per client address in fixed one-minute windows.

    A peer over the limit is refused before any key lookup until its window ends. Memory is
    bounded: at most `max_peers` addresses are tracked; the oldest entry goes first.
    """

    __slots__ = ("_clock", "_peers", "limit", "max_peers", "window")

    def __init__(
        self,
        limit: int,
        *,
        window: float = 60.0,
        max_peers: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit, self.window, self.max_peers, self._clock = limit, window, max_peers, clock
        self._peers: dict[str, tuple[float, int]] = {}  # peer -> (window start, failures)

    def __len__(self) -> int:
        """Peers with recent failures (0: nothing to check)."""
        return len(self._peers)

    def check(self, peer: str) -> None:
        """Raise RateLimited if `peer` used up its failures in the current window."""
        entry = self._peers.get(peer)
        if self.limit and entry is not None and entry[1] >= self.limit:
            if self._clock() - entry[0] < self.window:
                raise RateLimited("Too many failed authentications from this address; retry later.")
            del self._peers[peer]

    def failed(self, peer: str) -> None:
        if not self.limit:
            return
        now = self._clock()
        start, count = self._peers.pop(peer, (now, 0))
        if now - start >= self.window:
            start, count = now, 0
        if len(self._peers) >= self.max_peers:
            del self._peers[next(iter(self._peers))]
        self._peers[peer] = (start, count + 1)
