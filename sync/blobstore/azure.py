"""Azure Blob Storage behind the blob-store contract (azure-storage-blob).

One container holds the site's blobs. Only put creates it (when missing,
once per process); reads never do, so a reader or a restore pointed at a
mistyped container leaves the storage account as it was. A missing container
reads as an empty one: list yields nothing, and stat, open_range, iter_chunks,
delete, set_tier and request_online raise BlobNotFound, which the callers take
for "not in the cloud" (sync.container_check then refuses a box whose packs
are not there; a reader or restore reports an empty cloud). Azure names a
missing container by its error code (ContainerNotFound); an endpoint that does
not answer, or refuses the credentials, still fails any operation with
BlobStoreUnavailable. A container deleted under a running agent makes put fail
with BlobStoreUnavailable: it is not recreated behind the operator's back.
Choices worth knowing:

- put streams: chunks from the caller are cut into `block_size` blocks and
  staged (Put Block) by at most `max_concurrency` threads, with at most that
  many blocks in flight, so memory stays near (max_concurrency + 1) *
  block_size whatever the blob size. Commit Block List publishes the blob
  atomically (uncommitted blocks are invisible; Azure drops those of an
  abandoned put after a week) with `If-None-Match: *`, so an existing blob is
  never replaced. Block ids are a random per-put token plus a counter, all of
  one length as Azure requires across a blob's uncommitted blocks: a put that
  failed half-way does not break the next attempt, and racing writers of one
  name never commit each other's blocks. Every block is staged with a
  transactional MD5 (validate_content): the service checks each block as it
  arrives, so a block damaged in transit is refused (BlobIntegrityError), never
  committed. The MD5 of the whole blob, computed while streaming, is stored
  as Content-MD5 (Azure computes none for a block-list blob): a record of
  what the client sent that the retry policy compares, not a check by the
  service. put returns the committed blob's ETag (and refuses when a stat
  right after the commit sees another one).
- The SDK's own retries are off (retry_total=0): retries are one policy,
  sync.blobstore.retry, so that backoff and logging happen in one place and a
  dead endpoint does not hide behind the SDK's minute of silent retries.
  One exception the SDK keeps: a download whose body is cut short is asked
  again up to three times by the SDK itself, which then wraps the last failure
  in an HttpResponseError without an answer; that is mapped as the dropped
  connection it is (TransientBlobError), so the wrapper resumes the read.
  A put is many requests from a stream that often cannot be read twice (a
  pack is encrypted while it streams), so the retry wrapper cannot send it
  again; instead each request of a put is tried under the RetryPolicy the
  factory hands over (`retry`; once without one), and the wrapper makes one
  attempt (`retries_put_requests`). A Put Block that fails transiently is
  sent again by its thread with the same block id and bytes (Put Block is
  idempotent; the bytes are held until staged anyway, so memory stays as
  above); one that fails `attempts` times fails the put and nothing is
  committed. Commit Block List is retried with the block list and MD5 kept
  from the stream: BlobExists after a failed commit is checked against the
  blob's size and Content-MD5 (RetryPolicy.create), so a commit that landed
  with its answer lost is a success, and another writer's blob is not.
- Range reads check bounds against the blob's size: Azure answers a range
  that runs past the end with the bytes it has, and Azurite even answers a
  range that starts at the end with nothing; the contract wants exactly the
  bytes asked for or BlobRangeError.
- Archive: reading raises 409 BlobArchived (-> BlobOffline). Leaving Archive
  starts a rehydration that takes hours on Azure, during which the blob still
  reports tier Archive (archive_status "rehydrate-pending-to-..."); Azurite
  flips it at once.
- Metadata keys must be C# identifiers (no hyphens); sync.blobstore.names
  checks that for both backends.
- Errors: azure.core exceptions are mapped to the sync.blobstore.base tree in
  `_mapped`, right here; nothing of the SDK leaves this module. Messages carry
  the HTTP status and Azure error code, never the connection string. A 403 whose
  answer is dated more than 15 minutes from this machine's clock says so: Azure
  refuses such a request as AuthenticationFailed, as it does a wrong key.
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import hashlib
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, NoReturn, TypeVar

from azure.core.exceptions import (
    AzureError,
    DecodeError,
    HttpResponseError,
    IncompleteReadError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import (
    BlobBlock,
    BlobProperties,
    ContainerClient,
    ContentSettings,
    RehydratePriority,
    StorageStreamDownloader,
)

from sync.blobstore.base import (
    BlobExists,
    BlobInfo,
    BlobIntegrityError,
    BlobNotFound,
    BlobOffline,
    BlobRangeError,
    BlobStore,
    BlobStoreError,
    BlobStoreUnavailable,
    Tier,
    TransientBlobError,
)
from sync.blobstore.names import check_metadata, check_name, check_prefix
from sync.blobstore.retry import RetryPolicy, holds

T = TypeVar("T")
CONTAINER_NAME = re.compile(r"(?=.{3,63}\Z)[a-z0-9]+(?:-[a-z0-9]+)*")
_DROPPED = (IncompleteReadError, ServiceRequestError, ServiceResponseError)
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_TRANSIENT_CODES = {"ServerBusy", "OperationTimedOut", "InternalError"}
_OFFLINE_CODES = {"BlobArchived", "BlobBeingRehydrated"}
_EXISTS_CODES = {"BlobAlreadyExists", "ConditionNotMet"}
_TIERS = {tier.value.lower(): tier for tier in Tier}
_BLOCK_ID_DIGITS = 6  # Azure allows 50,000 committed blocks per blob
_MAX_SKEW = 15 * 60  # seconds: Azure refuses a request dated further off than this


def check_container(container: str) -> str:
    """Azure's rule for container names: 3-63 of [a-z0-9-], no leading, trailing or double -."""
    if not CONTAINER_NAME.fullmatch(container):
        raise ValueError(f"container name {container!r} must be 3-63 characters of [a-z0-9-], "
                         "starting and ending with a letter or digit, with no '--'")
    return container


