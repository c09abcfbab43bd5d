"""Tenant keys: generated once, stored only as SHA-256 digests, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import AuthenticationError

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
        self._by_digest = {d: (tenant, d) for d, tenant in digests.items()}

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
        return Principal(entry[0], presented[:8])
