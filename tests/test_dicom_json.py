"""The metadata's own DICOM JSON encoder answers exactly what pydicom's to_json_dict did.

appliance/services/dicom_json.py decodes common elements from their raw bytes
and leaves the rest to pydicom. The reference is the same build with the
encoder replaced by pydicom's `to_json_dict` for every element, which is the
former path; outputs are compared as parsed JSON, file by file.
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Any

import dicomgen
import pydicom.data
import pytest
from pydicom import config, dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from appliance.services import series_metadata
from appliance.services.dicom_json import element_json

URL = "https://edge.example/dicom-web/studies/1.2/series/1.2.3/instances/1.2.3.4"
CYRILLIC_NAME = "\u0418\u0432\u0430\u043d\u043e\u0432^\u041f\u0451\u0442\u0440"
SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)


def _both(path: Path, syntax: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """(the encoder's JSON, pydicom's); pydicom's warnings on the invalid values are expected."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _json(path, syntax, monkeypatch)


def _json(path: Path, syntax: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    fast = json.loads(json.dumps(series_metadata.instance_json(path, syntax, URL)))
    with monkeypatch.context() as patch:
        patch.setattr(series_metadata, "dataset_element_json",
                      lambda ds, tag, codec: ds[tag].to_json_dict(None, 1024))
        slow = json.loads(json.dumps(series_metadata.instance_json(path, syntax, URL)))
    return fast, slow


def _item(**elements: Any) -> Dataset:
    item = Dataset()
    for keyword, value in elements.items():
        setattr(item, keyword, value)
    return item


def _rich_header(base: Path, charset: str, name: str, text: str) -> Dataset:
    """A header with every case the encoder decides on, from a generated CT's."""
    ds = dcmread(base, stop_before_pixels=True)
    ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.OtherPatientNames = ["Doe^John", "Roe^Jane=Roe^J=", "Poe^Ed^^Dr.^Jr."]
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = text
    ds.SeriesDescription = f"  {text}  "
    ds.ImageComments = f"{text}\nline two  "
    ds.AdditionalPatientHistory = "x" * 3000  # deferred by defer_size: read again by pydicom
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = ["-125.5", " 3e2", "+.5"]
    ds.PixelSpacing = "0.48828125\\0.48828125"
    ds.SliceThickness = ""
    ds.WindowCenter = "40\\\\400"  # an empty value among numbers: pydicom's answer, whatever it is
    ds.add_new(0x00181030, "LO", "a\\\\b")  # ProtocolName with an empty value in the middle
    ds.AcquisitionNumber = "12"
    ds.EchoNumbers = ["1", "+2", " 3"]
    ds.StationName = " STATION 1 "
    ds.InstanceCreationTime = "101010.123456"
    ds.AcquisitionDateTime = "20230301101010.5+0100"
    ds.PatientAge = "042Y"
    ds.RetrieveAETitle = ["  AE ONE", "AE2 "]
    ds.FrameIncrementPointer = 0x00181063
    ds.add_new(0x00209165, "AT", [0x00200032, 0x00200037])  # DimensionIndexPointer
    ds.add_new(0x00280107, "US", 4095)  # LargestImagePixelValue
    ds.add_new(0x00281052, "DS", "-1024")
    ds.add_new(0x00189219, "FD", [1.25, -2.5])  # TubeAngle: two doubles
    ds.add_new(0x00189306, "FD", 0.1)
    ds.add_new(0x00181150, "IS", "")
    ds.add_new(0x00280106, "SS", [-5, 7])
    ds.add_new(0x00186020, "SL", -70000)
    ds.add_new(0x00082112, "SQ", Sequence())  # an empty sequence
    ds.add_new(0x00400275, "SQ", Sequence([
        _item(RequestedProcedureID="RP1", ScheduledProcedureStepDescription=text,
              ReferencedStudySequence=Sequence([
                  _item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",
                        ReferencedSOPInstanceUID="1.2.3.4.5.6\0")])),
        _item(RequestedProcedureID="", ScheduledProcedureStepID="SPS\\2")]))
    icon = _item(Rows=4, Columns=4, BitsAllocated=8, SamplesPerPixel=1)
    icon.add_new(0x7FE00010, "OB", bytes(range(256)) * 8)  # nested bulk stays inline
    ds.add_new(0x00880200, "SQ", Sequence([icon]))
    ds.add_new(0x00091010, "LO", "ACME 1.0")
    ds.add_new(0x00091001, "LO", "private text")
    ds.add_new(0x00091002, "OB", b"\x01\x02\x03\x04")
    ds.add_new(0x00091003, "US", [1, 2, 3])
    ds.add_new(0x00091004, "UN", b"abc")  # odd length, unknown
    ds.add_new(0x00091005, "UN", b"z" * 2000)  # bulk
    ds.add_new(0x00081090, "UN", b"ModelX  ")  # a public element sent as UN
    ds.add_new(0x00180015, "CS", "")
    ds.add_new(0x00081160, "IS", "1\\2\\3")  # ReferencedFrameNumber
    ds.NumberOfFrames = "3"
    ds.add_new(0x00080114, "UT", f"{text}\\not split ")
    ds.add_new(0x00081190, "UR", "https://example.org/a b ")
    return ds


