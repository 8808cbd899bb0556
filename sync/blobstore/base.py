"""The blob-store contract every backend implements.

A blob store holds immutable, named byte strings. The sync agent writes each
name once (packs and manifests are versioned, never overwritten) and reads
them back whole or by range. Names are opaque, PHI-free strings made of
`[a-z0-9/._-]` (see sync.pack.naming); backends may rely on that.

Semantics every backend must keep (the contract tests in
tests/test_blobstore_contract.py check each one):

- put(name, data) is atomic: a reader sees the whole blob or no blob, never
  a prefix. Putting a name that exists raises BlobExists (nothing is
  overwritten). `data` is an iterable of byte chunks so a pack streams
  without being held in memory.
- put stores exactly the bytes streamed, checked by the store itself, or
  fails with BlobIntegrityError and publishes nothing: Azure verifies a
  transactional MD5 of every staged block; the local folder reads the temp
  file back after fsync and compares it with what was streamed.
- stat/list/put report an `etag`: an opaque string that changes whenever the
  blob's bytes are replaced, and stays the same across reads and tier
  changes. Azure: the service's ETag (unquoted). Local folder: the put's
  random id with the data file's inode, size and mtime (ns), which any
  rewrite or replacement of the file changes (a copy of the folder elsewhere
  changes it too; a scrub then re-records it).
- open_range(name, offset, length) returns exactly those bytes; a range past
  the end raises BlobRangeError. Reading an archived blob raises BlobOffline.
  The empty range at the end ([size, size)) is allowed and returns b"".
- Names and metadata follow sync.blobstore.names in every backend (metadata
  keys `[a-z_][a-z0-9_]*`: Azure keys are C# identifiers). Breaking those
  rules is a caller bug and raises ValueError, not a BlobStoreError.
- Retries live in one policy and one wrapper (sync.blobstore.retry), composed
  by sync.blobstore.factory.open_blob_store; backends never retry by rules of
  their own. The wrapper cannot send a one-shot stream twice, so a backend
  whose put is many requests may instead be handed the factory's RetryPolicy
  and try each request of its put under it (Azure: one Put Block, the
  commit); it says so with `retries_put_requests`.
- stat(name) reports size, access tier, whether it can be read now
  (online), the etag, and the backend's content hash when it keeps one (on
  Azure the Content-MD5 the client set at put: a record, not a check).
- list(prefix) yields every blob whose name starts with prefix, sorted.
- delete(name) removes a blob; deleting a missing blob raises BlobNotFound.
- set_tier(name, tier) moves a blob between Hot/Cool/Cold/Archive.
  Moving out of Archive starts rehydration: request_online(name) does that
  explicitly, and stat(name).online tells when it finished. With early=True
  the caller needs the blob by a deadline (a prefetch before the patient
  arrives): Azure rehydrates with High priority (under an hour for most
  blobs, at a higher price) instead of Standard (up to 15 hours).

Errors from vendor SDKs never cross this boundary: each backend maps them to
the tree below where they arise.

    BlobStoreError               base (operation, name, hint)
    ├── BlobNotFound             no blob by that name
    ├── BlobExists               put of a name that exists
    ├── BlobRangeError           range outside the blob
    ├── BlobOffline              archived: rehydrate first
    ├── BlobStoreUnavailable     the store cannot be reached or refused us
    │   └── TransientBlobError   worth retrying (timeouts, 5xx, throttling)
    │       └── BlobIntegrityError  the store did not keep what put sent
    └── factory.CredentialsError no usable Azure connection string
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from appliance.base.errors import PacsEdgeError


class Tier(enum.Enum):
    HOT = "Hot"
    COOL = "Cool"
    COLD = "Cold"
    ARCHIVE = "Archive"


@dataclass(frozen=True)
class BlobInfo:
    name: str
    size: int
    tier: Tier
    online: bool
    content_md5: bytes | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    etag: str = ""  # changes when the bytes are replaced; see the module docstring


class BlobStoreError(PacsEdgeError):
    def __init__(self, operation: str, name: str, message: str, *,
                 hint: str | None = None) -> None:
        super().__init__(f"blob store {operation} {name!r}: {message}", hint=hint)
        self.operation = operation
        self.name = name


class BlobNotFound(BlobStoreError):
    pass


class BlobExists(BlobStoreError):
    pass


class BlobRangeError(BlobStoreError):
    pass


class BlobOffline(BlobStoreError):
    pass


class BlobStoreUnavailable(BlobStoreError):
    pass


class TransientBlobError(BlobStoreUnavailable):
    def __init__(self, operation: str, name: str, message: str, *,
                 hint: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(operation, name, message, hint=hint)
        # Seconds the store asked us to wait before trying again (Retry-After), if it did.
        self.retry_after = retry_after


class BlobIntegrityError(TransientBlobError):
    """The bytes the store received or wrote differ from those put sent (a damaged
    block in transit, a disk or NAS that did not keep the write). The put published
    nothing; sending the data again may succeed."""


class BlobStore(ABC):
    """Immutable named blobs; see the module docstring for the contract."""

    url: str
    # True when put retries each of its requests under the RetryPolicy the backend was
    # given (see the module docstring): the retry wrapper then makes one attempt of it.
    retries_put_requests: bool = False

    @abstractmethod
    def put(self, name: str, data: Iterable[bytes], *,
            metadata: dict[str, str] | None = None) -> BlobInfo:
        """Write a new blob atomically from byte chunks; BlobExists if the name is taken."""

    @abstractmethod
    def open_range(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes [offset, offset+length) of a blob (to its end when length is None)."""

    @abstractmethod
    def iter_chunks(self, name: str, *, chunk_size: int = 4 << 20) -> Iterator[bytes]:
        """The whole blob as a stream of chunks (recall of a full pack)."""

    @abstractmethod
    def stat(self, name: str) -> BlobInfo:
        """Size, tier, online state and content hash of one blob."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        """Blobs whose names start with `prefix`, in name order."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove a blob; BlobNotFound when there is none."""

    @abstractmethod
    def set_tier(self, name: str, tier: Tier) -> None:
        """Change the access tier; leaving Archive starts rehydration."""

    @abstractmethod
    def request_online(self, name: str, *, early: bool = False) -> None:
        """Start bringing an archived blob back online (no-op when it is online or a
        rehydration is under way); `early`: at the backend's faster, dearer pace."""

    @abstractmethod
    def close(self) -> None:
        """Release connections and clients."""

    def sweep_interrupted_writes(self) -> int:
        """Remove what puts cut off by a crash left behind; return how many went.

        The sync agent calls it at start-up. Nothing by default: Azure discards
        uncommitted blocks by itself."""
        return 0
