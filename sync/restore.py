"""`pacs-edge restore`: rebuild a lost box's index from the cloud manifests.

Needs a data home with the escrowed secrets (`pacs-edge keys recover`, then
`pacs-edge init`) and the cloud container the old box replicated to. It
lists `studies/` once, and for every `v<NNNNNN>.manifest` the index does not
hold yet (by manifest name), study by study (READ_CONCURRENCY studies at once,
a study's versions in version order; the index writer group-commits them):

1. unwrap the data key from the version's site key object (whichever ring key
   wrapped it, see sync.sitekeys) and open the manifest: authenticated, so a
   modified manifest is refused, never half-imported; then check that the
   study key in its blob name is the keyed hash of the StudyInstanceUID it
   holds (sync.pack.naming.study_key). The manifest authenticates its pack and
   key object, not its folder: a version moved whole into another study's
   folder opens fine, and would be restored under a name the box never uses
   for that study (so its next version, its recall and its eviction would look
   elsewhere). Such a version is refused and counted as misfiled;
2. check the pack in the listing: it must exist with the manifest's `pack_size`
   (its access tier comes from there too);
3. look in the store folder for each instance's file, at the path the store
   names it (`<study>/<series>/<sop>.<sha256[:16]>.dcm`): a file there with the
   manifest's size and dataset offset whose dataset hashes to the manifest's
   SHA-256 (as fsck and ingest hash it) is a good local copy. The files are read
   in a thread, in chunks, before the transaction: an index rebuilt on the same
   data home ("A lost or damaged index" in docs/operator-guide.md) keeps the
   copies it has, and never lets the agent delete them on the word of a pack
   this box never read. A file that does not match is not counted on: it is
   left where it is (a recall writes the good content over it);
4. one transaction: patient (upsert by PatientID + issuer), study (inserted
   `evicted`), series, instances (pointing at the pack with their plaintext
   offset and length; path as the store would name it; `is_local = 1` for a
   file found good in step 3, else 0) and the `packs` row (`verified`, but no
   `verified_at`: this box never read the pack, so evict scrubs it before it
   deletes a local copy on its word, sync.scrub.read_back_unread_packs; the
   scheduled scrub takes such packs by their upload time, so early). Counts
   are recomputed from the rows, and a study restore wrote takes the state they
   say (hierarchy.settle_restored_state): `replicated` when every instance is
   local, else `evicted` (which may hold local rows: a recall brings back only
   the others).

A SOP Instance UID already in the index (an earlier version of the same
study) takes the later version's content; earlier, different content becomes a
prior version (`instance_versions`, located in its pack; local only when step 3
found its file), as ingest made it on the lost box (appliance.store.index.make_way).
The same content again (a damaged pack's instances uploaded anew) updates the row
in place. A SOP Instance UID that is current in another study (sent again under
another Study Instance UID) stays current where it was received last, by the
manifests' `received_at`: studies are restored in no particular order, and the
content received first becomes the prior version whichever comes back first.
A series that followed its last instance into another study follows it here too,
whichever instance of the version is listed first.
A study restore writes takes its state without a transition row: nothing
happened to it on this box yet. So a study with a tier history is this box's
agent's: a version of it is added while it is `evicted` (its state stays),
refused (RestoreConflict) in any other state; a study without history (restore
wrote it) takes further versions and its state again. The first retrieve of an
`evicted` study recalls it; a `replicated` one is served from local disk.

Running restore again skips every pack the index already holds, so it
changes nothing; one interrupted half way resumes at the first missing pack.
Versions that cannot be read (no manifest, no site key object, a pack of the
wrong size, authentication failure, a manifest or key object whose magic or
kind is edited, or of a newer format: sync.pack.blob_format tells those two
apart in the message) are reported and skipped; the report names the blob,
never PHI. A store that stops answering (BlobStoreUnavailable:
its retries are spent) stops the restore with that error once the versions in
flight are done: every further version would wait out the same retries, hours
over a large container, and running restore again resumes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from appliance.base.errors import PacsEdgeError
from appliance.base.uids import is_valid_uid
from appliance.store import hierarchy
from appliance.store.files import FileStore, hash_dataset, instance_path
from appliance.store.index import (
    Index,
    StoredFile,
    add_prior_version,
    make_way,
    newer_in_another_study,
    withdraw_current,
)
from appliance.store.packs import insert_verified_pack, manifest_names
from appliance.store.spool import dataset_offset
from appliance.store.tiering import TierState, state_of
from provisioning.keyring import SiteKeyring
from sync.blobstore.base import BlobInfo, BlobStore, BlobStoreUnavailable
from sync.pack import naming
from sync.pack.manifest import Manifest, ManifestEntry, manifest_pack_id, open_manifest
from sync.pack.pack_errors import PackFormatError, PackIntegrityError
from sync.sitekeys import unwrap_site_object

if TYPE_CHECKING:  # the transaction body below only passes the connection on
    import sqlite3

log = logging.getLogger(__name__)

# Studies read at once. Each version costs two GETs (manifest, site key object),
# so the wall time is mostly round trips; their order matters only within a study.
READ_CONCURRENCY = 8


class RestoreConflict(PacsEdgeError):
    """A cloud version belongs to a study this box holds locally (not a fresh home)."""


class MisfiledManifest(PackIntegrityError):
    """A manifest's StudyInstanceUID does not hash to the study key of its blob name."""


