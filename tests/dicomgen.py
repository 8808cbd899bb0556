"""Deterministic synthetic DICOM for the tests and the benchmark.

Everything here is a pure function of its arguments and `seed`: the same call
writes byte-identical files with the same UIDs, so a test can compute the
answers it expects (for C-FIND, C-MOVE, ...) from the returned headers,
independently of the server under test.

- make_studies / make_study: Part 10 files of one or more patients, studies and
  series (CT and MR by default, 64x64 16-bit images), with the attributes that
  C-FIND matches on. Each file is returned as a GeneratedInstance whose
  `header` is the file's dataset without Pixel Data.
- make_syntax_set: one small image per transfer syntax a modality may send
  (see TRANSFER_SYNTAXES); uncompressed ones are written by pydicom, big endian
  and the JPEG / JPEG-LS / RLE ones by dcmtk's converters.
- make_non_ascii_instance: a Patient's Name outside ASCII (ISO_IR 192 by default).
- make_encapsulated_pdf: a one-page Encapsulated PDF (no pixels) in a given study.
- make_ybr_full_422_cine: an uncompressed YBR_FULL_422 ultrasound cine (2 bytes a pixel).
- make_fragmented_cine: a JPEG Baseline cine, each frame split over several fragments,
  with no Basic Offset Table (as some ultrasound machines send one).
- make_large_cine: a JPEG Baseline cine of any size (above 4 GiB too), written frame by
  frame; large_cine_frame gives any of its frames.
- bad input: make_bad_uid_instance, make_truncated_instance, make_garbage_payload,
  make_non_dicom_file.
- make_ct_study: the benchmark's 300 x 512x512 CT series (~157 MB); on demand only.
- dataset_bytes: the bytes after the File Meta group, to compare a retrieved file
  with the sent one; dataset_sha256 their hash, for files too large to read whole.

Run it as a script to write data for manual use or the benchmark:
`python tests/dicomgen.py --help`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import random
import shutil
import struct
import subprocess
import tempfile
import warnings
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

UID_ROOT = "1.2.826.0.1.3680043.10.1234."
IMPLEMENTATION_CLASS_UID = UID_ROOT + "0.1"
IMPLEMENTATION_VERSION = "PE_TESTGEN_1"
TOOL_TIMEOUT = 120.0

SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "US": "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
    "OT": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
}
FAMILY = ("DOE", "SMITH", "NGUYEN", "GARCIA", "KOWALSKI", "OKAFOR", "TANAKA", "MARTIN",
          "SILVA", "JOHANSSON")
GIVEN = ("JOHN", "ANNA", "THI", "LUIS", "PIOTR", "CHIDI", "YUKI", "CLAIRE", "ANA", "ERIK")
PHYSICIANS = ("WELBY^MARCUS", "HOUSE^GREGORY", "GREY^MEREDITH", "KILDARE^JAMES")
BODY_PARTS = ("CHEST", "ABDOMEN", "HEAD", "PELVIS", "KNEE", "SPINE")

# name -> UID of every transfer syntax make_syntax_set writes.
TRANSFER_SYNTAXES: dict[str, UID] = {
    "implicit-le": ImplicitVRLittleEndian,
    "explicit-le": ExplicitVRLittleEndian,
    "explicit-be": ExplicitVRBigEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
    "jpeg-baseline": JPEGBaseline8Bit,
    "jpeg-extended": JPEGExtended12Bit,
    "jpeg-lossless": JPEGLossless,
    "jpeg-lossless-sv1": JPEGLosslessSV1,
    "jpeg-ls-lossless": JPEGLSLossless,
    "jpeg-ls-near-lossless": JPEGLSNearLossless,
    "rle": RLELossless,
    "jpeg2000-lossless": JPEG2000Lossless,
    "jpeg2000": JPEG2000,
    "htj2k-lossless": HTJ2KLossless,
    "htj2k-lossless-rpcl": HTJ2KLosslessRPCL,
    "htj2k": HTJ2K,
}
# dcmtk converters: TS -> (tool, options). +un keeps the SOP Instance UID on lossy
# compression (dcmtk assigns a new one by default), so the caller's UIDs stay valid.
_DCMTK_CONVERT: dict[str, tuple[str, ...]] = {
    ExplicitVRBigEndian: ("dcmconv", "+tb"),
    JPEGBaseline8Bit: ("dcmcjpeg", "+eb", "+un"),
    JPEGExtended12Bit: ("dcmcjpeg", "+ee", "+un"),
    JPEGLossless: ("dcmcjpeg", "+el", "+un"),
    JPEGLosslessSV1: ("dcmcjpeg", "+e1", "+un"),
    JPEGLSLossless: ("dcmcjpls", "+el", "+un"),
    JPEGLSNearLossless: ("dcmcjpls", "+en", "+un"),
    RLELossless: ("dcmcrle",),
}
# dcmtk 3.6.7 can neither send nor receive these: use pynetdicom for them.
HTJ2K_SYNTAXES = frozenset({HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K})
_J2K = {JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K}
_LOSSY = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, HTJ2K}


@dataclass(frozen=True)
class GeneratedInstance:
    """One written file and its dataset without Pixel Data (as read back from the file)."""

    path: Path
    header: Dataset

    @property
    def transfer_syntax(self) -> str:
        return str(self.header.file_meta.TransferSyntaxUID)

    @property
    def sop_class_uid(self) -> str:
        return str(self.header.SOPClassUID)

    @property
    def sop_instance_uid(self) -> str:
        return str(self.header.SOPInstanceUID)

    @property
    def series_uid(self) -> str:
        return str(self.header.SeriesInstanceUID)

    @property
    def study_uid(self) -> str:
        return str(self.header.StudyInstanceUID)

    @property
    def patient_id(self) -> str:
        return str(self.header.PatientID)


def make_uid(seed: int, *parts: object) -> str:
    """A valid UID under UID_ROOT, a pure function of `seed` and `parts`.

    pydicom hashes the entropy sources joined with nothing between them, so each
    part carries its own separator: without it (seed 1, parts 0, 0, 12) and (seed 10,
    parts 0, 1, 2) hashed the same text, and many generated studies shared UIDs."""
    return str(generate_uid(UID_ROOT, entropy_srcs=[f"pacs-edge-testgen:{seed}",
                                                    *(f"/{part}" for part in parts)]))


def group_by(instances: Iterable[GeneratedInstance],
             keyword: str) -> dict[str, list[GeneratedInstance]]:
    """Instances keyed by the string value of a header attribute (e.g. StudyInstanceUID)."""
    groups: dict[str, list[GeneratedInstance]] = {}
    for inst in instances:
        groups.setdefault(str(inst.header.get(keyword, "")), []).append(inst)
    return groups


# -- studies -------------------------------------------------------------------------

def make_studies(
    folder: Path,
    *,
    seed: int = 0,
    patients: int = 1,
    studies_per_patient: int = 1,
    series_per_study: int = 2,
    instances_per_series: int = 3,
    modalities: Sequence[str] = ("CT", "MR"),
    size: int = 64,
    transfer_syntax: str = ExplicitVRLittleEndian,
    phantom: bool = False,
) -> list[GeneratedInstance]:
    """Write patients x studies x series x instances Part 10 files under `folder`.

    Series j of every study has modality `modalities[j % len(modalities)]`, so the
    defaults give studies whose ModalitiesInStudy is CT\\MR. Patient, study and
    series attributes vary deterministically with `seed` and the indices. Files
    go to `folder/P<p>/S<s>/SE<j>/IM<k>.dcm`.
    """
    out: list[GeneratedInstance] = []
    for p in range(patients):
        patient = _patient_attrs(seed, p)
        for s in range(studies_per_patient):
            number = p * studies_per_patient + s
            study = _study_attrs(seed, number, modalities[0])
            for j in range(series_per_study):
                modality = modalities[j % len(modalities)]
                series = _series_attrs(seed, number, j, modality, study)
                for k in range(instances_per_series):
                    ds = _instance(seed, (number, j, k), k, patient, study, series,
                                   modality, size, size, _bits_for(transfer_syntax))
                    if phantom:
                        _use_ct_phantom(ds, k, instances_per_series)
                    path = folder / f"P{p:03d}" / f"S{s:02d}" / f"SE{j:02d}" / f"IM{k:05d}.dcm"
                    out.append(write_instance(ds, path, transfer_syntax))
    return out


def make_study(folder: Path, *, seed: int = 0, **kwargs: object) -> list[GeneratedInstance]:
    """One patient, one study; by default a CT and an MR series of 3 images each."""
    return make_studies(folder, seed=seed, patients=1, studies_per_patient=1, **kwargs)  # type: ignore[arg-type]


def make_ct_study(folder: Path, n_slices: int = 300, size: int = 512, *,
                  seed: int = 4242) -> list[GeneratedInstance]:
    """The benchmark study: one CT series of `n_slices` size x size 16-bit slices.

    300 x 512 x 512 x 2 bytes is about 157 MB; generate it on demand only.
    """
    return make_studies(folder, seed=seed, series_per_study=1, instances_per_series=n_slices,
                        modalities=("CT",), size=size)


def make_ct_phantom_series(folder: Path, n_slices: int = 40, size: int = 256, *,
                           seed: int = 4343) -> list[GeneratedInstance]:
    """One CT series that looks like a chest and changes from slice to slice (for viewers).

    12-bit stored values in Hounsfield units + 1024 (air, soft tissue, lungs, spine) with a
    lung window; the lungs and a nodule grow and shrink along the series, so scrolling
    visibly changes the image.
    """
    return make_studies(folder, seed=seed, series_per_study=1, instances_per_series=n_slices,
                        modalities=("CT",), size=size, phantom=True)


def make_syntax_set(folder: Path, *, seed: int = 100, size: int = 64,
                    syntaxes: Iterable[str] | None = None) -> dict[str, GeneratedInstance]:
    """One CT image per transfer syntax, in one study and series; keyed by TS UID.

    `syntaxes` takes names or UIDs from TRANSFER_SYNTAXES (default: all of them).
    Baseline JPEG gets an 8-bit image and extended JPEG a 12-bit one, the most
    those processes carry; every other syntax a 16-bit image.
    """
    wanted = [TRANSFER_SYNTAXES.get(s, s) for s in (syntaxes or TRANSFER_SYNTAXES.values())]
    patient = _patient_attrs(seed, 0)
    study = _study_attrs(seed, 0, "CT")
    series = _series_attrs(seed, 0, 0, "CT", study)
    out: dict[str, GeneratedInstance] = {}
    for k, ts in enumerate(wanted):
        ds = _instance(seed, (0, 0, k, ts), k, patient, study, series, "CT", size, size,
                       _bits_for(ts))
        out[str(ts)] = write_instance(ds, folder / f"TS{k:02d}_{ts}.dcm", ts)
    return out


def make_non_ascii_instance(folder: Path, *, seed: int = 200, name: str = "Müller^Jürgen",
                            charset: str = "ISO_IR 192",
                            transfer_syntax: str = ExplicitVRLittleEndian) -> GeneratedInstance:
    """One MR image whose Patient's Name needs `charset` (UTF-8 by default)."""
    patient = {**_patient_attrs(seed, 0), "PatientName": name}
    study = _study_attrs(seed, 0, "MR")
    study["StudyDescription"] = "Kopf nativ"  # ASCII on purpose: only the name is special
    series = _series_attrs(seed, 0, 0, "MR", study)
    ds = _instance(seed, (0, 0, 0), 0, patient, study, series, "MR", 32, 32, 16)
    ds.SpecificCharacterSet = charset
    return write_instance(ds, folder / "non_ascii.dcm", transfer_syntax)


