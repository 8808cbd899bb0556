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
3. For every study version the cloud holds (one listing of `studies/`, in
   name order: sync.sitekeys.cloud_versions), then for every verified pack
   row of the index the listing does not show:
   - if `keys/site-<new id>` exists and opens the manifest, the pack is done;
   - else unwrap the data key from the pack's current site object (with the
     key its id names), wrap it under the new key, put `keys/site-<new id>`,
     read it back and open the manifest with what it unwraps.
   The listing, not the index, says what the old key still opens: after an
   index rebuilt by `fsck --repair` the cloud keeps versions the index does
   not know, which `restore` reads. A version whose pack row is still
   `uploading` is skipped: the agent rolls such uploads back and makes them
   again under the new key. A version the index does not know is left alone
   when it has no site object of an older key (retiring that key changes
   nothing for it), and is a failure when it has one but no manifest to check
   a new wrap against; any version whose site objects all name keys the box
   does not hold is a failure too.
4. Only when every version has its new wrap, and unless the site's escrow
   holds an older key (below): delete every version's other site objects
   (`keys/site`, `keys/site-<old id>`), then retire the old key files.

The escrow is the site's way back when the box is lost, and `keys escrow` can
hold only the current key. So while the escrow record (provisioning.escrow_state)
names an older key of the ring, nothing the old key opens is deleted: the old
escrow keeps opening every pack until the new key is escrowed (`keys escrow`,
allowed while a rotation is pending), and the next run finishes. Deleting per
version, as the first design did, left packs that only the new, not yet
escrowable key opened: a box lost then lost them. A site that never escrowed
has no such escrow to keep working, and finishes in one run.

A store that stops answering (BlobStoreUnavailable: the blob store's retries are
spent) stops the walk at that version, reported with the count not tried: every
further version would wait out the same retries, hours over a large container,
and running the command again resumes anyway.
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
from provisioning.escrow_state import escrow_status
from provisioning.keyring import SiteKeyring, begin_rotation, key_lock, retire_older_keys
from sync.blobstore.base import BlobNotFound, BlobStore, BlobStoreUnavailable
from sync.crashpoints import crash_point
from sync.pack import naming
from sync.pack.data_keys import unwrap_with_site, wrap_for_site
from sync.pack.manifest import manifest_pack_id, open_manifest
from sync.pack.pack_errors import PackIntegrityError, WrongKeyError
from sync.sitekeys import CloudVersion, cloud_versions, site_object_names, unwrap_site_object

log = logging.getLogger(__name__)


@dataclass
class RotationReport:
    new_key_id: str
    resumed: bool
    migrated: int = 0
    already_migrated: int = 0
    skipped_uploading: int = 0
    unknown_to_index: int = 0  # of migrated + already_migrated: versions only the cloud knew
    left_alone: int = 0        # versions only the cloud knew, with no wrap of an older key
    awaiting_escrow: str = ""  # the older key id the escrow holds: old wraps kept for it
    retired: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.failures

    @property
    def finished(self) -> bool:
        """Every pack re-wrapped, the old wraps deleted and the old key retired."""
        return self.complete and not self.awaiting_escrow


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
        uploading = {p.pack_name for p in rows if p.state != "verified"}
        report.skipped_uploading = len(uploading)
        indexed = {p.pack_name: p.manifest_name for p in rows if p.state == "verified"}
        listed = [v for v in await asyncio.to_thread(cloud_versions, store)
                  if v.pack_name not in uploading]
        shown = {v.pack_name for v in listed}
        work: list[tuple[str, str, CloudVersion | None]] = [
            (v.pack_name, indexed.get(v.pack_name, v.manifest_name), v) for v in listed]
        work += [(name, manifest, None) for name, manifest in indexed.items()
                 if name not in shown]  # gone from the cloud: _rewrap reports it
        rewrapped: list[str] = []  # pack names whose old site objects go at the end
        for done, (pack_name, manifest_name, version) in enumerate(work, 1):
            known = pack_name in indexed
            try:
                changed = await asyncio.to_thread(_rewrap_version, store, ring, pack_name,
                                                  manifest_name, version, known=known)
            except BlobStoreUnavailable as exc:  # the retries are spent: so would the rest be
                report.failures.append(f"{pack_name}: {exc.message}; stopped there, "
                                       f"{len(work) - done} version(s) not tried")
                log.error("re-wrap stopped pack=%s error=%s", pack_name, exc.message)
                break
            except PacsEdgeError as exc:
                report.failures.append(f"{pack_name}: {exc.message}")
                log.error("re-wrap failed pack=%s error=%s", pack_name, exc.message)
            else:
                if changed is None:
                    report.left_alone += 1
                else:
                    rewrapped.append(pack_name)
                    if changed:
                        report.migrated += 1
                    else:
                        report.already_migrated += 1
                    if not known:
                        report.unknown_to_index += 1
            if on_progress is not None:
                on_progress(done, len(work))
        if report.unknown_to_index or report.left_alone:
            log.warning("site key rotation found versions in the cloud the index does not"
                        " know re_wrapped=%d left_alone=%d", report.unknown_to_index,
                        report.left_alone)
        if report.complete:
            report.awaiting_escrow = _escrow_of_an_older_key(config, ring)
        if report.finished:
            await asyncio.to_thread(_delete_old_wraps, store, ring, rewrapped, report)
        if report.finished:
            crash_point("rotate:before-retire")
            report.retired = retire_older_keys(config.home)
            log.info("site key rotation complete key=%s retired=%s", ring.current_id,
                     ",".join(report.retired))
        elif report.awaiting_escrow:
            log.warning("site key rotation waits for an escrow of key=%s; the escrowed key=%s"
                        " and its wraps are kept", ring.current_id, report.awaiting_escrow)
    return report


