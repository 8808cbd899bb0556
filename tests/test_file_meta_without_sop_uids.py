"""Files whose File Meta lacks the Media Storage SOP Class or Instance UID are stored.

Old archives write Part 10 files without (0002,0003) Media Storage SOP Instance UID,
or without (0002,0002) as well; dcmtk's storescu sends them (it reads the data set's
SOP UIDs). `pacs-edge import`, the drop folder and STOW-RS refused them ("File Meta
lacks SOP Class, SOP Instance or Transfer Syntax", 0xC000) though the data set names
the instance. The File Meta the box stores is its own (docs/storage.md), so it now
takes the data set's SOP Class and Instance UIDs (services/ingest._file_meta), and the
data set comes back byte for byte. A file with no Transfer Syntax UID is still refused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import dicomgen
import pydicom
import pytest
import webpeer
from conftest import EdgeServer
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
WAIT_SECONDS = 60.0


def write(folder: Path, number: int, *, keep_class: bool, syntax: str) -> tuple[Path, str]:
    """A Secondary Capture whose File Meta has no Media Storage SOP Instance UID (nor,
    unless keep_class, its SOP Class UID). Returns (path, SOP Instance UID)."""
    ds = Dataset()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = dicomgen.make_uid(470, "sop", number)
    ds.StudyInstanceUID = dicomgen.make_uid(470, "study", number)
    ds.SeriesInstanceUID = dicomgen.make_uid(470, "series", number)
    ds.PatientName, ds.PatientID, ds.Modality = "META^MISSING", f"META{number}", "OT"
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    if keep_class:
        meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = "1.2.3.4"
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=False)
    out.is_little_endian, out.is_implicit_VR = True, syntax == ImplicitVRLittleEndian
    write_dataset(out, ds)
    path = folder / f"{number}.dcm"
    path.write_bytes(out.getvalue())
    assert "MediaStorageSOPInstanceUID" not in pydicom.dcmread(path).file_meta
    return path, str(ds.SOPInstanceUID)


def stored(server: EdgeServer, sop_uid: str) -> Path | None:
    found = list((server.home / "store").rglob(f"{sop_uid}.*.dcm"))
    return found[0] if found else None


def wait_stored(server: EdgeServer, sop_uid: str) -> Path:
    deadline = time.monotonic() + WAIT_SECONDS
    while (path := stored(server, sop_uid)) is None:
        if time.monotonic() > deadline:
            rejected = sorted(p.name for p in server.home.glob("incoming.rejected/*"))
            pytest.fail(f"not stored after {WAIT_SECONDS:.0f} s; rejected: {rejected}")
        time.sleep(0.1)
    return path


def test_files_without_media_storage_uids_are_stored_by_every_file_edge(
        tmp_path: Path) -> None:
    sent = {edge: write(tmp_path, n, keep_class=n % 2 == 0,
                        syntax=ExplicitVRLittleEndian if n < 2 else ImplicitVRLittleEndian)
            for n, edge in enumerate(("import", "stow", "dropfolder"))}
    server = EdgeServer(webpeer.web_home(tmp_path / "home", webpeer.dcmtk.free_port()))
    server.configure(dropfolder={"stable_seconds": 0.2, "rescan_seconds": 1.0})
    server.start()
    try:
        webpeer.add_user(server, "rad", "radiologist")
        server.cli("import", str(sent["import"][0]))
        body, content_type = webpeer.multipart_body([sent["stow"][0]])
        answer = webpeer.session(server, "rad").post(
            f"{webpeer.base_url(server)}/dicom-web/studies", data=body,
            headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
            timeout=60)
        assert answer.status_code == 200, answer.text
        dropped = server.home / "incoming" / "old-archive.dcm"
        dropped.parent.mkdir(exist_ok=True)
        dropped.write_bytes(sent["dropfolder"][0].read_bytes())
        for edge, (path, sop_uid) in sent.items():
            kept = wait_stored(server, sop_uid)
            assert dicomgen.dataset_bytes(kept) == dicomgen.dataset_bytes(path), edge
            meta = pydicom.dcmread(kept, stop_before_pixels=True).file_meta
            assert meta.MediaStorageSOPInstanceUID == sop_uid, edge
            assert meta.MediaStorageSOPClassUID == SECONDARY_CAPTURE, edge
        status = json.loads(server.cli("status", "--json").stdout)
        assert status["instances"] == 3 and status["dropfolder"]["rejected"] == 0
    finally:
        server.stop()
    assert not server.unclean_stops, server.unclean_stops
