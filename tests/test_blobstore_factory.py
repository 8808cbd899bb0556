"""open_blob_store: URLs to backends, credentials from a 0600 file or the environment."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from appliance.base.errors import ConfigError
from sync.blobstore.azure import AzureBlobStore
from sync.blobstore.base import BlobStoreUnavailable, Tier
from sync.blobstore.factory import CONNECTION_STRING_ENV, CredentialsError, open_blob_store
from sync.blobstore.local import LocalFolderStore
from sync.blobstore.retry import RetryingBlobStore


def container() -> str:
    return f"factory-{uuid.uuid4().hex[:12]}"


def test_a_file_url_opens_a_local_folder_with_retries(tmp_path: Path) -> None:
    store = open_blob_store((tmp_path / "cloud dir").as_uri())  # percent-encoded space
    assert isinstance(store, RetryingBlobStore)
    assert isinstance(store.inner, LocalFolderStore)
    assert store.inner.root == tmp_path / "cloud dir"
    store.put("x", [b"1"])
    assert (tmp_path / "cloud dir" / "x").read_bytes() == b"1"


def test_a_file_url_can_slow_down_rehydration_for_tests(tmp_path: Path) -> None:
    store = open_blob_store(tmp_path.as_uri(), rehydrate_delay=60)
    store.put("x", [b"1"])
    store.set_tier("x", Tier.ARCHIVE)
    store.request_online("x")
    assert store.stat("x").online is False


@pytest.mark.parametrize("url", [
    "", "/abs/path", "s3://bucket", "file:relative", "file://host/path", "file://./rel",
    "azure://", "azure://Upper", "azure://a", "azure://double--dash", "azure://ok-name/sub",
    "azure:///ok-name",
])
def test_a_bad_url_names_itself_and_what_is_valid(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        open_blob_store(url)
    message = str(caught.value)
    assert repr(url) in message and "cloud.url" in message
    assert "file:///ABSOLUTE/PATH" in message and "azure://CONTAINER" in message


def test_a_url_with_a_query_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as caught:
        open_blob_store("azure://packs?sv=2024&sig=SECRETSIGNATURE")
    assert "SECRETSIGNATURE" not in str(caught.value)
    assert "'azure://packs'" in str(caught.value)


def test_azure_without_any_connection_string_says_where_to_put_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONNECTION_STRING_ENV, raising=False)
    with pytest.raises(CredentialsError) as caught:
        open_blob_store("azure://packs")
    assert caught.value.hint and CONNECTION_STRING_ENV in caught.value.hint
    assert "credentials_file" in caught.value.hint


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_a_credentials_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    secret = tmp_path / "azure.conn"
    secret.write_text("AccountKey=SHOULDNOTLEAK")
    secret.chmod(mode)
    with pytest.raises(CredentialsError) as caught:
        open_blob_store("azure://packs", credentials_file=secret)
    text = str(caught.value) + (caught.value.hint or "")
    assert f"{mode:04o}" in text and f"chmod 600 {secret}" in text
    assert "SHOULDNOTLEAK" not in text


def test_a_missing_or_empty_credentials_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="cannot read"):
        open_blob_store("azure://packs", credentials_file=tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(CredentialsError, match="empty"):
        open_blob_store("azure://packs", credentials_file=empty)


def test_a_malformed_connection_string_is_refused_without_echoing_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONNECTION_STRING_ENV, "not-a-connection-string-SECRET")
    with pytest.raises(BlobStoreUnavailable) as caught:
        open_blob_store("azure://packs")
    assert "SECRET" not in str(caught.value) + (caught.value.hint or "")


def test_azure_from_a_0600_credentials_file(tmp_path: Path, azurite: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONNECTION_STRING_ENV, "garbage: the named file wins")
    secret = tmp_path / "azure.conn"
    secret.write_text(azurite + "\n")
    secret.chmod(0o600)
    name = container()
    store = open_blob_store(f"azure://{name}", credentials_file=secret)
    assert isinstance(store, RetryingBlobStore) and isinstance(store.inner, AzureBlobStore)
    assert store.inner.retry is store.policy  # one policy: the wrapper's and each Put Block's
    assert store.url == f"azure://{name}"
    store.put("p/1", [b"abc"])
    assert store.open_range("p/1") == b"abc"
    store.close()


def test_azure_from_the_environment(azurite: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONNECTION_STRING_ENV, azurite)
    store = open_blob_store(f"azure://{container()}/")
    store.put("p/1", [b"abc"])
    assert [info.name for info in store.list()] == ["p/1"]
    store.close()