def make_mislabelled_instance(folder: Path, name: bytes, *, charset: str | None,
                              seed: int = 210) -> GeneratedInstance:
    """One MR image whose Patient's Name holds the bytes `name` whatever its Specific
    Character Set says (`charset`; None: no such element), as real writers make them:
    Latin-1 bytes under ISO_IR 192, or a broken ISO 2022 escape."""
    placeholder = "Q" * len(name)
    instance = make_non_ascii_instance(folder, seed=seed, name=placeholder,
                                       charset=charset or "ISO_IR 100")
    data = instance.path.read_bytes()
    if charset is None:  # the element goes, and the File Meta group length stays right
        data = data.replace(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100", b"", 1)
    instance.path.write_bytes(data.replace(placeholder.encode(), name, 1))
    with warnings.catch_warnings():  # pydicom's remark on the bytes is the point here
        warnings.simplefilter("ignore")
        return GeneratedInstance(instance.path, read_header(instance.path))


US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image Storage


def make_ybr_full_422_cine(folder: Path, *, seed: int = 260, frames: int = 6,
                           rows: int = 48, cols: int = 64) -> GeneratedInstance:
    """An uncompressed ultrasound cine in YBR_FULL_422 (Explicit VR Little Endian), as
    many ultrasound machines send one: each pair of pixels is Y Y Cb Cr, 2 bytes a pixel
    (PS3.3 C.7.6.3.1.2). Every frame differs (its number is in its first bytes)."""
    patient, study = _patient_attrs(seed, 0), _study_attrs(seed, 0, "US")
    series = _series_attrs(seed, 0, 0, "US", study)
    ds = _instance(seed, (0, 0, 0), 0, patient, study, series, "US", rows, cols, 8)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = US_MULTIFRAME
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "SliceThickness",
                    "SliceLocation", "WindowCenter", "WindowWidth"):
        del ds[keyword]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "YBR_FULL_422"
    ds.PlanarConfiguration, ds.NumberOfFrames = 0, frames
    ds.FrameTime, ds.FrameIncrementPointer = 33.3, Tag(0x0018, 0x1063)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(frames, rows * cols * 2), dtype=np.uint8)
    pixels[:, 0] = np.arange(frames)
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB"
    return write_instance(ds, folder / "us_ybr_full_422.dcm", ExplicitVRLittleEndian)


