"""UID validation: a UID becomes a path component, so it is checked first.

What is checked is what keeps a path safe and a UID a UID: components of digits
separated by dots, at most 64 characters (PS3.5 9.1). Anything else (letters, `..`,
an empty component, slashes) is refused before it can reach the file system.
PS3.5 9.1 also forbids a leading zero in a multi-digit component ("1.2.03"); real
modalities and archives have written such UIDs for decades (dcmtk, Orthanc and
dcm4chee store them), and refusing one answers 0xC000, which a modality takes for
a permanent failure: the study would never arrive. So a leading zero is accepted,
and the UID kept exactly as sent.
"""

from __future__ import annotations

import re

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_UID_LENGTH = 64


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_UID_LENGTH and bool(_UID.match(value))


def normalise_uid(value: object) -> str:
    """Strip the trailing NUL/space padding that some peers leave on UIDs."""
    return str(value or "").rstrip("\x00 ")
