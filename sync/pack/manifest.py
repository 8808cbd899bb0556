"""The manifest: one encrypted blob per pack describing every instance in it.

It is the only place patient data lives in the cloud, and it carries all the
index needs to rebuild its patient/study/series/instance rows (a lost box is
restored from manifests alone) plus where each instance sits in the pack.

Blob layout::

    b"PEMANI01" | pack_id (16) | nonce (12) | AES-256-GCM(data_key, nonce,
                                               zlib(JSON, UTF-8), aad)
    aad = b"PEMANI01" | pack_id

The data key is the pack's own. The nonce is random; writers redraw it while
its first four bytes are zero, so it can never equal a segment nonce
(00000000 | u64 index) under the same key. Readers accept any nonce.

JSON keys for DICOM attributes are DICOM keywords (PatientID, ...); format
fields are snake_case. Readers ignore keys they do not know, so later writers
may add fields without a new version; removing or changing one needs version 2.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sync.pack.blob_format import MANIFEST
from sync.pack.pack_errors import PackFormatError, PackIntegrityError
from sync.pack.segments import (
    PACK_ID_SIZE,
    check_data_key,
    check_pack_id,
    check_segment_size,
    pack_size,
)

FORMAT_VERSION = 1
MANIFEST_MAGIC = MANIFEST.magic
FORMAT_NAME = "pacs-edge-manifest"
_NONCE_SIZE = 12
_PREFIX_SIZE = len(MANIFEST_MAGIC) + PACK_ID_SIZE + _NONCE_SIZE
# An authenticated manifest is ours, but a bound keeps a bug from eating memory.
MAX_MANIFEST_JSON = 256 << 20

# Python field -> DICOM keyword. Field names match appliance.services.dicom_header.InstanceHeader.
_STUDY_KEYWORDS = {
    "patient_id": "PatientID",
    "issuer_of_patient_id": "IssuerOfPatientID",
    "patient_name": "PatientName",
    "birth_date": "PatientBirthDate",
    "sex": "PatientSex",
    "study_uid": "StudyInstanceUID",
    "study_date": "StudyDate",
    "study_time": "StudyTime",
    "accession_number": "AccessionNumber",
    "study_id": "StudyID",
    "study_description": "StudyDescription",
    "referring_physician": "ReferringPhysicianName",
    "character_set": "SpecificCharacterSet",
}
_SERIES_KEYWORDS = {
    "series_uid": "SeriesInstanceUID",
    "modality": "Modality",
    "series_number": "SeriesNumber",
    "series_description": "SeriesDescription",
    "body_part": "BodyPartExamined",
    "series_date": "SeriesDate",
    "series_time": "SeriesTime",
}
_INSTANCE_KEYWORDS = {
    "sop_uid": "SOPInstanceUID",
    "sop_class_uid": "SOPClassUID",
    "instance_number": "InstanceNumber",
    "transfer_syntax": "TransferSyntaxUID",
}
_OPTIONAL_INT = {"series_number", "instance_number"}


@dataclass(frozen=True)
class StudyAttributes:
    """Patient and study attributes, decoded text as in the index (PHI)."""

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

    @classmethod
    def from_header(cls, header: Any) -> StudyAttributes:
        """From an appliance InstanceHeader (or anything with the same field names)."""
        return cls(**{name: getattr(header, name) for name in _STUDY_KEYWORDS})


@dataclass(frozen=True)
class SeriesAttributes:
    series_uid: str
    modality: str
    series_number: int | None
    series_description: str
    body_part: str
    series_date: str
    series_time: str

    @classmethod
    def from_header(cls, header: Any) -> SeriesAttributes:
        return cls(**{name: getattr(header, name) for name in _SERIES_KEYWORDS})


@dataclass(frozen=True)
class InstanceAttributes:
    """What describes one instance, apart from where it sits in a pack."""

    series: SeriesAttributes
    sop_uid: str
    sop_class_uid: str
    instance_number: int | None
    transfer_syntax: str
    received_at: float | None = None  # index `received_at`; None when unknown
    source_ae: str = ""

    @classmethod
    def from_header(cls, header: Any, *, received_at: float | None = None,
                    source_ae: str = "") -> InstanceAttributes:
        return cls(SeriesAttributes.from_header(header),
                   **{name: getattr(header, name) for name in _INSTANCE_KEYWORDS},
                   received_at=received_at, source_ae=source_ae)


@dataclass(frozen=True)
class ManifestEntry:
    """One instance: its attributes and its Part 10 file's place in the plaintext."""

    instance: InstanceAttributes
    offset: int  # of the whole file in the pack's plaintext
    length: int  # bytes of the whole file
    dataset_offset: int  # inside the file: first byte after the File Meta group
    sha256: str  # hex, of file[dataset_offset:] (the index's instances.sha256)


