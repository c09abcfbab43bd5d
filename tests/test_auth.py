"""proxy/core/auth.py: tenant keys are random, stored as digests, and map a bearer header to a tenant."""

from __future__ import annotations

import hashlib

import pytest

from proxy.core.auth import KEY_PREFIX, KeyStore, Principal, digest, new_key
from proxy.errors import AuthenticationError

ACME_KEY = "tm-acme-secret-key-0123456789abcdefghijklmnopqrstuv"
GLOBEX_KEY = "tm-globex-secret-key-0123456789abcdefghijklmnopqrst"


@pytest.fixture
def store() -> KeyStore:
    return KeyStore({digest(ACME_KEY): "acme", digest(GLOBEX_KEY): "globex"})


def test_new_keys_are_unique_and_long() -> None:
    """new_key returns distinct keys with the tm- prefix and at least 256 bits of randomness."""
    keys = [new_key() for _ in range(500)]
    assert len(set(keys)) == len(keys)
    for key in keys:
        assert key.startswith(KEY_PREFIX)
        assert len(key) - len(KEY_PREFIX) >= 43  # 32 random bytes in url-safe base64
        assert key.isascii() and " " not in key


def test_digest_is_sha256_hex() -> None:
    """digest() is the lower-case SHA-256 hex digest that configs store."""
    assert digest(ACME_KEY) == hashlib.sha256(ACME_KEY.encode()).hexdigest()


@pytest.mark.parametrize(("key", "tenant"), [(ACME_KEY, "acme"), (GLOBEX_KEY, "globex")])
def test_bearer_key_authenticates_its_tenant(store: KeyStore, key: str, tenant: str) -> None:
    """'Bearer <key>' authenticates the tenant the key's digest belongs to."""
    assert store.authenticate(f"Bearer {key}").tenant == tenant


@pytest.mark.parametrize("header", [f"bearer {ACME_KEY}", f"BEARER {ACME_KEY}", f"Bearer  {ACME_KEY} "])
def test_scheme_is_case_insensitive_and_whitespace_tolerant(store: KeyStore, header: str) -> None:
    """The Bearer scheme is matched case-insensitively and surrounding spaces are ignored."""
    assert store.authenticate(header).tenant == "acme"


def test_fresh_key_round_trips(store: KeyStore) -> None:
    """A key from new_key authenticates once its digest is stored."""
    key = new_key()
    assert KeyStore({digest(key): "initech"}).authenticate(f"Bearer {key}").tenant == "initech"


@pytest.mark.parametrize("header", [None, ""])
def test_missing_header_is_rejected(store: KeyStore, header: str | None) -> None:
    """No Authorization header is an AuthenticationError."""
    with pytest.raises(AuthenticationError) as info:
        store.authenticate(header)
    assert info.value.status == 401


@pytest.mark.parametrize(
    "header", [f"Basic {ACME_KEY}", ACME_KEY, "Bearer", "Bearer   ", f"Token {ACME_KEY}"]
)
def test_wrong_scheme_is_rejected(store: KeyStore, header: str) -> None:
    """A header that is not 'Bearer <key>' is an AuthenticationError."""
    with pytest.raises(AuthenticationError):
        store.authenticate(header)


@pytest.mark.parametrize(
    "key", ["tm-unknown", ACME_KEY + "x", ACME_KEY[:-1], ACME_KEY.upper(), digest(ACME_KEY)]
)
def test_unknown_key_is_rejected(store: KeyStore, key: str) -> None:
    """A key whose digest is not stored (including the digest itself) is an AuthenticationError."""
    with pytest.raises(AuthenticationError) as info:
        store.authenticate(f"Bearer {key}")
    assert ACME_KEY not in info.value.message


def test_empty_store_rejects_everything() -> None:
    """A store without keys authenticates nobody."""
    with pytest.raises(AuthenticationError):
        KeyStore({}).authenticate(f"Bearer {ACME_KEY}")


def test_key_id_is_a_digest_prefix_not_the_key(store: KeyStore) -> None:
    """Principal.key_id is a short prefix of the key's digest and never contains the key."""
    for key in (ACME_KEY, GLOBEX_KEY, new_key()):
        principal = KeyStore({digest(key): "t"}).authenticate(f"Bearer {key}")
        assert isinstance(principal, Principal)
        assert digest(key).startswith(principal.key_id)
        assert 4 <= len(principal.key_id) < 64
        assert principal.key_id not in key
        assert key not in repr(principal)
