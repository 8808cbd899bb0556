"""The file store: one Part 10 file per instance, on local disk.

Layout (relative to the store root, `<home>/store` by default)::

    <StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.<sha16>.dcm
    .spool/rx-*.part     instances being received (same file system: commit is a rename)

`sha16` is the first 16 hex digits of the SHA-256 of the dataset bytes, so a
re-sent instance with different content gets its own file and the earlier
one is kept as a prior version; identical content maps to the same name.
UIDs are validated (digits and dots) before they become path components.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from appliance.base.durable import (
    TEMP_SUFFIX,
    SharedFolderSync,
    durable_link,
    durable_rename,
    ensure_dir,
    fsync_dir,
    is_no_space,
    sweep_temp_files,
)
from appliance.base.errors import OutOfSpace, PacsEdgeError, StoreReadOnly
from appliance.base.human import human_size
from appliance.base.uids import is_valid_uid
from appliance.store.disk import DiskState, disk_state
from appliance.store.instance_header import InstanceHeader
from appliance.store.spool import BELOW_RESERVE, BelowReserve, SpoolFile, dataset_offset

SPOOL_DIR = ".spool"
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Placed:
    """The file an ingested instance's row names, and whether this ingest made it."""

    created: bool  # False: the name was there: kept whole, or `replaced` when damaged
    size: int
    dataset_offset: int
    replaced: bool = False  # the file there was damaged: this content took its place


