"""What only the local folder store has: its on-disk layout, crash leftovers, and a
configurable rehydration delay that lets state-machine tests see an archived
blob stay offline for a while (Azurite rehydrates at once)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sync.blobstore.base import BlobOffline, BlobStoreError, Tier
from sync.blobstore.local import LocalFolderStore

DATA = b"encrypted pack bytes"


def wait_online(store: LocalFolderStore, name: str, timeout: float = 10.0) -> float:
    """Seconds until stat() reports `name` online, polled with a deadline."""
    began = time.monotonic()
    while not store.stat(name).online:
        assert time.monotonic() - began < timeout, f"{name} still offline after {timeout}s"
        time.sleep(0.02)
    return time.monotonic() - began


def test_blobs_are_plain_files_under_the_root(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path / "nas")
    store.put("packs/ab/v1.pack", [DATA[:5], DATA[5:]])
    assert (tmp_path / "nas" / "packs" / "ab" / "v1.pack").read_bytes() == DATA
    assert store.url == (tmp_path / "nas").as_uri()


def test_rehydrate_delay_keeps_an_archived_blob_offline_until_it_elapses(tmp_path: Path
                                                                          ) -> None:
    store = LocalFolderStore(tmp_path / "nas", rehydrate_delay=0.5)
    store.put("p", [DATA])
    store.set_tier("p", Tier.ARCHIVE)
    began = time.monotonic()
    store.request_online("p")
    info = store.stat("p")
    assert (info.tier, info.online) == (Tier.ARCHIVE, False)
    with pytest.raises(BlobOffline):
        store.open_range("p")
    store.request_online("p")  # asking again neither fails nor restarts the clock
    wait_online(store, "p")
    assert time.monotonic() - began >= 0.5
    assert store.stat("p").tier is Tier.HOT
    assert store.open_range("p") == DATA


def test_leaving_archive_by_set_tier_rehydrates_to_that_tier(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path / "nas", rehydrate_delay=0.2)
    store.put("p", [DATA])
    store.set_tier("p", Tier.ARCHIVE)
    store.set_tier("p", Tier.COOL)
    assert store.stat("p").online is False
    wait_online(store, "p")
    assert store.stat("p").tier is Tier.COOL


def test_rehydration_state_is_seen_by_another_process_store(tmp_path: Path) -> None:
    writer = LocalFolderStore(tmp_path / "nas", rehydrate_delay=60)
    writer.put("p", [DATA], metadata={"format": "pe1"})
    writer.set_tier("p", Tier.ARCHIVE)
    writer.request_online("p")
    reader = LocalFolderStore(tmp_path / "nas")  # its own delay does not matter
    info = reader.stat("p")
    assert (info.tier, info.online, info.metadata) == (Tier.ARCHIVE, False, {"format": "pe1"})


def test_a_blob_whose_sidecar_was_lost_is_served_with_a_rebuilt_one(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path / "nas")
    store.put("packs/p", [DATA])
    (tmp_path / "nas" / "packs" / ".p.meta").unlink()  # a crash between link and sidecar
    info = store.stat("packs/p")
    assert (info.size, info.tier, info.online) == (len(DATA), Tier.HOT, True)
    assert info.content_md5 == hashlib.md5(DATA).digest()
    assert (tmp_path / "nas" / "packs" / ".p.meta").exists()


def test_temp_files_of_interrupted_puts_are_never_listed_and_are_swept(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path / "nas")
    store.put("packs/p", [DATA])
    leftover = tmp_path / "nas" / "packs" / ".q.x1y2.part"
    leftover.write_bytes(b"half a pack")
    assert [info.name for info in store.list()] == ["packs/p"]
    assert store.sweep_interrupted_writes(older_than=3600) == 0  # could be a put still running
    old = time.time() - 7200
    os.utime(leftover, (old, old))
    assert store.sweep_interrupted_writes(older_than=3600) == 1
    assert not leftover.exists()


def test_a_failed_put_leaves_no_file_behind(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path / "nas")

    def broken() -> Iterator[bytes]:
        yield DATA
        raise OSError(5, "the caller's own source failed")

    with pytest.raises(OSError, match="caller's own source"):  # not mapped: not ours
        store.put("packs/p", broken())
    assert sorted(p.name for p in (tmp_path / "nas" / "packs").iterdir()) == []


def test_a_blob_in_the_way_of_a_folder_is_a_clear_error(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path / "nas")
    store.put("a", [DATA])
    with pytest.raises(BlobStoreError) as caught:
        store.put("a/b", [DATA])
    assert "in the way" in str(caught.value) and caught.value.hint
    assert store.open_range("a") == DATA
    store.put("c/d", [DATA])
    with pytest.raises(BlobStoreError) as caught:
        store.put("c", [DATA])
    assert "in the way" in str(caught.value)
