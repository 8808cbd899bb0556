"""The test data generator writes what it claims: readable files, the right transfer
syntax, deterministic UIDs and bytes, and bad input that is bad in the intended way."""

from __future__ import annotations

import re
from pathlib import Path

import dcmtk
import dicomgen
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def _valid_uid(uid: str) -> bool:
    return len(uid) <= 64 and bool(UID_RE.match(uid))


def test_study_has_the_requested_shape_and_query_attributes(tmp_path: Path) -> None:
    made = dicomgen.make_studies(tmp_path, seed=3, patients=2, studies_per_patient=2,
                                 series_per_study=2, instances_per_series=3)
    assert len(made) == 2 * 2 * 2 * 3
    assert len(dicomgen.group_by(made, "PatientID")) == 2
    studies = dicomgen.group_by(made, "StudyInstanceUID")
    assert len(studies) == 4
    for instances in studies.values():
        assert {i.header.Modality for i in instances} == {"CT", "MR"}
        assert len({i.series_uid for i in instances}) == 2
    for inst in made:
        ds = pydicom.dcmread(inst.path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert (ds.Rows, ds.Columns, ds.BitsAllocated) == (64, 64, 16)
        assert len(ds.PixelData) == 64 * 64 * 2
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                        "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                        "StudyDescription", "ReferringPhysicianName", "Modality",
                        "SeriesNumber", "SeriesDescription", "BodyPartExamined",
                        "InstanceNumber"):
            assert str(ds.get(keyword, "")) != "", keyword
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert _valid_uid(uid) and uid.startswith(dicomgen.UID_ROOT)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert len({i.sop_instance_uid for i in made}) == len(made)


def test_same_seed_same_bytes_other_seed_other_uids(tmp_path: Path) -> None:
    a = dicomgen.make_study(tmp_path / "a", seed=5)
    b = dicomgen.make_study(tmp_path / "b", seed=5)
    c = dicomgen.make_study(tmp_path / "c", seed=6)
    assert [x.path.read_bytes() for x in a] == [y.path.read_bytes() for y in b]
    assert not {x.sop_instance_uid for x in a} & {z.sop_instance_uid for z in c}
    assert a[0].patient_id != c[0].patient_id


def test_every_transfer_syntax_is_written_and_readable(tmp_path: Path) -> None:
    made = dicomgen.make_syntax_set(tmp_path)
    assert set(made) == {str(ts) for ts in dicomgen.TRANSFER_SYNTAXES.values()}
    for ts, inst in made.items():
        ds = pydicom.dcmread(inst.path)
        assert ds.file_meta.TransferSyntaxUID == ts
        assert "PixelData" in ds
        # dcmtk reads it too (-Un: print UIDs, not names).
        dump = dcmtk.dcmdump(inst.path, "-Un", "+P", "TransferSyntaxUID").check()
        assert f"[{ts}]" in dump.output
    # dcmtk kept the caller's SOP Instance UIDs when it compressed (+un).
    uids = {inst.sop_instance_uid for inst in made.values()}
    assert len(uids) == len(made) and all(u.startswith(dicomgen.UID_ROOT) for u in uids)


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, "explicit-be", "deflated", "rle"])
def test_dcmdump_reads_the_whole_file(tmp_path: Path, ts: str) -> None:
    inst = dicomgen.make_syntax_set(tmp_path, syntaxes=[ts])
    path = next(iter(inst.values())).path
    result = dcmtk.dcmdump(path).check()
    assert "PixelData" in result.output and "E:" not in result.output


def test_dataset_bytes_skip_exactly_the_file_meta(tmp_path: Path) -> None:
    inst = dicomgen.make_study(tmp_path, series_per_study=1, instances_per_series=1)[0]
    body = dicomgen.dataset_bytes(inst.path)
    assert body.startswith(b"\x08\x00\x05\x00CS")  # (0008,0005) SpecificCharacterSet
    assert inst.path.read_bytes().endswith(body)


def test_non_ascii_name_round_trips(tmp_path: Path) -> None:
    inst = dicomgen.make_non_ascii_instance(tmp_path)
    ds = pydicom.dcmread(inst.path)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Müller^Jürgen"
    assert "Müller".encode() in inst.path.read_bytes()


@pytest.mark.parametrize("kind,keyword", [("traversal", "SOPInstanceUID"),
                                          ("letters", "SOPInstanceUID"),
                                          ("traversal", "StudyInstanceUID"),
                                          ("letters", "SeriesInstanceUID")])
def test_bad_uid_files_carry_the_bad_uid(tmp_path: Path, kind: str, keyword: str) -> None:
    path = dicomgen.make_bad_uid_instance(tmp_path, kind=kind, keyword=keyword)
    uid = str(dicomgen.read_header(path).get(keyword))
    assert not _valid_uid(uid)
    assert ("../" in uid) if kind == "traversal" else re.search("[a-z]", uid)


def test_truncated_file_ends_inside_pixel_data(tmp_path: Path) -> None:
    path = dicomgen.make_truncated_instance(tmp_path)
    ds = pydicom.dcmread(path)  # pydicom reads what is there without complaint
    assert len(ds.PixelData) == ds.Rows * ds.Columns  # half of the 16-bit image
    result = dcmtk.dcmdump(path)
    assert not result.ok and "PixelData" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["truncated.dcm"]


def test_garbage_payload_has_meta_but_no_dataset(tmp_path: Path) -> None:
    path = dicomgen.make_garbage_payload(tmp_path)
    meta = pydicom.filereader.read_file_meta_info(path)
    assert _valid_uid(str(meta.MediaStorageSOPInstanceUID))
    assert not dcmtk.dcmdump(path).ok
    assert dicomgen.dataset_bytes(path).startswith(b"%PDF")


def test_non_dicom_file_is_plain_text(tmp_path: Path) -> None:
    path = dicomgen.make_non_dicom_file(tmp_path)
    assert b"DICM" not in path.read_bytes()


def test_ct_study_is_one_series_of_full_size_slices(tmp_path: Path) -> None:
    made = dicomgen.make_ct_study(tmp_path, n_slices=3, size=128)
    assert len(made) == 3 and len({i.series_uid for i in made}) == 1
    ds = pydicom.dcmread(made[0].path)
    assert (ds.Modality, ds.Rows, ds.Columns) == ("CT", 128, 128)
    assert len(ds.PixelData) == 128 * 128 * 2


def test_ct_phantom_is_12_bit_hounsfield_and_changes_along_the_series(tmp_path: Path) -> None:
    made = dicomgen.make_ct_phantom_series(tmp_path, n_slices=12, size=64)
    assert len(made) == 12 and len({i.series_uid for i in made}) == 1
    slices = [pydicom.dcmread(i.path) for i in made]
    first, middle = slices[0], slices[6]
    assert (first.BitsStored, first.RescaleIntercept, first.WindowCenter) == (12, -1024, -400)
    hu = first.pixel_array.astype(int) - 1024
    assert hu.min() < -900 and hu.max() > 600  # air and bone in the same slice
    change = abs(middle.pixel_array.astype(int) - first.pixel_array.astype(int))
    assert (change > 300).mean() > 0.02  # lungs and nodule differ, not just noise


def test_command_line_writes_a_study(tmp_path: Path) -> None:
    dicomgen.main(["study", str(tmp_path), "--patients", "2", "--instances", "1"])
    assert len(list(tmp_path.rglob("*.dcm"))) == 2 * 2 * 1
