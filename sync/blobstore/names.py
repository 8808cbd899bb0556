"""What every backend accepts as a blob name and as metadata, checked in one place.

Both backends apply the same rules so that a name or a metadata key that works
against the local folder cannot fail later against Azure (or the other way
round). Breaking a rule is a bug in the caller, not an operational failure,
so it raises ValueError rather than a BlobStoreError.

Names
    Segments separated by `/`, each made of `[a-z0-9._-]` and starting with a
    letter or digit: no empty segment, no `.` or `..`, no leading dot. The
    local folder reserves dot-files for its temp files and sidecars, and maps
    segments to sub-folders, so a segment is also capped at 200 characters
    (file systems allow 255 and the sidecar name adds a few). Azure caps a
    whole name at 1024 characters.

Metadata
    Keys are `[a-z_][a-z0-9_]*` up to 64 characters: Azure metadata keys must
    be C# identifiers, so they cannot contain hyphens, and the service folds
    their case. Values are printable ASCII without leading or trailing spaces
    because they travel as HTTP header values, which Azure trims.
"""

from __future__ import annotations

import re

MAX_NAME = 1024
MAX_SEGMENT = 200
_SEGMENT = re.compile(r"[a-z0-9][a-z0-9._-]*")
_META_KEY = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_META_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)?")


def check_name(name: str) -> str:
    """Return `name` if it is a valid blob name, else raise ValueError saying why."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"blob name {name!r} is empty or not a string")
    if len(name) > MAX_NAME:
        raise ValueError(f"blob name is {len(name)} characters long (at most {MAX_NAME})")
    for segment in name.split("/"):
        if not _SEGMENT.fullmatch(segment):
            raise ValueError(
                f"blob name {name!r}: segment {segment!r} must match [a-z0-9][a-z0-9._-]* "
                "(no empty segments, no '.' or '..', no leading dot)")
        if len(segment) > MAX_SEGMENT:
            raise ValueError(f"blob name {name!r}: a segment is longer than {MAX_SEGMENT}")
    return name


def check_prefix(prefix: str) -> str:
    """A list prefix: any leading part of a valid name (it may end inside a segment)."""
    if prefix and not re.fullmatch(r"[a-z0-9._/-]*", prefix):
        raise ValueError(f"blob prefix {prefix!r} has characters outside [a-z0-9/._-]")
    return prefix


def check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    """A copy of `metadata` after checking every key and value (see the module docstring)."""
    checked: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not _META_KEY.fullmatch(key):
            raise ValueError(f"blob metadata key {key!r} must match [a-z_][a-z0-9_]* "
                             "(Azure keys are C# identifiers: no hyphens)")
        if not isinstance(value, str) or not _META_VALUE.fullmatch(value):
            raise ValueError(f"blob metadata value for {key!r} must be printable ASCII "
                             "without leading or trailing spaces")
        checked[key] = value
    return checked