class AzureBlobStore(BlobStore):
    """Blobs in one Azure container; see the module docstring for the choices made.

    `retry`: the policy each request of a put is tried under (the factory hands over
    the retry wrapper's); without one, every request is tried once."""

    retries_put_requests = True

    def __init__(self, container: str, connection_string: str, *,
                 max_concurrency: int = 4, block_size: int = 4 << 20,
                 rehydrate_to: Tier = Tier.HOT, rehydrate_priority: str = "Standard",
                 connection_timeout: float = 20.0, read_timeout: float = 120.0,
                 retry: RetryPolicy | None = None) -> None:
        check_container(container)
        if max_concurrency < 1 or block_size < 1:
            raise ValueError("max_concurrency and block_size must be positive")
        if rehydrate_to is Tier.ARCHIVE or rehydrate_priority not in ("Standard", "High"):
            raise ValueError("rehydrate_to must be online; rehydrate_priority Standard or High")
        self.url = f"azure://{container}"
        self.container = container
        self.max_concurrency = max_concurrency
        self.block_size = block_size
        self.rehydrate_to = rehydrate_to
        self.rehydrate_priority = rehydrate_priority
        self.retry = retry or RetryPolicy(attempts=1)
        try:
            self._client = ContainerClient.from_connection_string(
                connection_string, container, retry_total=0,
                connection_timeout=connection_timeout, read_timeout=read_timeout,
                # Bounded downloads: the first GET of a blob is one chunk, not 32 MiB.
                max_single_get_size=4 << 20, max_chunk_get_size=4 << 20)
        except (ValueError, AzureError) as exc:
            # Never echo the connection string: it carries the account key.
            raise BlobStoreUnavailable(
                "open", container, "the Azure connection string is not valid",
                hint="set AZURE_STORAGE_CONNECTION_STRING (or the credentials file) to the "
                "storage account's connection string") from exc
        self._container_ready = False
        self._lock = threading.Lock()

    # -- the contract ---------------------------------------------------------------

    def put(self, name: str, data: Iterable[bytes], *,
            metadata: dict[str, str] | None = None) -> BlobInfo:
        check_name(name)
        meta = check_metadata(metadata)
        self.retry.call("put", name, functools.partial(self._ensure_container, "put", name))
        blob = self._client.get_blob_client(name)
        # Commit refuses an existing name anyway; asking first saves the upload.
        if self._request(name, blob.exists):
            raise _exists(name)
        md5 = hashlib.md5(usedforsecurity=False)
        size = 0
        block_ids: list[str] = []
        in_flight: set[Future[Any]] = set()
        buffer = bytearray()

        # Block ids are per put: two writers racing for one name stage separate
        # blocks, so the loser's blocks can never end up in the winner's blob.
        token = secrets.token_hex(8)

        def stage(block: bytes) -> None:
            block_id = f"{token}-{len(block_ids):0{_BLOCK_ID_DIGITS}d}"
            block_ids.append(block_id)
            if len(in_flight) >= self.max_concurrency:
                # Wait for any block, not the oldest: one slow request must not idle the rest.
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                in_flight.difference_update(done)
                for future in done:
                    future.result()
            # validate_content: the SDK sends the block's MD5 and the service refuses a
            # block whose bytes arrived otherwise (Md5Mismatch), so what is committed is
            # what we sent, checked by the service, not only by us. A failed attempt is
            # sent again by the same thread: same id, same bytes (Put Block is idempotent).
            in_flight.add(pool.submit(self._request, name, functools.partial(
                blob.stage_block, block_id, block, len(block), validate_content=True)))

        with ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="blob-put") as pool:
            try:
                for chunk in data:  # the caller's errors propagate unchanged
                    md5.update(chunk)
                    size += len(chunk)
                    buffer += chunk
                    while len(buffer) >= self.block_size:
                        stage(_take(buffer, self.block_size))
                if buffer:
                    stage(bytes(buffer))
                    buffer.clear()
                for future in in_flight:
                    future.result()
            except BaseException:
                for future in in_flight:
                    future.cancel()
                raise

        def commit() -> str:
            committed = blob.commit_block_list(
                [BlobBlock(block_id) for block_id in block_ids],
                content_settings=ContentSettings(content_md5=bytearray(md5.digest())),
                metadata=meta, if_none_match="*")
            return str(committed.get("etag") or "").strip('"')

        def landed() -> str | None:
            """The blob's ETag if the blob that exists holds our bytes (a commit of ours
            whose answer was lost), else None."""
            info = self.retry.call("put", name, functools.partial(self.stat, name))
            ours = holds(info, size, md5.digest(), lambda: self.iter_chunks(name))
            return info.etag if ours else None

        etag = self.retry.create("put", name, functools.partial(_mapped_call, "put", name,
                                                                 commit), landed)
        info = self.retry.call("put", name, functools.partial(self.stat, name))
        if info.etag != etag:
            raise BlobStoreError("put", name, "the blob changed right after it was committed",
                                 hint="another writer has access to the container; check "
                                 "who holds its keys")
        return info

    def open_range(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        check_name(name)
        if offset < 0 or (length is not None and length < 0):
            raise _range(name, offset, length, None)
        if length == 0:  # the SDK cannot ask for an empty range
            info = self._online_info("open_range", name)
            if offset > info.size:
                raise _range(name, offset, length, info.size)
            return b""
        blob = self._client.get_blob_client(name)
        try:
            with _mapped("open_range", name):
                # A whole-blob read sends no range: "bytes=0-" is refused for an empty blob.
                whole = offset == 0 and length is None
                downloader = blob.download_blob(offset=None if whole else offset, length=length,
                                                max_concurrency=self.max_concurrency)
                data = downloader.readall()
                _release_if_empty(downloader)
                size = _total_size(downloader.properties)
        except BlobRangeError:
            # Azure refuses a range that starts at the end; the contract allows the
            # empty tail [size, size) and nothing else.
            size = self._online_info("open_range", name).size
            if offset == size and length is None:
                return b""
            raise _range(name, offset, length, size) from None
        end = size if length is None else offset + length
        if offset > size or end > size or len(data) != end - offset:
            raise _range(name, offset, length, size)
        return data

    def iter_chunks(self, name: str, *, chunk_size: int = 4 << 20) -> Iterator[bytes]:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        check_name(name)
        blob = self._client.get_blob_client(name)
        # The first GET happens here, so a missing or archived blob fails at the call.
        with _mapped("iter_chunks", name):
            downloader = blob.download_blob()
        _release_if_empty(downloader)
        return self._rechunk(name, downloader.chunks(), chunk_size)

    def stat(self, name: str) -> BlobInfo:
        return _info(self._properties("stat", name))

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        check_prefix(prefix)
        # Lazy: the first page is asked for when the caller starts iterating.
        pages = self._client.list_blobs(name_starts_with=prefix or None, include=["metadata"])
        return self._list(prefix, pages)

    def delete(self, name: str) -> None:
        check_name(name)
        with _mapped("delete", name):
            self._client.get_blob_client(name).delete_blob()

    def set_tier(self, name: str, tier: Tier) -> None:
        check_name(name)
        with _mapped("set_tier", name):
            self._client.get_blob_client(name).set_standard_blob_tier(tier.value)

    def request_online(self, name: str, *, early: bool = False) -> None:
        props = self._properties("request_online", name)
        priority = "High" if early else self.rehydrate_priority
        if _info(props).online:
            return
        # A rehydration under way is left alone, unless it runs at Standard and the
        # caller needs it early: Azure lets a pending Standard one be raised to High.
        if props.archive_status and not (
                early and str(getattr(props, "rehydrate_priority", "") or "") != "High"):
            return
        try:
            with _mapped("request_online", name):
                self._client.get_blob_client(name).set_standard_blob_tier(
                    self.rehydrate_to.value,
                    rehydrate_priority=RehydratePriority(priority))
        except BlobOffline:
            return  # another caller started the rehydration in between

    def close(self) -> None:
        self._client.close()

    # -- helpers --------------------------------------------------------------------

    def _request(self, name: str, request: Callable[[], T]) -> T:
        """One request of a put, its errors mapped, tried under the retry policy."""
        return self.retry.call("put", name, functools.partial(_mapped_call, "put", name,
                                                               request))

    def _ensure_container(self, operation: str, name: str) -> None:
        """Create the container if missing, once per process: put only (see the module
        docstring: a read never creates it)."""
        if self._container_ready:
            return
        with self._lock, _mapped(operation, name):
            if self._container_ready:
                return
            with contextlib.suppress(ResourceExistsError):
                self._client.create_container()
            self._container_ready = True

    def _properties(self, operation: str, name: str) -> BlobProperties:
        check_name(name)
        with _mapped(operation, name):
            return self._client.get_blob_client(name).get_blob_properties()

    def _online_info(self, operation: str, name: str) -> BlobInfo:
        info = _info(self._properties(operation, name))
        if not info.online:
            raise _offline(operation, name)
        return info

    def _rechunk(self, name: str, chunks: Iterator[bytes], chunk_size: int) -> Iterator[bytes]:
        """The SDK's chunks cut to exactly `chunk_size` (the last one shorter)."""
        buffer = bytearray()
        with _mapped("iter_chunks", name):
            for chunk in chunks:
                buffer += chunk
                while len(buffer) >= chunk_size:
                    yield _take(buffer, chunk_size)
        if buffer:
            yield bytes(buffer)

    def _list(self, prefix: str, pages: Iterable[BlobProperties]) -> Iterator[BlobInfo]:
        with _mapped("list", prefix):
            try:
                # Azure lists in UTF-8 byte order, which for our ASCII names is sorted order.
                for props in pages:
                    yield _info(props)
            except ResourceNotFoundError as exc:
                if _error_code(exc) != "ContainerNotFound":
                    raise
                # No container, no blobs (a fresh box lists before its first upload).


def _info(props: BlobProperties) -> BlobInfo:
    raw = props.blob_tier
    # Premium or unknown tiers count as Hot: always online, never archived by us.
    tier = _TIERS.get(str(getattr(raw, "value", raw) or "hot").lower(), Tier.HOT)
    md5 = props.content_settings.content_md5
    return BlobInfo(name=props.name, size=int(props.size), tier=tier,
                    online=tier is not Tier.ARCHIVE,
                    content_md5=bytes(md5) if md5 else None,
                    metadata=dict(props.metadata or {}),
                    # Get Properties quotes the ETag, List Blobs does not: compare bare values.
                    etag=str(props.etag or "").strip('"'))


def _mapped_call(operation: str, name: str, fn: Callable[[], T]) -> T:
    with _mapped(operation, name):
        return fn()


@contextlib.contextmanager
def _mapped(operation: str, name: str) -> Iterator[None]:
    """Translate azure.core exceptions raised inside the block into the project's tree."""
    try:
        yield
    except AzureError as exc:
        # An error answer to a streamed request (a download) keeps its connection
        # checked out until closed; unclosed, it leaks a socket.
        response = getattr(exc, "response", None)
        if response is not None:
            with contextlib.suppress(Exception):
                response.close()
        _raise_mapped(operation, name, exc)


def _raise_mapped(operation: str, name: str, exc: AzureError) -> NoReturn:
    status = getattr(exc, "status_code", None)
    code = _error_code(exc)
    what = f"HTTP {status} {code}".strip() if status else type(exc).__name__
    if (dropped := _dropped(exc)) is not None:
        raise TransientBlobError(
            operation, name, f"Azure did not answer ({type(dropped).__name__})",
            hint="check the network path to the storage account; the sync agent retries by"
                 " itself, a command can be run again") from exc
    if code in _OFFLINE_CODES:
        raise _offline(operation, name) from exc
    if code == "Md5Mismatch" or (status == 400 and "md5" in str(exc).lower()):
        # Azure answers Md5Mismatch; Azurite InvalidOperation "Provided contentMD5 ...".
        raise BlobIntegrityError(
            operation, name, f"a block arrived damaged: its MD5 did not match ({what})",
            hint="the network path corrupted data in transit; nothing was committed and "
            "the next pass sends it again") from exc
    if isinstance(exc, ResourceNotFoundError):
        if code == "ContainerNotFound" and operation == "put":
            # put made sure of the container first: it went away while in use.
            raise BlobStoreUnavailable(
                operation, name, "the container does not exist (deleted while in use?)",
                hint="check the storage account (was the container deleted?); the agent "
                "does not recreate it while it runs") from exc
        if code == "ContainerNotFound":
            # A read: no container holds no blob. Only put creates the container.
            raise BlobNotFound(
                operation, name, "no such blob: the container does not exist",
                hint="check the cloud URL and the storage account: a mistyped container "
                "does not exist (reads never create it)") from exc
        raise BlobNotFound(operation, name, "no such blob") from exc
    if isinstance(exc, ResourceExistsError | ResourceModifiedError) and code in _EXISTS_CODES:
        raise _exists(name) from exc
    if status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES:
        raise TransientBlobError(operation, name, f"Azure is busy or failing ({what})",
                                 hint="the sync agent retries by itself, a command can be"
                                 " run again; see the Azure status page if it persists",
                                 retry_after=_retry_after(exc)) from exc
    if status == 416:
        raise BlobRangeError(operation, name, f"range outside the blob ({what})") from exc
    if status in (401, 403):
        skew = _clock_skew(exc)
        if skew is not None and abs(skew) > _MAX_SKEW:
            # Azure answers a request dated too far off as it answers a wrong key
            # (AuthenticationFailed), and a HEAD carries no detail at all: the Date of
            # the answer is what tells the two apart.
            raise BlobStoreUnavailable(
                operation, name, f"Azure refused the request's time: this machine's clock is"
                f" {abs(skew) / 60:.0f} minutes {'behind' if skew > 0 else 'ahead of'} the"
                f" storage service's ({what})",
                hint="set the clock right (timedatectl status; NTP or chrony): Azure refuses"
                " requests more than 15 minutes off; the credentials are not the problem"
                ) from exc
        raise BlobStoreUnavailable(
            operation, name, f"Azure refused our credentials ({what})",
            hint="check the connection string (account key or SAS and its permissions) "
            "and this machine's clock") from exc
    if isinstance(exc, HttpResponseError):
        raise BlobStoreError(operation, name, f"Azure refused the request ({what})",
                             hint="unexpected for this operation: report it with the "
                             "log line") from exc
    raise BlobStoreUnavailable(operation, name, f"Azure client failed ({type(exc).__name__})",
                               hint="check the storage account and the network") from exc


def _dropped(exc: AzureError) -> BaseException | None:
    """The failure, when `exc` says the connection failed or the answer was cut short.

    A download retries a body cut short by itself (three tries, whatever retry_total
    says), then wraps the last failure in an HttpResponseError with no answer: still a
    dropped connection, not a refusal, so the retry wrapper must resume the read."""
    if isinstance(exc, _DROPPED):
        return exc
    inner = getattr(exc, "inner_exception", None)
    if getattr(exc, "status_code", None) is None and isinstance(inner, (*_DROPPED, DecodeError)):
        return inner
    return None


def _retry_after(exc: AzureError) -> float | None:
    """Seconds a throttled or busy answer asked us to wait: x-ms-retry-after-ms or
    retry-after-ms (milliseconds), else Retry-After (seconds, or an HTTP date)."""
    response = getattr(exc, "response", None)
    if response is None:
        return None
    headers = response.headers
    try:
        for header in ("x-ms-retry-after-ms", "retry-after-ms"):
            if value := headers.get(header):
                return max(0.0, float(value) / 1000)
        if not (value := headers.get("Retry-After")):
            return None
        if value.strip().isdigit():
            return float(value)
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _clock_skew(exc: AzureError) -> float | None:
    """Seconds the service's clock is ahead of this machine's, from the Date of its
    answer; None when the answer carried no usable Date."""
    response = getattr(exc, "response", None)
    date = response.headers.get("Date") if response is not None else None
    if not date:
        return None
    try:
        return email.utils.parsedate_to_datetime(date).timestamp() - time.time()
    except (TypeError, ValueError):
        return None


def _error_code(exc: AzureError) -> str:
    """Azure's error code ("ContainerNotFound"), or "" when the answer carried none."""
    error_code = getattr(exc, "error_code", None)  # a str or a StorageErrorCode (a str enum)
    return str(getattr(error_code, "value", error_code) or "")


def _take(buffer: bytearray, n: int) -> bytes:
    """Remove and return the first `n` bytes of `buffer`, copying them once."""
    with memoryview(buffer) as view:
        head = bytes(view[:n])
    del buffer[:n]
    return head


def _release_if_empty(downloader: StorageStreamDownloader[bytes]) -> None:
    """Give back the connection of an answer with an empty body.

    The SDK never reads an empty body, so urllib3 never returns its connection
    to the pool and the socket leaks until garbage collection. It happens for
    an empty blob and for Azurite's empty 206 to a range starting at the end
    (Azure answers 416). Reaches into the downloader: there is no public close.
    """
    if downloader.size == 0:
        response = getattr(getattr(downloader, "_response", None), "response", None)
        if response is not None:
            with contextlib.suppress(Exception):
                response.close()


def _total_size(props: BlobProperties) -> int:
    """The whole blob's size after a ranged download: properties.size is the range's."""
    content_range = props.content_range  # "bytes START-END/TOTAL"
    if content_range and "/" in content_range:
        return int(content_range.rsplit("/", 1)[1])
    return int(props.size)


def _exists(name: str) -> BlobExists:
    return BlobExists("put", name, "a blob by that name exists; blobs are never overwritten",
                      hint="write a new version under a new name")


def _offline(operation: str, name: str) -> BlobOffline:
    return BlobOffline(operation, name, "the blob is in the Archive tier or rehydrating",
                       hint="request_online() first and wait until stat() reports it online "
                       "(rehydration from Archive takes hours on Azure)")


def _range(name: str, offset: int, length: int | None, size: int | None) -> BlobRangeError:
    of = f" ({size} bytes)" if size is not None else ""
    return BlobRangeError("open_range", name,
                          f"range offset={offset} length={length} is outside the blob{of}",
                          hint="the pack index and the blob disagree: re-verify the pack")
