"""Site key objects under a key ring, and the site key lock, as the sync side sees them.

A pack's data key is wrapped for the site in one key object (docs/cloud-format.md,
"Key objects" and "Site key rotation"):

    v<NNNNNN>.keys/site          as uploaded, wrapped with the site key of that day
    v<NNNNNN>.keys/site-<kid>    written by a key rotation, wrapped with key <kid>

Blobs are immutable, so a rotation never rewrites `keys/site`: it writes the
new name, checks it, then deletes the old object. `unwrap_site_object` looks
for `keys/site` first (what every pack has until its first rotation), then
for the rotated names of each key in the ring, and unwraps the first whose
key id names a key of the ring with that key. So any pack stays readable at
every step of a rotation, even one interrupted half way.

`cloud_versions` is what a rotation walks: every study version the cloud
holds, from one listing of `studies/`, with its site key objects. The index
alone is not enough: after an index rebuilt by `fsck --repair` the cloud
keeps versions the index does not know (sync.replicate uploads above them),
and `restore` into a new data home reads them with the site key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from provisioning.keyring import SiteKeyring, key_lock
from sync.blobstore.base import BlobNotFound, BlobStore
from sync.pack import naming
from sync.pack.data_keys import parse_key_object, unwrap_with_site
from sync.pack.pack_errors import WrongKeyError


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
    """The data key of a pack from its site key object, under whichever ring key wrapped it.

    An object that names a key the ring lacks is passed over for the next name: a
    rotation keeps `keys/site` of the old key beside `keys/site-<new id>` until the new
    key is escrowed, and a box recovered from that escrow holds the new key alone."""
    keys = {ring.current_id: ring.current, **dict(zip(ring.older_ids, ring.older, strict=True))}
    foreign: bytes | None = None
    for name in site_object_names(key_name, ring):
        try:
            wrapped = store.open_range(name)
        except BlobNotFound:
            continue
        wrapped_with = parse_key_object(wrapped).site_key_id
        key = keys.get(wrapped_with.hex() if wrapped_with else "")
        if key is None:
            foreign = foreign or wrapped
            continue
        return unwrap_with_site(key, pack_id, wrapped)
    if foreign is not None:  # the current key's unwrap reports "wrapped with site key X"
        return unwrap_with_site(ring.current, pack_id, foreign)
    _refuse_foreign_wraps(store, key_name)
    raise BlobNotFound("open", key_name, "no site key object for this pack version",
                       hint="the cloud copy of this version is incomplete and cannot be "
                       "decrypted; replicate the study again from a local copy if one exists")


def _refuse_foreign_wraps(store: BlobStore, key_name: str) -> None:
    """WrongKeyError when the version has site objects only of keys the ring lacks.

    The usual cause is a box recovered from an escrow made before a `keys rotate`:
    its ring names none of the rotated objects, and "no site key object" would send
    the operator after a damaged cloud copy instead of the newer escrow file."""
    kids = sorted(info.name.rsplit("-", 1)[1] for info in store.list(f"{key_name}-"))
    if kids:
        raise WrongKeyError(
            f"wrapped only with site key(s) {', '.join(kids)}, which this box does not hold"
            " (an escrow made before a `pacs-edge keys rotate`?)",
            hint="recover from the escrow file made after the site's latest key rotation:"
                 " an older one no longer opens any pack")


@dataclass
class CloudVersion:
    """One study version as the cloud's listing shows it."""

    study_key: str
    version: int
    has_manifest: bool = False
    # its site key objects: name -> the key id a rotated name carries ('' for `keys/site`)
    site_objects: dict[str, str] = field(default_factory=dict)

    @property
    def pack_name(self) -> str:
        return naming.pack_name(self.study_key, self.version)

    @property
    def manifest_name(self) -> str:
        return naming.manifest_name(self.study_key, self.version)


def cloud_versions(store: BlobStore) -> list[CloudVersion]:
    """Every study version the cloud names (one listing of `studies/`), in name order;
    names this format does not make are ignored."""
    found: dict[tuple[str, int], CloudVersion] = {}
    for info in store.list(naming.STUDIES_PREFIX):
        parsed = naming.parse_blob_name(info.name)
        if parsed is None:
            continue
        version = found.setdefault((parsed.study_key, parsed.version),
                                   CloudVersion(parsed.study_key, parsed.version))
        if parsed.kind == "manifest":
            version.has_manifest = True
        elif parsed.kind == "site-key":
            version.site_objects[info.name] = parsed.site_key_id or ""
    return [found[key] for key in sorted(found)]
