"""The site key files across a key rotation, and the lock that keeps a rotation alone.

Files in `<home>/secrets/` (all 0600, 32 raw bytes)::

    site.key          the current site key: every new wrap uses it
    site.key.next     a rotation's new key, before it becomes current
    site.key.<id>     an older site key, kept while wraps made with it remain
                      (<id>: its 16-hex-digit key id, as in key objects)

A rotation (`pacs-edge keys rotate`, driven by sync.rotate) goes:

1. `begin_rotation`: create `site.key.next`; keep the current key as
   `site.key.<id>`; rename `site.key.next` over `site.key`. Each step is
   durable and the sequence can be re-run after a crash at any point: a
   `site.key.next` left behind is finished, never replaced by another key.
2. The caller re-wraps every pack's data key under the new key, reading the
   old wraps with the keys in `SiteKeyring.older`.
3. `retire_older_keys`: remove the `site.key.<id>` files, and with them the
   last copies of the old key on this box.

A rotation is pending while any `site.key.<id>` file exists; readers load
every key of the ring so that packs wrapped under either key stay readable
throughout. `replace_site_secrets` is `init --force-new-keys`: new site key
and name secret outright, for a site that has nothing in the cloud yet.

Each step that changes the current key first makes `<home>/site-key-id.json`
(provisioning.site_key_id) name the key about to become current, so that
serve, which may not read `site.key`, knows its id, and a crash between the
two writes leaves the record ahead of the key, never behind it.
`publish_current_key_id` repairs the record from the keys themselves.

`key_lock(home)` is an advisory lock (flock) on `secrets/site-key.lock`:
every process that uses the cloud takes it shared, a rotation takes it
exclusive, so a rotation never runs beside an agent that still wraps with the
old key.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.base.durable import fsync_dir
from provisioning.provisioning_errors import KeyRotationError, ProvisioningError
from provisioning.site_key_id import key_id, publish_key_id
from provisioning.site_secrets import (
    KEY_BYTES,
    NAMES_KEY,
    SITE_KEY,
    create_secret_file,
    load_secret_file,
    secrets_dir,
)

NEXT_KEY = f"{SITE_KEY}.next"
LOCK_FILE = "site-key.lock"
_OLDER = re.compile(rf"^{re.escape(SITE_KEY)}\.(?P<id>[0-9a-f]{{16}})$")


@dataclass(frozen=True)
class SiteKeyring:
    """The current site key and the older keys a pending rotation still needs."""

    current: bytes
    older: tuple[bytes, ...] = ()

    @property
    def current_id(self) -> str:
        return key_id(self.current)

    @property
    def older_ids(self) -> tuple[str, ...]:
        return tuple(key_id(k) for k in self.older)

    @property
    def rotation_pending(self) -> bool:
        return bool(self.older)


def load_keyring(home: Path) -> SiteKeyring:
    folder = secrets_dir(home)
    current = load_secret_file(folder / SITE_KEY)
    older = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = _OLDER.match(path.name)
        if match is None:
            continue
        key = load_secret_file(path)
        if key_id(key) != match["id"]:
            raise KeyRotationError(f"{path}: holds the key {key_id(key)}, not {match['id']}",
                                   hint="restore the file from escrow; do not rename key files")
        if key != current:
            older.append(key)
    return SiteKeyring(current, tuple(older))


def begin_rotation(home: Path) -> tuple[SiteKeyring, bool]:
    """Make a new site key current, keeping the old one; (ring, resumed) after a crash too.

    With a rotation already pending (older keys present, or a `site.key.next`
    left by a crash) this finishes the swap and returns the ring without
    starting another rotation; `resumed` says so.
    """
    folder = secrets_dir(home)
    next_path = folder / NEXT_KEY
    resumed = next_path.exists() or load_keyring(home).rotation_pending
    if not resumed:
        create_secret_file(next_path, secrets.token_bytes(KEY_BYTES))
    if next_path.exists():
        new = load_secret_file(next_path)
        current = load_secret_file(folder / SITE_KEY)
        publish_key_id(home, key_id(new))  # before the rename makes it current
        if current != new:
            create_secret_file(folder / f"{SITE_KEY}.{key_id(current)}", current)
            os.replace(next_path, folder / SITE_KEY)
        else:  # crashed after the rename, before the next file was gone
            next_path.unlink()
        fsync_dir(folder)
    ring = load_keyring(home)
    publish_key_id(home, ring.current_id)  # a rotation begun before the record existed
    return ring, resumed


def retire_older_keys(home: Path) -> list[str]:
    """Remove every older site key file; return their key ids. Call when no wrap needs them."""
    folder = secrets_dir(home)
    retired = []
    for path in sorted(folder.iterdir()):
        match = _OLDER.match(path.name)
        if match is not None:
            path.unlink()
            retired.append(match["id"])
    fsync_dir(folder)
    return retired


def replace_site_secrets(home: Path) -> list[Path]:
    """New site key and name secret in place of the old ones (`init --force-new-keys`).

    The caller must have checked that nothing in the cloud depends on the old
    ones; a pending rotation is refused here. A home without a site key yet has
    nothing to replace: init creates both next.
    """
    if not (secrets_dir(home) / SITE_KEY).exists():
        return []
    if load_keyring(home).rotation_pending or (secrets_dir(home) / NEXT_KEY).exists():
        raise KeyRotationError("a site key rotation is pending",
                               hint="finish it with `pacs-edge keys rotate` first")
    folder = secrets_dir(home)
    replaced = []
    for name in (SITE_KEY, NAMES_KEY):
        path = folder / name
        tmp = folder / f".{name}.new"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        key = secrets.token_bytes(KEY_BYTES)
        create_secret_file(tmp, key)
        if name == SITE_KEY:
            publish_key_id(home, key_id(key))  # before the replace makes it current
        os.replace(tmp, path)
        replaced.append(path)
    fsync_dir(folder)
    return replaced


def publish_current_key_id(home: Path) -> None:
    """Make the public id record name the current site key, if this process can read it.

    For an upgraded box (no record yet) and after a crash in a key change.
    Under the shared key lock, so never beside a rotation, which writes the
    record itself in the order that keeps it safe; skipped while one runs.
    Never raises: the record is a convenience for serve, not the key's truth."""
    with contextlib.suppress(ProvisioningError, OSError), key_lock(home, exclusive=False):
        publish_key_id(home, load_keyring(home).current_id)


@contextlib.contextmanager
def key_lock(home: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold the site key lock; KeyRotationError at once when the other kind holds it."""
    folder = secrets_dir(home)
    if not folder.is_dir():
        yield  # no secrets yet: nothing to protect (the caller fails on the missing key)
        return
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            if exclusive:
                raise KeyRotationError(
                    "the sync agent (or a sync, evict or recall command) is using the site key",
                    hint="stop it first: `systemctl stop pacs-edge-sync`, then run "
                    "`pacs-edge keys rotate` again") from None
            raise KeyRotationError(
                "a site key rotation is running (`pacs-edge keys rotate`)",
                hint="wait until it finishes; the agent can start again then") from None
        yield
    finally:
        os.close(fd)
