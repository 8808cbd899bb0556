"""The retry wrapper: what it retries, how long it waits, and what it resumes.

The policy tests use FlakyStore, a LocalFolderStore that raises
TransientBlobError a set number of times (before or after doing the work, to
model a lost answer). The Azure tests use real failures: an Azurite that is
stopped and started again between attempts, and a port where nothing listens.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import dcmtk
import pytest
from azurite import AzuriteServer, connection_string

from sync.blobstore.azure import AzureBlobStore
from sync.blobstore.base import (
    BlobExists,
    BlobInfo,
    BlobNotFound,
    BlobStore,
    BlobStoreUnavailable,
    TransientBlobError,
)
from sync.blobstore.local import LocalFolderStore
from sync.blobstore.retry import RetryingBlobStore, RetryPolicy

DATA = b"pack bytes " * 1000
T = TypeVar("T")


class FlakyStore(LocalFolderStore):
    """Fails `before[op]` calls before doing the work and `after[op]` calls after it."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.before: dict[str, int] = {}
        self.after: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.break_stream_after = 0  # iter_chunks/list: fail once after this many items

    def _trip(self, op: str, table: dict[str, int]) -> None:
        if table.get(op, 0) > 0:
            table[op] -= 1
            raise TransientBlobError(op, "-", "injected failure")

    def _wrap(self, op: str, work: Callable[[], T]) -> T:
        self.calls[op] = self.calls.get(op, 0) + 1
        self._trip(op, self.before)
        result = work()
        self._trip(op, self.after)
        return result

    def put(self, name: str, data: Iterable[bytes], *,
            metadata: dict[str, str] | None = None) -> BlobInfo:
        return self._wrap("put", lambda: super(FlakyStore, self).put(name, data,
                                                                    metadata=metadata))

    def stat(self, name: str) -> BlobInfo:
        return self._wrap("stat", lambda: super(FlakyStore, self).stat(name))

    def delete(self, name: str) -> None:
        self._wrap("delete", lambda: super(FlakyStore, self).delete(name))

    def iter_chunks(self, name: str, *, chunk_size: int = 4 << 20) -> Iterator[bytes]:
        inner = self._wrap("iter_chunks",
                           lambda: super(FlakyStore, self).iter_chunks(name,
                                                                       chunk_size=chunk_size))
        return self._breaking(inner)

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        self.calls["list"] = self.calls.get("list", 0) + 1
        return self._breaking(super().list(prefix))

    def _breaking(self, items: Iterator[T]) -> Iterator[T]:
        for count, item in enumerate(items):
            if self.break_stream_after and count == self.break_stream_after:
                self.break_stream_after = 0
                raise TransientBlobError("stream", "-", "connection reset mid-stream")
            yield item


@pytest.fixture
def flaky(tmp_path: Path) -> FlakyStore:
    return FlakyStore(tmp_path / "blobs")


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def retrying(inner: BlobStore, attempts: int = 5, base_delay: float = 0.5,
             max_delay: float = 30.0) -> tuple[RetryingBlobStore, Sleeps]:
    """The wrapper with its sleeps recorded instead of slept."""
    sleeps = Sleeps()
    return RetryingBlobStore(inner, RetryPolicy(attempts=attempts, base_delay=base_delay,
                                                max_delay=max_delay, sleep=sleeps)), sleeps


def test_transient_errors_are_retried_with_growing_capped_jittered_delays(flaky: FlakyStore
                                                                           ) -> None:
    flaky.put("a", [DATA])
    flaky.before["stat"] = 5
    store, sleeps = retrying(flaky, attempts=6, base_delay=1.0, max_delay=4.0)
    assert store.stat("a").size == len(DATA)
    assert flaky.calls["stat"] == 6
    ceilings = [1.0, 2.0, 4.0, 4.0, 4.0]
    assert len(sleeps) == 5
    for pause, ceiling in zip(sleeps, ceilings, strict=True):
        assert ceiling / 2 <= pause <= ceiling


def test_the_last_transient_error_is_raised_when_attempts_run_out(flaky: FlakyStore) -> None:
    flaky.put("a", [DATA])
    flaky.before["stat"] = 10
    store, sleeps = retrying(flaky, attempts=3)
    with pytest.raises(TransientBlobError):
        store.stat("a")
    assert (flaky.calls["stat"], len(sleeps)) == (3, 2)


def test_answers_that_are_not_transient_are_never_retried(flaky: FlakyStore) -> None:
    store, sleeps = retrying(flaky)
    with pytest.raises(BlobNotFound):
        store.stat("missing")
    assert (flaky.calls["stat"], sleeps) == (1, [])


