"""Read the attributes the index needs from a Part 10 file, without the pixel data.

The file is never rewritten: this only decodes a copy of its header for the
index. Values are decoded with the file's Specific Character Set, so names in
any character set land in the index as text.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pydicom.config
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian

from appliance.errors import InvalidInstance
from appliance.uids import is_valid_uid, normalise_uid


@dataclass(frozen=True)
class InstanceHeader:
    """What the index records about one instance (PHI: never log these values)."""

    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    study_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    referring_physician: str
    character_set: str
    series_uid: str
    modality: str
    series_number: int | None
    series_description: str
    body_part: str
    series_date: str
    series_time: str
    sop_uid: str
    sop_class_uid: str
    instance_number: int | None
    transfer_syntax: str


# The appliance validates what it relies on (UIDs, completeness) itself and
# stores everything else as sent. pydicom's own value checks would only add
# warnings whose text can quote attribute values (PHI) into the log.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

# Values above this size are skipped (seeked over), not read: pixel data stays on disk.
_DEFER_BYTES = 4096
_SEQUENCE_DELIMITER = (b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", b"\xff\xfe\xe0\xdd\x00\x00\x00\x00")


def read_header(path: Path) -> InstanceHeader:
    """Parse `path`'s header and check it is complete.

    Raises InvalidInstance with a PHI-free reason when the file is not DICOM,
    is truncated, or lacks valid UIDs.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
        if any("End of file" in str(w.message) for w in caught):
            raise InvalidInstance("dataset is truncated")
        ts = normalise_uid(ds.file_meta.get("TransferSyntaxUID", ""))
        if ts != DeflatedExplicitVRLittleEndian:
            _check_complete(ds, path)
        return header_from_dataset(ds, ts)
    except InvalidInstance:
        raise
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError,
            AttributeError, NotImplementedError, struct.error) as exc:
        raise InvalidInstance(f"dataset cannot be parsed ({type(exc).__name__})") from exc


def _check_complete(ds: Dataset, path: Path) -> None:
    """pydicom seeks over deferred values, so a cut-off last element goes unnoticed:
    check that the last top-level element ends exactly where the file does."""
    if len(ds) == 0:
        raise InvalidInstance("dataset is empty")
    last = ds.get_item(max(ds.keys()), keep_deferred=True)
    size = path.stat().st_size
    tell = getattr(last, "value_tell", None)
    length = getattr(last, "length", None)
    if tell is None or length is None:
        return
    if length == 0xFFFFFFFF:
        with path.open("rb") as fh:
            fh.seek(max(size - 8, 0))
            if fh.read(8) not in _SEQUENCE_DELIMITER:
                raise InvalidInstance("dataset is truncated")
    elif tell + length != size:
        raise InvalidInstance("dataset is truncated")


def header_from_dataset(ds: Dataset, transfer_syntax: str) -> InstanceHeader:
    uids = {
        kw: normalise_uid(ds.get(kw, ""))
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
    }
    for keyword, value in uids.items():
        if not value:
            raise InvalidInstance(f"{keyword} is missing")
        if not is_valid_uid(value):
            raise InvalidInstance(f"{keyword} is not a valid UID")
    if not is_valid_uid(transfer_syntax):
        raise InvalidInstance("transfer syntax UID is missing or invalid")
    charset = ds.get("SpecificCharacterSet", "")
    return InstanceHeader(
        patient_id=_text(ds, "PatientID"),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        patient_name=_text(ds, "PatientName"),
        birth_date=_text(ds, "PatientBirthDate"),
        sex=_text(ds, "PatientSex"),
        study_uid=uids["StudyInstanceUID"],
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        accession_number=_text(ds, "AccessionNumber"),
        study_id=_text(ds, "StudyID"),
        study_description=_text(ds, "StudyDescription"),
        referring_physician=_text(ds, "ReferringPhysicianName"),
        character_set="\\".join(charset) if isinstance(charset, list | tuple) else str(charset),
        series_uid=uids["SeriesInstanceUID"],
        modality=_text(ds, "Modality"),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"),
        body_part=_text(ds, "BodyPartExamined"),
        series_date=_text(ds, "SeriesDate"),
        series_time=_text(ds, "SeriesTime"),
        sop_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        instance_number=_int(ds, "InstanceNumber"),
        transfer_syntax=transfer_syntax,
    )


def _text(ds: Dataset, keyword: str) -> str:
    value: Any = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