def make_fragmented_cine(folder: Path, *, seed: int = 270, frames: int = 12,
                         fragments_per_frame: int = 3, frame_bytes: int = 4000,
                         has_bot: bool = False) -> GeneratedInstance:
    """A JPEG Baseline ultrasound cine whose frames are each split over
    `fragments_per_frame` fragments, with an empty Basic Offset Table unless `has_bot`:
    frame boundaries are then only the end-of-image markers. Each frame is SOI, bytes
    without 0xFF (no marker but the last) and EOI; frame lengths differ (odd ones too,
    padded in their last fragment). Not decodable: the box never decodes pixels."""
    patient, study = _patient_attrs(seed, 0), _study_attrs(seed, 0, "US")
    series = _series_attrs(seed, 0, 0, "US", study)
    ds = _instance(seed, (0, 0, 0), 0, patient, study, series, "US", 48, 64, 8)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = US_MULTIFRAME
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "SliceThickness",
                    "SliceLocation", "WindowCenter", "WindowWidth"):
        del ds[keyword]
    ds.NumberOfFrames = frames
    ds.FrameTime, ds.FrameIncrementPointer = 33.3, Tag(0x0018, 0x1063)
    rng = random.Random(seed)
    encoded = []
    for number in range(frames):
        body = bytes(rng.randrange(0, 255) for _ in range(frame_bytes + number % 3))
        encoded.append(b"\xff\xd8" + bytes([number % 255]) + body + b"\xff\xd9")
    ds.PixelData = encapsulate(encoded, fragments_per_frame=fragments_per_frame,
                               has_bot=has_bot)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.LossyImageCompression = "01"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"us_fragmented_{fragments_per_frame}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return GeneratedInstance(path, read_header(path))


