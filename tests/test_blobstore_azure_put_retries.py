"""A put to Azure from a one-shot stream rides out failed requests, one request at a time.

A pack is encrypted while it streams, so the retry wrapper cannot send it twice;
the Azure backend tries each request of its put (Put Block, Commit Block List)
under the wrapper's RetryPolicy instead (sync.blobstore.retry). The failures are
real ones on a real path: a proxy between the backend and a real Azurite
(faultproxy.FailingRequests) answers chosen requests 503 ServerBusy, resets their
connection, or lets them through and loses the answer. 64 KiB blocks make a
small blob many blocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from faultproxy import BUSY, LOST, RESET, FailingRequests, Request

from sync.blobstore.azure import AzureBlobStore
from sync.blobstore.base import BlobExists, BlobNotFound, TransientBlobError
from sync.blobstore.retry import RetryingBlobStore, RetryPolicy

BLOCK = 64 << 10
ATTEMPTS = 3
NAME = "packs/one-shot"


def pattern(n: int) -> bytes:
    """n bytes that differ from block to block, so a misplaced block would show."""
    return b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(n // 32 + 1))[:n]


DATA = pattern(10 * BLOCK + 1234)  # 11 blocks


def one_shot(data: bytes) -> Iterator[bytes]:
    """`data` as a generator, as a pack streams: it can be read once."""
    for start in range(0, len(data), 10_000):
        yield data[start:start + 10_000]


@dataclass
class Flaky:
    store: RetryingBlobStore  # as the factory composes it: wrapper and backend, one policy
    direct: AzureBlobStore  # the same container without the proxy, to look at the result
    proxy: FailingRequests
    sleeps: list[float]


@contextlib.contextmanager
def flaky_azure(azurite: str, fault: Callable[[Request], str | None]) -> Iterator[Flaky]:
    port = int(re.search(r"127\.0\.0\.1:(\d+)", azurite).group(1))  # type: ignore[union-attr]
    container = f"blocks-{uuid.uuid4().hex[:12]}"
    sleeps: list[float] = []
    policy = RetryPolicy(attempts=ATTEMPTS, base_delay=0.01, sleep=sleeps.append)
    with FailingRequests(port, fault) as proxy, contextlib.ExitStack() as stack:
        inner = AzureBlobStore(container, azurite.replace(f"127.0.0.1:{port}",
                                                          f"127.0.0.1:{proxy.port}"),
                               block_size=BLOCK, retry=policy)
        store = RetryingBlobStore(inner, policy)
        stack.callback(store.close)
        direct = AzureBlobStore(container, azurite)
        stack.callback(direct.close)
        yield Flaky(store, direct, proxy, sleeps)


def test_a_one_shot_put_sends_a_failed_block_again_with_its_id_and_bytes(azurite: str) -> None:
    faults = {2: BUSY, 5: RESET}
    with flaky_azure(azurite, lambda r: faults.get(r.number) if r.comp == "block"
                     else None) as flaky:
        info = flaky.store.put(NAME, one_shot(DATA))
        assert flaky.direct.open_range(NAME) == DATA
        assert flaky.direct.stat(NAME) == info
        blocks = flaky.proxy.requests("block")
    assert info.size == len(DATA) and info.content_md5 == hashlib.md5(DATA).digest()
    failed = [r for r, fault in blocks if fault]
    staged = [r for r, fault in blocks if not fault]
    assert [fault for _, fault in blocks if fault] == [BUSY, RESET]
    assert len(staged) == len({r.block_id for r in staged}) == 11  # each block staged once
    assert {(r.block_id, r.body) for r in failed} <= {(r.block_id, r.body) for r in staged}
    assert len(flaky.sleeps) == 2


def test_a_block_that_fails_every_attempt_fails_the_put_and_commits_nothing(
        azurite: str) -> None:
    def third_block_always_busy(request: Request) -> str | None:
        return BUSY if request.comp == "block" and request.block_id.endswith("-000002") else None

    with flaky_azure(azurite, third_block_always_busy) as flaky:
        with pytest.raises(TransientBlobError) as caught:
            flaky.store.put(NAME, one_shot(DATA))
        with pytest.raises(BlobNotFound):
            flaky.direct.stat(NAME)
        assert list(flaky.direct.list()) == []
        blocks = flaky.proxy.requests("block")
        commits = flaky.proxy.requests("blocklist")
    assert (caught.value.operation, caught.value.name) == ("put", NAME)
    assert "ServerBusy" in caught.value.message
    assert len([r for r, fault in blocks if fault]) == ATTEMPTS
    assert commits == []


def test_a_commit_whose_answer_was_lost_is_a_success_when_the_blob_holds_our_bytes(
        azurite: str) -> None:
    with flaky_azure(azurite, lambda r: LOST if r.comp == "blocklist" and r.number == 1
                     else None) as flaky:
        info = flaky.store.put(NAME, one_shot(DATA))
        assert flaky.direct.open_range(NAME) == DATA
        assert flaky.direct.stat(NAME) == info
        commits = flaky.proxy.requests("blocklist")
    assert [fault for _, fault in commits] == [LOST, None]  # the retry found BlobExists


def test_a_commit_retried_into_another_writers_blob_raises_exists(azurite: str) -> None:
    def another_writer_first(request: Request) -> str | None:
        if request.comp == "blocklist" and request.number == 1:
            flaky.direct.put(NAME, [b"another writer's pack"])
            return RESET  # our commit's answer lost, as if it had landed
        return None

    with flaky_azure(azurite, another_writer_first) as flaky:
        with pytest.raises(BlobExists):
            flaky.store.put(NAME, one_shot(DATA))
        assert flaky.direct.open_range(NAME) == b"another writer's pack"
        assert len(flaky.proxy.requests("blocklist")) == 2
