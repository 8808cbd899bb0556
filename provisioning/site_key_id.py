"""The current site key's public id, outside `secrets/`, for processes that cannot read the key.

serve's systemd unit hides every secret it does not need, `site.key` among
them (docs/security.md, "Privilege split"), yet its `/metrics` and `/status`
say whether the current site key is escrowed, which needs the key's id. The
id is a public fingerprint (it is in `escrow.json`, escrow files and every
site key object in the cloud), so it can live in the home:

`<home>/site-key-id.json` (0640, one JSON object, replaced atomically)::

    {"site_key_id": "<16 hex>"}

Written by the code that changes the current key (provisioning.site_secrets,
provisioning.keyring) and repaired by any process that reads the keyring
(provisioning.keyring.publish_current_key_id). The rule that keeps it honest
across a crash: a key becomes current only after this record names it. A
crash between the two writes leaves the record naming a key that is not
current yet and was never escrowed (escrow takes only the current key), so
the record can make a reader say "not escrowed" too early, never "escrowed"
for a key that is not. Only readers without the key use it (serve); the
eviction gate compares the key itself (provisioning.escrow_state).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import re
from pathlib import Path

from appliance.base.durable import write_file

RECORD_FILE = "site-key-id.json"
# Must equal sync.pack.data_keys.site_key_id (provisioning cannot import sync;
# tests/test_key_rotation.py checks that the two agree).
_KEY_ID_INFO = b"pacs-edge site key id v1"
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")


def key_id(site_key: bytes) -> str:
    """The public 16-hex-digit fingerprint of a site key."""
    return hmac.new(site_key, _KEY_ID_INFO, hashlib.sha256).digest()[:8].hex()


def record_path(home: Path) -> Path:
    return Path(home) / RECORD_FILE


def published_key_id(home: Path) -> str | None:
    """The id the record names; None when there is no record or it cannot be read."""
    with contextlib.suppress(OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        kid = json.loads(record_path(home).read_text(encoding="utf-8"))["site_key_id"]
        if isinstance(kid, str) and _KEY_ID.match(kid):
            return kid
    return None


def publish_key_id(home: Path, kid: str, *, replace: bool = True) -> bool:
    """Make the record name `kid`, durably; True if the file changed.

    Without `replace` an existing record is kept (link semantics, so a
    writer that races a key rotation never undoes the rotation's record)."""
    if replace and published_key_id(home) == kid:
        return False
    return write_file(record_path(home), (json.dumps({"site_key_id": kid}) + "\n").encode(),
                      0o640, replace=replace)