def large_cine_frame(seed: int, number: int, frame_bytes: int) -> bytes:
    """Frame `number` (1-based) of make_large_cine(seed=seed, frame_bytes=frame_bytes):
    SOI, seeded random bytes, EOI; a test computes the frame it expects from here."""
    body = random.Random(f"{seed}:frame:{number}").randbytes(frame_bytes - 4)
    return b"\xff\xd8" + body + b"\xff\xd9"


def make_large_cine(folder: Path, *, frames: int, frame_bytes: int = 2 << 20,
                    seed: int = 280) -> GeneratedInstance:
    """A JPEG Baseline ultrasound cine of `frames` frames of `frame_bytes` each, written
    frame by frame (never whole in memory): above 4 GiB with enough frames, as breast
    tomosynthesis and long cines are. Pixel Data is encapsulated with undefined length,
    an empty Basic Offset Table (its 32-bit offsets cannot reach past 4 GiB) and one
    fragment a frame (large_cine_frame). Not decodable: the box never decodes pixels."""
    if frame_bytes % 2 or frame_bytes < 4:
        raise ValueError("frame_bytes must be even and at least 4")
    patient, study = _patient_attrs(seed, 0), _study_attrs(seed, 0, "US")
    series = _series_attrs(seed, 0, 0, "US", study)
    ds = _instance(seed, (0, 0, 0), 0, patient, study, series, "US", 64, 64, 8)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = US_MULTIFRAME
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "SliceThickness",
                    "SliceLocation", "WindowCenter", "WindowWidth", "PixelData"):
        del ds[keyword]
    ds.NumberOfFrames = frames
    ds.FrameTime, ds.FrameIncrementPointer = 33.3, Tag(0x0018, 0x1063)
    ds.LossyImageCompression = "01"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"us_large_{frames}x{frame_bytes}.dcm"
    item = struct.Struct("<HHI")
    with path.open("wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fh, ds.file_meta, enforce_standard=True)  # type: ignore[arg-type]
        head = DicomBytesIO()
        head.is_little_endian, head.is_implicit_VR = True, False
        write_dataset(head, ds)
        fh.write(head.getvalue())
        fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
        fh.write(item.pack(0xFFFE, 0xE000, 0))  # the Basic Offset Table, empty
        for number in range(1, frames + 1):
            fh.write(item.pack(0xFFFE, 0xE000, frame_bytes))
            fh.write(large_cine_frame(seed, number, frame_bytes))
        fh.write(item.pack(0xFFFE, 0xE0DD, 0))
    return GeneratedInstance(path, read_header(path))


ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"  # Encapsulated PDF Storage


def make_encapsulated_pdf(folder: Path, like: Dataset, *, seed: int = 250,
                          text: str = "PACS EDGE REPORT") -> GeneratedInstance:
    """An Encapsulated PDF (a one-page document showing `text`, no pixels) in a new
    series of the study of `like` (its patient and study attributes), as a scanner or a
    reporting system sends one."""
    content = f"BT /F1 24 Tf 20 100 Td ({text}) Tj ET".encode("ascii")
    objects = [b"<</Type/Catalog/Pages 2 0 R>>", b"<</Type/Pages/Kids[3 0 R]/Count 1>>",
               b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 300 200]/Contents 4 0 R"
               b"/Resources<</Font<</F1 5 0 R>>>>>>",
               b"<</Length %d>>stream\n%s\nendstream" % (len(content), content),
               b"<</Type/Font/Subtype/Type1/BaseFont/Helvetica>>"]
    pdf, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(pdf))
        pdf += b"%d 0 obj%sendobj\n" % (number, body)
    xref = len(pdf)
    pdf += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    pdf += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    pdf += b"trailer<</Size %d/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    ds = Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
                    "AccessionNumber", "ReferringPhysicianName", "StudyDescription"):
        if keyword in like:
            setattr(ds, keyword, like.data_element(keyword).value)  # type: ignore[union-attr]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = ENCAPSULATED_PDF
    ds.SeriesInstanceUID = make_uid(seed, "pdf-series", like.StudyInstanceUID)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = make_uid(
        seed, "pdf", like.StudyInstanceUID)
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DOC", 900, 1
    ds.SeriesDescription = ds.DocumentTitle = "Scanned report"
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = like.StudyDate, "120000", ""
    ds.ConversionType, ds.BurnedInAnnotation = "SD", "YES"
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = bytes(pdf) + b"\0" * (len(pdf) % 2)
    return write_instance(ds, folder / "report.pdf.dcm", ExplicitVRLittleEndian)


