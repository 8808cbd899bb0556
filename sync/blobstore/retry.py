"""Retries with exponential backoff and jitter: one policy, one wrapper around any blob store.

Only TransientBlobError is retried (timeouts, connection failures, 5xx,
throttling); every other error is an answer and goes straight to the caller.
Backends do not retry by rules of their own (the Azure SDK's retries are
switched off), so this module is the one place where the policy and its log
lines live. RetryPolicy is the policy; RetryingBlobStore applies it to every
operation of a store. sync.blobstore.factory builds one policy and hands it
to both: to the wrapper, and to a backend whose put is many requests (Azure:
a Put Block per block, then Commit Block List), which retries each of those
requests under it (see "put" below).

Delays: attempt n (from 1) waits a random time in [d/2, d] with
d = min(max_delay, base_delay * 2**(n-1)): exponential, capped, and jittered
so that many agents recovering from one outage do not retry in step. When the
store said how long to wait (a 429 or 503 with Retry-After, in
TransientBlobError.retry_after), the pause is at least that, capped at max_delay.

Operations whose effect may have happened although the call failed:

- put: the commit may have landed and only its answer been lost. The retry
  then finds BlobExists. After a transient failure, BlobExists is not taken at
  its word (RetryPolicy.create): the blob is compared with the data put sent
  (size, and the backend's Content-MD5, or the blob's own bytes when the
  backend keeps none). Same bytes: the put succeeded. Different bytes:
  BlobExists, as without retry.
  Retrying a whole put needs the data twice, so the wrapper retries it only
  when `data` is a re-iterable (a list, or an object whose __iter__ reopens
  its source); a one-shot iterator or generator (a pack, encrypted while it
  streams) gets one attempt from the wrapper. A backend that retries the
  requests inside its put (`BlobStore.retries_put_requests`: Azure, which
  keeps each in-flight block's bytes until it is staged, and the block list
  until it is committed) gets one attempt for every put: a transient failure
  of one Put Block re-sends that block, with the same id and bytes (Put Block
  is idempotent), and a lost commit is checked as above with the MD5 computed
  while streaming. Either way one request is tried at most `attempts` times,
  never attempts * attempts.
- delete: BlobNotFound after a transient failure means the first delete went
  through.
- iter_chunks and list resume where they stopped: blobs are immutable, so
  reading on from the same offset (or listing on after the last name seen)
  gives what one uninterrupted call would have.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from sync.blobstore.base import (
    BlobExists,
    BlobInfo,
    BlobNotFound,
    BlobStore,
    Tier,
    TransientBlobError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long a TransientBlobError is retried; see the module docstring.

    Stateless, so one policy serves the wrapper and a backend's threads at once."""

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    # Injectable: tests observe the delays or act between attempts.
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay < 0 or self.max_delay < self.base_delay:
            raise ValueError("need attempts >= 1 and 0 <= base_delay <= max_delay")

    def delay(self, attempt: int) -> float:
        """The pause after failed attempt number `attempt` (1-based)."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)

    def call(self, operation: str, name: str, fn: Callable[[], T]) -> T:
        """`fn()`, tried again after each TransientBlobError while attempts are left."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except TransientBlobError as exc:
                self.backoff(operation, name, attempt, exc)
        raise AssertionError("unreachable: the last attempt raises")

    def create(self, operation: str, name: str, fn: Callable[[], T],
               ours: Callable[[], T | None]) -> T:
        """`fn()`, which creates blob `name` (a put, a commit), retried as call() does.

        BlobExists after a transient failure of an earlier attempt may be that
        attempt, landed with its answer lost: `ours()` returns the result to give
        when the blob that exists holds our bytes (see holds()), else None, and
        BlobExists goes on to the caller."""
        failed = False
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except TransientBlobError as exc:
                self.backoff(operation, name, attempt, exc)
                failed = True
            except BlobExists:
                if failed and (result := ours()) is not None:
                    log.info("blob put landed before its answer was lost name=%s", name)
                    return result
                raise
        raise AssertionError("unreachable: the last attempt raises")

    def backoff(self, operation: str, name: str, attempt: int,
                exc: TransientBlobError) -> None:
        """Sleep before the next attempt, or re-raise `exc` when none is left."""
        if attempt >= self.attempts:
            log.warning("blob store gave up operation=%s name=%s attempts=%d error=%s",
                        operation, name, attempt, exc.message)
            raise exc
        pause = self.delay(attempt)
        if exc.retry_after is not None:
            # The store said when to come back (429/503 Retry-After): not sooner, but
            # never longer than max_delay, so a wrong header cannot stall a job for hours.
            pause = max(pause, min(exc.retry_after, self.max_delay))
        log.info("blob store retry operation=%s name=%s attempt=%d/%d delay=%.2fs error=%s",
                 operation, name, attempt, self.attempts, pause, exc.message)
        self.sleep(pause)


