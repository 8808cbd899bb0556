"""Errors of the cloud format library, each with a hint for the operator.

Tree::

    PackError                    base (PacsEdgeError: message + hint)
    ├── PackFormatError          a blob of a newer format (blob_format), or
    │                            authenticated content this reader does not understand
    ├── PackIntegrityError       authentication failed: the blob was modified,
    │   │                        truncated, reordered or swapped with another pack's
    │   └── TruncatedPackError   the stream ended before the final segment
    ├── WrongKeyError            a key object was wrapped for another site key or
    │                            another reader (not tampering: the wrong key)
    └── PackSourceError          a local file changed under the writer (size or
                                 SHA-256 differs from the index): nothing valid
                                 was produced, the upload must be abandoned

Messages never quote PHI or UIDs: they name segments, offsets and blob kinds.
"""

from __future__ import annotations

from appliance.base.errors import PacsEdgeError

_TAMPER_HINT = (
    "the cloud copy was modified or damaged; do not trust it. If the study is still "
    "on local disk, replicate it again as a new version; otherwise restore the blob "
    "from the storage account's versioning or soft delete"
)


class PackError(PacsEdgeError):
    """Base of every failure of the cloud format library."""


class PackFormatError(PackError):
    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint or "the blob is not in a format this version "
                         "of pacs-edge reads; upgrade, or check that the right blob was read")


class PackIntegrityError(PackError):
    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint or _TAMPER_HINT)


class TruncatedPackError(PackIntegrityError):
    pass


class WrongKeyError(PackError):
    pass


class PackSourceError(PackError):
    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint or "a local instance file differs from the "
                         "index; run `pacs-edge fsck` before replicating this study again")