# -- bad input -----------------------------------------------------------------------

def make_bad_uid_instance(folder: Path, *, kind: str = "traversal",
                          keyword: str = "SOPInstanceUID", seed: int = 300) -> Path:
    """A CT image whose UID `keyword` is not a UID: `kind` "traversal" puts `../` in
    it, "letters" puts letters in it. The File Meta header repeats a bad SOP Instance
    UID, as a careless modality would."""
    bad = {"traversal": "../../../../tmp/pacs-edge-escape",
           "letters": UID_ROOT + "abc.1"}[kind]
    study = _study_attrs(seed, 0, "CT")
    series = _series_attrs(seed, 0, 0, "CT", study)
    ds = _instance(seed, (0, 0, 0, kind, keyword), 0, _patient_attrs(seed, 0), study, series,
                   "CT", 16, 16, 16)
    path = folder / f"bad_uid_{kind}_{keyword}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    # pydicom warns on invalid UI values when they are set: that is the point. An
    # element keeps the validation mode it was created with, so recreate it.
    with pydicom_config.disable_value_validation():
        del ds[keyword]
        setattr(ds, keyword, bad)
        if keyword == "SOPInstanceUID":
            del ds.file_meta.MediaStorageSOPInstanceUID
            ds.file_meta.MediaStorageSOPInstanceUID = bad
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
    return path


def make_truncated_instance(folder: Path, *, seed: int = 400, fraction: float = 0.5) -> Path:
    """A CT file cut `fraction` of the way into its Pixel Data value."""
    inst = make_study(folder / ".truncated-src", seed=seed, series_per_study=1,
                      instances_per_series=1, modalities=("CT",))[0]
    data = inst.path.read_bytes()
    pixel_bytes = inst.header.Rows * inst.header.Columns * 2
    cut = len(data) - pixel_bytes + int(pixel_bytes * fraction)
    path = folder / "truncated.dcm"
    path.write_bytes(data[:cut])
    shutil.rmtree(folder / ".truncated-src")
    return path


def make_deeply_nested_instance(folder: Path, *, depth: int = 1000, seed: int = 520) -> Path:
    """A Secondary Capture whose last element, Content Sequence (0040,A730), nests
    `depth` undefined-length sequences in undefined-length items, written by hand
    (pydicom would recurse as deep to write it)."""
    ds = Dataset()
    ds.SOPClassUID = SOP_CLASSES["OT"]
    ds.SOPInstanceUID = make_uid(seed, "nested", depth)
    ds.StudyInstanceUID = make_uid(seed, "study", depth)
    ds.SeriesInstanceUID = make_uid(seed, "series", depth)
    ds.PatientName, ds.PatientID, ds.Modality = "NESTED^DEEP", f"NEST{depth}", "OT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / f"nested_{depth}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    undefined_sq = struct.pack("<HH2s2xI", 0x0040, 0xA730, b"SQ", 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    sequence_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    nested = (undefined_sq + item) * depth + (item_end + sequence_end) * depth
    path.write_bytes(path.read_bytes() + nested)
    return path


def make_garbage_payload(folder: Path, *, seed: int = 500, size: int = 4096) -> Path:
    """A valid File Meta header (CT, explicit VR LE) followed by bytes that are not a
    data set: what a C-STORE of a corrupt or non-DICOM payload carries."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASSES["CT"]
    meta.MediaStorageSOPInstanceUID = make_uid(seed, "garbage")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    buf = DicomBytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    text = b"%PDF-1.4 this is not a DICOM data set\n"
    body = (text * (size // len(text) + 1))[:size]
    path = folder / "garbage_payload.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + buf.getvalue() + body)
    return path


def make_deflate_bomb(folder: Path, *, inflated_bytes: int = 800 << 20, seed: int = 600,
                      bulk: str = "pixels") -> Path:
    """A Deflated Explicit VR LE CT image whose dataset inflates to about `inflated_bytes`
    (zeros deflate ~1000:1: 800 MB make a file of ~0.8 MB). `bulk` says where the zeros
    sit: "pixels" (the Pixel Data value, after everything the index reads), "private"
    (a private OB element in group 0009, before the patient and study attributes) or
    "items" (an undefined-length private sequence of empty items, also before them).
    Written as a stream: neither this process nor the file ever holds the zeros."""
    study = _study_attrs(seed, 0, "CT")
    series = _series_attrs(seed, 0, 0, "CT", study)
    ds = _instance(seed, (0, 0, 0, "bomb", bulk), 0, _patient_attrs(seed, 0), study, series,
                   "CT", 16, 16, 16)
    del ds.PixelData
    head, tail = Dataset(), Dataset()
    for elem in ds:
        (head if elem.tag.group < 0x0009 else tail).add(elem)
    chunk = b"\0" * (1 << 20)
    if bulk == "items":
        chunk = b"\xfe\xff\x00\xe0\xff\xff\xff\xff\xfe\xff\x0d\xe0\x00\x00\x00\x00" * (1 << 16)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflate.compress(_encode_explicit_le(head))]
    if bulk == "private":
        parts.append(deflate.compress(_encode_explicit_le_private_block(inflated_bytes)))
    elif bulk == "items":
        parts.append(deflate.compress(b"\x09\x00\x10\x00LO\x08\x00PE BOMB "
                                      b"\x09\x00\x01\x10SQ\x00\x00\xff\xff\xff\xff"))
    if bulk != "pixels":
        for _ in range(inflated_bytes // len(chunk)):
            parts.append(deflate.compress(chunk))
        if bulk == "items":
            parts.append(deflate.compress(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"))
    parts.append(deflate.compress(_encode_explicit_le(tail)))
    if bulk == "pixels":
        parts.append(deflate.compress(b"\xe0\x7f\x10\x00OW\x00\x00"
                                      + struct.pack("<I", inflated_bytes)))
        for _ in range(inflated_bytes // len(chunk)):
            parts.append(deflate.compress(chunk))
    parts.append(deflate.flush())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    buf = DicomBytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    path = folder / f"deflate_bomb_{bulk}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = b"".join(parts)
    if len(body) % 2:
        body += b"\0"  # PS3.5 A.5: an odd deflated stream gets one trailing null byte
    path.write_bytes(b"\0" * 128 + b"DICM" + buf.getvalue() + body)
    return path


def _encode_explicit_le(ds: Dataset) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def _encode_explicit_le_private_block(length: int) -> bytes:
    """Private creator (0009,0010) and the header of an OB element (0009,1001) of `length`."""
    return (b"\x09\x00\x10\x00LO\x08\x00PE BOMB "
            + b"\x09\x00\x01\x10OB\x00\x00" + struct.pack("<I", length))


def make_non_dicom_file(folder: Path, name: str = "notes.txt") -> Path:
    """A plain text file, for `import` and drop-folder tests."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a DICOM file\n")
    return path


