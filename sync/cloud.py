"""PackService: the one place where the sync agent meets the cloud format and the blob store.

Uploads a study version (pack + manifest + site key object), verifies it,
and reads single instances back for a recall. Blob-store calls block, so
each public coroutine runs its I/O in a worker thread.

Verification at upload, before anything may be evicted:
- the store checks what it stored (sync.blobstore.base): Azure verifies the
  transactional MD5 of every staged block, the local folder reads its file
  back after fsync; put returns the committed blob's ETag;
- `stat` of pack, manifest and key object: each exists with the size
  written, and pack and manifest still carry the ETag their put returned;
- the manifest and the site key object are read back, unwrapped and
  decrypted (they are small), and the manifest's pack hash and size match
  what the writer produced;
- the pack's first and last segments are read back by range and
  authenticated: a truncated or foreign blob cannot pass.
The pack's and manifest's sizes and ETags go into the index with the pack
(UploadedPack). A full read-back of the pack would double the transfer; the
store's own checks cover the bytes, and the scrub reads packs back later.

Before evict deletes a local copy, `confirm_unchanged` HEADs the pack and
manifest (same size and ETag as recorded) and finds the site key object;
`scrub` streams a whole pack back and authenticates every byte of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.base import logsafe
from appliance.base.config import Config
from appliance.base.durable import fsync_dir
from appliance.base.errors import PacsEdgeError
from appliance.store.files import FileStore, store_failure
from appliance.store.packs import PackRow
from appliance.store.study_rows import InstanceRow, StudyRow
from provisioning.keyring import SiteKeyring, load_keyring
from provisioning.site_secrets import load_name_secret
from sync.blobstore.base import (
    BlobExists,
    BlobInfo,
    BlobNotFound,
    BlobOffline,
    BlobRangeError,
    BlobStore,
    Tier,
)
from sync.crashpoints import crash_point
from sync.pack import naming
from sync.pack.data_keys import new_data_key, parse_key_object, wrap_for_site
from sync.pack.manifest import (
    InstanceAttributes,
    Manifest,
    SeriesAttributes,
    StudyAttributes,
    manifest_pack_id,
    open_manifest,
    seal_manifest,
)
from sync.pack.pack_errors import PackError, PackIntegrityError, WrongKeyError
from sync.pack.reader import read_instances, unpack_instances
from sync.pack.segments import HEADER_SIZE, PackHeader, decrypt_range, plan_range
from sync.pack.writer import PackWriter
from sync.pack_reads import pack_ranges
from sync.sitekeys import site_object_names, unwrap_site_object
from sync.threads import check, in_thread

log = logging.getLogger(__name__)

_MANIFEST_CACHE = 16


@dataclass(frozen=True)
class UploadedPack:
    version: int
    pack_name: str
    manifest_name: str
    pack_size: int
    pack_sha256: str
    offsets: dict[int, tuple[int, int]]  # instance row id -> (plaintext offset, length)
    pack_etag: str = ""
    manifest_etag: str = ""
    manifest_size: int = 0


class CloudCopyChanged(PacsEdgeError):
    """The cloud copy of a pack is not the one verified at upload (missing, or replaced)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, hint="nothing was deleted; run `pacs-edge scrub --all` to "
                         "read the packs back: an intact pack is recorded again, a damaged one "
                         "is uploaded again from the local copy")


class VersionTaken(PacsEdgeError):
    """A put found a blob of the version being uploaded: the cloud holds versions of the
    study that the index does not know (an index rebuilt without `restore`, or a second
    box writing to this container). Those blobs are another upload's: never deleted."""

    def __init__(self, study_ref: str, version: int, highest: int) -> None:
        super().__init__(
            f"the cloud holds version {version} of study {study_ref} already (its highest "
            f"there is {highest}), which this index does not know",
            hint="the cloud's versions are left in place and the upload moves above them; "
            "`pacs-edge restore` into a new data home reads every version")
        self.version = version
        self.highest = highest


@dataclass(frozen=True)
class ScrubVerdict:
    """What reading one pack back found. state: ok | damaged | skipped (not readable now:
    archived, or replaced while it was read; tried again at the next scrub) | wrong-key
    (wrapped for a site key this box does not hold: the box's keys, not the pack, are
    what is wrong, so nothing is marked)."""

    state: str
    reason: str = ""
    pack_etag: str = ""
    manifest_etag: str = ""
    manifest_size: int = 0


