"""Blob names: derived from a keyed hash, so they carry no PHI and no UIDs.

    study_key = hex(HMAC-SHA256(name_secret, b"study:" + StudyInstanceUID))[:32]

    studies/<study_key>/v<version:06d>.pack                 the pack
    studies/<study_key>/v<version:06d>.manifest             its manifest
    studies/<study_key>/v<version:06d>.keys/site            data key for the site
    studies/<study_key>/v<version:06d>.keys/site-<kid>      the same, re-wrapped by a site
                                                            key rotation (kid: key id)
    studies/<study_key>/v<version:06d>.keys/reader-<rid>    data key for one reader
    rid = hex(SHA-256(reader public key, 32 raw bytes))[:16]

The name secret is a site secret (`<home>/secrets/names.key`): without it a
name cannot be linked to a study even by someone who knows the UID; with it
the edge finds a study's blobs from the UID alone. 128 bits of the HMAC are
plenty against collisions for any number of studies a site will hold.
Names only use `[a-z0-9/._-]`, which every backend accepts unescaped.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

STUDIES_PREFIX = "studies/"
MAX_VERSION = 999_999  # six digits keep names sorting in version order

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_HEX = re.compile(r"^[0-9a-f]+$")
_NAME = re.compile(
    r"^studies/(?P<study>[0-9a-f]{32})/v(?P<version>[0-9]{6})"
    r"(?:\.(?P<kind>pack|manifest)|\.keys/(?:(?P<site>site(?:-(?P<kid>[0-9a-f]{16}))?)"
    r"|reader-(?P<reader>[0-9a-f]{16})))$"
)


def study_key(name_secret: bytes, study_uid: str) -> str:
    """The 32-hex-digit key that stands for a study in blob names.

    The UID must be exact (digits and dots, no padding): a padded UID would
    silently name another study.
    """
    if not isinstance(name_secret, bytes) or len(name_secret) < 16:
        raise ValueError("the name secret must be at least 16 bytes")
    if not isinstance(study_uid, str) or len(study_uid) > 64 or not _UID.match(study_uid):
        raise ValueError("study UID must be digits and dots, at most 64 characters")
    mac = hmac.new(name_secret, b"study:" + study_uid.encode("ascii"), hashlib.sha256)
    return mac.hexdigest()[:32]


def reader_id(public_key: bytes) -> str:
    """16 hex digits naming a reader by its public key (not secret)."""
    if not isinstance(public_key, bytes) or len(public_key) != 32:
        raise ValueError("a reader public key is 32 bytes")
    return hashlib.sha256(public_key).hexdigest()[:16]


def study_prefix(key: str) -> str:
    """Prefix of every blob of a study (for list())."""
    return f"{STUDIES_PREFIX}{_check_study_key(key)}/"


def version_prefix(key: str, version: int) -> str:
    """Prefix of every blob of one study version: pack, manifest and key objects."""
    return f"{study_prefix(key)}v{_check_version(version):06d}."


def pack_name(key: str, version: int) -> str:
    return version_prefix(key, version) + "pack"


def manifest_name(key: str, version: int) -> str:
    return version_prefix(key, version) + "manifest"


def site_key_name(key: str, version: int, key_id: str | None = None) -> str:
    """`keys/site` as uploaded; `keys/site-<key_id>` once a key rotation re-wrapped it."""
    if key_id is None:
        return version_prefix(key, version) + "keys/site"
    if len(key_id) != 16 or not _HEX.match(key_id):
        raise ValueError("a site key id is 16 lowercase hex digits")
    return version_prefix(key, version) + f"keys/site-{key_id}"


def reader_key_name(key: str, version: int, reader: str) -> str:
    if len(reader) != 16 or not _HEX.match(reader):
        raise ValueError("a reader id is 16 lowercase hex digits")
    return version_prefix(key, version) + f"keys/reader-{reader}"


@dataclass(frozen=True)
class BlobName:
    """A parsed blob name. kind: "pack", "manifest", "site-key" or "reader-key"."""

    study_key: str
    version: int
    kind: str
    reader_id: str | None = None
    site_key_id: str | None = None  # set for a rotated site key object only


def parse_blob_name(name: str) -> BlobName | None:
    """Split a name made by this module; None for anything else in the container."""
    match = _NAME.match(name)
    if match is None:
        return None
    kind = match["kind"] or ("site-key" if match["site"] else "reader-key")
    return BlobName(match["study"], int(match["version"]), kind, match["reader"], match["kid"])


def _check_study_key(key: str) -> str:
    if len(key) != 32 or not _HEX.match(key):
        raise ValueError("a study key is 32 lowercase hex digits")
    return key


def _check_version(version: int) -> int:
    if not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise ValueError(f"study version must be 1..{MAX_VERSION}")
    return version
