"""Ingest: byte-exact, durable, re-sends versioned, bad input refused without leftovers."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.config
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from appliance.base.errors import InvalidInstance, PacsEdgeError
from appliance.services.fsck import fsck
from appliance.services.ingest import IngestService
from appliance.store import database
from appliance.store.files import FileStore
from appliance.store.index import Index, RecordOutcome
from appliance.store.study_rows import study_by_uid

STUDY = "1.2.826.0.1.3680043.10.1234.1"
SERIES = "1.2.826.0.1.3680043.10.1234.1.1"


def write_instance(path: Path, sop: str, *, value: int = 0, study: str = STUDY,
                   series: str = SERIES, name: str = "Müller^Jürgen") -> Path:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientName = name
    ds.PatientID = "PID-1"
    ds.Modality = "CT"
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = 16
    ds.PixelData = np.full((16, 16), value, np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def dataset_bytes(path: Path) -> bytes:
    """Everything after the File Meta group: what byte-exact storage preserves."""
    data = path.read_bytes()
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


async def row_of(index: Index, sql: str, params: tuple[object, ...] = ()) -> Any:
    """The first row of `sql` on the index's reader, or None (what the test inspects)."""
    return await database.run_sync(index.reader, database.query_one, sql, params)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[IngestService]:
    files = FileStore(tmp_path / "store")
    files.prepare()
    async with Index(tmp_path / "index.sqlite3") as index:
        yield IngestService(files, index)


async def test_stored_file_is_byte_exact_and_indexed(
    service: IngestService, tmp_path: Path
) -> None:
    source = write_instance(tmp_path / "a.dcm", f"{SERIES}.1")
    result = await service.ingest_file(source)
    assert result.outcome is RecordOutcome.NEW
    stored = service.files.absolute(result.path)
    assert dataset_bytes(stored) == dataset_bytes(source)
    row = await row_of(
        service.index,
        "SELECT p.patient_name, i.sha256, i.size FROM instances i JOIN series se ON"
        " i.series_fk = se.id JOIN studies st ON se.study_fk = st.id"
        " JOIN patients p ON st.patient_fk = p.id"
    )
    assert row is not None and row[0] == "Müller^Jürgen" and row[2] == stored.stat().st_size


async def test_identical_resend_is_a_noop(service: IngestService, tmp_path: Path) -> None:
    source = write_instance(tmp_path / "a.dcm", f"{SERIES}.1")
    first = await service.ingest_file(source)
    again = await service.ingest_file(source)
    assert again.outcome is RecordOutcome.DUPLICATE
    totals = await service.index.totals()
    assert (totals.instances, totals.versions) == (1, 0)
    assert list(service.files.iter_files()) == [first.path]


async def test_changed_resend_becomes_current_and_keeps_the_prior_version(
    service: IngestService, tmp_path: Path
) -> None:
    sop = f"{SERIES}.1"
    old = await service.ingest_file(write_instance(tmp_path / "a.dcm", sop, value=1))
    new = await service.ingest_file(write_instance(tmp_path / "b.dcm", sop, value=2))
    assert new.outcome is RecordOutcome.NEW_VERSION
    assert old.path != new.path
    assert service.files.absolute(old.path).exists()
    assert service.files.absolute(new.path).exists()
    current = await row_of(service.index, "SELECT path FROM instances WHERE sop_uid = ?", (sop,))
    prior = await row_of(
        service.index,
        "SELECT path FROM instance_versions WHERE sop_uid = ?", (sop,)
    )
    assert current is not None and current[0] == new.path
    assert prior is not None and prior[0] == old.path
    totals = await service.index.totals()
    assert (totals.studies, totals.instances, totals.versions) == (1, 1, 1)


async def test_content_sent_again_after_a_correction_is_stored_every_time(
    service: IngestService, tmp_path: Path
) -> None:
    """X, Y, X, Y for one SOP Instance UID (a correction, its revert, the correction
    again): every send succeeds, the last one is current, the other content is the
    one prior version, and every row's file is there (docs/storage.md)."""
    sop = f"{SERIES}.1"
    x = write_instance(tmp_path / "x.dcm", sop, value=1)
    y = write_instance(tmp_path / "y.dcm", sop, value=2)
    outcomes = [(await service.ingest_file(path)).outcome for path in (x, y, x, y)]
    assert outcomes == [RecordOutcome.NEW, *[RecordOutcome.NEW_VERSION] * 3]
    current = await row_of(service.index, "SELECT sha256 FROM instances WHERE sop_uid = ?",
                           (sop,))
    prior = await row_of(service.index, "SELECT sha256, COUNT(*) FROM instance_versions")
    assert current is not None and current[0] == hashlib.sha256(dataset_bytes(y)).hexdigest()
    assert prior is not None and tuple(prior) == (
        hashlib.sha256(dataset_bytes(x)).hexdigest(), 1)
    assert len(list(service.files.iter_files())) == 2
    assert (await fsck(service.files, service.index, repair=False)).clean