class PackService:
    def __init__(self, store: BlobStore, files: FileStore, *, site_key: bytes,
                 name_secret: bytes, segment_size: int, rehydrate_poll: float,
                 rehydrate_early: bool = False,
                 older_site_keys: tuple[bytes, ...] = ()) -> None:
        self.store = store
        self.files = files
        self._site_key = site_key
        # Older keys: a pending key rotation's (see sync.sitekeys), for reading only.
        self._site_ring = SiteKeyring(site_key, older_site_keys)
        self._name_secret = name_secret
        self._segment_size = segment_size
        self._rehydrate_poll = rehydrate_poll
        self._rehydrate_early = rehydrate_early
        self._opened: dict[str, tuple[bytes, Manifest]] = {}

    @classmethod
    def for_home(cls, config: Config, store: BlobStore, files: FileStore) -> PackService:
        ring = load_keyring(config.home)
        return cls(store, files, site_key=ring.current, older_site_keys=ring.older,
                   name_secret=load_name_secret(config.home),
                   segment_size=config.sync.segment_size,
                   rehydrate_poll=config.sync.rehydrate_poll_seconds,
                   rehydrate_early=config.sync.rehydrate_priority == "high")

    def names(self, study_uid: str, version: int) -> tuple[str, str]:
        key = naming.study_key(self._name_secret, study_uid)
        return naming.pack_name(key, version), naming.manifest_name(key, version)

    def _key_name(self, study_uid: str, version: int) -> str:
        return naming.site_key_name(naming.study_key(self._name_secret, study_uid), version)

    # --- upload ----------------------------------------------------------------

    async def upload(self, study: StudyRow, instances: list[InstanceRow],
                     version: int, pack_id: bytes, *,
                     withdrawn: tuple[str, ...] = ()) -> UploadedPack:
        """Put, then verify, version `version` of the study: its pack, manifest and site
        key object, each carrying `pack_id`; the manifest lists `withdrawn`. VersionTaken
        when a blob of that version exists already."""
        return await in_thread(lambda stop: self._upload(study, instances, version, pack_id,
                                                         withdrawn, stop))

    def _upload(self, study: StudyRow, instances: list[InstanceRow], version: int,
                pack_id: bytes, withdrawn: tuple[str, ...],
                stop: threading.Event) -> UploadedPack:
        pack_name, manifest_name = self.names(study.study_uid, version)
        data_key = new_data_key()
        writer = PackWriter(data_key, pack_id, self._segment_size)
        offsets = {}
        for row in instances:
            slot = writer.feed_file(self.files.absolute(row.path), _instance_attributes(row),
                                    dataset_offset=row.dataset_offset, dataset_sha256=row.sha256)
            offsets[row.id] = (slot.offset, slot.length)
        key_name = self._key_name(study.study_uid, version)
        try:
            pack_info = self.store.put(pack_name, _stoppable(writer.chunks(), stop))
            crash_point("upload:after-pack")
            result = writer.result
            manifest = writer.manifest(_study_attributes(study), study_version=version,
                                       created_at=time.time(), withdrawn=withdrawn)
            sealed = seal_manifest(manifest, data_key)
            wrapped = wrap_for_site(self._site_key, pack_id, data_key)
            manifest_info = self.store.put(manifest_name, [sealed])
            crash_point("upload:after-manifest")
            self.store.put(key_name, [wrapped])
        except BlobExists as exc:
            raise VersionTaken(logsafe.ref(study.study_uid), version,
                               self._highest_version(study.study_uid)) from exc
        self._verify(pack_name, manifest_name, key_name, result.pack_size, result.pack_sha256,
                     {pack_name: pack_info.etag, manifest_name: manifest_info.etag},
                     {manifest_name: len(sealed), key_name: len(wrapped)})
        return UploadedPack(version, pack_name, manifest_name, result.pack_size,
                            result.pack_sha256, offsets, pack_info.etag, manifest_info.etag,
                            len(sealed))

    def _verify(self, pack_name: str, manifest_name: str, key_name: str, pack_size: int,
                pack_sha256: str, etags: dict[str, str], small: dict[str, int]) -> None:
        info = self.store.stat(pack_name)
        if info.size != pack_size:
            raise PackIntegrityError(f"uploaded pack has {info.size} bytes, wrote {pack_size}")
        for name, size in small.items():
            if self.store.stat(name).size != size:
                raise PackIntegrityError("uploaded manifest or key object has the wrong size")
        for name, etag in etags.items():
            if self.store.stat(name).etag != etag:
                raise PackIntegrityError("an uploaded blob was replaced right after its put",
                                         hint="another writer has access to the cloud store")
        data_key, manifest = self._open(pack_name, manifest_name, key_name, use_cache=False)
        if manifest.pack_size != pack_size or manifest.pack_sha256 != pack_sha256:
            raise PackIntegrityError("manifest read back does not describe the uploaded pack")
        header = PackHeader(manifest.pack_id, manifest.segment_size)
        for offset in {0, max(manifest.plaintext_size - 1, 0)}:
            plan = plan_range(offset, min(1, manifest.plaintext_size), segment_size=
                              manifest.segment_size, plaintext_size=manifest.plaintext_size)
            decrypt_range(data_key, header, plan,
                          self.store.open_range(pack_name, plan.blob_offset, plan.blob_length))

    # --- checks of what is in the cloud now -------------------------------------------

    async def confirm_unchanged(self, pack: PackRow) -> None:
        """HEAD the pack and its manifest: there, with the size and ETag recorded at
        upload (a pack from before migration 5 has no ETag yet: size only), and a site
        key object to open them; CloudCopyChanged otherwise."""
        await asyncio.to_thread(self._confirm_unchanged, pack)

    def _confirm_unchanged(self, pack: PackRow) -> None:
        for what, name, size, etag in (
                ("pack", pack.pack_name, pack.pack_size, pack.pack_etag),
                ("manifest", pack.manifest_name, pack.manifest_size, pack.manifest_etag)):
            try:
                info = self.store.stat(name)
            except BlobNotFound:
                raise CloudCopyChanged(f"the {what} {name} is missing from the cloud") from None
            if (size and info.size != size) or (etag and info.etag != etag):
                raise CloudCopyChanged(f"the {what} {name} in the cloud is not the one verified "
                                       f"at upload ({info.size} bytes, was {size}; ETag "
                                       f"{info.etag}, was {etag or 'not recorded'})")
        key_name = self._pack_key_name(pack)
        for name in site_object_names(key_name, self._site_ring):
            with contextlib.suppress(BlobNotFound):
                self.store.stat(name)
                return
        raise CloudCopyChanged(f"no site key object for {pack.pack_name} in the cloud")

    async def scrub(self, pack: PackRow, rows: list[InstanceRow], *,
                    on_bytes: Callable[[int], None] = lambda n: None) -> ScrubVerdict:
        """Read a whole pack back and authenticate it (see sync.scrub for what is checked).

        Damage is a verdict, not an exception; a store that cannot be reached raises
        (BlobStoreUnavailable), since then nothing is known about the pack."""
        return await in_thread(lambda stop: self._scrub(pack, rows, on_bytes, stop))

    def _scrub(self, pack: PackRow, rows: list[InstanceRow],
               on_bytes: Callable[[int], None], stop: threading.Event) -> ScrubVerdict:
        try:
            before = self.store.stat(pack.pack_name)
            if not before.online:
                return ScrubVerdict("skipped", "archived: not read (rehydration costs)")
            manifest_info = self.store.stat(pack.manifest_name)
            if before.size != pack.pack_size:
                raise PackIntegrityError(f"pack has {before.size} bytes, the index says "
                                         f"{pack.pack_size}")
            data_key, manifest = self._open(pack.pack_name, pack.manifest_name,
                                            self._pack_key_name(pack), use_cache=False)
            if manifest.pack_size != pack.pack_size or manifest.pack_sha256 != pack.pack_sha256:
                raise PackIntegrityError("the manifest describes another pack than the index")
            listed = {entry.instance.sop_uid: entry.sha256 for entry in manifest.instances}
            if any(listed.get(row.sop_uid) != row.sha256 for row in rows):
                raise PackIntegrityError("the manifest does not list an indexed instance "
                                         "with its indexed content")

            def chunks() -> Iterator[bytes]:
                for chunk in self.store.iter_chunks(pack.pack_name):
                    on_bytes(len(chunk))
                    crash_point("scrub:mid-pack")  # a chunk read, not yet authenticated
                    check(stop)
                    yield chunk

            # Every segment authenticated, the blob's SHA-256 and every instance's
            # length and SHA-256 checked against the manifest; nothing is kept.
            for _ in unpack_instances(data_key, chunks(), manifest):
                pass
            if self.store.stat(pack.pack_name).etag != before.etag:
                return ScrubVerdict("skipped", "replaced while it was read")
        except WrongKeyError as exc:
            return ScrubVerdict("wrong-key", exc.message)
        except (PackError, BlobNotFound, BlobRangeError) as exc:
            return ScrubVerdict("damaged", exc.message)
        except BlobOffline:
            return ScrubVerdict("skipped", "archived while it was read")
        return ScrubVerdict("ok", "", before.etag, manifest_info.etag, manifest_info.size)

    def _pack_key_name(self, pack: PackRow) -> str:
        parsed = naming.parse_blob_name(pack.pack_name)
        if parsed is None:
            raise PackIntegrityError(f"index names a pack blob this format does not make: "
                                     f"{pack.pack_name!r}")
        return naming.site_key_name(parsed.study_key, parsed.version)

    # --- clean-up ----------------------------------------------------------------------

    def _highest_version(self, study_uid: str) -> int:
        """The highest version of the study that any blob in the cloud names."""
        prefix = naming.study_prefix(naming.study_key(self._name_secret, study_uid))
        parsed = (naming.parse_blob_name(info.name) for info in self.store.list(prefix))
        return max((name.version for name in parsed if name is not None), default=0)

    async def delete_version(self, study_uid: str, version: int,
                             upload_id: bytes | None) -> list[str]:
        """Remove what a failed or interrupted upload wrote of a version: each of its
        blobs that carries `upload_id` (any blob by the name when None: a pack row from
        before upload ids were recorded). Returns the names left in place because another
        upload wrote them."""
        pack_name, manifest_name = self.names(study_uid, version)
        names = [pack_name, manifest_name, self._key_name(study_uid, version)]

        def delete() -> list[str]:
            kept = []
            for name in names:
                with contextlib.suppress(BlobNotFound):
                    if upload_id is not None and self._pack_id_of(name) != upload_id:
                        kept.append(name)
                        continue
                    self.store.delete(name)
            return kept

        return await in_thread(lambda _stop: delete())

    def _pack_id_of(self, name: str) -> bytes | None:
        """The pack id a blob of a version carries in the clear, None when it is not a
        pack, manifest or key object this format reads (so not one this box wrote)."""
        kind = naming.parse_blob_name(name)
        try:
            if kind is not None and kind.kind == "pack":
                return PackHeader.from_bytes(self.store.open_range(name, 0, HEADER_SIZE)).pack_id
            if kind is not None and kind.kind == "manifest":
                return manifest_pack_id(self.store.open_range(name))
            return parse_key_object(self.store.open_range(name)).pack_id
        except (PackError, BlobRangeError, BlobOffline):
            return None

    # --- recall ----------------------------------------------------------------

    async def request_online(self, pack: PackRow) -> BlobInfo:
        """The pack as the cloud holds it now; when it is archived, its rehydration is
        requested first (a no-op while one runs), at the `[sync] rehydrate_priority`."""
        info = await asyncio.to_thread(self.store.stat, pack.pack_name)
        if not info.online:
            await asyncio.to_thread(self.store.request_online, pack.pack_name,
                                    early=self._rehydrate_early)
        return info

    async def ensure_online(self, pack: PackRow) -> Tier:
        """Wait until an archived pack is rehydrated (requested here when needed); the
        online tier it is on."""
        info = await self.request_online(pack)
        if info.online:
            return info.tier
        log.info("pack is archived; rehydration requested pack=%s", pack.pack_name)
        while not (info := await asyncio.to_thread(self.store.stat, pack.pack_name)).online:
            await asyncio.sleep(self._rehydrate_poll)
        log.info("pack back online pack=%s tier=%s", pack.pack_name, info.tier.value)
        return info.tier

    async def recall_pack(self, pack: PackRow, rows: list[InstanceRow], *,
                          on_written: Callable[[InstanceRow], None]) -> None:
        """Restore `rows` (instances of this pack) to their store paths, verified.

        Most of a pack: one streamed read of the whole blob (authenticated end to
        end, truncation included). A few instances of a big pack: range reads of
        only their segments (sync.pack.reader.read_instances decides, for the
        reader's pull as well). `on_written` runs after each instance's file is
        fsynced and renamed into place; the folders are fsynced once each before
        this returns (the caller's index commit comes after).
        """
        await in_thread(lambda stop: self._recall_pack(pack, rows, on_written, stop))

    def _recall_pack(self, pack: PackRow, rows: list[InstanceRow],
                     on_written: Callable[[InstanceRow], None], stop: threading.Event) -> None:
        data_key, manifest = self._open_pack(pack)
        by_uid = {entry.instance.sop_uid: entry for entry in manifest.instances}
        wanted: dict[int, InstanceRow] = {}  # manifest entry offset -> row
        for row in rows:
            entry = by_uid.get(row.sop_uid)
            if entry is None or entry.sha256 != row.sha256:
                raise PackIntegrityError(
                    "the pack's manifest does not hold this instance with the indexed content",
                    hint="the cloud copy was replaced or the index is out of date")
            wanted[entry.offset] = row
        entries = [e for e in manifest.instances if e.offset in wanted]
        spool = None
        folders: set[Path] = set()
        try:
            for piece in read_instances(pack_ranges(self.store, pack.pack_name),
                                        lambda: self.store.iter_chunks(pack.pack_name),
                                        data_key, manifest, entries):
                check(stop)
                if spool is None:
                    spool = self.files.new_spool()
                spool.write(piece.data)
                if piece.last:  # length and SHA-256 verified against the manifest
                    row = wanted[piece.entry.offset]
                    self.files.commit(spool, row.path, sync_folder=False)
                    folders.add(self.files.absolute(row.path).parent)
                    spool.discard()
                    spool = None
                    log.debug("recalled instance=%s", logsafe.ref(row.sop_uid))
                    on_written(row)
            for folder in sorted(folders):  # once per folder, before the index says local
                fsync_dir(folder)
        except OSError as exc:  # the store's (the cloud's own errors are BlobStoreErrors)
            raise store_failure(exc) from exc
        finally:
            if spool is not None:
                spool.discard()

    def _open_pack(self, pack: PackRow) -> tuple[bytes, Manifest]:
        return self._open(pack.pack_name, pack.manifest_name, self._pack_key_name(pack))

    def _open(self, pack_name: str, manifest_name: str, key_name: str, *,
              use_cache: bool = True) -> tuple[bytes, Manifest]:
        cached = self._opened.get(pack_name) if use_cache else None
        if cached is not None:
            return cached
        sealed = self.store.open_range(manifest_name)
        # A magic, kind or size that does not parse is tampering unless it names a newer
        # format (sync.pack.blob_format), as restore and a remote reader tell it.
        pack_id = manifest_pack_id(sealed)
        data_key = unwrap_site_object(self.store, key_name, pack_id, self._site_ring)
        opened = (data_key, open_manifest(sealed, data_key, expected_pack_id=pack_id))
        if not use_cache:
            return opened
        if len(self._opened) >= _MANIFEST_CACHE:
            self._opened.pop(next(iter(self._opened)))
        self._opened[pack_name] = opened
        return opened

    async def set_tier(self, pack_name: str, tier: Tier) -> None:
        await asyncio.to_thread(self.store.set_tier, pack_name, tier)


def _stoppable(chunks: Iterable[bytes], stop: threading.Event) -> Iterator[bytes]:
    for number, chunk in enumerate(chunks):
        if number == 2:
            crash_point("upload:mid-pack")
        check(stop)
        yield chunk


def _study_attributes(study: StudyRow) -> StudyAttributes:
    return StudyAttributes(
        patient_id=study.patient_id, issuer_of_patient_id=study.issuer,
        patient_name=study.patient_name, birth_date=study.birth_date, sex=study.sex,
        study_uid=study.study_uid, study_date=study.study_date, study_time=study.study_time,
        accession_number=study.accession_number, study_id=study.study_id,
        study_description=study.study_description,
        referring_physician=study.referring_physician, character_set=study.character_set,
    )


def _instance_attributes(row: InstanceRow) -> InstanceAttributes:
    return InstanceAttributes(
        SeriesAttributes(row.series_uid, row.modality, row.series_number,
                         row.series_description, row.body_part, row.series_date,
                         row.series_time),
        sop_uid=row.sop_uid, sop_class_uid=row.sop_class_uid,
        instance_number=row.instance_number, transfer_syntax=row.transfer_syntax,
    )