def holds(info: BlobInfo, size: int, md5: bytes, read: Callable[[], Iterable[bytes]]) -> bool:
    """Whether the blob that `info` describes holds exactly the `size` bytes whose MD5 is
    `md5`: by its Content-MD5 when the backend keeps one, else by its bytes, from `read()`."""
    if info.size != size:
        return False
    if info.content_md5 is not None:
        return info.content_md5 == md5
    have = hashlib.md5(usedforsecurity=False)
    for chunk in read():
        have.update(chunk)
    return have.digest() == md5


class RetryingBlobStore(BlobStore):
    """`inner` with TransientBlobError retried under `policy`; see the module docstring."""

    def __init__(self, inner: BlobStore, policy: RetryPolicy | None = None) -> None:
        self.inner = inner
        self.url = inner.url
        self.policy = policy or RetryPolicy()

    # -- the contract ---------------------------------------------------------------

    def put(self, name: str, data: Iterable[bytes], *,
            metadata: dict[str, str] | None = None) -> BlobInfo:
        if iter(data) is data or self.inner.retries_put_requests:
            # One-shot: a second attempt would send nothing. Or the backend retries each
            # request of its put under the same policy: attempts, not attempts squared.
            return self.inner.put(name, data, metadata=metadata)
        return self.policy.create(
            "put", name, lambda: self.inner.put(name, data, metadata=metadata),
            lambda: self.stat(name) if self._holds(name, data) else None)

    def open_range(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.policy.call("open_range", name,
                                functools.partial(self.inner.open_range, name, offset, length))

    def iter_chunks(self, name: str, *, chunk_size: int = 4 << 20) -> Iterator[bytes]:
        first = self.policy.call("iter_chunks", name,
                                 functools.partial(self.inner.iter_chunks, name,
                                                   chunk_size=chunk_size))
        return self._resuming_chunks(name, chunk_size, first)

    def stat(self, name: str) -> BlobInfo:
        return self.policy.call("stat", name, functools.partial(self.inner.stat, name))

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        last: str | None = None
        failures = 0
        while True:
            try:
                for info in self.inner.list(prefix):
                    if last is not None and info.name <= last:
                        continue  # seen before the interruption
                    yield info
                    last, failures = info.name, 0
                return
            except TransientBlobError as exc:
                failures += 1
                self.policy.backoff("list", prefix, failures, exc)

    def delete(self, name: str) -> None:
        failed = False
        for attempt in range(1, self.policy.attempts + 1):
            try:
                self.inner.delete(name)
                return
            except TransientBlobError as exc:
                self.policy.backoff("delete", name, attempt, exc)
                failed = True
            except BlobNotFound:
                if failed:
                    return  # the failed attempt deleted it
                raise

    def set_tier(self, name: str, tier: Tier) -> None:
        self.policy.call("set_tier", name, functools.partial(self.inner.set_tier, name, tier))

    def request_online(self, name: str, *, early: bool = False) -> None:
        self.policy.call("request_online", name,
                         functools.partial(self.inner.request_online, name, early=early))

    def close(self) -> None:
        self.inner.close()

    def sweep_interrupted_writes(self) -> int:
        return self.inner.sweep_interrupted_writes()

    # -- helpers --------------------------------------------------------------------

    def _resuming_chunks(self, name: str, chunk_size: int,
                         first: Iterator[bytes]) -> Iterator[bytes]:
        offset = 0
        try:
            for chunk in first:
                yield chunk
                offset += len(chunk)
            return
        except TransientBlobError as exc:
            log.info("blob store resume operation=iter_chunks name=%s offset=%d error=%s",
                     name, offset, exc.message)
        size = self.stat(name).size
        while offset < size:
            chunk = self.open_range(name, offset, min(chunk_size, size - offset))
            yield chunk
            offset += len(chunk)

    def _holds(self, name: str, data: Iterable[bytes]) -> bool:
        """Whether blob `name` holds exactly the bytes of `data` (re-read from the start)."""
        want = hashlib.md5(usedforsecurity=False)
        size = 0
        for chunk in data:
            want.update(chunk)
            size += len(chunk)
        return holds(self.stat(name), size, want.digest(), lambda: self.iter_chunks(name))