@dataclass
class RestoreReport:
    manifests: int = 0
    restored: int = 0  # pack versions added to the index
    already: int = 0   # pack versions the index held already
    instances: int = 0
    local: int = 0        # of those, found good in the store and recorded local (step 3)
    local_bytes: int = 0
    studies: set[str] = field(default_factory=set)  # study keys touched (no PHI)
    failures: list[str] = field(default_factory=list)
    misfiled: set[str] = field(default_factory=set)  # study keys holding another's manifest

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class _Version:
    pack_name: str
    manifest_name: str
    manifest: Manifest
    access_tier: str


async def restore_index(index: Index, store: BlobStore, ring: SiteKeyring, *,
                        name_secret: bytes, files: FileStore,
                        on_progress: Callable[[int, int], None] | None = None
                        ) -> RestoreReport:
    """Add every cloud pack version the index lacks; see the module docstring.

    `name_secret` is the site's (escrowed) names.key: it checks each manifest's folder.
    `files` is the data home's store, which may still hold instance files (step 3).
    `on_progress(done, total)` counts pack versions, each once its files are read."""
    writer = index.writer
    assert writer is not None
    listing = await asyncio.to_thread(_list_studies, store)
    known = await manifest_names(index)
    names = listing.manifests
    report = RestoreReport(manifests=len(names), already=sum(n in known for n in names))
    for pack_name, newest in _packs_without_manifest(listing, known):
        report.failures.append(f"{pack_name}: no manifest for this pack: {_WHY[newest]}")
        log.error("restore skipped pack=%s error=no manifest", pack_name)
    done = report.already
    if on_progress is not None:
        on_progress(done, len(names))
    unavailable: list[BlobStoreUnavailable] = []  # set: the workers stop taking versions

    async def restore_version(study_key: str, name: str) -> None:
        try:
            version = await asyncio.to_thread(_read_version, store, ring, name_secret, name,
                                              listing.packs)
            local = await asyncio.to_thread(_good_local_copies, files, version.manifest)
            await writer.submit_sync(functools.partial(_insert_version, version=version,
                                                       local=local))
        except BlobStoreUnavailable as exc:  # the retries are spent: so would the rest be
            unavailable.append(exc)
        except MisfiledManifest as exc:
            report.failures.append(f"{name}: {exc.message}")
            report.misfiled.add(study_key)
            log.error("restore skipped manifest=%s error=misfiled", name)
        except (PacsEdgeError, ValueError) as exc:
            message = getattr(exc, "message", str(exc))
            report.failures.append(f"{name}: {message}")
            log.error("restore skipped manifest=%s error=%s", name, message)
        else:
            report.restored += 1
            report.instances += len(version.manifest.instances)
            report.local += len(local)
            report.local_bytes += sum(e.length for e in version.manifest.instances
                                      if _store_path(version.manifest, e) in local)
            report.studies.add(study_key)

    studies = iter(_by_study([n for n in names if n not in known]).items())

    async def worker() -> None:
        nonlocal done
        for study_key, versions in studies:  # shared: each study goes to one worker
            for name in versions:
                if unavailable:
                    return
                await restore_version(study_key, name)
                done += 1
                if on_progress is not None:
                    on_progress(done, len(names))

    async with asyncio.TaskGroup() as group:
        for _ in range(READ_CONCURRENCY):
            group.create_task(worker())
    if unavailable:
        raise unavailable[0]
    report.failures.sort()
    return report


@dataclass(frozen=True)
class _Listing:
    manifests: list[str]  # in name order: a study's versions in version order
    packs: dict[str, BlobInfo]  # pack blob name -> its listing entry


