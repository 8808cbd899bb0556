"""`pacs-edge fsck`: reconcile the file store with the index.

- A file without an index row (a crash between the rename and the commit) is
  reported, and with `--repair` adopted, oldest first (by mtime, the time its content
  was last received): as the current instance when its SOP
  Instance UID is unknown, or when the index holds other content received before
  the file was written (its mtime); as a prior version of other content received
  after.
- An index row without its file is flagged when the row says the file is local
  (`is_local`, of a current instance or a prior version; evicted ones are in a
  pack): that must never happen, and fsck does not paper over it.
- With `--content`, every file a local row names is read whole and its dataset's
  SHA-256 compared with the row's: a file whose bytes changed since they were
  received (bit rot, a tool that rewrote it) would be sent to workstations as it
  is now. Reported, never repaired here: fsck cannot tell good bytes from bad, and
  the cloud copy or the sender has them (docs/operator-guide.md says how).
- Each file adopted is audited by the caller (`on_adopted`): one Import record per
  study, source `fsck`, from the command and from serve's start-up recovery.
- With `--repair`, temp files left by a crash are removed: those untouched for
  TEMP_FILE_AGE, since serve may be running and a newer one may be a transfer it
  is receiving (serve's start-up removes them all: then nothing else writes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from appliance.base.durable import sweep_temp_files
from appliance.base.errors import InvalidInstance, RejectedInstance
from appliance.services.dicom_header import read_header
from appliance.store.files import FileStore, hash_dataset, intact_file
from appliance.store.index import Index, StoredFile
from appliance.store.instance_header import InstanceHeader
from appliance.store.spool import dataset_offset

# A file being received is written at least once per network_timeout (60 s by
# default); one untouched for an hour is a crash's.
TEMP_FILE_AGE = 3600.0


@dataclass
class FsckReport:
    orphan_files: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)
    damaged_files: list[str] = field(default_factory=list)
    temp_files_removed: int = 0

    @property
    def clean(self) -> bool:
        unresolved = set(self.orphan_files) - set(self.adopted)
        return not (unresolved or self.missing_files or self.damaged_files)


async def fsck(files: FileStore, index: Index, *, repair: bool, content: bool = False,
               on_progress: Callable[[int, int], None] = lambda done, total: None,
               on_adopted: Callable[[InstanceHeader], None] = lambda header: None
               ) -> FsckReport:
    """`on_adopted` hears of each file adopted, once its row is committed: the audit
    trail's Import (an adopted file is an instance that queries find and retrieves send)."""
    report = FsckReport()
    if repair:
        report.temp_files_removed = sweep_temp_files(files.root, older_than=TEMP_FILE_AGE)
    # Memory grows with the files on local disk, never with the evicted rows (after a
    # year, most of the index): a start after a crash runs this before serving.
    on_disk = set(await asyncio.to_thread(lambda: list(files.iter_files())))
    local = await index.local_paths()
    report.missing_files = sorted(local - on_disk)
    # Files no local row names: an evicted instance's (an interrupted eviction; the sync
    # agent removes it) or nobody's (an orphan).
    report.orphan_files = sorted(await index.unknown_paths(sorted(on_disk - local)))
    if content:
        report.damaged_files = await _damaged(files, index, len(local & on_disk), on_progress)
    if repair:
        for relative in await asyncio.to_thread(_oldest_first, files, report.orphan_files):
            try:
                header = await _adopt(files, index, relative)
            except RejectedInstance as exc:  # InvalidInstance, or beyond the inflate limit
                report.unreadable.append((relative, exc.reason))
            else:
                report.adopted.append(relative)
                on_adopted(header)
    return report


def _oldest_first(files: FileStore, paths: list[str]) -> list[str]:
    """`paths` in the order their files were last received (mtime, then path): adopted
    so, they are recorded as ingest recorded them. In path order, an instance of a
    series that had followed another instance into its study (store/index.py
    _supersede) could come before that instance, while the series was still the
    first study's, and was refused ("its Series Instance UID belongs to another
    study on this box") until a second run."""
    def received(relative: str) -> float:
        try:
            return files.absolute(relative).stat().st_mtime
        except OSError:  # gone or unreadable: its adoption says why
            return 0.0
    return sorted(paths, key=lambda relative: (received(relative), relative))


async def _damaged(files: FileStore, index: Index, total: int,
                   on_progress: Callable[[int, int], None]) -> list[str]:
    """The local files whose dataset no longer hashes to what their row recorded (a
    missing file is the caller's finding, not this one's)."""
    damaged, done, seen = [], 0, set()
    for versions in (False, True):
        after = 0
        while page := await index.local_contents(versions=versions, after=after):
            for _, relative, sha256 in page:
                if relative in seen:  # a prior version's content sent again (X, Y, X)
                    continue
                seen.add(relative)
                verdict = await asyncio.to_thread(_content_matches, files.absolute(relative),
                                                  sha256)
                if verdict is None:
                    continue  # not on disk: a missing file
                if not verdict:
                    damaged.append(relative)
                done += 1
                on_progress(done, total)
            after = page[-1][0]
    return sorted(damaged)


def _content_matches(path: Path, sha256: str) -> bool | None:
    """Whether the file's dataset hashes to `sha256` (what ingest asks of a file it
    finds under a content's name); None when there is no such file."""
    if not path.exists():
        return None
    try:
        return intact_file(str(path), sha256) is not None
    except OSError:  # it cannot be read whole: as good as damaged
        return False


async def _adopt(files: FileStore, index: Index, relative: str) -> InstanceHeader:
    path = files.absolute(relative)
    header = await asyncio.to_thread(read_header, path)
    offset = _read_offset(path)
    sha256 = await asyncio.to_thread(hash_dataset, path, offset)
    st = path.stat()
    stored = StoredFile(relative, st.st_size, offset, sha256, st.st_mtime, source_ae="fsck")
    current = await index.current_content(header.sop_uid)
    # A file written after the current content was received holds content received
    # later (the same SOP Instance UID sent again, maybe into another study, never
    # replicated): it is current, and the indexed content its prior version.
    if current is None or current[0] == sha256 or stored.received_at > current[1]:
        await index.record_instance(header, stored)
    else:
        await index.record_version(header.sop_uid, stored, header.transfer_syntax)
    return header


def _read_offset(path: Path) -> int:
    with path.open("rb") as fh:
        offset = dataset_offset(fh.read(144))
    if offset < 0:
        raise InvalidInstance("File Meta group length is missing")
    return offset