def _escrow_of_an_older_key(config: Config, ring: SiteKeyring) -> str:
    """The id of the older ring key the site's escrow holds ('' when none does): its wraps
    must stay until the current key is escrowed, or a box lost meanwhile loses packs."""
    escrowed = escrow_status(config.home).escrowed_key_id
    return escrowed if escrowed in ring.older_ids else ""


def _delete_old_wraps(store: BlobStore, ring: SiteKeyring, pack_names: list[str],
                      report: RotationReport) -> None:
    """Delete every site object but `keys/site-<current id>` of each re-wrapped pack."""
    for pack_name in pack_names:
        parsed = naming.parse_blob_name(pack_name)
        assert parsed is not None  # _rewrap checked it
        legacy = naming.site_key_name(parsed.study_key, parsed.version)
        target = naming.site_key_name(parsed.study_key, parsed.version, ring.current_id)
        try:
            for name in site_object_names(legacy, ring):
                if name != target:
                    with contextlib.suppress(BlobNotFound):
                        store.delete(name)
                        crash_point("rotate:after-old-wrap-deleted")
        except BlobStoreUnavailable as exc:
            report.failures.append(f"{pack_name}: deleting its old site key object: "
                                   f"{exc.message}; stopped there")
            log.error("old wrap deletion stopped pack=%s error=%s", pack_name, exc.message)
            return
        except PacsEdgeError as exc:
            report.failures.append(f"{pack_name}: deleting its old site key object: "
                                   f"{exc.message}")
            log.error("old wrap deletion failed pack=%s error=%s", pack_name, exc.message)


def _rewrap_version(store: BlobStore, ring: SiteKeyring, pack_name: str, manifest_name: str,
                    version: CloudVersion | None, *, known: bool) -> bool | None:
    """`_rewrap` after the checks the listing allows (module docstring, step 3); None when
    a version the index does not know is left alone (no site object of an older key)."""
    if version is not None and not known:
        if not version.site_objects:
            return None
        if not version.has_manifest:
            if set(version.site_objects.values()) == {ring.current_id}:
                return None
            raise BlobNotFound(
                "open", manifest_name, "a site key object of an older key but no manifest:"
                " a new wrap cannot be checked, so the old key is kept",
                hint="restore the manifest from the storage account's soft delete or"
                     " versioning, or delete this version's blobs if nothing in it is needed;"
                     " then run `pacs-edge keys rotate` again")
    if version is not None and version.site_objects:
        kids = set(version.site_objects.values())
        foreign = kids - {"", ring.current_id, *ring.older_ids}
        if foreign == kids:
            raise WrongKeyError(
                f"wrapped only for site key(s) {', '.join(sorted(foreign))}, which this box"
                " does not hold: it cannot be re-wrapped",
                hint="the old key is kept; this box cannot open the version. Delete its blobs"
                     " if nothing in it is needed, or re-wrap it with that key (from its"
                     " escrow) first")
    return _rewrap(store, ring, pack_name, manifest_name)


def _rewrap(store: BlobStore, ring: SiteKeyring, pack_name: str, manifest_name: str) -> bool:
    """Make sure `keys/site-<current id>` opens the pack; True if it wrote it. The old
    site objects stay (_delete_old_wraps removes them once the rotation may finish)."""
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
    return wrote


def _check_opens(store: BlobStore, name: str, pack_id: bytes, site_key: bytes,
                 sealed: bytes) -> None:
    """Read `name` back, unwrap it with `site_key` alone and open the manifest with it."""
    data_key = unwrap_with_site(site_key, pack_id, store.open_range(name))
    open_manifest(sealed, data_key, expected_pack_id=pack_id)
