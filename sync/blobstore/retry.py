"""Retries with exponential backoff and jitter, as one wrapper around any blob store.

Only TransientBlobError is retried (timeouts, connection failures, 5xx,
throttling); every other error is an answer and goes straight to the caller.
Backends do not retry themselves (the Azure SDK's retries are switched off),
so this wrapper is the one place where the policy and its log lines live.

Delays: attempt n (from 1) waits a random time in [d/2, d] with
d = min(max_delay, base_delay * 2**(n-1)): exponential, capped, and jittered
so that many agents recovering from one outage do not retry in step.

Operations whose effect may have happened although the call failed:

- put: the commit may have landed and only its answer been lost. The retry
  then finds BlobExists. After a transient failure, BlobExists is not taken at
  its word: the data is hashed again and compared with the blob (size, and the
  backend's Content-MD5, or the blob's own bytes when the backend keeps none).
  Same bytes: the put succeeded. Different bytes: BlobExists, as without retry.
  Retrying a put needs the data twice, so it is retried only when `data` is a
  re-iterable (a list, or an object whose __iter__ reopens its source); a
  one-shot iterator or generator gets exactly one attempt, and its
  TransientBlobError reaches the caller, who can retry with fresh data.
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


class RetryingBlobStore(BlobStore):
    """`inner` with TransientBlobError retried; see the module docstring for the policy."""

    def __init__(self, inner: BlobStore, *, attempts: int = 5, base_delay: float = 0.5,
                 max_delay: float = 30.0, sleep: Callable[[float], None] = time.sleep) -> None:
        if attempts < 1 or base_delay < 0 or max_delay < base_delay:
            raise ValueError("need attempts >= 1 and 0 <= base_delay <= max_delay")
        self.inner = inner
        self.url = inner.url
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._sleep = sleep  # injectable: tests observe the delays or act between attempts

    def delay(self, attempt: int) -> float:
        """The pause after failed attempt number `attempt` (1-based)."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)

    # -- the contract ---------------------------------------------------------------

    def put(self, name: str, data: Iterable[bytes], *,
            metadata: dict[str, str] | None = None) -> BlobInfo:
        if iter(data) is data:  # one-shot: a second attempt would send nothing
            return self.inner.put(name, data, metadata=metadata)
        failed = False
        for attempt in range(1, self.attempts + 1):
            try:
                return self.inner.put(name, data, metadata=metadata)
            except TransientBlobError as exc:
                self._backoff("put", name, attempt, exc)
                failed = True
            except BlobExists:
                if failed and self._holds(name, data):
                    log.info("blob put landed before its answer was lost name=%s", name)
                    return self.stat(name)
                raise
        raise AssertionError("unreachable: the last attempt raises")

    def open_range(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._call("open_range", name,
                          functools.partial(self.inner.open_range, name, offset, length))

    def iter_chunks(self, name: str, *, chunk_size: int = 4 << 20) -> Iterator[bytes]:
        first = self._call("iter_chunks", name,
                           functools.partial(self.inner.iter_chunks, name,
                                             chunk_size=chunk_size))
        return self._resuming_chunks(name, chunk_size, first)

    def stat(self, name: str) -> BlobInfo:
        return self._call("stat", name, functools.partial(self.inner.stat, name))

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
                self._backoff("list", prefix, failures, exc)

    def delete(self, name: str) -> None:
        failed = False
        for attempt in range(1, self.attempts + 1):
            try:
                self.inner.delete(name)
                return
            except TransientBlobError as exc:
                self._backoff("delete", name, attempt, exc)
                failed = True
            except BlobNotFound:
                if failed:
                    return  # the failed attempt deleted it
                raise

    def set_tier(self, name: str, tier: Tier) -> None:
        self._call("set_tier", name, functools.partial(self.inner.set_tier, name, tier))

    def request_online(self, name: str, *, early: bool = False) -> None:
        self._call("request_online", name,
                   functools.partial(self.inner.request_online, name, early=early))

    def close(self) -> None:
        self.inner.close()

    def sweep_interrupted_writes(self) -> int:
        return self.inner.sweep_interrupted_writes()

    # -- helpers --------------------------------------------------------------------

    def _call(self, operation: str, name: str, fn: Callable[[], T]) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except TransientBlobError as exc:
                self._backoff(operation, name, attempt, exc)
        raise AssertionError("unreachable: the last attempt raises")

    def _backoff(self, operation: str, name: str, attempt: int,
                 exc: TransientBlobError) -> None:
        """Sleep before the next attempt, or re-raise `exc` when none is left."""
        if attempt >= self.attempts:
            log.warning("blob store gave up operation=%s name=%s attempts=%d error=%s",
                        operation, name, attempt, exc.message)
            raise exc
        pause = self.delay(attempt)
        log.info("blob store retry operation=%s name=%s attempt=%d/%d delay=%.2fs error=%s",
                 operation, name, attempt, self.attempts, pause, exc.message)
        self._sleep(pause)

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
        info = self.stat(name)
        if info.size != size:
            return False
        if info.content_md5 is not None:
            return info.content_md5 == want.digest()
        have = hashlib.md5(usedforsecurity=False)
        for chunk in self.iter_chunks(name):
            have.update(chunk)
        return have.digest() == want.digest()