# -- reading helpers -----------------------------------------------------------------

def forged_copy(original: Path, path: Path) -> Path:
    """`original`'s dataset under a File Meta that announces another SOP Instance UID
    (the data set contradicts its request: refused 0xA900), written to `path`."""
    meta = pydicom.filereader.read_file_meta_info(original)
    meta.MediaStorageSOPInstanceUID = make_uid(99, "forged")
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + buffer.getvalue() + dataset_bytes(original))
    return path


def relabelled_copy(original: Path, path: Path, transfer_syntax: str) -> Path:
    """`original`'s dataset bytes unchanged under a File Meta whose Transfer Syntax UID is
    `transfer_syntax` (one the box does not take, say), written to `path`."""
    meta = pydicom.filereader.read_file_meta_info(original)
    meta.TransferSyntaxUID = transfer_syntax
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + buffer.getvalue() + dataset_bytes(original))
    return path


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its File Meta group (explicit VR LE, group 0002).

    Walks the meta elements instead of trusting (0002,0000), which some writers omit.
    """
    data = Path(path).read_bytes()
    return data[_dataset_start(data, path):]


def dataset_sha256(path: Path, start: int = 0, end: int | None = None) -> str:
    """SHA-256 of dataset_bytes(path), read a chunk at a time (a file of GBs compares too);
    of the Part 10 file at bytes [start, end) of `path` when given (a multipart part)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        fh.seek(start)
        position = start + _dataset_start(fh.read(1 << 16), path)
        left = (Path(path).stat().st_size if end is None else end) - position
        fh.seek(position)
        while left and (chunk := fh.read(min(8 << 20, left))):
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def _dataset_start(data: bytes, path: Path) -> int:
    """Where the dataset starts in a Part 10 file whose head is `data`."""
    if data[128:132] != b"DICM":
        raise ValueError(f"{path}: no DICM prefix")
    pos = 132
    while pos + 8 <= len(data):
        group, _elem = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (length,) = struct.unpack_from("<I", data, pos + 8)
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            pos += 8 + length
    return pos


def read_header(path: Path) -> Dataset:
    """The file's dataset without Pixel Data, value validation off (bad input reads too)."""
    with pydicom_config.disable_value_validation():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        # Elements are converted (and validated) lazily on first access: do it now.
        for _ in (*ds.file_meta.iterall(), *ds.iterall()):
            pass
    return ds


# -- writing -------------------------------------------------------------------------

