"""Errors of the appliance, each carrying what an operator needs.

Every error class of the appliance package is in this tree; those defined in
another module name it (a test keeps the tree and the classes in step).

Tree::

    PacsEdgeError                 base: message + optional operator hint
    ├── ConfigError               a config key has a bad value (key, value, expected)
    ├── HomeError                 the data home is missing or unusable
    ├── PeerError                 allowlist edits that cannot be applied
    ├── NotAuthorized             a peer asked for a service it may not use (ae_title, permission)
    ├── RejectedInstance          ingest refused an instance (kind: Rejection)
    │   ├── InvalidInstance       cannot be parsed, bad UIDs, not what the request announced
    │   ├── InflateLimitExceeded  a deflated dataset inflates beyond store.max_inflated_mb
    │   ├── UnsupportedTransferSyntax  a Part 10 file (STOW-RS, import, drop folder) whose
    │   │                         File Meta names a transfer syntax the box does not take
    │   └── OutOfSpace            disk full: the store or the index could not grow
    │       └── StoreReadOnly     the store's file system is read-only (remounted after
    │                             I/O errors): refused as a full disk is, another hint
    ├── QueryError                a query identifier cannot be answered (kind: QueryRefusal)
    ├── RetrieveRefused           a retrieve cannot be served at all (kind: RetrieveRefusal)
    ├── AuthenticationError       a web user, session or launch link is refused
    │                             (kind: AuthFailure; services/users.py)
    ├── UserError                 a user account edit that cannot be applied (services/users.py)
    ├── FrameError                an instance has no such frame or no usable pixel data
    │                             (services/pixel_frames.py)
    ├── IndexUnavailable          SQLite failed for a reason other than disk full
    ├── UnsafePath                a dropped file's path crosses a symlink: left alone
    ├── StudyBusy                 another process runs a tiering operation on the study
    │                             (operation, pid; store/leases.py)
    ├── LeaseLost                 the study's lease expired mid-operation (store/leases.py)
    ├── NotEvictable              a study's instances are not all in verified packs
    │                             (store/tier_steps.py)
    ├── TierTransitionError       a trigger the study's tiering state does not allow
    │                             (state, trigger; store/tiering.py)
    ├── OrderTransitionError      an order status change the state table refuses
    │                             (services/order_states.py)
    ├── WorklistRefused           a peer may not query the worklist (services/worklist.py)
    ├── MppsRefused               an MPPS request is refused (services/mpps.py)
    ├── MppsTransitionError       a step change PS3.4 F.7 does not allow (store/mpps_rows.py)
    ├── DuplicateStep             N-CREATE of a step that exists (store/mpps_rows.py)
    ├── NoSuchStep                N-SET of a step never created (store/mpps_rows.py)
    ├── CommitmentRefused         a Storage Commitment request is refused
    │                             (services/commitment.py)
    ├── CommitmentTransitionError a commitment state change the table refuses
    │                             (store/commitment_rows.py)
    ├── PrefetchTransitionError   a prior's state change the prefetch table refuses
    │                             (store/prefetch_rows.py)
    ├── RemoteArchiveError        the remote archive could not answer a prefetch
    │                             (kind: PrefetchFailure; dimse/remote_archive.py raises it)
    ├── MigrationError            `pacs-edge migrate` cannot start, resume or change a run
    ├── LegacyPeerError           the legacy PACS of a migration failed a C-FIND, C-MOVE or
    │                             C-GET (kind: MigrationFailure; dimse/legacy_scu.py raises it)
    ├── AuditLogError             the audit log cannot be appended to or read (audit/log.py)
    ├── CertificateRefused        a renewed node certificate or key serve will not load at
    │                             a reload: logged, the old pair kept (process/node_tls.py)
    └── AnchorError               an audit anchor cannot be written or read, or contradicts
                                  the log (audit/anchor.py)

    MessageRefused                an HL7 message the order service refuses: becomes an
                                  AE/AR acknowledgement, never leaves services/orders.py
    Hl7Error                      an HL7 message that cannot be parsed or applied (location
                                  = the field): becomes an AE/AR, never leaves appliance/hl7
    TooLarge                      an MLLP block over max_message_bytes: AR, then the
                                  connection closes: never leaves appliance/hl7 (framing.py)
    _NotPlain                     a header the fast scan cannot walk: the ingest falls back to
                                  pydicom, never leaves services/header_scan.py
    _Malformed                    a query or retrieve identifier that is no data set: becomes
                                  QueryError(UNDECODABLE), never leaves
                                  dimse/identifier_decoding.py
    _Unreadable                   a stored file unreadable before anything was sent: the
                                  sub-operation fails (one gone waits for its study's
                                  recall first), never leaves dimse/move_get.py
    _ReadFailed                   a stored file unreadable after its C-STORE-RQ began: the
                                  message is cut short and the lane broken, never leaves
                                  dimse/store_lane.py

    OSError
    ├── TransportAborted          the DIMSE edge ended a connection, having logged why;
    │                             pynetdicom's DUL reads it as "transport closed"
    │                             (dimse/pdu_socket.py raises it)
    ├── BelowReserve              a C-STORE's spool would leave less free space than the
    │                             store reserve (errno ENOSPC: handled as a full disk,
    │                             OutOfSpace; store/spool.py raises it)
    └── TimeoutError
        └── BlockTimeout          an MLLP connection closed for its silence or slowness
            │                     (event = the log line): never leaves appliance/hl7
            ├── Idle              silent for idle_timeout before a message
            ├── Stalled           silent for idle_timeout inside a message
            └── Overdue           a message not in within message_timeout of its first byte

The other packages root their trees in PacsEdgeError too: provisioning in
provisioning/provisioning_errors.py, the sync agent in sync/__init__.py.

Errors that a network edge answers carry a `kind` (an enum): the edge maps the
kind to its protocol's status with a table (appliance/dimse/handlers.py and
move_get.py for DICOM), never by reading the message, which is for people.
Messages and hints name no patient data and no UIDs.

The CLI turns these into an exit code, a one-line message and the hint; a
traceback is only ever shown for a bug.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Iterable


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

    @classmethod
    def unknown(cls, key: str, known: Iterable[str], *, source: str = "") -> ConfigError:
        """A section or key this version does not know: most often a typo, so the message
        names the closest known one rather than the value."""
        known = sorted(known)
        error = cls(key, None, f"one of {known}", source=source)
        where = f" in {source}" if source else ""
        close = difflib.get_close_matches(key.rpartition(".")[2], known, n=1)
        guess = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
        error._say(f"unknown config {'key' if '.' in key else 'section'} {key!r}{where}: {guess}",
                   "correct the name (or remove it) and run `pacs-edge config check`")
        return error

    @classmethod
    def not_toml(cls, path: str, detail: str) -> ConfigError:
        error = cls(path, "<file>", f"valid TOML ({detail})")
        error._say(f"{path} is not valid TOML: {detail}",
                   "fix the file at that line and run `pacs-edge config check`")
        return error

    def _say(self, message: str, hint: str) -> None:
        self.message, self.hint, self.args = message, hint, (message,)


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


class Rejection(enum.Enum):
    """Why ingest refused an instance, whatever the edge it came through."""

    INVALID = "not valid DICOM: cannot be parsed, truncated, bad UIDs"
    NOT_AS_REQUESTED = "the dataset is not the instance its request announced"
    SERIES_OF_ANOTHER_STUDY = "its series is another study's on this box"
    INFLATE_LIMIT = "a deflated dataset inflates beyond the configured limit"
    OUT_OF_SPACE = "no space left for the file or the index"
    TRANSFER_SYNTAX_NOT_SUPPORTED = "its transfer syntax is not one the box takes"


class RejectedInstance(PacsEdgeError):
    """Ingest refused an instance; `reason` is a short, PHI-free explanation."""

    def __init__(self, reason: str, *, kind: Rejection, hint: str | None = None) -> None:
        super().__init__(reason, hint=hint)
        self.reason = reason
        self.kind = kind


class InvalidInstance(RejectedInstance):
    """The data cannot be understood (not DICOM, truncated, invalid UIDs), or, with
    kind NOT_AS_REQUESTED, is not the instance its C-STORE request announced, or,
    with kind SERIES_OF_ANOTHER_STUDY, names a series the box holds under another study."""

    def __init__(self, reason: str, *, kind: Rejection = Rejection.INVALID) -> None:
        super().__init__(reason, kind=kind)


class InflateLimitExceeded(RejectedInstance):
    """A deflated dataset inflates beyond the configured limit (a deflate bomb, or an
    instance larger than the site allows); it was refused before that much was inflated."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"deflated dataset inflates beyond the limit of {limit / (1 << 20):g} MB",
                         kind=Rejection.INFLATE_LIMIT,
                         hint="if a modality really sends deflated instances this large, "
                         "raise store.max_inflated_mb")
        self.limit = limit