class FileStore:
    def __init__(self, root: Path, *, reserve_bytes: int = 0) -> None:
        self.root = root
        self._root = os.fspath(root)  # the commit path joins strings, not Paths
        self.spool_dir = root / SPOOL_DIR
        self.reserve_bytes = reserve_bytes
        self._folder_syncs = SharedFolderSync(self._root)

    def prepare(self) -> int:
        """Create the folders and remove crash leftovers; return how many were removed.
        Only for serve's start-up, when nothing else writes: the sweep would take
        another process's files being received."""
        self.create_folders()
        return sweep_temp_files(self.root)

    def create_folders(self) -> None:
        """Create the store and its spool folder, for a process that writes into the
        store while serve may be running (import, migrate, the sync agent's recalls;
        after a restore, before serve ever ran)."""
        ensure_dir(self.spool_dir)

    def new_spool(self) -> SpoolFile:
        """A spool that gives up once writing it leaves less than the reserve free."""
        return SpoolFile(self.spool_dir, reserve_bytes=self.reserve_bytes)

    def relative_path(self, header: InstanceHeader, sha256: str) -> str:
        return instance_path(header.study_uid, header.series_uid, header.sop_uid, sha256)

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def absolute_text(self, relative: str) -> str:
        """`absolute` as a string, joined without a Path: what the commit path uses."""
        return os.path.join(self._root, relative)

    def check_space(self, needed: int = 0) -> None:
        """Refuse (OutOfSpace) a write of `needed` more bytes that would leave less than
        the reserve free: the room the index, the audit log and the sync agent's
        eviction write into once the store is full."""
        if not self.reserve_bytes and not needed:
            return
        free = self.disk().free_bytes
        if free - needed >= self.reserve_bytes:
            return
        if not needed:
            raise OutOfSpace(BELOW_RESERVE)
        if free < self.reserve_bytes:  # "of which" would name more than there is
            raise OutOfSpace(f"{human_size(needed)} needed, {human_size(free)} free, below"
                             f" the store reserve of {human_size(self.reserve_bytes)}"
                             " ([store] reserve_mb)")
        raise OutOfSpace(f"{human_size(needed)} needed, {human_size(free)} free, of which"
                         f" {human_size(self.reserve_bytes)} is the store reserve")

    def commit(self, spool: SpoolFile, relative: str, *, synced: Future[None] | None = None,
               sync_folder: bool = True) -> None:
        """fsync the spooled file and move it to `relative`, durably. `synced`: an fsync
        of the spool already under way (its result, or error, is awaited here).
        `sync_folder=False`: the caller fsyncs the folder later (see durable_rename).
        Concurrent commits into one folder share its fsync (SharedFolderSync)."""
        target = self.absolute_text(relative)
        with _spool_synced(spool, synced):
            durable_rename(spool.name, target, sync_folder=sync_folder,
                           folders=self._folder_syncs)
            spool.renamed()

    def place(self, spool: SpoolFile, relative: str, *, sha256: str, offset: int,
              synced: Future[None] | None = None) -> Placed:
        """Make a spooled instance (dataset `sha256` from `offset` on) durable at
        `relative`, the name of its content.

        The name may be taken already: by the file of a prior version with the same
        content (sent again after a correction: X, Y, X), or by a concurrent ingest of
        the same bytes. That file is kept and the spool is left to the caller to
        discard; only a file whose dataset does not hash to `sha256` (damaged) is
        replaced. Only a file this call `created` may its caller remove again (when
        the index refuses the row): another row may name any other. A kept file's
        mtime is set to now, as a new one's would be."""
        target = self.absolute_text(relative)
        with _spool_synced(spool, synced):
            if durable_link(spool.name, target, folders=self._folder_syncs):
                return Placed(True, spool.size, offset)
            kept = intact_file(target, sha256)
            if kept is not None:
                # Its mtime says when this content was received last: fsck --repair,
                # adopting files after a lost index, makes the newest content current.
                os.utime(target)
                return Placed(False, *kept)
            durable_rename(spool.name, target, folders=self._folder_syncs)
            spool.renamed()
            return Placed(False, spool.size, offset, replaced=True)

    def remove(self, relative: str) -> None:
        path = self.absolute(relative)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            fsync_dir(path.parent)

    def disk(self) -> DiskState:
        return disk_state(self.root)

    def iter_files(self) -> Iterator[str]:
        """Every stored instance file (relative path), spool and temp files excluded."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if d != SPOOL_DIR]
            for name in filenames:
                if name.endswith(".dcm") and not name.endswith(TEMP_SUFFIX):
                    yield os.path.relpath(os.path.join(dirpath, name), self.root)


def store_failure(exc: OSError) -> PacsEdgeError:
    """The refusal for a store that failed to take a file (spool, fsync, link, mkdir),
    so that no edge or command meets a bare OSError, whose text holds the file's path
    (UIDs): a full disk or a read-only store is out of resources (the instance is fine:
    the sender retries later), anything else (an I/O error) a processing failure."""
    if isinstance(exc, BelowReserve):
        return OutOfSpace(BELOW_RESERVE)
    if is_no_space(exc):
        return OutOfSpace()
    if exc.errno == errno.EROFS:
        return StoreReadOnly()
    return PacsEdgeError(f"store write failed: {exc.strerror or type(exc).__name__}")


def hash_dataset(path: Path, offset: int) -> str:
    """SHA-256 of a stored file's dataset bytes (from `offset`, its File Meta's end)."""
    with path.open("rb") as fh:
        return _hash_from(fh, offset)


def _hash_from(fh: BinaryIO, offset: int) -> str:
    fh.seek(offset)
    digest = hashlib.sha256()
    while chunk := fh.read(_READ_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def instance_path(study_uid: str, series_uid: str, sop_uid: str, sha256: str) -> str:
    """Where the store keeps the file of an instance's content (relative to its root)."""
    parts = (study_uid, series_uid, sop_uid)
    if not all(is_valid_uid(p) for p in parts):  # callers checked; defence in depth
        raise ValueError("refusing a path from an invalid UID")
    return f"{study_uid}/{series_uid}/{sop_uid}.{sha256[:16]}.dcm"


@contextlib.contextmanager
def _spool_synced(spool: SpoolFile, synced: Future[None] | None) -> Iterator[None]:
    """Wait for the spool's fsync (`synced`: one already under way, else made here), then
    run the body; a full disk on the way is OutOfSpace."""
    try:
        if synced is not None:
            synced.result()
        else:
            spool.sync()
        yield
    except OSError as exc:
        if is_no_space(exc):
            raise OutOfSpace() from exc
        raise


def intact_file(path: str, sha256: str) -> tuple[int, int] | None:
    """(size, dataset offset) of the Part 10 file at `path` if its dataset bytes hash
    to `sha256`; None when they do not, or it is no such file (not followed: a link)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        offset = dataset_offset(fh.read(144))
        if offset < 0:
            return None
        if _hash_from(fh, offset) != sha256:
            return None
        return os.fstat(fd).st_size, offset
