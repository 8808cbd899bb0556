"""Open the blob store that a `[cloud] url` names, with retries composed on top.

    file:///ABSOLUTE/PATH   LocalFolderStore (the default; the folder may be a NAS mount)
    azure://CONTAINER       AzureBlobStore in that container

This is the one place where wrappers are composed (STYLE: "One interface per
seam"): every store the agent uses comes out of here wrapped in
RetryingBlobStore. Its RetryPolicy is also handed to the Azure backend, which
tries each request of a put (one Put Block, the commit) under it: the wrapper
cannot send a one-shot stream twice (sync.blobstore.retry).

Azure credentials never come from the config text. They come from, in order:
1. `credentials_file`, when the config names one: a file holding the
   connection string, which must not be readable or writable by group or
   others (0600 or stricter), else it is refused before it is read;
2. the `AZURE_STORAGE_CONNECTION_STRING` environment variable (the SDK's
   standard name; under systemd, an EnvironmentFile= or LoadCredential=).
The Azure SDK is imported only for azure:// URLs, so the embedded default
never pays for it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from urllib.parse import unquote, urlsplit

from appliance.base.errors import ConfigError
from sync.blobstore.base import BlobStore, BlobStoreError
from sync.blobstore.local import LocalFolderStore
from sync.blobstore.retry import RetryingBlobStore, RetryPolicy

URL_KEY = "cloud.url"
CONNECTION_STRING_ENV = "AZURE_STORAGE_CONNECTION_STRING"
EXPECTED = ("file:///ABSOLUTE/PATH (a local or mounted folder) or azure://CONTAINER "
            "(3-63 characters of [a-z0-9-])")


class CredentialsError(BlobStoreError):
    """No usable Azure connection string: missing, empty, or in a file others can read."""

    def __init__(self, message: str, *, hint: str, source: str) -> None:
        super().__init__("open", source, message, hint=hint)


def open_blob_store(url: str, *, credentials_file: Path | None = None,
                    rehydrate_delay: float = 0.0) -> BlobStore:
    """The store for `url`, wrapped with retries; ConfigError names a bad URL.

    `rehydrate_delay` (seconds, file:// only) makes leaving the Archive tier take
    that long in the local folder, so that tests of the agent (run as a real
    process) can watch a recall wait for rehydration; Azure sets its own pace.
    """
    policy = RetryPolicy()
    parts = urlsplit(url)
    # Show the URL without query or fragment: a pasted SAS token must not reach a log.
    shown = url.split("?", 1)[0].split("#", 1)[0]
    if parts.query or parts.fragment:
        raise ConfigError(URL_KEY, shown, f"{EXPECTED}, without '?' or '#' parts")
    if parts.scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise ConfigError(URL_KEY, shown, f"{EXPECTED}; a file URL needs an absolute "
                              "path and no host (three slashes)")
        store: BlobStore = LocalFolderStore(Path(path), rehydrate_delay=rehydrate_delay)
    elif parts.scheme == "azure":
        from sync.blobstore.azure import CONTAINER_NAME, AzureBlobStore

        if not CONTAINER_NAME.fullmatch(parts.netloc) or parts.path not in ("", "/"):
            raise ConfigError(URL_KEY, shown, EXPECTED)
        store = AzureBlobStore(parts.netloc, connection_string(credentials_file, url=shown),
                               retry=policy)
    else:
        raise ConfigError(URL_KEY, shown, EXPECTED)
    return RetryingBlobStore(store, policy)


def connection_string(credentials_file: Path | None, *, url: str = "azure") -> str:
    """The Azure connection string from the 0600 file, else from the environment."""
    if credentials_file is not None:
        return _read_private(Path(credentials_file))
    value = os.environ.get(CONNECTION_STRING_ENV, "").strip()
    if not value:
        raise CredentialsError(
            "no Azure connection string", source=url,
            hint=f"set {CONNECTION_STRING_ENV} (for the sync agent, or for this command), or"
            " put the connection string in a file (chmod 600) and name it in [cloud]"
            " credentials_file")
    return value


def _read_private(path: Path) -> str:
    try:
        st = path.stat()
    except OSError as exc:
        raise CredentialsError(f"cannot read the credentials file: {exc.strerror}",
                               source=str(path),
                               hint="create it (chmod 600) or fix [cloud] credentials_file"
                               ) from exc
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise CredentialsError(
            f"the credentials file is accessible by group or others (mode {mode:04o})",
            source=str(path), hint=f"chmod 600 {path}")
    if not stat.S_ISREG(st.st_mode):
        raise CredentialsError("the credentials file is not a regular file", source=str(path),
                               hint="point [cloud] credentials_file at a file")
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialsError(f"cannot read the credentials file: {exc}", source=str(path),
                               hint="make it a UTF-8 text file readable by the agent's user"
                               ) from exc
    if not value:
        raise CredentialsError("the credentials file is empty", source=str(path),
                               hint="write the storage account's connection string into it")
    return value