def _write(ds: Dataset, path: Path, syntax: str) -> Path:
    ds.file_meta.TransferSyntaxUID = syntax
    dcmwrite(path, ds, implicit_vr=syntax == ImplicitVRLittleEndian,
             little_endian=syntax != ExplicitVRBigEndian,
             force_encoding=True)
    return path


@pytest.fixture(scope="module")
def rich_files(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, str]]:
    folder = tmp_path_factory.mktemp("rich")
    base = next(iter(dicomgen.make_syntax_set(
        folder / "base", syntaxes=[ExplicitVRLittleEndian]).values())).path
    out = []
    for charset, name, text in (
            ("ISO_IR 192", "Yamada^Tarou=山田^太郎=やまだ^たろう", "Kopf nativ, Müller, 頭部"),
            ("ISO_IR 100", "Müller^Jürgen", "Thorax ä ö ü ß"),
            ("", "Smith^Ann", "Chest CT"),
            ("ISO_IR 144", CYRILLIC_NAME, CYRILLIC_NAME[:4]),
            ("\\ISO 2022 IR 87", "Yamada^Tarou=山田^太郎=やまだ^たろう", "Chest")):
        for syntax in SYNTAXES:
            with warnings.catch_warnings():  # the invalid values are on purpose
                warnings.simplefilter("ignore")
                ds = _rich_header(base, charset, name, text)
                out.append((_write(ds, folder / f"{len(out)}.dcm", syntax), syntax))
    return out


def test_metadata_json_equals_pydicoms_for_every_transfer_syntax(
        syntax_set: dict[str, dicomgen.GeneratedInstance],
        monkeypatch: pytest.MonkeyPatch) -> None:
    for syntax, instance in syntax_set.items():
        fast, slow = _both(instance.path, syntax, monkeypatch)
        assert fast == slow, syntax


@pytest.mark.parametrize("validation", [config.WARN, config.IGNORE])  # IGNORE: the server's
def test_metadata_json_equals_pydicoms_for_names_text_numbers_sequences_and_private_tags(
        rich_files: list[tuple[Path, str]], monkeypatch: pytest.MonkeyPatch,
        validation: int) -> None:
    monkeypatch.setattr(config.settings, "reading_validation_mode", validation)
    for path, syntax in rich_files:
        fast, slow = _both(path, syntax, monkeypatch)
        assert fast == slow, (path.name, syntax)
    explicit, _ = _both(*rich_files[0], monkeypatch)
    assert explicit["00100010"]["Value"] == [
        {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}]
    assert explicit["00200032"]["Value"] == [-125.5, 300.0, 0.5]
    assert explicit["00880200"]["Value"][0]["7FE00010"]["InlineBinary"]
    assert explicit["00091005"] == {"vr": "UN", "BulkDataURI": f"{URL}/bulkdata/00091005"}