@dataclass(frozen=True)
class Manifest:
    version: int
    pack_id: bytes
    study_version: int
    created_at: float  # Unix seconds
    segment_size: int
    plaintext_size: int
    pack_size: int
    pack_sha256: str  # hex, of the whole pack blob (header included)
    study: StudyAttributes
    instances: tuple[ManifestEntry, ...]
    # SOP Instance UIDs whose entries in the study's earlier versions are no longer its:
    # each left for another study (appliance/store/amendments.py).
    withdrawn: tuple[str, ...] = ()

    def validate(self) -> None:
        """Check internal consistency; PackFormatError names what is wrong."""
        if self.version != FORMAT_VERSION:
            raise PackFormatError(f"manifest version {self.version} is not supported "
                                  f"(this reader knows {FORMAT_VERSION})")
        try:
            check_pack_id(self.pack_id)
            check_segment_size(self.segment_size)
            expected_size = pack_size(self.plaintext_size, self.segment_size)
        except ValueError as exc:
            raise PackFormatError(f"manifest: {exc}") from exc
        if self.pack_size != expected_size:
            raise PackFormatError(f"manifest pack_size {self.pack_size} does not match "
                                  f"{self.plaintext_size} plaintext bytes")
        if self.study_version < 1:
            raise PackFormatError("manifest study_version must be at least 1")
        _check_hex(self.pack_sha256, "pack_sha256")
        position = 0
        for n, entry in enumerate(self.instances):
            if entry.offset != position or entry.length < 0:
                raise PackFormatError(f"manifest instance #{n}: offset {entry.offset} "
                                      f"is not {position} (entries must be contiguous)")
            if not 0 <= entry.dataset_offset <= entry.length:
                raise PackFormatError(f"manifest instance #{n}: dataset_offset outside "
                                      "the file")
            _check_hex(entry.sha256, f"instance #{n} sha256")
            position += entry.length
        if position != self.plaintext_size:
            raise PackFormatError(f"manifest instances cover {position} bytes, "
                                  f"plaintext_size is {self.plaintext_size}")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": self.version,
            "pack_id": self.pack_id.hex(),
            "study_version": self.study_version,
            "created_at": self.created_at,
            "segment_size": self.segment_size,
            "plaintext_size": self.plaintext_size,
            "pack_size": self.pack_size,
            "pack_sha256": self.pack_sha256,
            "study": _to_keywords(self.study, _STUDY_KEYWORDS),
            "instances": [_entry_to_json(e) for e in self.instances],
            # Only when there is one: a manifest without is byte for byte as before.
            **({"withdrawn": list(self.withdrawn)} if self.withdrawn else {}),
        }

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Parse and validate; PackFormatError names the first bad field."""
        obj = _Obj(data, "manifest")
        if obj.get("format", str) != FORMAT_NAME:
            raise PackFormatError("not a pacs-edge manifest (format field)")
        version = obj.get("version", int)
        if version != FORMAT_VERSION:
            raise PackFormatError(f"manifest version {version} is not supported "
                                  f"(this reader knows {FORMAT_VERSION})")
        try:
            pack_id = bytes.fromhex(obj.get("pack_id", str))
        except ValueError as exc:
            raise PackFormatError("manifest pack_id is not hex") from exc
        instances = obj.get("instances", list)
        manifest = cls(
            version=version,
            pack_id=pack_id,
            study_version=obj.get("study_version", int),
            created_at=_seconds(obj.get("created_at", (int, float)), "created_at"),
            segment_size=obj.get("segment_size", int),
            plaintext_size=obj.get("plaintext_size", int),
            pack_size=obj.get("pack_size", int),
            pack_sha256=obj.get("pack_sha256", str),
            study=StudyAttributes(**_from_keywords(obj.child("study"), _STUDY_KEYWORDS)),
            instances=tuple(_entry_from_json(_Obj(item, f"manifest instance #{n}"))
                            for n, item in enumerate(instances)),
            withdrawn=_withdrawn(obj),
        )
        manifest.validate()
        return manifest


def _withdrawn(obj: _Obj) -> tuple[str, ...]:
    """The optional `withdrawn` list: SOP Instance UIDs as text."""
    uids = obj.get("withdrawn", list, optional=True) or []
    if not all(isinstance(uid, str) for uid in uids):
        raise PackFormatError("manifest withdrawn must list SOP Instance UIDs as text")
    return tuple(uids)


def seal_manifest(manifest: Manifest, data_key: bytes) -> bytes:
    """The manifest blob: validated JSON, zlib, AES-256-GCM under the pack's data key."""
    check_data_key(data_key)
    manifest.validate()
    text = json.dumps(manifest.to_json(), ensure_ascii=False, separators=(",", ":"))
    compressed = zlib.compress(text.encode("utf-8"), 9)
    nonce = os.urandom(_NONCE_SIZE)
    while nonce[:4] == b"\x00\x00\x00\x00":  # never collide with a segment nonce
        nonce = os.urandom(_NONCE_SIZE)
    aad = MANIFEST_MAGIC + manifest.pack_id
    return aad + nonce + AESGCM(data_key).encrypt(nonce, compressed, aad)