def _list_studies(store: BlobStore) -> _Listing:
    """One listing of `studies/`: the manifests, and the packs' sizes and tiers (so
    restore needs no request per pack)."""
    listing = _Listing([], {})
    for info in store.list(naming.STUDIES_PREFIX):
        parsed = naming.parse_blob_name(info.name)
        if parsed is not None and parsed.kind == "manifest":
            listing.manifests.append(info.name)
        elif parsed is not None and parsed.kind == "pack":
            listing.packs[info.name] = info
    listing.manifests.sort()
    return listing


# What a pack without a manifest most likely is, by whether it is its study's newest.
# The agent uploads a version's pack before its manifest, so a box lost in between leaves
# the newest pack alone; an older version lost its manifest after it was written.
_WHY = {
    True: "the newest version of its study, most likely an upload the lost box never"
          " finished: its instances were on that box only (send them again from the"
          " modality), unless its manifest was deleted (restore it from soft delete or"
          " versioning)",
    False: "an older version of its study, whose manifest was deleted: restore the"
           " manifest blob from soft delete or versioning, then run restore again",
}


def _packs_without_manifest(listing: _Listing, known: set[str]) -> list[tuple[str, bool]]:
    """Pack blobs whose manifest neither the listing nor the index holds, each with
    whether it is its study's newest version: versions restore cannot read, reported
    rather than passed over, so that "0 failed" means every pack came back."""
    listed = set(listing.manifests) | known
    newest: dict[str, int] = {}
    for name in (*listed, *listing.packs):
        parsed = naming.parse_blob_name(name)
        if parsed is not None:
            newest[parsed.study_key] = max(parsed.version, newest.get(parsed.study_key, 0))
    orphans = []
    for pack_name in sorted(listing.packs):
        parsed = naming.parse_blob_name(pack_name)
        assert parsed is not None
        if naming.manifest_name(parsed.study_key, parsed.version) not in listed:
            orphans.append((pack_name, parsed.version == newest[parsed.study_key]))
    return orphans


def _by_study(manifests: list[str]) -> dict[str, list[str]]:
    """Manifest names by study key, each study's in version order."""
    groups: dict[str, list[str]] = {}
    for name in manifests:
        parsed = naming.parse_blob_name(name)
        assert parsed is not None
        groups.setdefault(parsed.study_key, []).append(name)
    return groups


def _read_version(store: BlobStore, ring: SiteKeyring, name_secret: bytes, manifest_name: str,
                  packs: dict[str, BlobInfo]) -> _Version:
    parsed = naming.parse_blob_name(manifest_name)
    assert parsed is not None
    sealed = store.open_range(manifest_name)
    pack_id = manifest_pack_id(sealed)
    data_key = unwrap_site_object(store, naming.site_key_name(parsed.study_key, parsed.version),
                                  pack_id, ring)
    manifest = open_manifest(sealed, data_key, expected_pack_id=pack_id)
    if manifest.study_version != parsed.version:
        raise PackIntegrityError("manifest names another study version than its blob name")
    study = manifest.study
    uids = [study.study_uid, *(e.instance.series.series_uid for e in manifest.instances),
            *(e.instance.sop_uid for e in manifest.instances), *manifest.withdrawn]
    if not all(is_valid_uid(uid) for uid in uids):
        raise PackFormatError("manifest holds an invalid UID")
    if naming.study_key(name_secret, study.study_uid) != parsed.study_key:
        raise MisfiledManifest(
            "the manifest's study does not belong under this study key (a version moved "
            "from another study's folder); skipped",
            hint="the container was modified: compare it with its soft-deleted or versioned "
            "blobs; do not move blobs between study folders")
    pack_name = naming.pack_name(parsed.study_key, parsed.version)
    info = packs.get(pack_name)
    if info is None:
        raise PackIntegrityError("the pack of this manifest is missing",
                                 hint="the cloud copy of this version is incomplete; "
                                 "restore the blob from soft delete or versioning")
    if info.size != manifest.pack_size:
        raise PackIntegrityError(f"the pack has {info.size} bytes, its manifest says "
                                 f"{manifest.pack_size}")
    return _Version(pack_name, manifest_name, manifest, info.tier.value)


def _store_path(m: Manifest, entry: ManifestEntry) -> str:
    inst = entry.instance
    return instance_path(m.study.study_uid, inst.series.series_uid, inst.sop_uid, entry.sha256)


