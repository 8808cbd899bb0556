"""Launch links: signed, expiring, one-time URLs that open one study for one user.

An EHR asks the box (`pacs-edge link STUDY_UID --user NAME`) for a URL and opens
it in the clinician's browser; the box redeems it at `GET /launch?t=<token>`.
Token (docs/web.md, "Launch links", is the integrators' copy of this contract)::

    v1.<claims>.<mac>
    claims  base64url (no padding) of compact JSON
            {"u": user, "s": study UID, "iat": issued, "exp": expires, "n": nonce}
            (iat, exp: integer Unix seconds; n: 16 random bytes, hex)
    mac     base64url (no padding) of HMAC-SHA256(link.key, "v1." + claims)

The key is 32 random bytes in `<home>/secrets/link.key` (0600), created by `init`
or by the first `pacs-edge link` in an older home. It never leaves the box, so a link made by
another box (another key) is refused. The MAC is checked, in constant time,
before anything in the claims is read; then the expiry, then the lifetime
(exp - iat may not exceed [auth] link_max_ttl_minutes, whatever the signer
asked), and the service records the nonce so the link opens once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from appliance.base.errors import AuthenticationError, AuthFailure
from appliance.base.uids import is_valid_uid
from provisioning.site_secrets import create_secret_file, load_secret_file, secrets_dir

KEY_FILE = "link.key"
VERSION = "v1"
MAX_TOKEN_CHARS = 1024  # a user name and a UID fit many times over
CLOCK_SKEW_SECONDS = 60  # an `iat` this far in the future is still accepted


@dataclass(frozen=True)
class LinkClaims:
    user: str
    study_uid: str
    issued_at: int
    expires_at: int
    nonce: str


def key_path(home: Path) -> Path:
    return secrets_dir(home) / KEY_FILE


def ensure_link_key(home: Path) -> bool:
    """Create `link.key` (0600) if missing; True if it was created."""
    secrets_dir(home).mkdir(mode=0o700, parents=True, exist_ok=True)
    return create_secret_file(key_path(home), secrets.token_bytes(32))


def load_link_key(home: Path, *, create: bool = False) -> bytes:
    """The link key; with `create` (the signing command) it is made on first use for
    homes older than launch links. `serve` never creates it: under its systemd unit
    `secrets/` is a read-only view holding only the keys it reads."""
    if create:
        ensure_link_key(home)
    return load_secret_file(key_path(home))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, signed: str) -> bytes:
    return hmac.new(key, signed.encode("ascii"), hashlib.sha256).digest()


def sign(key: bytes, *, user: str, study_uid: str, ttl_seconds: int, now: float) -> str:
    """A token for `user` to open `study_uid` until now + ttl_seconds."""
    if not is_valid_uid(study_uid):
        raise ValueError("not a valid study UID")
    issued = int(now)
    claims = {"u": user, "s": study_uid, "iat": issued, "exp": issued + int(ttl_seconds),
              "n": secrets.token_hex(16)}
    body = _b64(json.dumps(claims, separators=(",", ":")).encode("utf-8"))
    signed = f"{VERSION}.{body}"
    return f"{signed}.{_b64(_mac(key, signed))}"


def _invalid() -> AuthenticationError:
    return AuthenticationError(AuthFailure.LINK_INVALID,
                               hint="ask the EHR (or `pacs-edge link`) for a new link")


def verify(key: bytes, token: str, *, now: float, max_ttl_seconds: float) -> LinkClaims:
    """The claims of a genuine, unexpired token; AuthenticationError LINK_INVALID or
    LINK_EXPIRED otherwise. Does not look at the nonce (the service records it)."""
    if not token or len(token) > MAX_TOKEN_CHARS or not token.isascii():
        raise _invalid()
    version, _, rest = token.partition(".")
    body, _, mac_text = rest.partition(".")
    if version != VERSION or not body or not mac_text:
        raise _invalid()
    # The MAC is compared as the text the box writes, not as the bytes it decodes to:
    # base64 decoding drops characters outside its alphabet and the spare bits of the
    # last character, so "...Q" and "...R", or a MAC with a "!" inserted, decoded to
    # the same MAC and a link with a character changed was honoured.
    if not hmac.compare_digest(mac_text.encode("ascii"),
                               _b64(_mac(key, f"{version}.{body}")).encode("ascii")):
        raise _invalid()
    try:
        raw = json.loads(_unb64(body))
        claims = LinkClaims(user=raw["u"], study_uid=raw["s"], issued_at=raw["iat"],
                            expires_at=raw["exp"], nonce=raw["n"])
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise _invalid() from None
    if not (isinstance(claims.user, str) and claims.user and is_valid_uid(claims.study_uid)
            and isinstance(claims.nonce, str) and claims.nonce
            and all(type(v) is int for v in (claims.issued_at, claims.expires_at))):
        raise _invalid()
    if (claims.issued_at > now + CLOCK_SKEW_SECONDS
            or claims.expires_at - claims.issued_at > max_ttl_seconds):
        raise _invalid()
    if now >= claims.expires_at:
        raise AuthenticationError(AuthFailure.LINK_EXPIRED,
                                  hint="ask the EHR (or `pacs-edge link`) for a new link")
    return claims