def test_metadata_json_equals_pydicoms_for_a_multiframe_instance_with_odd_raw_elements(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = next(iter(dicomgen.make_syntax_set(
        tmp_path / "base", syntaxes=[ExplicitVRLittleEndian]).values())).path
    ds = dcmread(base)
    frame = ds.PixelData
    ds.NumberOfFrames = 3
    ds.PixelData = frame * 3
    ds.add_new(0x00280009, "AT", 0x00181063)
    ds.add_new(0x00181063, "DS", "33.3")
    head = _write(ds, tmp_path / "head.dcm", ExplicitVRLittleEndian).read_bytes()
    pixel_at = head.rindex(b"\xe0\x7f\x10\x00")
    un_odd = struct.pack("<HH2sHI", 0x7FDF, 0x1001, b"UN", 0, 3) + b"abc"
    odd = b"".join(  # a private block right before Pixel Data, values as a writer may send them
        struct.pack("<HH2sH", 0x7FDF, element, vr, len(value)) + value
        + (un_odd if element == 0x0010 else b"")
        for element, vr, value in (
            (0x0010, b"LO", b"ODD "), (0x1002, b"LO", b"xyz"), (0x1003, b"DS", b"1.5"),
            (0x1004, b"DS", b"1.5.5 "), (0x1005, b"IS", b"1.0 "), (0x1006, b"LO", b"  "),
            (0x1007, b"UI", b"\0\0"), (0x1008, b"DS", b"  "), (0x1009, b"PN", b"^^ "),
            (0x100A, b"AE", b"  "), (0x100B, b"US", b"\1\0\2"), (0x100C, b"AT", b"\x10\x00")))
    path = tmp_path / "multiframe.dcm"
    path.write_bytes(head[:pixel_at] + odd + head[pixel_at:])
    fast, slow = _both(path, ExplicitVRLittleEndian, monkeypatch)
    assert fast == slow
    assert fast["7FE00010"] == {"vr": "OW", "BulkDataURI": f"{URL}/bulkdata/7FE00010"}
    assert fast["00280008"]["Value"] == [3]


def test_metadata_json_equals_pydicoms_for_the_files_pydicom_ships(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """pydicom's own test files: odd writers, big endian, ISO 2022 character sets, ..."""
    data = Path(pydicom.data.__file__).parent
    compared = 0
    for path in sorted([*data.glob("test_files/*.dcm"), *data.glob("charset_files/*.dcm")]):
        try:
            syntax = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        except Exception:  # no file meta or not readable: not a stored instance
            continue
        fast, slow = _both(path, syntax, monkeypatch)
        assert fast == slow, path.name
        compared += 1
    assert compared > 50


def test_dicom_json_elements_are_decoded_without_pydicom_values() -> None:
    """The encoder does decode the common cases itself (else it would not be faster)."""
    def raw(tag: int, vr: str | None, value: bytes) -> RawDataElement:
        return RawDataElement(tag, vr, len(value), value, 0, vr is None, True)

    assert element_json(raw(0x00100010, "PN", b"A^B=C^D "), "UTF8") == {
        "vr": "PN", "Value": [{"Alphabetic": "A^B", "Ideographic": "C^D"}]}
    assert element_json(raw(0x00280030, None, b"0.5\\0.25"), None) == {
        "vr": "DS", "Value": [0.5, 0.25]}
    assert element_json(raw(0x00280010, "US", b"\x00\x02"), None) == {"vr": "US", "Value": [512]}
    assert element_json(raw(0x00091001, None, b"abcd"), "UTF8") is None  # implicit private
    assert element_json(DataElement(0x00100010, "PN", "A^B"), "UTF8") is None


def test_non_finite_numbers_are_answered_empty_never_as_nan_or_infinity() -> None:
    """JSON has no NaN or Infinity (PS3.18 F.2.3 makes DS, FL and FD JSON numbers)."""
    def raw(tag: int, vr: str, value: bytes) -> RawDataElement:
        return RawDataElement(tag, vr, len(value), value, 0, False, True)

    nan, inf = struct.pack("<d", float("nan")), struct.pack("<f", float("inf"))
    assert element_json(raw(0x00189087, "FD", nan), None) == {"vr": "FD"}
    assert element_json(raw(0x00189087, "FD", struct.pack("<d", 1.5) + nan), None) == {
        "vr": "FD"}
    assert element_json(raw(0x00181320, "FL", inf), None) == {"vr": "FL"}
    assert element_json(raw(0x00201041, "DS", b"1e400 "), None) == {"vr": "DS"}
    assert element_json(raw(0x00280030, "DS", b"0.5\\-1e999"), None) == {"vr": "DS"}
    assert element_json(raw(0x00189087, "FD", struct.pack("<d", 1.5)), None) == {
        "vr": "FD", "Value": [1.5]}


def _non_finite_header(base: Path) -> Dataset:
    ds = dcmread(base, stop_before_pixels=True)
    ds.add_new(0x00189087, "FD", float("nan"))  # Diffusion b-value
    ds.add_new(0x00189089, "FD", [1.0, float("-inf"), 0.0])  # Diffusion Gradient Orientation
    ds.add_new(0x00201041, "DS", "NaN")  # SliceLocation: pydicom parses it, to nan
    ds.add_new(0x00280030, "DS", "1e400\\0.5")  # PixelSpacing: overflows to inf
    ds.add_new(0x00181063, "DS", "33.3")  # a finite one stays
    item = _item(SpecificCharacterSet="ISO_IR 100")  # the item goes to pydicom whole
    item.add_new(0x00189087, "FD", float("inf"))
    item.add_new(0x00181320, "FL", 2.5)  # B1rms
    ds.add_new(0x00400275, "SQ", Sequence([item]))
    return ds


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_metadata_of_an_instance_with_nan_and_infinity_is_valid_json(
        tmp_path: Path, syntax: str) -> None:
    base = next(iter(dicomgen.make_syntax_set(
        tmp_path / "base", syntaxes=[ExplicitVRLittleEndian]).values())).path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = _write(_non_finite_header(base), tmp_path / "nan.dcm", syntax)
        found = series_metadata.instance_json(path, syntax, URL)
    json.dumps(found, allow_nan=False)  # raises on NaN or Infinity
    for tag, vr in (("00189087", "FD"), ("00189089", "FD"), ("00201041", "DS"),
                    ("00280030", "DS")):
        assert found[tag] == {"vr": vr}, tag
    assert found["00181063"] == {"vr": "DS", "Value": [33.3]}
    (item,) = found["00400275"]["Value"]
    assert item["00189087"] == {"vr": "FD"}
    assert item["00181320"] == {"vr": "FL", "Value": [2.5]}