class UnsupportedTransferSyntax(RejectedInstance):
    """A Part 10 file's File Meta names a transfer syntax the box does not take (a UID
    that is no transfer syntax, or one its storage contexts do not list): stored, it
    could be sent to no DICOM peer and its frames not read. `name` is the transfer
    syntax's name, "" for a UID that names none (the message never quotes the UID)."""

    def __init__(self, name: str) -> None:
        what = f"transfer syntax {name!r}" if name else "a UID that is no transfer syntax"
        super().__init__(f"File Meta Transfer Syntax UID is {what}: not one the box takes",
                         kind=Rejection.TRANSFER_SYNTAX_NOT_SUPPORTED,
                         hint="the File Meta must name the transfer syntax the data set is"
                         " encoded in, one of those docs/conformance.md lists (\"Transfer"
                         " syntaxes\"): correct it, or convert the file (dcmconv), and send"
                         " it again")
        self.name = name


class OutOfSpace(RejectedInstance):
    """The store or index ran out of disk space; nothing partial was kept."""

    def __init__(self, reason: str = "no space left on the store's file system") -> None:
        super().__init__(reason, kind=Rejection.OUT_OF_SPACE,
                         hint="free disk space or evict studies; ingest resumes without a restart")


class StoreReadOnly(OutOfSpace):
    """The store's file system refuses writes (EROFS): ext4 mounted errors=remount-ro
    does this by itself after an I/O error. Refused as a full disk is (0xA700: the
    sender keeps the instance and retries; the drop folder leaves it in place), since
    the instance is fine and the store will take it once it is writable again."""

    def __init__(self) -> None:
        super().__init__("the store's file system is read-only")
        self.hint = ("check the disk (dmesg, SMART), repair the file system and remount it"
                     " read-write; ingest resumes without a restart")


