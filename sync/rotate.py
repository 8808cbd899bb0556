"""`pacs-edge keys rotate`: a new site key, and every pack's data key re-wrapped under it.

Packs and manifests are never touched or re-uploaded: only the small site key
object of each pack version changes (docs/cloud-format.md, "Site key
rotation"). The steps, each safe to interrupt and resumed by running the
command again:

1. Take the site key lock exclusively: the agent and every sync command hold
   it shared, so none of them wraps with the old key while this runs.
2. provisioning.keyring.begin_rotation: the new key becomes `site.key`, the
   old one stays as `site.key.<old id>`. A pending rotation is resumed, not
   started again.
3. For every verified pack row of the index, in id order:
   - if `keys/site-<new id>` exists and opens the manifest, the pack is done;
   - else unwrap the data key from the pack's current site object (with the
     key its id names), wrap it under the new key, put `keys/site-<new id>`,
     read it back and open the manifest with what it unwraps;
   - then delete the pack's other site objects (`keys/site`,
     `keys/site-<old id>`), which only the old key opens.
   A row still `uploading` is skipped: the agent rolls such uploads back and
   makes them again under the new key.
4. Only when every pack is done: retire the old key files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.base.config import Config
from appliance.base.errors import PacsEdgeError
from appliance.store.index import Index
from appliance.store.packs import all_packs
from provisioning.keyring import SiteKeyring, begin_rotation, key_lock, retire_older_keys
from sync.blobstore.base import BlobNotFound, BlobStore
from sync.crashpoints import crash_point
from sync.pack import naming
from sync.pack.data_keys import unwrap_with_site, wrap_for_site
from sync.pack.manifest import manifest_pack_id, open_manifest
from sync.pack.pack_errors import PackIntegrityError
from sync.sitekeys import site_object_names, unwrap_site_object

log = logging.getLogger(__name__)


@dataclass
class RotationReport:
    new_key_id: str
    resumed: bool
    migrated: int = 0
    already_migrated: int = 0
    skipped_uploading: int = 0
    retired: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.failures


async def rotate_site_key(config: Config, store: BlobStore, *,
                          on_progress: Callable[[int, int], None] | None = None
                          ) -> RotationReport:
    """Rotate (or finish rotating) the site key of `config.home`; see the module docstring."""
    with key_lock(config.home, exclusive=True):
        ring, resumed = begin_rotation(config.home)
        crash_point("rotate:after-new-key")
        report = RotationReport(ring.current_id, resumed)
        log.info("site key rotation new_key=%s older=%s resumed=%s", ring.current_id,
                 ",".join(ring.older_ids), resumed)
        async with Index(config.index.path) as index:
            rows = await all_packs(index)
        for done, pack in enumerate(rows, 1):
            if pack.state != "verified":
                report.skipped_uploading += 1
                continue
            try:
                changed = await asyncio.to_thread(_rewrap, store, ring, pack.pack_name,
                                                  pack.manifest_name)
            except PacsEdgeError as exc:
                report.failures.append(f"{pack.pack_name}: {exc.message}")
                log.error("re-wrap failed pack=%s error=%s", pack.pack_name, exc.message)
            else:
                if changed:
                    report.migrated += 1
                else:
                    report.already_migrated += 1
            if on_progress is not None:
                on_progress(done, len(rows))
        if report.complete:
            crash_point("rotate:before-retire")
            report.retired = retire_older_keys(config.home)
            log.info("site key rotation complete key=%s retired=%s", ring.current_id,
                     ",".join(report.retired))
    return report


def _rewrap(store: BlobStore, ring: SiteKeyring, pack_name: str, manifest_name: str) -> bool:
    """Make the pack's site wrap `keys/site-<current id>` and the only one; True if it wrote."""
    parsed = naming.parse_blob_name(pack_name)
    if parsed is None or parsed.kind != "pack":
        raise PackIntegrityError(f"the index names a pack blob this format does not make: "
                                 f"{pack_name!r}")
    legacy = naming.site_key_name(parsed.study_key, parsed.version)
    target = naming.site_key_name(parsed.study_key, parsed.version, ring.current_id)
    sealed = store.open_range(manifest_name)
    pack_id = manifest_pack_id(sealed)
    wrote = False
    try:
        _check_opens(store, target, pack_id, ring.current, sealed)
    except BlobNotFound:
        data_key = unwrap_site_object(store, legacy, pack_id, ring)
        store.put(target, [wrap_for_site(ring.current, pack_id, data_key)])
        crash_point("rotate:after-new-wrap")
        _check_opens(store, target, pack_id, ring.current, sealed)
        wrote = True
    for name in site_object_names(legacy, ring):
        if name != target:
            with contextlib.suppress(BlobNotFound):
                store.delete(name)
    return wrote


def _check_opens(store: BlobStore, name: str, pack_id: bytes, site_key: bytes,
                 sealed: bytes) -> None:
    """Read `name` back, unwrap it with `site_key` alone and open the manifest with it."""
    data_key = unwrap_with_site(site_key, pack_id, store.open_range(name))
    open_manifest(sealed, data_key, expected_pack_id=pack_id)
