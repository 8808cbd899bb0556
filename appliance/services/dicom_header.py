"""Read the attributes the index needs from a Part 10 file, without the pixel data.

The file is never rewritten: this only decodes a copy of its header for the
index. Values are decoded with the file's Specific Character Set, so names in
any character set land in the index as text. A value whose bytes that set cannot
read (Latin-1 bytes under ISO_IR 192, common in real life) is read as Latin-1,
where pydicom would put U+FFFD in place of each letter: the name still reads,
matches (`Weiß*`) and can be told apart from others; WADO-RS metadata reads it so
too (dicom_json.latin1_fallback). A deflated dataset is read by
appliance.services.deflated, which inflates it in bounded chunks and keeps only the
elements in INDEX_KEYWORDS.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
import pydicom.config
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian

from appliance.base import compat
from appliance.base.errors import InvalidInstance
from appliance.base.uids import is_valid_uid, normalise_uid
from appliance.services import header_scan, pydicom_remarks
from appliance.services.deflated import read_deflated_elements
from appliance.services.dicom_json import REPLACEMENT, latin1_fallback
from appliance.store.instance_header import InstanceHeader

# The appliance validates what it relies on (UIDs, completeness) itself and
# stores everything else as sent. pydicom's own value checks would only add
# warnings whose text can quote attribute values (PHI) into the log.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

# Values above this size are skipped (seeked over), not read: pixel data stays on disk.
_DEFER_BYTES = 4096
_DELIMITER_TAGS = (b"\xfe\xff\xdd\xe0", b"\xff\xfe\xe0\xdd")  # little, big endian
_SEQUENCE_DELIMITERS = tuple(tag + b"\0\0\0\0" for tag in _DELIMITER_TAGS)
_TAIL_CHUNK = 1 << 16
# What a deflated dataset may inflate to unless the caller says otherwise (store.max_inflated_mb).
DEFAULT_MAX_INFLATED = 512 << 20

# Every attribute header_from_dataset reads, and the character set that decodes them.
INDEX_KEYWORDS: Sequence[str] = (
    "SpecificCharacterSet", "PatientID", "IssuerOfPatientID", "PatientName",
    "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
    "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName",
    "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined",
    "SeriesDate", "SeriesTime", "SOPInstanceUID", "SOPClassUID", "InstanceNumber",
)
_INDEX_TAGS = frozenset(int(tag_for_keyword(k) or 0) for k in INDEX_KEYWORDS)
_SCAN_TAGS = header_scan.wanted(INDEX_KEYWORDS)


def read_header(path: str | Path, *, max_inflated: int = DEFAULT_MAX_INFLATED,
                fd: int | None = None) -> InstanceHeader:
    """Parse `path`'s header and check it is complete. `fd`: a descriptor of `path` open
    for reading that the caller keeps (a spool's: no open and close of the path).

    Raises InvalidInstance with a PHI-free reason when the file is not DICOM,
    is truncated, or lacks valid UIDs; InflateLimitExceeded when its dataset is
    deflated and inflates beyond `max_inflated` bytes.

    The common case (little endian, plain ASCII values) is read by header_scan
    without pydicom; pydicom reads everything else.
    """
    try:
        scanned = header_scan.scan(path, _SCAN_TAGS, fd=fd)
        if scanned is not None:
            values, syntax = scanned
            return header_from_dataset(values, syntax)
        with open(path, "rb") as fh:
            read_preamble(fh, force=False)
            meta = compat.read_file_meta(fh)
            ts = normalise_uid(meta.get("TransferSyntaxUID", ""))
            if ts == DeflatedExplicitVRLittleEndian:
                return header_from_dataset(_read_deflated(fh, max_inflated), ts)
        with pydicom_remarks.held_back() as remarks:
            ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
        if any("End of file" in remark for remark in remarks):
            raise InvalidInstance("dataset is truncated")
        _check_complete(ds, path)
        return header_from_dataset(ds, ts)
    except InvalidInstance:
        raise
    except RecursionError as exc:
        # pydicom reads each nested sequence a few frames deeper: ~200 levels exhaust
        # Python's stack (header_scan hands such data sets to it past 64). No writer
        # nests so deep; a dataset that does cannot be read, by the web edge either.
        raise InvalidInstance("sequences nested too deep") from exc
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError,
            AttributeError, NotImplementedError, struct.error, BytesLengthException) as exc:
        raise InvalidInstance(f"dataset cannot be parsed ({type(exc).__name__})") from exc


def _read_deflated(fh: BinaryIO, max_inflated: int) -> Dataset:
    """The indexed elements of the deflated dataset at `fh`'s position, decoded."""
    kept = read_deflated_elements(fh, _INDEX_TAGS, limit=max_inflated)
    # The walk kept whole elements, so nothing here can run short; pydicom's remarks
    # on odd encodings could quote values (PHI), so they go nowhere.
    with pydicom_remarks.held_back():
        return read_dataset(DicomBytesIO(kept), is_implicit_VR=False, is_little_endian=True)


def _check_complete(ds: Dataset, path: str | Path) -> None:
    """pydicom seeks over deferred values, so a cut-off last element goes unnoticed:
    check that the element last in the file (not the highest tag: writers append
    elements out of order) ends where the file does, or where zero bytes begin that
    run to its end. Old archives and CD writers pad files with zeros (to an even
    length, a block, a sector); dcmtk reads past them, and they are kept as sent."""
    if len(ds) == 0:
        raise InvalidInstance("dataset is empty")
    # By tag, not by iterating the data set: that would convert (read) every value.
    tags = list(ds.keys())
    elements = [ds.get_item(tag, keep_deferred=True) for tag in tags]
    last = max(elements, key=_position)
    size = os.stat(path).st_size
    tell = getattr(last, "value_tell", None)
    length = getattr(last, "length", None)
    undefined = length == 0xFFFFFFFF or getattr(last, "is_undefined_length", False)
    if not undefined:
        if tell is None or length is None or tell + length == size:
            return  # a parsed sequence of defined length (read whole), or the file's end
        end = tell + length
        with open(path, "rb") as fh:
            complete = end < size and _zero_tail_start(fh, size, stop=end) == end
    else:
        with open(path, "rb") as fh:
            fh.seek(max(size - 8, 0))
            complete = fh.read(8) in _SEQUENCE_DELIMITERS
            if not complete:
                # The sequence delimiter's tag is the last non-zero data: its zero
                # length and the padding follow.
                zeros_from = _zero_tail_start(fh, size)
                fh.seek(max(zeros_from - 4, 0))
                complete = size - zeros_from >= 4 and fh.read(4) in _DELIMITER_TAGS
    if not complete:
        raise InvalidInstance("dataset is truncated")


def _position(element: object) -> int:
    """Where an element is in the file: its value (a raw element), or its header (one
    pydicom has parsed already: a sequence)."""
    return int(getattr(element, "value_tell", None) or getattr(element, "file_tell", None) or 0)


def _zero_tail_start(fh: BinaryIO, size: int, *, stop: int = 0) -> int:
    """Where the run of zero bytes that ends the file begins (`size` when the last byte
    is not zero; `stop` when it runs down to there), read backwards a chunk at a time:
    nothing below `stop` is read (a value may end in zeros of its own)."""
    end = size
    while end > stop:
        start = max(end - _TAIL_CHUNK, stop)
        fh.seek(start)
        kept = fh.read(end - start).rstrip(b"\0")
        if kept:
            return start + len(kept)
        end = start
    return stop


def header_from_dataset(ds: Dataset | Mapping[str, Any], transfer_syntax: str) -> InstanceHeader:
    """The InstanceHeader of a Dataset, or of plain values by keyword (header_scan)."""
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


def _text(ds: Dataset | Mapping[str, Any], keyword: str) -> str:
    # The raw bytes first: ds.get() below converts the element in place.
    raw = ds.get_item(keyword) if isinstance(ds, Dataset) else None
    value: Any = ds.get(keyword, "")
    # A str is every value header_scan gives: the common case first.
    text = value.strip() if type(value) is str else _joined(value)
    if REPLACEMENT in text and isinstance(raw, RawDataElement):
        return latin1_fallback(raw.value) or text
    return text


def _joined(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: Dataset | Mapping[str, Any], keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