def _good_local_copies(files: FileStore, m: Manifest) -> frozenset[str]:
    """Step 3 of the module docstring: the store paths of the version's instances whose
    file is there with the manifest's size, dataset offset and dataset SHA-256."""
    good = set()
    for entry in m.instances:
        relative = _store_path(m, entry)
        path = files.absolute(relative)
        try:
            if not path.is_file() or path.stat().st_size != entry.length:
                continue
            with path.open("rb") as fh:
                if dataset_offset(fh.read(144)) != entry.dataset_offset:
                    continue
            if hash_dataset(path, entry.dataset_offset) == entry.sha256:
                good.add(relative)
        except OSError as exc:  # unreadable: not a copy to count on, the row stays remote
            log.warning("restore could not read a stored file error=%s", type(exc).__name__)
    return frozenset(good)


def _insert_version(conn: sqlite3.Connection, version: _Version,
                    local: frozenset[str]) -> None:
    """Step 4 of the module docstring: one version's rows, in one transaction; `local`
    holds the store paths found good in step 3."""
    m, s = version.manifest, version.manifest.study
    now = time.time()
    patient_fk = hierarchy.upsert_patient(conn, s)
    received = [e.instance.received_at or m.created_at for e in m.instances] or [m.created_at]
    study_fk = hierarchy.upsert_study(
        conn, patient_fk, s, instances=0, size=0, first_received_at=min(received),
        last_received_at=max(received), last_access_at=max(received),
        tier_state=TierState.EVICTED, tier_changed_at=now)
    state = state_of(conn, study_fk)
    restores_only = not hierarchy.has_tier_history(conn, study_fk)
    if not (state is TierState.EVICTED or (state is TierState.REPLICATED and restores_only)):
        raise RestoreConflict(f"the study of this version is {state} on this box",
                              hint="restore fills a new data home; this box already holds "
                              "the study locally, so its sync agent replicates it itself")
    # The study is filed under the patient of its newest version (the lost box moved it
    # there once every instance named them: store/index.py _follow_instances; or a merge
    # did, store/amendments.py), who has the name the newest manifest of theirs states.
    if m.study_version > hierarchy.newest_pack_version(conn, study_fk):
        hierarchy.refile_study(conn, study_fk, patient_fk)
        hierarchy.state_patient_as_of(conn, patient_fk, s, m.created_at)
    else:
        hierarchy.drop_patient_if_unused(conn, patient_fk)
    pack_fk = insert_verified_pack(
        conn, study_fk, m.study_version, pack_name=version.pack_name,
        manifest_name=version.manifest_name, pack_size=m.pack_size,
        pack_sha256=m.pack_sha256, instance_count=len(m.instances),
        access_tier=version.access_tier, created_at=m.created_at)
    for sop_uid in m.withdrawn:  # it left the study: its content here is a prior version
        withdraw_current(conn, sop_uid, study_fk, now)
    current = []
    for entry in m.instances:
        inst = entry.instance
        path = _store_path(m, entry)
        received_at = inst.received_at or m.created_at
        if newer_in_another_study(conn, inst.sop_uid, study_fk, received_at):
            add_prior_version(conn, inst.sop_uid, path=path, size=entry.length,
                              sha256=entry.sha256, transfer_syntax=inst.transfer_syntax,
                              received_at=received_at, superseded_at=now, pack_fk=pack_fk,
                              pack_offset=entry.offset, pack_length=entry.length,
                              is_local=path in local)
            continue
        make_way(conn, inst.sop_uid, entry.sha256, path, now)
        current.append((entry, path, received_at))
    # Every instance makes way before any series is filed: an instance that left another
    # study for this one took its series along when it was the series' last there
    # (store/index.py _supersede), and a series is refused under a second study while
    # an instance of it is current in the first; the version's instances listed before
    # that one would have been refused, and the whole version with them.
    for entry, path, received_at in current:
        inst, se = entry.instance, entry.instance.series
        series_fk, _ = hierarchy.upsert_series(conn, study_fk, se, instances=0)
        stored = StoredFile(path, entry.length, entry.dataset_offset, entry.sha256,
                            received_at, inst.source_ae)
        hierarchy.put_instance(conn, series_fk, inst, stored, pack_fk=pack_fk,
                               pack_offset=entry.offset, pack_length=entry.length,
                               is_local=path in local)
    hierarchy.recount_study(conn, study_fk)
    if restores_only:
        hierarchy.settle_restored_state(conn, study_fk, at=now)