async def test_a_refused_index_write_removes_only_a_file_this_ingest_created(
    service: IngestService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clean-up after a failed index write (a full disk, say) never deletes the file
    of a prior version that the same content, sent again, found under its name."""
    sop = f"{SERIES}.1"
    x = write_instance(tmp_path / "x.dcm", sop, value=1)
    first = await service.ingest_file(x)
    await service.ingest_file(write_instance(tmp_path / "y.dcm", sop, value=2))

    def refuse(*args: object, **kwargs: object) -> RecordOutcome:
        raise PacsEdgeError("index write failed: disk I/O error")

    monkeypatch.setattr(service.index, "record_instance_blocking", refuse)
    with pytest.raises(PacsEdgeError):
        await service.ingest_file(x)  # X's name is taken: the prior version's file
    assert service.files.absolute(first.path).exists()
    with pytest.raises(PacsEdgeError):
        await service.ingest_file(write_instance(tmp_path / "z.dcm", sop, value=3))
    assert len(list(service.files.iter_files())) == 2  # Z's own file went again
    monkeypatch.undo()
    assert (await fsck(service.files, service.index, repair=False)).clean
    assert (await service.ingest_file(x)).outcome is RecordOutcome.NEW_VERSION


async def test_content_sent_again_replaces_a_damaged_file_under_its_name(
    service: IngestService, tmp_path: Path
) -> None:
    """A file found under the name of the content being stored is kept only when its
    dataset hashes right: the acknowledged bytes are the stored bytes."""
    sop = f"{SERIES}.1"
    x = write_instance(tmp_path / "x.dcm", sop, value=1)
    first = await service.ingest_file(x)
    await service.ingest_file(write_instance(tmp_path / "y.dcm", sop, value=2))
    stored = service.files.absolute(first.path)
    damaged = bytearray(stored.read_bytes())
    damaged[-1] ^= 0xFF
    stored.write_bytes(bytes(damaged))
    again = await service.ingest_file(x)
    assert again.path == first.path
    assert dataset_bytes(stored) == dataset_bytes(x)
    row = await row_of(service.index, "SELECT size FROM instances WHERE path = ?",
                       (first.path,))
    assert row is not None and row[0] == stored.stat().st_size


async def test_index_names_current_hash_and_counts_instances_by_source(
    service: IngestService, tmp_path: Path
) -> None:
    """The named reads fsck, status and `init --force-new-keys` rely on."""
    sop = f"{SERIES}.1"
    index = service.index
    assert await index.current_content(sop) is None
    assert (await index.instance_count_from("DROPPER"), await index.pack_count()) == (0, 0)
    await service.ingest_file(write_instance(tmp_path / "a.dcm", sop, value=1),
                              source_ae="DROPPER")
    await service.ingest_file(write_instance(tmp_path / "b.dcm", f"{SERIES}.2"),
                              source_ae="OTHER")
    newer = await service.ingest_file(write_instance(tmp_path / "c.dcm", sop, value=2),
                                      source_ae="OTHER")
    stored = service.files.absolute(newer.path)
    current = await index.current_content(sop)
    assert current is not None
    assert current[0] == hashlib.sha256(dataset_bytes(stored)).hexdigest()
    # The replaced instance counts for its new source only.
    assert await index.instance_count_from("DROPPER") == 0
    assert await index.instance_count_from("OTHER") == 2
    assert await index.pack_count() == 0


@pytest.mark.parametrize(
    ("sop", "reason"),
    [
        ("1.2.3.4/../../etc", "not a valid UID"),
        ("1.2.abc.4", "not a valid UID"),
        ("1." + "2" * 70, "not a valid UID"),
    ],
)
async def test_invalid_uids_never_reach_the_file_system(
    service: IngestService, tmp_path: Path, sop: str, reason: str
) -> None:
    with pydicom.config.disable_value_validation():
        source = write_instance(tmp_path / "bad.dcm", sop)
    with pytest.raises(InvalidInstance, match=reason):
        await service.ingest_file(source)
    assert list(service.files.iter_files()) == []
    assert list(service.files.spool_dir.iterdir()) == []


async def test_truncated_dataset_is_refused_without_leftovers(
    service: IngestService, tmp_path: Path
) -> None:
    source = write_instance(tmp_path / "a.dcm", f"{SERIES}.1")
    source.write_bytes(source.read_bytes()[:-100])
    with pytest.raises(InvalidInstance, match="truncated"):
        await service.ingest_file(source)
    assert (await service.index.totals()).instances == 0
    assert list(service.files.spool_dir.iterdir()) == []


async def test_non_dicom_payload_is_refused(service: IngestService, tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"MZ\x90\x00" + b"\x00" * 500)
    with pytest.raises(InvalidInstance):
        await service.ingest_file(junk)


def _file_meta_element_edited(path: Path, tag: bytes, edit: Callable[[bytes], bytes]) -> None:
    """Replace the File Meta element `tag` (its 4 tag bytes, explicit VR with a 16-bit
    length) by `edit(element)`, keeping the group length right."""
    data = path.read_bytes()
    at = data.index(tag, 144)
    end = at + 8 + int.from_bytes(data[at + 6:at + 8], "little")
    element = edit(data[at:end])
    group_length = int.from_bytes(data[140:144], "little") + len(element) - (end - at)
    path.write_bytes(data[:140] + group_length.to_bytes(4, "little") + data[144:at] + element
                     + data[end:])


@pytest.mark.parametrize(("tag", "edit", "reason"), [
    (b"\x02\x00\x10\x00", lambda element: element[:6] + b"\x00\x00",  # empty value
     "File Meta lacks SOP Class, SOP Instance or Transfer Syntax"),
    (b"\x02\x00\x02\x00", lambda element: element[:4] + b"U\x00" + element[6:],
     "File Meta cannot be parsed"),
])
async def test_a_file_meta_without_a_value_or_with_an_unknown_vr_is_refused(
    service: IngestService, tmp_path: Path, tag: bytes, edit: Callable[[bytes], bytes],
    reason: str,
) -> None:
    """pydicom raises AttributeError writing an empty UID and NotImplementedError
    reading a VR it does not know: both are a refused file (import, drop folder,
    STOW-RS), not an error that stops the import. An empty Transfer Syntax UID cannot
    be told from the data set (an empty SOP Class UID can: below)."""
    source = write_instance(tmp_path / "a.dcm", f"{SERIES}.7")
    _file_meta_element_edited(source, tag, edit)
    with pytest.raises(InvalidInstance, match=reason):
        await service.ingest_file(source)
    assert list(service.files.spool_dir.iterdir()) == []


async def test_an_empty_media_storage_sop_class_uid_takes_the_data_sets(
    service: IngestService, tmp_path: Path
) -> None:
    source = write_instance(tmp_path / "a.dcm", f"{SERIES}.7")
    _file_meta_element_edited(source, b"\x02\x00\x02\x00",
                              lambda element: element[:6] + b"\x00\x00")
    result = await service.ingest_file(source)
    stored = pydicom.dcmread(service.files.absolute(result.path), stop_before_pixels=True)
    assert stored.file_meta.MediaStorageSOPClassUID == stored.SOPClassUID


async def test_completeness_counts_survive_a_reopen(tmp_path: Path) -> None:
    files = FileStore(tmp_path / "store")
    files.prepare()
    async with Index(tmp_path / "index.sqlite3") as index:
        service = IngestService(files, index)
        for n in range(3):
            await service.ingest_file(write_instance(tmp_path / f"{n}.dcm", f"{SERIES}.{n + 1}"))
        await service.ingest_file(write_instance(
            tmp_path / "x.dcm", f"{SERIES}.9.1", series=f"{SERIES}.9"))
    async with Index(tmp_path / "index.sqlite3") as index:
        row = await row_of(
            index,
            "SELECT instance_count, series_count, first_received_at <= last_received_at"
            " FROM studies WHERE study_uid = ?", (STUDY,),
        )
    assert row is not None and tuple(row) == (4, 2, 1)


async def test_adopting_an_older_file_does_not_move_the_last_arrival_back(
    service: IngestService, tmp_path: Path
) -> None:
    """fsck adopts an orphan with its file's mtime as arrival time; a study that received
    something since must not look quiet since then (the sync agent's "stable" test)."""
    await service.ingest_file(write_instance(tmp_path / "a.dcm", f"{SERIES}.1"))
    before = await study_by_uid(service.index, STUDY)
    assert before is not None
    orphan = service.files.absolute(f"{STUDY}/{SERIES}/{SERIES}.2.dcm")
    write_instance(orphan, f"{SERIES}.2")
    os.utime(orphan, (before.last_received_at - 3600,) * 2)
    report = await fsck(service.files, service.index, repair=True)
    assert report.adopted == [f"{STUDY}/{SERIES}/{SERIES}.2.dcm"]
    after = await study_by_uid(service.index, STUDY)
    assert after is not None and after.instance_count == 2
    assert after.last_received_at == before.last_received_at


async def test_index_commits_are_fsynced_wal(tmp_path: Path) -> None:
    """The ack guarantee rests on WAL + synchronous=FULL on the writer connection."""
    async with Index(tmp_path / "index.sqlite3") as index:
        assert index.writer is not None
        conn = index._writer_conn
        assert conn is not None
        async with conn.execute("PRAGMA journal_mode") as cur:
            assert (await cur.fetchone())[0] == "wal"  # type: ignore[index]
        async with conn.execute("PRAGMA synchronous") as cur:
            assert (await cur.fetchone())[0] == 2  # type: ignore[index]  # FULL
    raw = sqlite3.connect(tmp_path / "index.sqlite3")
    assert raw.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0] >= 1
    raw.close()
