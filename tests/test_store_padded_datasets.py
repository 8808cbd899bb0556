"""Data sets that end in zero padding, or whose last element is out of order, are stored.

Old archives and CD writers pad files with zero bytes after the last element (to an
even length, a block, a sector), and some modalities append a forgotten element after
Pixel Data. dcmtk reads both. The box refused both with 0xC000 "dataset is truncated"
whenever pydicom read the header (a name outside ASCII, a multi-valued key, big
endian...): it took the element with the highest tag for the last one in the file, and
wanted it to end at the file's last byte. Now the element last in the file must end
where the file does, or where zero bytes begin that run to its end
(services/dicom_header._check_complete). What was sent comes back byte for byte.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import dicomgen
import pydicom
import pytest
import webpeer
from cget import c_get_studies
from conftest import HOST, TEST_AE, EdgeServer
from pydicom import encaps
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1
from pynetdicom import AE

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000
FRAME = b"\xff\xd8fake-jpeg\xff\xd9\x00"  # an odd-length frame, padded to even


def write(folder: Path, number: int, name: str, *, tail: bytes = b"",
          date_last: bool = False, encapsulated: bool = False) -> Path:
    """A Secondary Capture whose name is in Latin-1 (pydicom reads its header), with
    `tail` appended; date_last: Study Date (0008,0020) written after Pixel Data."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = dicomgen.make_uid(460, "sop", number)
    ds.StudyInstanceUID = dicomgen.make_uid(460, "study", number)
    ds.SeriesInstanceUID = dicomgen.make_uid(460, "series", number)
    ds.PatientName, ds.PatientID, ds.Modality = name, f"PAD{number}", "OT"
    if not date_last:
        ds.StudyDate = "20240102"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if encapsulated:
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.PixelData = encaps.encapsulate([FRAME])
        ds["PixelData"].is_undefined_length = True
        ds["PixelData"].VR = "OB"
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = bytes(range(16))
    path = folder / f"{number}.dcm"
    ds.save_as(path, enforce_file_format=True)
    if date_last:
        tail = struct.pack("<HH2sH", 0x0008, 0x0020, b"DA", 8) + b"20240102" + tail
    path.write_bytes(path.read_bytes() + tail)
    return path


CASES = {  # name: (write's arguments, C-STORE status)
    "zero-padding-to-even": (dict(tail=b"\0"), SUCCESS),
    "zero-padding-16": (dict(tail=bytes(16)), SUCCESS),
    "zero-padding-to-a-sector": (dict(tail=bytes(2048 - 628)), SUCCESS),
    "encapsulated-zero-padding": (dict(tail=bytes(100), encapsulated=True), SUCCESS),
    "element-after-pixel-data": (dict(date_last=True), SUCCESS),
    "element-after-pixel-data-padded": (dict(date_last=True, tail=bytes(6)), SUCCESS),
    "garbage-after-the-dataset": (dict(tail=b"\0\0\x01\0"), CANNOT_UNDERSTAND),
}


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeServer]:
    with webpeer.running_web_server(tmp_path_factory.mktemp("padded")) as server:
        yield server


def send_raw(server: EdgeServer, path: Path) -> int:
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    ae = AE(ae_title=TEST_AE)
    ae.add_requested_context(SECONDARY_CAPTURE, meta.TransferSyntaxUID)
    assoc = ae.associate(HOST, server.port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


@pytest.mark.parametrize("case", CASES)
def test_padded_or_reordered_dataset_is_stored_and_retrieved_byte_exact(
        box: EdgeServer, raw_sender: None, tmp_path: Path, case: str) -> None:
    arguments, status = CASES[case]
    number = list(CASES).index(case)
    path = write(tmp_path, number, "Müller^Jürgen", **arguments)  # type: ignore[arg-type]
    sent = dicomgen.dataset_bytes(path)
    assert send_raw(box, path) == status
    study_uid = dicomgen.make_uid(460, "study", number)
    if status != SUCCESS:
        assert "dataset is truncated" in box.log()
        return
    syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    arrived, finals = c_get_studies(box.port, [study_uid], {(SECONDARY_CAPTURE, syntax)})
    assert finals == [SUCCESS]
    assert list(arrived.values()) == [[sent]]
    client = webpeer.dicomweb(box, "rad")
    [metadata] = client.retrieve_study_metadata(study_uid)
    assert metadata["00100010"]["Value"][0]["Alphabetic"] == "Müller^Jürgen"
    [instance] = client.retrieve_study(study_uid, media_types=(("application/dicom", "*"),))
    assert instance.PatientName == "Müller^Jürgen" and instance.StudyDate == "20240102"
    if arguments.get("encapsulated"):
        [frame] = client.retrieve_instance_frames(
            study_uid, str(instance.SeriesInstanceUID), str(instance.SOPInstanceUID), [1],
            media_types=(("application/octet-stream", "*"),))
        assert frame == FRAME