def manifest_pack_id(blob: bytes) -> bytes:
    """The pack_id a manifest blob claims (unauthenticated until opened). A newer
    format's magic is a PackFormatError, another a PackIntegrityError (blob_format)."""
    MANIFEST.check_magic(blob)
    if len(blob) < _PREFIX_SIZE:
        raise MANIFEST.damaged(f"it has {len(blob)} bytes, fewer than its envelope's "
                               f"{_PREFIX_SIZE}")
    return bytes(blob[len(MANIFEST_MAGIC):len(MANIFEST_MAGIC) + PACK_ID_SIZE])


def open_manifest(blob: bytes, data_key: bytes, *,
                  expected_pack_id: bytes | None = None) -> Manifest:
    """Decrypt, decompress and validate a manifest blob.

    `expected_pack_id` (from the key object or the pack) makes a manifest of
    another pack fail even before decryption; the AAD and the JSON pack_id
    catch the rest.
    """
    check_data_key(data_key)
    pack_id = manifest_pack_id(blob)
    if expected_pack_id is not None and pack_id != expected_pack_id:
        raise PackIntegrityError("manifest belongs to another pack (pack_id differs)")
    nonce = blob[len(MANIFEST_MAGIC) + PACK_ID_SIZE:_PREFIX_SIZE]
    try:
        compressed = AESGCM(data_key).decrypt(nonce, blob[_PREFIX_SIZE:],
                                              MANIFEST_MAGIC + pack_id)
    except InvalidTag:
        raise PackIntegrityError("manifest failed authentication (modified, from another "
                                 "pack, or the wrong data key)") from None
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(compressed, MAX_MANIFEST_JSON)
        if inflater.unconsumed_tail or not inflater.eof:
            raise PackFormatError("manifest is too large or its compressed stream is cut")
        data = json.loads(raw.decode("utf-8"))
    # ValueError: an integer of more digits than Python converts; RecursionError: nesting.
    except (zlib.error, ValueError, RecursionError) as exc:
        raise PackFormatError(f"manifest content cannot be decoded ({type(exc).__name__})") \
            from exc
    manifest = Manifest.from_json(data)
    if manifest.pack_id != pack_id:
        raise PackIntegrityError("manifest content names another pack than its envelope")
    return manifest


# --- JSON helpers ------------------------------------------------------------


class _Obj:
    """A JSON object with typed, named access (errors say which field)."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise PackFormatError(f"{where} is not a JSON object")
        self.data = data
        self.where = where

    def get(self, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        if key not in self.data:
            if optional:
                return None
            raise PackFormatError(f"{self.where}: missing field {key!r}")
        value = self.data[key]
        if value is None and optional:
            return None
        # bool is an int in Python, never a valid number here
        if isinstance(value, bool) or not isinstance(value, kind):
            raise PackFormatError(f"{self.where}: field {key!r} has the wrong type")
        return value

    def child(self, key: str) -> _Obj:
        return _Obj(self.get(key, dict), f"{self.where}.{key}")


def _to_keywords(obj: Any, keywords: dict[str, str]) -> dict[str, Any]:
    return {keyword: getattr(obj, name) for name, keyword in keywords.items()}


def _from_keywords(obj: _Obj, keywords: dict[str, str]) -> dict[str, Any]:
    return {name: obj.get(keyword, int, optional=True) if name in _OPTIONAL_INT
            else obj.get(keyword, str) for name, keyword in keywords.items()}


def _entry_to_json(entry: ManifestEntry) -> dict[str, Any]:
    inst = entry.instance
    return {
        "series": _to_keywords(inst.series, _SERIES_KEYWORDS),
        **_to_keywords(inst, _INSTANCE_KEYWORDS),
        "received_at": inst.received_at,
        "source_ae": inst.source_ae,
        "offset": entry.offset,
        "length": entry.length,
        "dataset_offset": entry.dataset_offset,
        "sha256": entry.sha256,
    }


def _entry_from_json(obj: _Obj) -> ManifestEntry:
    received_at = obj.get("received_at", (int, float), optional=True)
    instance = InstanceAttributes(
        SeriesAttributes(**_from_keywords(obj.child("series"), _SERIES_KEYWORDS)),
        **_from_keywords(obj, _INSTANCE_KEYWORDS),
        received_at=None if received_at is None else _seconds(received_at, "received_at"),
        source_ae=obj.get("source_ae", str, optional=True) or "",
    )
    return ManifestEntry(instance, offset=obj.get("offset", int),
                         length=obj.get("length", int),
                         dataset_offset=obj.get("dataset_offset", int),
                         sha256=obj.get("sha256", str))


def _seconds(value: int | float, what: str) -> float:
    """A time in Unix seconds: finite (JSON may hold 1e400, or an int no float holds)."""
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds):
        raise PackFormatError(f"manifest {what} is not a finite number")
    return seconds


def _check_hex(value: str, what: str) -> None:
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise PackFormatError(f"manifest {what} is not 64 lowercase hex digits")