def altered_copy(instance: GeneratedInstance, path: Path, **attributes: object) -> Path:
    """A copy of `instance` at `path` with `attributes` (keywords) set, its SOP Instance
    UID kept: what a modality sends again after a correction."""
    ds = pydicom.dcmread(instance.path)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_instance(ds: Dataset, path: Path, transfer_syntax: str) -> GeneratedInstance:
    """Write `ds` (uncompressed, little endian pixels) to `path` in `transfer_syntax`."""
    ts = UID(transfer_syntax)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.file_meta.TransferSyntaxUID = ts
    if ts in (ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds.save_as(path, enforce_file_format=True)
    elif ts in _J2K:
        _write_fake_j2k(ds, path, ts)
    elif ts in _DCMTK_CONVERT:
        tool, *options = _DCMTK_CONVERT[ts]
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src = Path(tmp) / "src.dcm"
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.save_as(src, enforce_file_format=True)
            _run(tool, *options, str(src), str(path))
    else:
        raise ValueError(f"no writer for transfer syntax {ts}")
    return GeneratedInstance(path, read_header(path))


def _write_fake_j2k(ds: Dataset, path: Path, ts: UID) -> None:
    # No JPEG 2000 / HTJ2K encoder is installed. pacs-edge stores what it receives
    # byte for byte and never decodes pixel data, so a well-formed encapsulation
    # (offset table + one fragment per frame) under the right TS UID is all the
    # tests need. The fragment starts with a real codestream header (SOC, SIZ with
    # the image geometry; Rsiz flags HTJ2K) and ends with EOC, but is NOT decodable.
    bits = int(ds.BitsStored)
    rsiz = 0x4000 if ts in HTJ2K_SYNTAXES else 0
    siz = struct.pack(">HHHIIIIIIIIHBBB", 0xFF51, 41, rsiz, ds.Columns, ds.Rows, 0, 0,
                      ds.Columns, ds.Rows, 0, 0, 1, bits - 1, 1, 1)
    body = hashlib.shake_256(bytes(ds.PixelData)).digest(len(ds.PixelData) // 3 // 2 * 2)
    codestream = b"\xff\x4f" + siz + body.replace(b"\xff", b"\xfe") + b"\xff\xd9"
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    if ts in _LOSSY:
        ds.LossyImageCompression = "01"
    ds.save_as(path, enforce_file_format=True)


def _run(tool: str, *args: str) -> None:
    try:
        subprocess.run([tool, *args], check=True, capture_output=True, timeout=TOOL_TIMEOUT,
                       stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise RuntimeError(f"{tool} not found: install dcmtk (make test does)") from exc
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"{tool} {' '.join(args)} failed ({exc.returncode}): "
                           f"{exc.stderr.decode(errors='replace')}") from exc


def _bits_for(ts: str) -> int:
    return {JPEGBaseline8Bit: 8, JPEGExtended12Bit: 12}.get(UID(ts), 16)


# -- attributes ----------------------------------------------------------------------

def _rng(seed: int, *parts: object) -> random.Random:
    return random.Random(":".join(map(str, (seed, *parts))))  # str seeds are stable


def _date(base: dt.date, rng: random.Random, days: int) -> str:
    return (base + dt.timedelta(days=rng.randrange(days))).strftime("%Y%m%d")


def _patient_attrs(seed: int, p: int) -> dict[str, object]:
    rng = _rng(seed, "patient", p)
    i = p + seed
    return {
        "PatientName": f"{FAMILY[i % len(FAMILY)]}^{GIVEN[(i // len(FAMILY)) % len(GIVEN)]}",
        "PatientID": f"PE{seed % 1000:03d}{p:05d}",
        "PatientBirthDate": _date(dt.date(1940, 1, 1), rng, 70 * 365),
        "PatientSex": "MFO"[p % 3],
    }


def _study_attrs(seed: int, number: int, first_modality: str) -> dict[str, object]:
    rng = _rng(seed, "study", number)
    body = BODY_PARTS[rng.randrange(len(BODY_PARTS))]
    return {
        "StudyInstanceUID": make_uid(seed, "study", number),
        "StudyDate": _date(dt.date(2023, 1, 1), rng, 2 * 365),
        "StudyTime": f"{rng.randrange(7, 20):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}",
        "AccessionNumber": f"A{seed % 1000:03d}{number:06d}",
        "StudyID": str(number + 1),
        "StudyDescription": f"{first_modality} {body}",
        "ReferringPhysicianName": PHYSICIANS[rng.randrange(len(PHYSICIANS))],
        "_body": body,
    }


def _series_attrs(seed: int, number: int, j: int, modality: str,
                  study: dict[str, object]) -> dict[str, object]:
    return {
        "SeriesInstanceUID": make_uid(seed, "series", number, j),
        "Modality": modality,
        "SeriesNumber": j + 1,
        "SeriesDescription": f"{modality} {study['_body']} {j + 1}",
        "BodyPartExamined": study["_body"],
        "SeriesDate": study["StudyDate"],
        "SeriesTime": study["StudyTime"],
        "FrameOfReferenceUID": make_uid(seed, "for", number, j),
    }


def _instance(seed: int, key: tuple[object, ...], k: int, patient: dict[str, object],
              study: dict[str, object], series: dict[str, object], modality: str,
              rows: int, cols: int, bits: int) -> Dataset:
    sop_class = SOP_CLASSES[modality]
    sop_uid = make_uid(seed, "instance", *key)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    for attrs in (patient, study, series):
        for keyword, value in attrs.items():
            if not keyword.startswith("_"):
                setattr(ds, keyword, value)
    ds.ContentDate = study["StudyDate"]
    ds.ContentTime = study["StudyTime"]
    ds.Manufacturer = "PACS-EDGE TESTGEN"
    ds.InstanceNumber = k + 1
    ds.AcquisitionNumber = 1
    ds.PatientPosition = "HFS"
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = [-0.5 * cols, -0.5 * rows, 2.5 * k]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = 2.5
    ds.SliceLocation = 2.5 * k
    ds.PixelSpacing = [0.7, 0.7]
    if modality == "CT":
        ds.KVP = 120
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
    elif modality == "MR":
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 500
        ds.EchoTime = 15
        ds.MagneticFieldStrength = 1.5
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = 1 << (bits - 2)
    ds.WindowWidth = 1 << (bits - 1)
    ds.PixelData = _pixels(seed, key, rows, cols, bits)
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    return ds


def _use_ct_phantom(ds: Dataset, k: int, n_slices: int) -> None:
    """Replace the noise disc of `ds` with slice k of a chest-like phantom (see
    make_ct_phantom_series)."""
    rows, cols = ds.Rows, ds.Columns
    t = (k + 0.5) / n_slices  # 0 at the first slice, 1 at the last
    y, x = np.ogrid[:rows, :cols]
    y = (y - rows / 2) / (rows / 2)
    x = (x - cols / 2) / (cols / 2)
    hu = np.full((rows, cols), -1000.0)  # air
    hu[(x / 0.9) ** 2 + (y / 0.65) ** 2 < 1] = 40  # soft tissue
    lung = 0.2 + 0.5 * np.sin(np.pi * t)  # lungs grow towards the middle of the series
    for side in (-1, 1):
        hu[((x - side * 0.42) / (0.3 * lung + 0.05)) ** 2 + (y / (0.45 * lung + 0.05)) ** 2
           < 1] = -850
    hu[(x / 0.12) ** 2 + ((y - 0.45) / 0.12) ** 2 < 1] = 700  # vertebra
    nodule = 0.12 * max(0.0, 1 - abs(t - 0.5) * 4)  # a sphere around the middle slices
    hu[((x - 0.4) ** 2 + y ** 2) < nodule ** 2] = 60
    rng = np.random.default_rng(k)
    stored = np.clip(hu + 1024 + rng.normal(0, 8, size=hu.shape), 0, 4095)
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.WindowCenter = -400
    ds.WindowWidth = 1500
    ds.PixelData = stored.astype("<u2").tobytes()


def _pixels(seed: int, key: tuple[object, ...], rows: int, cols: int, bits: int) -> bytes:
    """A disc phantom plus seeded noise: compressible but not trivial."""
    digest = hashlib.sha256(repr((seed, key)).encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    top = (1 << bits) - 1
    y, x = np.ogrid[:rows, :cols]
    disc = np.hypot(y - rows / 2, x - cols / 2) < 0.4 * min(rows, cols)
    image = disc * (top // 2) + rng.integers(0, top // 16 + 1, size=(rows, cols))
    dtype = "<u1" if bits == 8 else "<u2"
    return np.clip(image, 0, top).astype(dtype).tobytes()


# -- command line --------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dicomgen", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    study = sub.add_parser("study", help="patients x studies x series x instances")
    study.add_argument("folder", type=Path)
    study.add_argument("--seed", type=int, default=0)
    study.add_argument("--patients", type=int, default=1)
    study.add_argument("--studies", type=int, default=1, help="per patient")
    study.add_argument("--series", type=int, default=2, help="per study")
    study.add_argument("--instances", type=int, default=3, help="per series")
    study.add_argument("--size", type=int, default=64)
    study.add_argument("--modalities", default="CT,MR")
    ct = sub.add_parser("ct-study", help="the benchmark CT series (default 300 x 512x512)")
    ct.add_argument("folder", type=Path)
    ct.add_argument("--slices", type=int, default=300)
    ct.add_argument("--size", type=int, default=512)
    ct.add_argument("--seed", type=int, default=4242)
    syntaxes = sub.add_parser("syntaxes", help="one image per transfer syntax")
    syntaxes.add_argument("folder", type=Path)
    args = parser.parse_args(argv)

    if args.command == "study":
        written = make_studies(args.folder, seed=args.seed, patients=args.patients,
                               studies_per_patient=args.studies, series_per_study=args.series,
                               instances_per_series=args.instances, size=args.size,
                               modalities=tuple(args.modalities.split(",")))
    elif args.command == "ct-study":
        written = make_ct_study(args.folder, args.slices, args.size, seed=args.seed)
    else:
        written = list(make_syntax_set(args.folder).values())
    total = sum(inst.path.stat().st_size for inst in written)
    print(f"wrote {len(written)} files, {total} bytes, under {args.folder}")


if __name__ == "__main__":
    main()
