"""Azure answers that are neither a blob nor a refusal: throttling that names its wait,
and a download whose connection drops in the middle of the body.

Real failures on a real path: a proxy in front of a real Azurite answers chosen
requests 503 ServerBusy with Retry-After (faultproxy.FailingRequests), or cuts the
answers of downloads short (faultproxy.CutDownloads). The RetryPolicy's sleeps are
recorded, not slept.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import uuid
from collections.abc import Iterator

from faultproxy import RETRY_AFTER, THROTTLED, CutDownloads, FailingRequests, Request

from sync.blobstore.azure import AzureBlobStore
from sync.blobstore.retry import RetryingBlobStore, RetryPolicy

DATA = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(32 << 10))  # 1 MiB


def _port(azurite: str) -> int:
    return int(re.search(r"127\.0\.0\.1:(\d+)", azurite).group(1))  # type: ignore[union-attr]


@contextlib.contextmanager
def through(azurite: str, proxy_port: int, container: str,
            sleeps: list[float]) -> Iterator[RetryingBlobStore]:
    """The store as the factory composes it (wrapper and backend, one policy), via the proxy."""
    policy = RetryPolicy(attempts=3, base_delay=0.01, max_delay=30.0, sleep=sleeps.append)
    port = _port(azurite)
    inner = AzureBlobStore(container, azurite.replace(f"127.0.0.1:{port}",
                                                      f"127.0.0.1:{proxy_port}"), retry=policy)
    store = RetryingBlobStore(inner, policy)
    try:
        yield store
    finally:
        store.close()


def fresh_blob(azurite: str) -> str:
    container = f"flaky-{uuid.uuid4().hex[:12]}"
    direct = AzureBlobStore(container, azurite)
    try:
        direct.put("packs/big", [DATA])
    finally:
        direct.close()
    return container


def test_a_busy_answer_with_retry_after_is_waited_out_not_retried_sooner(azurite: str) -> None:
    """Azure (or a gateway in front of it) answers 503 with Retry-After: the next attempt
    waits that long (capped by the policy's max_delay), where it came back after the
    policy's own backoff (0.01 s here), hammering a service that said when to return."""
    container = fresh_blob(azurite)
    busy: list[Request] = []

    def first_read_throttled(request: Request) -> str | None:
        if busy or request.blob != "packs/big":
            return None
        busy.append(request)
        return THROTTLED

    sleeps: list[float] = []
    with FailingRequests(_port(azurite), first_read_throttled) as proxy, \
            through(azurite, proxy.port, container, sleeps) as store:
        assert store.open_range("packs/big", 10, 5) == DATA[10:15]
    assert len(busy) == 1
    assert sleeps and sleeps[0] >= RETRY_AFTER, sleeps


def test_a_download_cut_short_again_and_again_resumes_and_reads_every_byte(
        azurite: str) -> None:
    """A recall's download loses its connection in the middle of the body three times
    running. The SDK tries a cut body three times by itself, then wraps the last failure
    in an HttpResponseError with no answer; that read as Azure refusing the request ("report
    it"), not retried, and the recall failed. Now it is a dropped connection: the wrapper
    reads on, and the bytes are the blob's."""
    container = fresh_blob(azurite)
    sleeps: list[float] = []
    with CutDownloads(_port(azurite), cuts=3) as proxy, \
            through(azurite, proxy.port, container, sleeps) as store:
        assert b"".join(store.iter_chunks("packs/big", chunk_size=1 << 16)) == DATA
    assert proxy.cuts == 0
    assert sleeps  # the wrapper retried: the SDK's own tries were not enough
