"""Site key objects under a key ring, and the site key lock, as the sync side sees them.

A pack's data key is wrapped for the site in one key object (docs/cloud-format.md,
"Key objects" and "Site key rotation"):

    v<NNNNNN>.keys/site          as uploaded, wrapped with the site key of that day
    v<NNNNNN>.keys/site-<kid>    written by a key rotation, wrapped with key <kid>

Blobs are immutable, so a rotation never rewrites `keys/site`: it writes the
new name, checks it, then deletes the old object. `unwrap_site_object` looks
for `keys/site` first (what every pack has until its first rotation), then
for the rotated names of each key in the ring, and unwraps with the key whose
id the object names. So any pack stays readable at every step of a rotation,
even one interrupted half way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from provisioning.keyring import SiteKeyring, key_lock
from sync.blobstore.base import BlobNotFound, BlobStore
from sync.pack.data_keys import parse_key_object, unwrap_with_site


@contextlib.contextmanager
def site_keys_in_use(home: Path) -> Iterator[None]:
    """Hold the site key lock shared (a rotation cannot start meanwhile).

    Fails at once (KeyRotationError) while a rotation runs.
    """
    with key_lock(home, exclusive=False):
        yield


def site_object_names(key_name: str, ring: SiteKeyring) -> list[str]:
    """Where a pack's site wrap may be, most likely first (`key_name`: its `keys/site`)."""
    return [key_name, *(f"{key_name}-{kid}" for kid in (ring.current_id, *ring.older_ids))]


def unwrap_site_object(store: BlobStore, key_name: str, pack_id: bytes,
                       ring: SiteKeyring) -> bytes:
    """The data key of a pack from its site key object, under whichever ring key wrapped it."""
    keys = {ring.current_id: ring.current, **dict(zip(ring.older_ids, ring.older, strict=True))}
    for name in site_object_names(key_name, ring):
        try:
            wrapped = store.open_range(name)
        except BlobNotFound:
            continue
        wrapped_with = parse_key_object(wrapped).site_key_id
        # An unknown key id falls through to the current key, whose unwrap
        # reports "wrapped with site key X" with a hint.
        key = keys.get(wrapped_with.hex() if wrapped_with else "", ring.current)
        return unwrap_with_site(key, pack_id, wrapped)
    raise BlobNotFound("open", key_name, "no site key object for this pack version",
                       hint="the cloud copy of this version is incomplete and cannot be "
                       "decrypted; replicate the study again from a local copy if one exists")
