"""One contract suite for every blob-store backend (sync.blobstore.base).

Each test runs twice: against a LocalFolderStore in tmp_path, and against an
AzureBlobStore on a real Azurite server with a fresh container per test. A
behaviour that one backend has and the other lacks fails here, not in the
sync agent.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from faultproxy import CorruptingProxy

from appliance.base import durable
from sync.blobstore.azure import AzureBlobStore
from sync.blobstore.base import (
    BlobExists,
    BlobIntegrityError,
    BlobNotFound,
    BlobOffline,
    BlobRangeError,
    BlobStore,
    Tier,
)
from sync.blobstore.local import LocalFolderStore

MiB = 1 << 20
TEXT = b"hello, immutable world"  # 22 bytes


@pytest.fixture(params=["local", "azure"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    backend: BlobStore
    if request.param == "local":
        backend = LocalFolderStore(tmp_path / "blobs")
    else:
        connection_string = request.getfixturevalue("azurite")
        # 1 MiB blocks so that the 20 MiB test spans many blocks in flight.
        backend = AzureBlobStore(f"contract-{uuid.uuid4().hex[:16]}", connection_string,
                                 block_size=MiB)
    yield backend
    backend.close()


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    """`data` as a one-shot stream of `size`-byte chunks."""
    for start in range(0, len(data), size):
        yield data[start:start + size]


def pattern(n: int) -> bytes:
    """n bytes that differ at every MiB, so a misplaced block would show."""
    blocks = (hashlib.sha256(str(i).encode()).digest() * (MiB // 32) for i in range(n // MiB + 1))
    return b"".join(blocks)[:n]


def test_put_then_stat_list_and_reads_agree(store: BlobStore) -> None:
    info = store.put("packs/a1/v1.pack", pieces(TEXT, 5), metadata={"format": "pe1"})
    assert (info.name, info.size, info.online) == ("packs/a1/v1.pack", len(TEXT), True)
    assert info.content_md5 == hashlib.md5(TEXT).digest()
    assert info.metadata == {"format": "pe1"}
    assert store.stat("packs/a1/v1.pack") == info
    assert list(store.list()) == [info]
    assert store.open_range("packs/a1/v1.pack") == TEXT
    assert b"".join(store.iter_chunks("packs/a1/v1.pack", chunk_size=4)) == TEXT


def test_put_of_an_existing_name_is_refused_and_the_original_kept(store: BlobStore) -> None:
    store.put("m/one", [TEXT])
    with pytest.raises(BlobExists) as caught:
        store.put("m/one", [b"something else"])
    assert (caught.value.operation, caught.value.name) == ("put", "m/one")
    assert caught.value.hint
    assert store.open_range("m/one") == TEXT
    assert store.stat("m/one").size == len(TEXT)


def test_racing_puts_of_one_name_leave_exactly_one_whole_blob(store: BlobStore) -> None:
    both_started = threading.Barrier(2, timeout=30)
    data = {"a": pattern(3 * MiB), "b": pattern(3 * MiB)[::-1]}
    outcome: dict[str, object] = {}

    def writer(key: str) -> None:
        def stream() -> Iterator[bytes]:
            chunks = pieces(data[key], MiB // 2)
            yield next(chunks)
            both_started.wait()  # both are past any existence check, mid-upload
            yield from chunks
        try:
            outcome[key] = store.put("race/blob", stream())
        except BlobExists as exc:
            outcome[key] = exc

    threads = [threading.Thread(target=writer, args=(key,)) for key in data]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    losers = [key for key, result in outcome.items() if isinstance(result, BlobExists)]
    assert len(outcome) == 2 and len(losers) == 1, outcome
    winner = "b" if losers == ["a"] else "a"
    assert store.open_range("race/blob") == data[winner]
    assert store.stat("race/blob").content_md5 == hashlib.md5(data[winner]).digest()


def test_put_is_atomic_when_the_chunk_source_fails_midway(store: BlobStore) -> None:
    def broken() -> Iterator[bytes]:
        yield from pieces(pattern(3 * MiB), MiB)
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        store.put("atomic/blob", broken())
    with pytest.raises(BlobNotFound):
        store.stat("atomic/blob")
    assert list(store.list()) == []
    # Nothing of the failed attempt is in the way of the next one.
    store.put("atomic/blob", [TEXT])
    assert store.open_range("atomic/blob") == TEXT


def test_empty_blob_round_trips(store: BlobStore) -> None:
    info = store.put("empty", [])
    assert info.size == 0
    assert store.open_range("empty") == b""
    assert store.open_range("empty", 0, 0) == b""
    assert list(store.iter_chunks("empty")) == []
    with pytest.raises(BlobRangeError):
        store.open_range("empty", 0, 1)


@pytest.mark.parametrize(("offset", "length"), [
    (0, None), (0, 22), (0, 1), (7, 9), (21, 1), (21, None), (5, 0), (22, None), (22, 0),
])
def test_open_range_returns_exactly_the_bytes_asked_for(store: BlobStore, offset: int,
                                                        length: int | None) -> None:
    store.put("r", [TEXT])
    end = len(TEXT) if length is None else offset + length
    assert store.open_range("r", offset, length) == TEXT[offset:end]


@pytest.mark.parametrize(("offset", "length"), [
    (22, 1), (23, None), (23, 0), (21, 2), (0, 23), (-1, 2), (0, -1), (100, 10),
])
def test_ranges_outside_the_blob_are_refused(store: BlobStore, offset: int,
                                             length: int | None) -> None:
    store.put("r", [TEXT])
    with pytest.raises(BlobRangeError) as caught:
        store.open_range("r", offset, length)
    assert (caught.value.operation, caught.value.name) == ("open_range", "r")
    assert str(offset) in str(caught.value)


def test_a_missing_blob_is_not_found_by_every_operation(store: BlobStore) -> None:
    store.put("present", [TEXT])  # the container exists; only the blob is missing
    calls: dict[str, Callable[[], object]] = {
        "stat": lambda: store.stat("absent/x"),
        "open_range": lambda: store.open_range("absent/x", 0, 1),
        "iter_chunks": lambda: store.iter_chunks("absent/x"),
        "delete": lambda: store.delete("absent/x"),
        "set_tier": lambda: store.set_tier("absent/x", Tier.COOL),
        "request_online": lambda: store.request_online("absent/x"),
    }
    for operation, call in calls.items():
        with pytest.raises(BlobNotFound) as caught:
            call()
        assert (caught.value.operation, caught.value.name) == (operation, "absent/x")
        assert "absent/x" in str(caught.value)
    assert list(store.list("absent")) == []


def test_delete_removes_the_blob_and_frees_its_name(store: BlobStore) -> None:
    store.put("d/x", [TEXT])
    store.put("d/y", [TEXT])
    store.delete("d/x")
    with pytest.raises(BlobNotFound):
        store.stat("d/x")
    with pytest.raises(BlobNotFound):
        store.delete("d/x")
    assert [info.name for info in store.list()] == ["d/y"]
    store.put("d/x", [b"again"])
    assert store.open_range("d/x") == b"again"


@pytest.mark.parametrize("tier", [Tier.COOL, Tier.COLD, Tier.HOT])
def test_online_tiers_round_trip_through_stat(store: BlobStore, tier: Tier) -> None:
    store.put("t", [TEXT])
    store.set_tier("t", tier)
    info = store.stat("t")
    assert (info.tier, info.online) == (tier, True)
    assert [i.tier for i in store.list()] == [tier]
    assert store.open_range("t", 0, 5) == TEXT[:5]


def test_an_archived_blob_is_offline_until_requested_online(store: BlobStore) -> None:
    store.put("arch/p", [TEXT])
    store.request_online("arch/p")  # online already: nothing to do
    store.set_tier("arch/p", Tier.ARCHIVE)
    info = store.stat("arch/p")
    assert (info.tier, info.online, info.size) == (Tier.ARCHIVE, False, len(TEXT))
    assert [i.online for i in store.list("arch/")] == [False]
    with pytest.raises(BlobOffline) as caught:
        store.open_range("arch/p", 0, 4)
    assert caught.value.hint and "request_online" in caught.value.hint
    with pytest.raises(BlobOffline):
        store.iter_chunks("arch/p")
    store.request_online("arch/p")
    # Both backends here finish at once (Azurite flips archive back immediately); the
    # slow path is the local store's rehydrate_delay, tested in test_blobstore_local.
    deadline = time.monotonic() + 30
    while not store.stat("arch/p").online:
        assert time.monotonic() < deadline, "request_online never completed"
        time.sleep(0.05)
    assert store.stat("arch/p").tier is Tier.HOT
    assert store.open_range("arch/p") == TEXT


def test_list_is_sorted_by_name_and_filtered_by_prefix(store: BlobStore) -> None:
    # '-' (0x2d) and '.' (0x2e) sort before '/' (0x2f): a per-folder walk gets this wrong.
    names = ["packs/b/v1", "packs/a/v2", "packs/a/v1", "packs-old/x", "packs.idx",
             "manifests/a/v1", "packs/a-z", "p"]
    for name in names:
        store.put(name, [name.encode()])
    assert [i.name for i in store.list()] == sorted(names)
    assert [i.name for i in store.list("packs/")] == ["packs/a-z", "packs/a/v1", "packs/a/v2",
                                                      "packs/b/v1"]
    assert [i.name for i in store.list("packs/a")] == ["packs/a-z", "packs/a/v1", "packs/a/v2"]
    assert [i.name for i in store.list("packs")] == ["packs-old/x", "packs.idx", "packs/a-z",
                                                     "packs/a/v1", "packs/a/v2", "packs/b/v1"]
    assert [i.name for i in store.list("pa")][:1] == ["packs-old/x"]
    assert [i.name for i in store.list("zzz")] == []
    sizes = {i.name: i.size for i in store.list()}
    assert sizes == {name: len(name) for name in names}


def test_a_large_blob_streams_through_put_and_iter_chunks(store: BlobStore) -> None:
    data = pattern(20 * MiB)
    tracemalloc.start()
    try:
        info = store.put("big/blob", pieces(data, MiB))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Streaming, not buffering: Azure holds ~(concurrency + 2) blocks of 1 MiB here.
    assert peak < 12 * MiB, f"put held {peak / MiB:.1f} MiB for a 20 MiB blob"
    assert info.size == len(data)
    assert info.content_md5 == hashlib.md5(data).digest()
    digest = hashlib.sha256()
    sizes = []
    for chunk in store.iter_chunks("big/blob", chunk_size=MiB):
        digest.update(chunk)
        sizes.append(len(chunk))
    assert sizes == [MiB] * 20
    assert digest.digest() == hashlib.sha256(data).digest()
    assert store.open_range("big/blob", 7 * MiB - 3, 10) == data[7 * MiB - 3:7 * MiB + 7]


def test_metadata_round_trips_and_keys_azure_refuses_are_refused(store: BlobStore) -> None:
    meta = {"format": "pe1", "pack_version": "2", "_k": "a b"}
    store.put("meta/x", [TEXT], metadata=meta)
    assert store.stat("meta/x").metadata == meta
    assert [i.metadata for i in store.list("meta/")] == [meta]
    for bad in ({"pack-version": "2"}, {"Format": "x"}, {"k": " padded"}, {"k": "é"},
                {"1k": "x"}):
        with pytest.raises(ValueError):
            store.put("meta/y", [TEXT], metadata=bad)
    with pytest.raises(BlobNotFound):
        store.stat("meta/y")


@pytest.mark.parametrize("name", ["", "/a", "a/", "a//b", "..", "a/../b", "./a", ".hidden",
                                  "a/.b", "A", "a b", "a\\b", "ä", "a/" + "x" * 201])
def test_names_outside_the_alphabet_are_refused(store: BlobStore, name: str) -> None:
    with pytest.raises(ValueError):
        store.put(name, [TEXT])
    with pytest.raises(ValueError):
        store.stat(name)
    assert list(store.list()) == []


# --- what the store itself verifies, and the identity it reports (etag) -------------------


def test_etag_is_stable_across_reads_and_tier_changes_and_agrees_everywhere(
        store: BlobStore) -> None:
    info = store.put("e/blob", pieces(TEXT, 5))
    assert info.etag
    assert store.stat("e/blob").etag == info.etag
    assert [i.etag for i in store.list("e/")] == [info.etag]
    store.open_range("e/blob", 2, 3)
    list(store.iter_chunks("e/blob"))
    store.set_tier("e/blob", Tier.COOL)  # Azure: "Set Blob Tier does not update the ETag"
    store.set_tier("e/blob", Tier.HOT)
    assert store.stat("e/blob").etag == info.etag


def test_etag_changes_when_a_blob_is_replaced_by_the_same_bytes(store: BlobStore) -> None:
    first = store.put("e/blob", [TEXT])
    store.put("e/other", [TEXT])
    assert store.stat("e/other").etag != first.etag
    store.delete("e/blob")
    again = store.put("e/blob", [TEXT])
    assert again.etag != first.etag
    assert store.stat("e/blob").etag == again.etag


MARKER = b"<this block travels through a flaky network>"
DAMAGED = b"<this block travels through a flaky netwprk>"


def damaged_on_the_way(store: BlobStore, request: pytest.FixtureRequest, data: bytes,
                       stack: contextlib.ExitStack) -> tuple[BlobStore, Iterator[bytes]]:
    """The same store reached through damage, and the chunks to put through it.

    Local folder: the put's temp file has a byte flipped after it was written
    (a disk or NAS that does not keep what it is given). Azure: the blocks pass
    through a proxy that corrupts their bodies in transit.
    """
    if isinstance(store, LocalFolderStore):
        def flipped_after_writing() -> Iterator[bytes]:
            yield from pieces(data, MiB)
            part = next((store.root / "d").glob(f".blob.*{durable.TEMP_SUFFIX}"))
            with open(part, "r+b") as fh:
                fh.seek(MiB + 7)
                byte = fh.read(1)
                fh.seek(MiB + 7)
                fh.write(bytes([byte[0] ^ 0x01]))
        return store, flipped_after_writing()
    assert isinstance(store, AzureBlobStore)
    connection_string = request.getfixturevalue("azurite")
    port = int(re.search(r"127\.0\.0\.1:(\d+)", connection_string).group(1))  # type: ignore[union-attr]
    proxy = stack.enter_context(CorruptingProxy(port, MARKER, DAMAGED))
    proxied = AzureBlobStore(store.container, connection_string.replace(
        f"127.0.0.1:{port}", f"127.0.0.1:{proxy.port}"), block_size=MiB)
    stack.callback(proxied.close)
    return proxied, pieces(data, MiB)


def test_put_of_bytes_damaged_on_the_way_fails_and_publishes_nothing(
        store: BlobStore, request: pytest.FixtureRequest) -> None:
    data = (MARKER + pattern(4096)) * (3 * MiB // (len(MARKER) + 4096))
    with contextlib.ExitStack() as stack:
        damaged_store, chunks = damaged_on_the_way(store, request, data, stack)
        with pytest.raises(BlobIntegrityError) as caught:
            damaged_store.put("d/blob", chunks)
    assert (caught.value.operation, caught.value.name) == ("put", "d/blob")
    assert caught.value.hint
    with pytest.raises(BlobNotFound):
        store.stat("d/blob")
    assert list(store.list()) == []
    # An intact path stores the same data, which reads back exactly.
    store.put("d/blob", pieces(data, MiB))
    assert store.open_range("d/blob") == data
