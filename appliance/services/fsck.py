"""`pacs-edge fsck`: reconcile the file store with the index.

- A file without an index row (a crash between the rename and the commit) is
  reported, and with `--repair` adopted: as the current instance when its SOP
  Instance UID is unknown, or when the index holds other content received before
  the file was written (its mtime); as a prior version of other content received
  after.
- An index row without its file is flagged when the row says the file is local
  (`is_local`, of a current instance or a prior version; evicted ones are in a
  pack): that must never happen, and fsck does not paper over it.
- With `--repair`, temp files left by a crash are removed: those untouched for
  TEMP_FILE_AGE, since serve may be running and a newer one may be a transfer it
  is receiving (serve's start-up removes them all: then nothing else writes).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from appliance.base.durable import sweep_temp_files
from appliance.base.errors import InvalidInstance, RejectedInstance
from appliance.services.dicom_header import read_header
from appliance.store.files import FileStore, hash_dataset
from appliance.store.index import Index, StoredFile
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
    temp_files_removed: int = 0

    @property
    def clean(self) -> bool:
        unresolved = set(self.orphan_files) - set(self.adopted)
        return not (unresolved or self.missing_files)


async def fsck(files: FileStore, index: Index, *, repair: bool) -> FsckReport:
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
    if repair:
        for relative in report.orphan_files:
            try:
                await _adopt(files, index, relative)
            except RejectedInstance as exc:  # InvalidInstance, or beyond the inflate limit
                report.unreadable.append((relative, exc.reason))
            else:
                report.adopted.append(relative)
    return report


async def _adopt(files: FileStore, index: Index, relative: str) -> None:
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


def _read_offset(path: Path) -> int:
    with path.open("rb") as fh:
        offset = dataset_offset(fh.read(144))
    if offset < 0:
        raise InvalidInstance("File Meta group length is missing")
    return offset
