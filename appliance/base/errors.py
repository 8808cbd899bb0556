"""Errors of the appliance, each carrying what an operator needs.

Tree::

    PacsEdgeError                 base: message + optional operator hint
    ├── ConfigError               a config key has a bad value (key, value, expected)
    ├── HomeError                 the data home is missing or unusable
    ├── PeerError                 allowlist edits that cannot be applied
    ├── NotAuthorized             a peer asked for a service it may not use (ae_title, permission)
    ├── RejectedInstance          ingest refused an instance (reason -> DICOM status)
    │   ├── InvalidInstance       cannot be parsed, bad UIDs, inconsistent headers
    │   ├── InflateLimitExceeded  a deflated dataset inflates beyond store.max_inflated_mb
    │   └── OutOfSpace            disk full: the store or the index could not grow
    ├── IndexUnavailable          SQLite failed for a reason other than disk full
    └── UnsafePath                a dropped file's path crosses a symlink: left alone

The CLI turns these into an exit code, a one-line message and the hint; a
traceback is only ever shown for a bug.
"""

from __future__ import annotations


class PacsEdgeError(Exception):
    """Base of every expected failure; `hint` tells the operator what to do."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ConfigError(PacsEdgeError):
    def __init__(self, key: str, value: object, expected: str, *, source: str = "") -> None:
        where = f" in {source}" if source else ""
        super().__init__(
            f"config key {key!r}{where} has invalid value {value!r}: expected {expected}",
            hint="fix the value (or remove the key to use the default) and run "
            "`pacs-edge config check`",
        )
        self.key = key
        self.value = value
        self.expected = expected


class HomeError(PacsEdgeError):
    pass


class PeerError(PacsEdgeError):
    pass


class NotAuthorized(PacsEdgeError):
    """A calling peer lacks the permission a service needs (or is not in the allowlist).

    Raised by the one permission check, `Allowlist.authorize`; every edge maps it to
    its protocol's refusal (DICOM 0x0124) and audits it."""

    def __init__(self, permission: str, *, ae_title: str) -> None:
        super().__init__(f"peer lacks permission {permission!r}",
                         hint=f"pacs-edge peers add ... --allow {permission}")
        self.permission = permission
        self.ae_title = ae_title


class RejectedInstance(PacsEdgeError):
    """Ingest refused an instance; `reason` is a short, PHI-free explanation."""

    def __init__(self, reason: str, *, hint: str | None = None) -> None:
        super().__init__(reason, hint=hint)
        self.reason = reason


class InvalidInstance(RejectedInstance):
    """The data cannot be understood: not DICOM, truncated, or invalid UIDs."""


class InflateLimitExceeded(RejectedInstance):
    """A deflated dataset inflates beyond the configured limit (a deflate bomb, or an
    instance larger than the site allows); it was refused before that much was inflated."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"deflated dataset inflates beyond the limit of {limit / (1 << 20):g} MB",
                         hint="if a modality really sends deflated instances this large, "
                         "raise store.max_inflated_mb")
        self.limit = limit


class OutOfSpace(RejectedInstance):
    """The store or index ran out of disk space; nothing partial was kept."""

    def __init__(self, reason: str = "no space left on the store's file system") -> None:
        super().__init__(reason, hint="free disk space or evict studies; ingest resumes "
                         "without a restart")


class IndexUnavailable(PacsEdgeError):
    pass


class UnsafePath(PacsEdgeError):
    """A path in the drop folder crosses or is a symbolic link (or is no regular file):
    nothing it points to is read, moved or deleted."""