class QueryRefusal(enum.Enum):
    """Why a query identifier cannot be answered."""

    NOT_IN_MODEL = "the identifier does not fit the information model (level, keys)"
    MALFORMED_KEY = "a matching key's value is malformed (date, time, range, integer)"
    UNDECODABLE = "the identifier's bytes are no data set in the transfer syntax"


class QueryError(PacsEdgeError):
    """A query identifier the appliance refuses. The message names the attribute or
    level at fault, never a value from the identifier: values can be patient data."""

    def __init__(self, kind: QueryRefusal, message: str) -> None:
        super().__init__(
            message,
            hint="the querying application sent an identifier outside the appliance's "
            "conformance; check its query settings",
        )
        self.kind = kind


class RetrieveRefusal(enum.Enum):
    """Why a retrieve (C-MOVE, C-GET, later WADO) cannot be served at all."""

    UNKNOWN_DESTINATION = "move destination is not a known peer"
    INVALID_IDENTIFIER = "identifier does not fit the information model"
    TOO_MANY_MATCHES = "more matches than a retrieve can report"


class RetrieveRefused(PacsEdgeError):
    """The retrieve cannot be served at all; `reason` is PHI-free and loggable."""

    def __init__(self, kind: RetrieveRefusal, reason: str, *, hint: str | None = None) -> None:
        super().__init__(reason, hint=hint)
        self.kind = kind
        self.reason = reason


