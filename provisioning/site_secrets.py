"""Site secrets: the site key and the name secret, as 0600 files in `<home>/secrets/`.

    site.key    32 random bytes. Wraps every pack's data key. Losing it loses
                the cloud copy: escrow it (`pacs-edge keys escrow`).
    names.key   32 random bytes. HMAC key for blob names, so names cannot be
                linked to a study without it.

Both are raw bytes (not text) and are never overwritten once created: a
second `init` keeps them, because a new site key would orphan every pack
already in the cloud. A file is written under a temporary name, fsynced, then
hard-linked to its final name (link fails if the name exists) and the folder
fsynced: a crash leaves either no key or a whole key, never a short one.
A new site key's public id is published (provisioning.site_key_id) before
the key is, and `init` publishes the id of a key made before that record
existed (a box upgraded from an older version).

Loading refuses a file that the group or others can access (mode & 0o077),
or that is not a regular file of exactly 32 bytes, with a hint the operator
can follow. This layer imports only the base floor (appliance.base).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from appliance.base.durable import fsync_dir, write_file
from provisioning.provisioning_errors import KeyFileError
from provisioning.site_key_id import key_id, publish_key_id

SECRETS_DIR = "secrets"
SITE_KEY = "site.key"
NAMES_KEY = "names.key"
READER_KEY = "reader.key"  # a remote reader's X25519 private key (raw 32 bytes)
KEY_BYTES = 32


def secrets_dir(home: Path) -> Path:
    return Path(home) / SECRETS_DIR


def create_site_secrets(home: Path) -> list[Path]:
    """Create `site.key` and `names.key` if missing; return the files created.

    Also makes `<home>/site-key-id.json` name the site key (not in the list:
    it is derived, public and rewritten at will)."""
    folder = _ensure_secrets_dir(home)
    site = folder / SITE_KEY
    created = []
    if not site.exists():
        key = secrets.token_bytes(KEY_BYTES)
        publish_key_id(home, key_id(key))  # named before it is the key (site_key_id)
        if create_secret_file(site, key):
            created.append(site)
        else:  # a concurrent init made the key: name its key, not ours
            publish_key_id(home, key_id(load_secret_file(site)))
    else:
        # A key older than the record: publish its id, but never over an existing
        # record, which a rotation running meanwhile may have just written.
        with contextlib.suppress(KeyFileError):  # the key's own readers report it
            publish_key_id(home, key_id(load_secret_file(site)), replace=False)
    if create_secret_file(folder / NAMES_KEY, secrets.token_bytes(KEY_BYTES)):
        created.append(folder / NAMES_KEY)
    return created


def create_reader_key(home: Path) -> bool:
    """Create a remote reader's private key (`reader.key`) if missing.

    Any 32 random bytes are a valid X25519 private key (the algorithm clamps them).
    """
    folder = _ensure_secrets_dir(home)
    return create_secret_file(folder / READER_KEY, secrets.token_bytes(KEY_BYTES))


def create_secret_file(path: Path, data: bytes) -> bool:
    """Write `data` to `path` with mode 0600, durably; False (and no change) if it exists."""
    return write_file(Path(path), data, 0o600)


def load_site_key(home: Path) -> bytes:
    return load_secret_file(secrets_dir(home) / SITE_KEY)


def load_name_secret(home: Path) -> bytes:
    return load_secret_file(secrets_dir(home) / NAMES_KEY)


def load_reader_key(home: Path) -> bytes:
    return load_secret_file(secrets_dir(home) / READER_KEY)


def load_secret_file(path: Path, *, length: int = KEY_BYTES) -> bytes:
    """Read a secret file, refusing one that others can read or that is malformed.

    The checks run on the opened file (fstat), so a swap between check and
    read cannot slip past them.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise KeyFileError(path, "secret file is missing",
                           hint="run `pacs-edge init` to create the site secrets, or "
                           "`pacs-edge keys recover` to restore them from escrow") from None
    except PermissionError:
        raise KeyFileError(path, "secret file cannot be read by this user",
                           hint=f"run as the service user, or `chown` {path} to it") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(path, "secret file is not a regular file",
                               hint="replace it with the 0600 key file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise KeyFileError(path, f"secret file has mode {mode:04o}: group or others "
                               "can access it",
                               hint=f"chmod 600 {path} (and consider the key exposed "
                               "if others could read it)")
        data = fh.read(length + 1)
    if len(data) != length:
        raise KeyFileError(path, f"secret file holds {len(data)} bytes, expected "
                           f"{length}", hint="restore the file from escrow; do not edit it")
    return data


def _ensure_secrets_dir(home: Path) -> Path:
    folder = secrets_dir(home)
    if not folder.is_dir():
        Path(home).mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        fsync_dir(Path(home))
    return folder


