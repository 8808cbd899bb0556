"""Password hashes: scrypt from the standard library, compared in constant time.

Why scrypt and not argon2id: both are memory-hard and both are what the issue
allows; scrypt is in `hashlib` (OpenSSL), so the box takes no new compiled
dependency for it. The cost (N=2**15, r=8, p=1: 32 MiB and about 0.1 s per hash
on the appliance's hardware) follows OWASP's password storage guidance for scrypt
and is written into every hash, so raising it later leaves old hashes verifiable.

Stored form: ``scrypt$<N>$<r>$<p>$<salt, base64>$<key, base64>`` with a fresh
16-byte salt per hash. The password itself is never stored, logged or returned.

Hashing is CPU work of ~0.1 s: callers run it off the event loop.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets

SCHEME = "scrypt"
N, R, P = 1 << 15, 8, 1
KEY_BYTES = 32
SALT_BYTES = 16
_MAX_N = 1 << 20  # refuse a stored hash that would make one check cost gigabytes


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                          dklen=KEY_BYTES, maxmem=128 * r * n * 2 + (1 << 20))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(SALT_BYTES)
    key = _scrypt(password, salt, N, R, P)
    return f"{SCHEME}${N}${R}${P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, stored: str) -> bool:
    """True when `password` hashes to `stored`. A malformed stored hash verifies nothing
    (the same cost is spent, so it does not show in the timing)."""
    try:
        scheme, n_text, r_text, p_text, salt_text, key_text = stored.split("$")
        n, r, p = int(n_text), int(r_text), int(p_text)
        salt, key = base64.b64decode(salt_text, validate=True), base64.b64decode(
            key_text, validate=True)
        if scheme != SCHEME or not (2 <= n <= _MAX_N and 1 <= r <= 32 and 1 <= p <= 16):
            raise ValueError(scheme)
    except ValueError:
        dummy_password_check(password)
        return False
    return hmac.compare_digest(_scrypt(password, salt, n, r, p), key)


@functools.cache
def _dummy_hash() -> str:
    return hash_password(secrets.token_urlsafe(16))


def dummy_password_check(password: str) -> None:
    """Spend what a real check costs, for a user name that does not exist: the answer
    for an unknown user then takes as long as for a wrong password."""
    verify_password(password, _dummy_hash())