class IndexUnavailable(PacsEdgeError):
    pass


class UnsafePath(PacsEdgeError):
    """A path in the drop folder crosses or is a symbolic link (or is no regular file):
    nothing it points to is read, moved or deleted."""


class AuthFailure(enum.Enum):
    """Why a web user, session or launch link was refused (the HTTP edge maps it)."""

    BAD_CREDENTIALS = "unknown user or wrong password"
    LOCKED_OUT = "too many failed logins: the account is locked for a while"
    THROTTLED = "too many failed logins from this address: refused for a while"
    EXPIRED = "no session, or the session expired or was ended"
    LINK_INVALID = "the launch link is malformed, forged or for an unknown user"
    LINK_EXPIRED = "the launch link's time ran out"
    LINK_USED = "the launch link was already used"


class AuthenticationError(PacsEdgeError):
    """A login, session or launch link is refused. The message is the same for an unknown
    user and a wrong password (no user enumeration) and never names a password."""

    def __init__(self, kind: AuthFailure, *, hint: str | None = None,
                 retry_after: int = 0) -> None:
        super().__init__(kind.value, hint=hint)
        self.kind = kind
        self.retry_after = retry_after  # THROTTLED: whole seconds until the address may try


class UserError(PacsEdgeError):
    """A user account edit that cannot be applied (duplicate name, unknown user, a password
    too short, a referring user without a name to match)."""


class PrefetchFailure(enum.StrEnum):
    """Why a prefetch request or prior failed (prefetch_priors.failure_kind)."""

    NOT_FOUND = "not_found"                    # the study left the index or the archive
    RECALL_FAILED = "recall_failed"            # the cloud recall failed
    NO_REMOTE_ARCHIVE = "no_remote_archive"    # [prefetch] remote_archive is no usable peer
    REMOTE_UNREACHABLE = "remote_unreachable"  # no association, or the C-FIND failed
    MOVE_FAILED = "move_failed"                # the C-MOVE failed or sent nothing
    MOVE_INCOMPLETE = "move_incomplete"        # some instances did not arrive
    ORDER_CANCELLED = "order_cancelled"        # the order was cancelled: its prefetch ended


class RemoteArchiveError(PacsEdgeError):
    """The remote archive could not answer a prefetch's C-FIND or C-MOVE. The message
    names the peer and the DICOM status, never a patient or a UID."""

    def __init__(self, kind: PrefetchFailure, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.kind = kind


class MigrationError(PacsEdgeError):
    """A migration run cannot be started, resumed, paused or cancelled as asked (no such
    run, one already unfinished, a peer that may not be migrated from, a bad option)."""


class MigrationFailure(enum.StrEnum):
    """Why a day's query or a study's transfer failed (migration_studies.error_kind)."""

    UNREACHABLE = "unreachable"      # no connection, or the association was rejected/aborted
    QUERY_FAILED = "query_failed"    # the C-FIND ended with a failure status
    RETRIEVE_FAILED = "retrieve_failed"  # the C-MOVE/C-GET ended with a failure status
    INCOMPLETE = "incomplete"        # fewer instances in the box than the legacy PACS listed
    NOT_FOUND = "not_found"          # the legacy PACS no longer lists the study


class LegacyPeerError(PacsEdgeError):
    """The legacy PACS could not answer a migration's C-FIND, C-MOVE or C-GET. The message
    names the peer and the DICOM status, never a patient or a UID. `status` is the
    failure status the legacy PACS answered, when it answered one; `rejected_for_good`:
    it rejected the association for an AE title, as it will until its or this box's
    configuration changes."""

    def __init__(self, kind: MigrationFailure, message: str, *, hint: str | None = None,
                 status: int | None = None, rejected_for_good: bool = False) -> None:
        super().__init__(message, hint=hint)
        self.kind = kind
        self.status = status
        self.rejected_for_good = rejected_for_good


class TransportAborted(OSError):
    """The edge ended the connection (its reason is in the log line before)."""