def test_a_put_whose_answer_was_lost_is_recognised_by_its_content(flaky: FlakyStore) -> None:
    flaky.after["put"] = 1  # the blob is written, then the "response" is lost
    store, sleeps = retrying(flaky)
    info = store.put("p", [DATA[:100], DATA[100:]])
    assert info.size == len(DATA) and info.content_md5 == hashlib.md5(DATA).digest()
    assert (flaky.calls["put"], len(sleeps)) == (2, 1)


def test_a_put_retry_that_finds_other_bytes_raises_exists(flaky: FlakyStore) -> None:
    flaky.put("p", [b"someone else's pack"])
    flaky.calls.clear()
    flaky.before["put"] = 1
    store, _ = retrying(flaky)
    with pytest.raises(BlobExists):
        store.put("p", [DATA])
    assert flaky.open_range("p") == b"someone else's pack"


def test_a_put_of_an_existing_name_without_a_failure_is_not_second_guessed(
        flaky: FlakyStore) -> None:
    flaky.put("p", [DATA])
    store, _ = retrying(flaky)
    with pytest.raises(BlobExists):
        store.put("p", [DATA])  # same bytes, but no earlier attempt of ours failed


def test_a_put_from_a_one_shot_iterator_is_not_retried(flaky: FlakyStore) -> None:
    flaky.before["put"] = 1
    store, sleeps = retrying(flaky)
    with pytest.raises(TransientBlobError):
        store.put("p", iter([DATA]))
    assert (flaky.calls["put"], sleeps) == (1, [])


def test_a_delete_whose_answer_was_lost_counts_as_done(flaky: FlakyStore) -> None:
    flaky.put("d", [DATA])
    flaky.after["delete"] = 1
    store, _ = retrying(flaky)
    store.delete("d")
    with pytest.raises(BlobNotFound):
        store.delete("d")  # and a plain missing blob is still reported


def test_iter_chunks_resumes_at_the_offset_where_the_stream_broke(flaky: FlakyStore) -> None:
    flaky.put("big", [DATA])
    flaky.break_stream_after = 3
    store, _ = retrying(flaky)
    chunks = list(store.iter_chunks("big", chunk_size=1000))
    assert b"".join(chunks) == DATA
    assert [len(c) for c in chunks] == [1000] * (len(DATA) // 1000)


def test_list_resumes_after_the_last_name_seen(flaky: FlakyStore) -> None:
    names = [f"n/{i:02d}" for i in range(10)]
    for name in names:
        flaky.put(name, [name.encode()])
    flaky.break_stream_after = 4
    store, sleeps = retrying(flaky)
    assert [info.name for info in store.list("n/")] == names
    assert (flaky.calls["list"], len(sleeps)) == (2, 1)


# -- real failures of a real Azure endpoint ------------------------------------------------

def test_azure_operations_ride_out_an_azurite_restart(tmp_path: Path) -> None:
    with AzuriteServer(tmp_path / "azurite") as server:
        restarts: list[float] = []

        def sleep_restarting(seconds: float) -> None:
            # Between attempts: bring the endpoint back, as an operator or a network would.
            restarts.append(seconds)
            server.start()

        policy = RetryPolicy(attempts=3, base_delay=0.01, sleep=sleep_restarting)
        inner = AzureBlobStore(f"retry-{uuid.uuid4().hex[:12]}", server.connection_string,
                               retry=policy)
        store = RetryingBlobStore(inner, policy)  # composed as the factory does
        store.put("kept/across", [DATA])
        server.stop()
        assert store.open_range("kept/across", 5, 10) == DATA[5:15]  # data survived too
        server.stop()
        info = store.put("written/after", [DATA[:10], DATA[10:]])
        assert info.size == len(DATA)
        assert len(restarts) == 2
        store.close()


def test_an_unreachable_azure_endpoint_is_transient_and_named(tmp_path: Path) -> None:
    dead = connection_string(dcmtk.free_port())  # nothing listens there
    store, sleeps = retrying(AzureBlobStore("unreachable", dead, connection_timeout=2),
                             attempts=2)
    with pytest.raises(TransientBlobError) as caught:
        store.stat("packs/x")
    assert (caught.value.operation, caught.value.name) == ("stat", "packs/x")
    assert caught.value.hint and "network" in caught.value.hint
    assert len(sleeps) == 1
    store.close()


def test_wrong_azure_credentials_are_refused_at_once(azurite: str) -> None:
    bad = azurite.replace("AccountKey=Eby8", "AccountKey=Xby8")
    store, sleeps = retrying(AzureBlobStore("badkey", bad))
    with pytest.raises(BlobStoreUnavailable) as caught:
        store.stat("packs/x")
    assert not isinstance(caught.value, TransientBlobError)
    assert "403" in str(caught.value)
    assert caught.value.hint and "connection string" in caught.value.hint
    assert "Xby8" not in str(caught.value) + caught.value.hint
    assert sleeps == []
    store.close()
