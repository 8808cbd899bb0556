"""UID validation: a UID becomes a path component, so it is checked first.

PS3.5 9.1: components of digits separated by dots, no leading zero in a
multi-digit component, at most 64 characters. Anything else (letters, `..`,
slashes) is refused before it can reach the file system.
"""

from __future__ import annotations

import re

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
MAX_UID_LENGTH = 64


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_UID_LENGTH and bool(_UID.match(value))


def normalise_uid(value: object) -> str:
    """Strip the trailing NUL/space padding that some peers leave on UIDs."""
    return str(value or "").rstrip("\x00 ")
