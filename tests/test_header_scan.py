"""header_scan reads what pydicom reads, for the index, on every file pydicom ships.

read_header takes header_scan's answer in the plain case and pydicom's otherwise;
both must give the same InstanceHeader (or both refuse the file), and the plain
case must be the common one (else the scan would not save anything). A seeded
fuzz damages those files at random (`make soak` runs it longer): read_header
must refuse what it cannot read with InvalidInstance, never another error, and
where both paths read a header they must agree.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import fuzzing
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from appliance.base.errors import InvalidInstance, RejectedInstance
from appliance.services import dicom_header, header_scan
from appliance.services.dicom_header import read_header
from appliance.store.instance_header import InstanceHeader


def _both(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[object, object]:
    def outcome() -> object:
        try:
            return read_header(path)
        except RejectedInstance as exc:  # InvalidInstance, or a deflate bomb
            return ("refused", exc.message)

    fast = outcome()
    with monkeypatch.context() as patched:
        patched.setattr(header_scan, "scan", lambda *_args, **_kwargs: None)
        slow = outcome()
    return fast, slow


def test_the_scan_reads_what_pydicom_reads_for_the_files_pydicom_ships(
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = Path(pydicom.data.__file__).parent
    compared = plain = 0
    for path in sorted([*data.glob("test_files/*.dcm"), *data.glob("charset_files/*.dcm")]):
        fast, slow = _both(path, monkeypatch)
        if isinstance(slow, InstanceHeader):
            assert fast == slow, path.name
            compared += 1
            plain += header_scan.scan(path, dicom_header._SCAN_TAGS) is not None
        elif isinstance(fast, InstanceHeader):  # pydicom refused it: so must the scan
            pytest.fail(f"{path.name}: scan accepted what pydicom refused: {slow}")
    assert compared > 40
    assert plain > compared // 2


def _instance(path: Path, syntax: str) -> bytes:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "Doe^Jane "
    ds.PatientID = "ID 7"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = " 12"
    ds.InstanceNumber = "3"
    ds.Modality = "CT"
    item = Dataset()
    item.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedImageSequence = [item, item]
    ds.BitsAllocated = 8
    ds.PixelData = b"\0" * 4096
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    ds.preamble = b"\0" * 128
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_the_scan_reads_a_plain_instance_and_refuses_it_cut_short(
        tmp_path: Path, syntax: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "one.dcm"
    encoded = _instance(path, syntax)
    assert header_scan.scan(path, dicom_header._SCAN_TAGS) is not None
    fast, slow = _both(path, monkeypatch)
    assert fast == slow
    assert isinstance(fast, InstanceHeader)
    assert (fast.patient_name, fast.series_number, fast.instance_number) == ("Doe^Jane", 12, 3)
    for cut in (1, 7, 4096, len(encoded) - 1300):
        path.write_bytes(encoded[:-cut])
        with pytest.raises(InvalidInstance, match="truncated"):
            read_header(path)


def test_an_item_delimiter_outside_a_sequence_is_refused_as_pydicom_refuses_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pydicom (and readers like it) stop reading at an item delimiter outside a
    sequence: what follows it would be stored but never seen, so both paths refuse."""
    path = tmp_path / "one.dcm"
    encoded = _instance(path, ExplicitVRLittleEndian)
    at = encoded.index(b"\x10\x00\x10\x00PN")  # PatientName, and everything after it
    path.write_bytes(encoded[:at] + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + encoded[at:])
    assert header_scan.scan(path, dicom_header._SCAN_TAGS) is None
    fast, slow = _both(path, monkeypatch)
    assert fast == slow == ("refused", "dataset is truncated")


def test_a_file_meta_value_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    """pydicom raises its BytesLengthException (not a ValueError) for a UL of 6 bytes:
    the file is refused like any unparseable one, not an unexpected error."""
    path = tmp_path / "one.dcm"
    encoded = _instance(path, ExplicitVRLittleEndian)
    group_length = b"\x02\x00\x00\x00UL\x04\x00"
    assert encoded[132:140] == group_length
    path.write_bytes(encoded[:132] + b"\x02\x00\x00\x00UL\x06\x00" + encoded[140:144]
                     + b"\x00\x00" + encoded[144:])
    with pytest.raises(InvalidInstance, match=r"cannot be parsed \(BytesLengthException\)"):
        read_header(path)


def _damaged(rng: random.Random, encoded: bytes) -> bytes:
    """`encoded` with a few random bit flips, odd bytes, length-like words, cuts and
    insertions."""
    data = bytearray(encoded)
    for _ in range(rng.choice((1, 1, 2, 4, 16))):
        if not data:
            break
        at = rng.randrange(len(data))
        kind = rng.random()
        if kind < 0.4:
            data[at] ^= 1 << rng.randrange(8)
        elif kind < 0.6:
            data[at] = rng.choice((0x00, 0xFF, 0x7F, 0x80, 0x20))
        elif kind < 0.75:
            data[at:at + 4] = rng.choice((b"\xff\xff\xff\xff", b"\0\0\0\0",
                                          b"\xfe\xff\xff\x7f", rng.randbytes(4)))
        elif kind < 0.85:
            del data[at:at + rng.randrange(1, 64)]
        elif kind < 0.95:
            del data[at:]
        else:
            data[at:at] = rng.randbytes(rng.randrange(1, 32))
    return bytes(data)


def test_damaged_files_are_refused_or_read_alike_by_both_paths(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = Path(pydicom.data.__file__).parent
    originals = [p.read_bytes() for p in sorted([*data.glob("test_files/*.dcm"),
                                                 *data.glob("charset_files/*.dcm")])
                 if p.stat().st_size < 400_000]
    rng = random.Random(fuzzing.SEED)
    path = tmp_path / "damaged.dcm"
    for step in range(fuzzing.steps(400)):
        path.write_bytes(_damaged(rng, rng.choice(originals)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's remarks on the damage
            fast, slow = _both(path, monkeypatch)
        if isinstance(fast, InstanceHeader) and isinstance(slow, InstanceHeader):
            assert fast == slow, f"seed {fuzzing.SEED} step {step}"
