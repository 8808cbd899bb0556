"""PHI-free references for log lines.

Logs never carry names, patient IDs, birth dates or UIDs. When a line must
say *which* study or instance, it carries `ref(uid)`: a short keyed hash.
The key is the data home's log key (0600, created by `pacs-edge init`), so
an operator with the home can map a reference back (`pacs-edge logref REF`),
and nobody else can.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
from pathlib import Path

_key = secrets.token_bytes(32)


def load_key(path: Path) -> None:
    """Use the home's log key; without one (or one this user may not read), references
    are stable per process only. Never raises: a log line is no reason to fail."""
    global _key
    with contextlib.suppress(OSError):
        _key = path.read_bytes()


def ref(value: str) -> str:
    return hmac.new(_key, value.encode(), hashlib.sha256).hexdigest()[:12]
