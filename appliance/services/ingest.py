"""Ingest: the one durable path every instance takes (C-STORE, import, drop folder).

Order, which is the acknowledgement contract:
 1. the instance is fully spooled (a SpoolFile in the store's spool folder);
 2. its header is parsed and checked: complete, UIDs valid, matching the request;
 3. identical content already stored -> no-op success;
 4. fsync the file (started in the background at step 2), link it into place,
    fsync the folder; a file already there under its name (the same content, a
    prior version's: X, Y, X) is kept instead (FileStore.place);
 5. commit the index row (group commit, synchronous=FULL);
 6. only then does the caller acknowledge (C-STORE Success).
A failure at any step leaves neither a file nor a row behind, and never removes a
file it did not create (a crash between 4 and 5 leaves a file that `fsck --repair`
adopts; a spool file that a store turned read-only will not let go is a temp file,
removed by serve's start-up sweep). A store that fails to take the file surfaces as
a PacsEdgeError, never a bare OSError (`FileStore`'s `store_failure`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from concurrent import futures
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import ALL_TRANSFER_SYNTAXES
from pynetdicom.dsutils import create_file_meta

from appliance.base import compat, logsafe
from appliance.base.errors import (
    InvalidInstance,
    PacsEdgeError,
    Rejection,
    UnsupportedTransferSyntax,
)
from appliance.base.metrics import INGEST_IN_PROGRESS, INSTANCES_OF_ANOTHER_PATIENT
from appliance.base.uids import is_valid_uid, normalise_uid
from appliance.services import pydicom_remarks
from appliance.services.dicom_header import DEFAULT_MAX_INFLATED, read_header
from appliance.store.files import FileStore, store_failure
from appliance.store.index import HeldCopy, Index, RecordOutcome, StoredFile
from appliance.store.instance_header import InstanceHeader
from appliance.store.spool import SpoolFile

log = logging.getLogger(__name__)

_COPY_CHUNK = 1 << 20
# Placings of one instance whose file an eviction may delete before its row commits
# (X, Y, X sent while its study is evicted): the second one makes the file anew.
PLACE_ATTEMPTS = 2
# fsyncs of spooled instances, one per association storing at a time (more wait).


@dataclass(frozen=True)
class IngestResult:
    outcome: RecordOutcome
    header: InstanceHeader
    path: str


@dataclass(frozen=True)
class ExpectedIdentity:
    """What the C-STORE request said the dataset is (Affected SOP Class/Instance UID)."""

    sop_class_uid: str
    sop_uid: str


class IngestService:
    def __init__(self, files: FileStore, index: Index, *,
                 max_inflated: int = DEFAULT_MAX_INFLATED) -> None:
        self.files = files
        self.index = index
        self.max_inflated = max_inflated  # bytes a deflated dataset may inflate to

    async def ingest_spool(
        self,
        spool: SpoolFile,
        *,
        source_ae: str = "",
        expected: ExpectedIdentity | None = None,
    ) -> IngestResult:
        """Make a fully spooled instance durable; the spool is consumed either way.

        The work runs in a worker thread (`ingest_spool_blocking`), which finishes
        even if this coroutine is cancelled: a file and its row never part ways.
        """
        return await asyncio.to_thread(self.ingest_spool_blocking, spool,
                                       source_ae=source_ae, expected=expected)

    def ingest_spool_blocking(
        self,
        spool: SpoolFile,
        *,
        source_ae: str = "",
        expected: ExpectedIdentity | None = None,
    ) -> IngestResult:
        """`ingest_spool` from a thread that is not the event loop's (a DIMSE association
        thread): everything runs here, the index calls too (Index.*_blocking: a read on
        a pooled connection, then this thread's share of a group commit). Every hop
        between threads sits on the C-STORE critical path (the peer sends the next
        instance after our response), so there is none."""
        committed_path: str | None = None
        syncing: futures.Future[None] | None = None
        INGEST_IN_PROGRESS.inc()
        try:
            if spool.error is not None:
                raise spool.error
            self.files.check_space()
            # The file's fsync (the slowest step) runs while the header is parsed and
            # the index asked for a duplicate; it is joined before the rename.
            syncing = spool.start_sync()
            header, sha256, offset = _inspect(spool, self.max_inflated)
            if expected is not None and (
                header.sop_uid != expected.sop_uid or header.sop_class_uid != expected.sop_class_uid
            ):
                raise InvalidInstance("dataset SOP Class/Instance UID differ from the request",
                                      kind=Rejection.NOT_AS_REQUESTED)
            held = self.index.held_copy_blocking(header.sop_uid, sha256)
            if held is not None:
                if held.is_local:
                    self._mend(spool, header, held, sha256=sha256, offset=offset,
                               synced=syncing)
                return IngestResult(RecordOutcome.DUPLICATE, header, "")
            relative = self.files.relative_path(header, sha256)
            target = self.files.absolute_text(relative)
            recorded = None
            for _ in range(PLACE_ATTEMPTS):
                placed = self.files.place(spool, relative, sha256=sha256, offset=offset,
                                          synced=syncing)
                if placed.created:  # else the name was taken (a prior version's file)
                    committed_path = relative
                stored = StoredFile(relative, placed.size, placed.dataset_offset, sha256,
                                    time.time(), source_ae)
                # None: the sync agent deleted the file meanwhile (Index.record_instance_
                # blocking); placed again, it is this ingest's own.
                recorded = self.index.record_instance_blocking(header, stored,
                                                               placed_at=target)
                if recorded is not None:
                    break
            if recorded is None:
                raise PacsEdgeError("store write failed: the stored file was deleted while"
                                    " the instance was recorded")
            committed_path = None  # the row owns the file now
            if recorded.outcome is RecordOutcome.NEW_VERSION:
                log.warning(
                    "instance re-sent with different content; previous kept as prior version"
                    " instance=%s study=%s", logsafe.ref(header.sop_uid),
                    logsafe.ref(header.study_uid),
                )
            if recorded.other_patient:
                _report_other_patient(header, moved=recorded.study_moved)
            if recorded.left_study_moved:
                _log_study_moved(header.sop_uid, recorded.left_study_moved)
            return IngestResult(recorded.outcome, header, relative)
        except OSError as exc:
            raise store_failure(exc) from exc
        finally:
            INGEST_IN_PROGRESS.dec()
            spool.discard()  # after its fsync, if one runs
            if committed_path is not None:
                self.files.remove(committed_path)

    def _mend(self, spool: SpoolFile, header: InstanceHeader, held: HeldCopy, *,
              sha256: str, offset: int, synced: futures.Future[None] | None) -> None:
        """Content the index holds on local disk, sent again: its file must still be there
        and whole. A sender (a drop folder above all) deletes its copy on the answer, so a
        stored file that was lost or damaged is written again from this one (FileStore.place
        keeps an intact file, and reads it whole to know)."""
        placed = self.files.place(spool, held.path, sha256=sha256, offset=offset,
                                  synced=synced)
        if not (placed.created or placed.replaced):
            return  # the file was there, whole
        if (placed.size, placed.dataset_offset) != (held.size, held.dataset_offset):
            self.index.restored_file_blocking(header.sop_uid, held.path, placed.size,
                                              placed.dataset_offset)
        log.warning("stored file of an instance was missing or damaged; written again from"
                    " the copy sent again instance=%s study=%s", logsafe.ref(header.sop_uid),
                    logsafe.ref(header.study_uid))

    async def ingest_file(self, source: Path | BinaryIO, *, source_ae: str = "") -> IngestResult:
        """Ingest a file from disk (import, drop folder) through the same path as C-STORE:
        a path, or a file already open (the drop folder opens its files without following
        symlinks; the caller closes it)."""
        spool = await asyncio.to_thread(self._spool_from_file, source)
        return await self.ingest_spool(spool, source_ae=source_ae)

    def _spool_from_file(self, source: Path | BinaryIO) -> SpoolFile:
        """Copy `source` into a spool file: a fresh File Meta header, then its dataset bytes
        exactly as they are in the source file. A store that the copy would take below
        its reserve refuses it before the copy (OutOfSpace, saying how much it needs):
        the drop folder retries every waiting file at each rescan, and a file larger
        than the free space filled the disk each time, refusing every other store."""
        opened = source.open("rb") if isinstance(source, Path) else nullcontext(source)
        with opened as fh:
            self.files.check_space(os.fstat(fh.fileno()).st_size)
            spool = self.start_spool(fh)
            try:
                shutil.copyfileobj(fh, spool, _COPY_CHUNK)  # type: ignore[misc]
            except BaseException:
                spool.discard()
                raise
        return spool

    def start_spool(self, fh: BinaryIO) -> SpoolFile:
        """A new spool holding the preamble and a fresh File Meta for the Part 10 file at
        `fh`, which is left at its first dataset byte: the caller writes the dataset bytes
        as they are (a file's rest, or an upload as it streams in: STOW-RS), then calls
        `ingest_spool`. Raises InvalidInstance for data that is not Part 10,
        UnsupportedTransferSyntax for a File Meta naming a syntax the box does not take."""
        meta = _file_meta(fh)
        spool = self.files.new_spool()
        try:
            spool.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(spool, meta, enforce_standard=True)  # type: ignore[arg-type]
        except BaseException:
            spool.discard()
            raise
        return spool


def _report_other_patient(header: InstanceHeader, *, moved: bool) -> None:
    """An instance named another patient than its study is filed under (Index._record)."""
    INSTANCES_OF_ANOTHER_PATIENT.inc()
    if moved:
        _log_study_moved(header.sop_uid, header.study_uid)
    else:
        log.warning("instance names another patient than its study; filed under the"
                    " study's patient until every instance of the study names the same"
                    " instance=%s study=%s", logsafe.ref(header.sop_uid),
                    logsafe.ref(header.study_uid))


def _log_study_moved(sop_uid: str, study_uid: str) -> None:
    log.warning("study moved to the patient every one of its instances now names"
                " instance=%s study=%s", logsafe.ref(sop_uid), logsafe.ref(study_uid))


def _file_meta(fh: BinaryIO) -> object:
    """The File Meta to store with an imported file; leaves `fh` at its dataset.

    Its Transfer Syntax UID must be one the DIMSE server's storage contexts list
    (TAKEN_TRANSFER_SYNTAXES), else the file is refused (UnsupportedTransferSyntax):
    stored as sent, no presentation context could carry it back out. Here, where the
    edges that take Part 10 files meet (STOW-RS, import, drop folder), and not in
    `ingest_spool`: a C-STORE's syntax is its accepted context's, one of those already.

    pydicom converts the File Meta's values when they are read, so a malformed one
    (an unknown VR, a wrong length) raises then, in one of several types. A File Meta
    without its Media Storage SOP Class or Instance UID (old archives write such files;
    dcmtk sends them) takes the data set's SOP Class and Instance UIDs, as the File
    Meta of a C-STORE takes the request's: the header the box writes is its own."""
    try:
        read_preamble(fh, force=False)
        source_meta = compat.read_file_meta(fh)
    except Exception as exc:
        raise InvalidInstance("not a DICOM Part 10 file") from exc
    try:
        uids = [normalise_uid(source_meta.get(keyword, "")) for keyword in _FILE_META_UIDS]
    except Exception as exc:
        raise InvalidInstance("File Meta cannot be parsed") from exc
    sop_class_uid, sop_instance_uid, transfer_syntax = uids
    # A value that is no valid UID is read_header's to refuse, as every invalid UID (0xC000).
    if is_valid_uid(transfer_syntax) and transfer_syntax not in TAKEN_TRANSFER_SYNTAXES:
        known = UID(transfer_syntax)
        raise UnsupportedTransferSyntax(known.name if known.is_transfer_syntax else "")
    if transfer_syntax and not (sop_class_uid and sop_instance_uid):
        found_class, found_instance = _dataset_sop_uids(fh, transfer_syntax)
        sop_class_uid = sop_class_uid or found_class
        sop_instance_uid = sop_instance_uid or found_instance
    if not (sop_class_uid and sop_instance_uid and transfer_syntax):
        # their validity is read_header's to judge, with the dataset's
        raise InvalidInstance("File Meta lacks SOP Class, SOP Instance or Transfer Syntax")
    return create_file_meta(sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid,
                            transfer_syntax=transfer_syntax)


# The transfer syntaxes of every storage context the DIMSE server accepts (dimse/server.py,
# docs/conformance.md "Transfer syntaxes"): the only ones an instance can be sent back in.
TAKEN_TRANSFER_SYNTAXES = frozenset(str(syntax) for syntax in ALL_TRANSFER_SYNTAXES)
_FILE_META_UIDS = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
_SOP_INSTANCE_UID_TAG = 0x00080018
# Where to look for the data set's SOP UIDs: its first elements (group 0008 comes
# first), never its pixel data. A STOW-RS part's head is 64 KiB, so the bound is lower.
_SOP_UIDS_WITHIN = 16 << 10


def _dataset_sop_uids(fh: BinaryIO, transfer_syntax: str) -> tuple[str, str]:
    """SOP Class and Instance UID of the data set at `fh` ("" each when not found in its
    first elements, or not readable: a deflated one); `fh` is left where it was."""
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        return "", ""
    start = fh.tell()
    try:
        with pydicom_remarks.held_back():  # pydicom's remarks could quote values (PHI)
            head = DicomBytesIO(fh.read(_SOP_UIDS_WITHIN))
            ds = read_dataset(head, is_implicit_VR=transfer_syntax == ImplicitVRLittleEndian,
                              is_little_endian=transfer_syntax != ExplicitVRBigEndian,
                              stop_when=lambda tag, *_: tag > _SOP_INSTANCE_UID_TAG)
            return (normalise_uid(ds.get("SOPClassUID", "")),
                    normalise_uid(ds.get("SOPInstanceUID", "")))
    except Exception:  # a malformed data set: read_header says why, if it gets that far
        return "", ""
    finally:
        fh.seek(start)


def _inspect(spool: SpoolFile, max_inflated: int) -> tuple[InstanceHeader, str, int]:
    """Header, dataset SHA-256 and dataset offset of a spooled Part 10 file."""
    header = read_header(spool.name, max_inflated=max_inflated, fd=spool.read_fd)
    sha256 = spool.dataset_sha256
    offset = spool.meta_end
    if sha256 is None or offset is None or offset < 0:
        raise InvalidInstance("File Meta group length is missing")
    return header, sha256, offset


