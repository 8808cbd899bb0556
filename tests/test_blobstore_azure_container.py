"""Who creates the Azure container: only a put. Reads leave the storage account as it was.

A reader, a restore or a sync job pointed at a mistyped azure:// container must not
create an empty container in the customer's storage account (and then report an
empty cloud from it). A missing container reads as an empty one: list yields
nothing, a read of a blob raises BlobNotFound. A store that cannot be reached, or
refuses the credentials, is still BlobStoreUnavailable from any operation: the
missing container is recognised by Azure's error code, not guessed from a failure.
All against a real Azurite; whether a container exists is asked through
azure-storage-blob directly, not through the store under test.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import dcmtk
import pytest
from azure.storage.blob import BlobServiceClient
from azurite import connection_string
from conftest import run_pacs_edge

from sync.blobstore.azure import AzureBlobStore
from sync.blobstore.base import (
    BlobNotFound,
    BlobStore,
    BlobStoreError,
    BlobStoreUnavailable,
    Tier,
    TransientBlobError,
)
from sync.blobstore.factory import CONNECTION_STRING_ENV, open_blob_store
from sync.reader_client import init_reader

TEXT = b"first blob"


def fresh_container() -> str:
    return f"typo-{uuid.uuid4().hex[:16]}"


def container_exists(connection: str, container: str) -> bool:
    with BlobServiceClient.from_connection_string(connection) as service:
        return bool(service.get_container_client(container).exists())


def reads(store: BlobStore) -> dict[str, Callable[[], object]]:
    """Every operation but put, each on the blob "packs/x" (list: all of its blobs)."""
    return {
        "list": lambda: list(store.list()),
        "stat": lambda: store.stat("packs/x"),
        "open_range": lambda: store.open_range("packs/x", 0, 4),
        "iter_chunks": lambda: list(store.iter_chunks("packs/x")),
        "delete": lambda: store.delete("packs/x"),
        "set_tier": lambda: store.set_tier("packs/x", Tier.COOL),
        "request_online": lambda: store.request_online("packs/x"),
    }


@pytest.fixture
def typo_store(azurite: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[BlobStore]:
    """A store on a container that does not exist, opened as the CLI and agent open it."""
    monkeypatch.setenv(CONNECTION_STRING_ENV, azurite)
    store = open_blob_store(f"azure://{fresh_container()}")
    yield store
    store.close()


def test_reading_a_missing_container_does_not_create_it(azurite: str,
                                                        typo_store: BlobStore) -> None:
    container = typo_store.url.removeprefix("azure://")
    assert list(typo_store.list()) == []
    assert list(typo_store.list("studies/")) == []
    raised: dict[str, BlobStoreError] = {}
    for operation, call in reads(typo_store).items():
        if operation != "list":
            with pytest.raises(BlobStoreError) as caught:
                call()
            raised[operation] = caught.value
    with pytest.raises(BlobNotFound):
        typo_store.open_range("packs/x", 0, 0)  # the empty range asks for properties only
    assert not container_exists(azurite, container)
    for operation, error in raised.items():  # each as the contract says for a missing blob
        assert isinstance(error, BlobNotFound), error
        assert (error.operation, error.name) == (operation, "packs/x")
        assert "container does not exist" in str(error)
        assert error.hint and "mistyped" in error.hint
        assert "AccountKey" not in str(error) + error.hint


def test_the_first_put_creates_the_container(azurite: str, typo_store: BlobStore) -> None:
    container = typo_store.url.removeprefix("azure://")
    assert list(typo_store.list()) == []  # a fresh box lists before its first upload
    with pytest.raises(BlobNotFound):
        typo_store.stat("packs/x")  # and the agent's start-up check HEADs packs
    assert not container_exists(azurite, container)
    info = typo_store.put("packs/x", [TEXT])
    assert container_exists(azurite, container)
    assert list(typo_store.list()) == [info]
    assert typo_store.open_range("packs/x") == TEXT
    # Another process (a fresh store) reads what the first put wrote.
    other = AzureBlobStore(container, azurite)
    try:
        assert other.stat("packs/x") == info
    finally:
        other.close()


def test_a_container_deleted_under_a_running_store_is_not_recreated(
        azurite: str, typo_store: BlobStore) -> None:
    container = typo_store.url.removeprefix("azure://")
    typo_store.put("packs/x", [TEXT])
    with BlobServiceClient.from_connection_string(azurite) as service:
        service.delete_container(container)
    assert list(typo_store.list()) == []
    with pytest.raises(BlobNotFound):
        typo_store.stat("packs/x")
    with pytest.raises(BlobStoreUnavailable) as caught:
        typo_store.put("packs/y", [TEXT])
    assert not isinstance(caught.value, TransientBlobError)  # not retried: an answer
    assert "deleted" in str(caught.value) + (caught.value.hint or "")
    assert not container_exists(azurite, container)


def test_an_unreachable_endpoint_fails_every_operation_as_unavailable() -> None:
    """What the first-use container creation used to check: a dead endpoint is a
    BlobStoreUnavailable from the first request of any operation, never an empty list
    or a missing blob."""
    dead = connection_string(dcmtk.free_port())  # nothing listens there
    store = AzureBlobStore(fresh_container(), dead, connection_timeout=2)
    try:
        calls = {**reads(store), "put": lambda: store.put("packs/x", [TEXT])}
        for operation, call in calls.items():
            with pytest.raises(TransientBlobError) as caught:
                call()
            assert caught.value.operation == operation
            assert "AccountKey" not in str(caught.value) + (caught.value.hint or "")
    finally:
        store.close()


def test_wrong_credentials_are_refused_not_read_as_a_missing_container(azurite: str) -> None:
    bad = azurite.replace("AccountKey=Eby8", "AccountKey=Xby8")
    store = AzureBlobStore(fresh_container(), bad)
    try:
        for operation, call in {**reads(store), "put": lambda: store.put("x", [TEXT])}.items():
            with pytest.raises(BlobStoreUnavailable) as caught:
                call()
            assert caught.value.operation == operation
            assert "403" in str(caught.value)
            assert "Xby8" not in str(caught.value) + (caught.value.hint or "")
    finally:
        store.close()


def test_a_reader_of_a_mistyped_container_creates_nothing_and_says_so(
        azurite: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONNECTION_STRING_ENV, azurite)  # the CLI's environment
    home = tmp_path / "reader"
    container = fresh_container()
    init_reader(home, f"azure://{container}")  # in-process: `reader init` reads no cloud
    result = run_pacs_edge("reader", "list", "--home", str(home))
    assert "the cloud holds no studies at all" in result.stderr
    assert "a mistyped container or folder looks empty" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr and "AccountKey" not in result.stderr
    assert not container_exists(azurite, container)
