"""Frames of a stored instance, read from the file without decoding the pixels.

WADO-RS `frames/N` (PS3.18 10.4.1.1.4) hands out one frame at a time:
- uncompressed little endian files (implicit or explicit VR): frame N is a
  slice of the Pixel Data value, read with one seek; only that frame is read;
- encapsulated files (JPEG, JPEG-LS, JPEG 2000, RLE, ...): frame N is the
  concatenation of its fragments, found through the Basic (or Extended)
  Offset Table by pydicom's `encaps.get_frame` reading the open file; when
  both tables are absent, through the file's fragment index (fragment_index.py:
  built once per file, cached), so reading a cine frame by frame reads each
  fragment once, not every earlier one again for every frame;
- big endian and deflated files (rare, small, legacy): the dataset is decoded
  once and the frame taken from it (big endian words swapped), since neither
  can be sliced in place.
Uncompressed frames are answered as Explicit VR Little Endian bytes (the
application/octet-stream default of PS3.18); encapsulated ones in the stored
syntax, never transcoded.

Blocking: the edge calls these functions in a worker thread.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread, encaps
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID

from appliance.base.errors import PacsEdgeError
from appliance.services import fragment_index
from appliance.services.fragment_index import FragmentIndexCache

PIXEL_DATA = Tag(0x7FE0, 0x0010)
EXPLICIT_LITTLE = "1.2.840.10008.1.2.1"
_IMPLICIT_LITTLE = "1.2.840.10008.1.2"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"
_UNDEFINED = 0xFFFFFFFF
# Fragment indexes of encapsulated files without offset tables, shared by every request.
FRAGMENT_INDEXES = FragmentIndexCache()


class FrameError(PacsEdgeError):
    """The instance has no such frame, or no pixel data (the edge answers 404)."""


@dataclass(frozen=True)
class Frames:
    """Frames read from one instance, in the order asked for."""

    transfer_syntax: str  # of the bytes: EXPLICIT_LITTLE for uncompressed ones
    encapsulated: bool
    frames: list[bytes]


# The elements that hold an image's pixels (one at most an instance): Pixel Data, and the
# Float and Double Float Pixel Data of parametric maps (PS3.3 C.7.6.3), each with the VR
# it has in Implicit VR Little Endian.
PIXEL_TAGS = {0x7FE00010: "OW", 0x7FE00008: "OF", 0x7FE00009: "OD"}


def is_encapsulated(transfer_syntax: str) -> bool:
    """Whether frames in `transfer_syntax` are fragments; False for a UID that is no
    transfer syntax pydicom knows (ingest refuses such files now; one stored before, as
    sent, keeps its frames refused by read_frames)."""
    uid = UID(transfer_syntax)
    return uid.is_transfer_syntax and uid.is_compressed and transfer_syntax != _DEFLATED


def read_frames(path: Path, transfer_syntax: str, numbers: Sequence[int]) -> Frames:
    """Frames `numbers` (1-based) of the stored file at `path`."""
    with _unreadable_as_frame_error():
        return _read_frames(path, transfer_syntax, numbers)


def frame_numbers(path: Path) -> range:
    """1 to the number of frames of the stored file at `path` (a range, not a list: the
    count is the header's word, which a malformed file may put at billions)."""
    with _unreadable_as_frame_error(), path.open("rb") as fh:
        count = _frame_count(dcmread(fh, stop_before_pixels=True))
    return range(1, count + 1)


@contextmanager
def _unreadable_as_frame_error() -> Iterator[None]:
    """The file is stored as it was sent, and only the index's attributes were checked:
    a malformed pixel module value (a 3-byte Rows, an unknown VR) or a transfer syntax
    pydicom does not know raises in one of the many types pydicom raises; each is a
    FrameError like any other unusable pixel data. An OSError is the disk's, not the
    data's, and stays one."""
    try:
        yield
    except (FrameError, OSError):
        raise
    except Exception as exc:
        raise FrameError(f"the instance's pixel data cannot be read ({type(exc).__name__})"
                         ) from exc


def _read_frames(path: Path, transfer_syntax: str, numbers: Sequence[int]) -> Frames:
    if not UID(transfer_syntax).is_transfer_syntax:  # how its pixels are encoded is unknown
        raise FrameError("the instance's transfer syntax is not one the box knows")
    with path.open("rb") as fh:
        ds = dcmread(fh, stop_before_pixels=True)
        count = _frame_count(ds)
        bad = [n for n in numbers if not 1 <= n <= count]
        if bad:
            raise FrameError(f"no frame {bad[0]} (the instance has {count})")
        if is_encapsulated(transfer_syntax):
            return Frames(transfer_syntax, True, _encapsulated(fh, ds, count, numbers))
        if transfer_syntax in (_IMPLICIT_LITTLE, EXPLICIT_LITTLE):
            return Frames(EXPLICIT_LITTLE, False,
                          _native(fh, ds, transfer_syntax == _IMPLICIT_LITTLE, numbers))
    return Frames(EXPLICIT_LITTLE, False, _decoded(path, numbers))


def _frame_count(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _frame_length(ds: Dataset) -> int:
    """Bytes of one uncompressed frame. YBR_FULL_422 (uncompressed from many ultrasound
    machines) stores two samples a pixel, not three: each pair of pixels is Y Y Cb Cr
    (PS3.3 C.7.6.3.1.2); counting three put every frame after the first in the wrong
    place and answered the last third of a cine as truncated."""
    if not any(keyword in ds for keyword in ("Rows", "Columns", "BitsAllocated")):
        raise FrameError("the instance has no pixel data (no Image Pixel module)")  # PDF, SR
    try:
        samples = int(ds.get("SamplesPerPixel", 1))
        if samples == 3 and ds.get("PhotometricInterpretation") == "YBR_FULL_422":
            samples = 2
        bits = int(ds.Rows) * int(ds.Columns) * samples * int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as exc:
        raise FrameError("the image pixel module is incomplete") from exc
    if bits % 8:
        raise FrameError("frames of this bit depth are not byte aligned")
    return bits // 8


def _pixel_value_start(fh: BinaryIO, implicit: bool) -> int:
    """Position after the Pixel Data element header; `fh` is where pydicom stopped."""
    header = fh.read(8)
    if len(header) < 8:
        raise FrameError("the instance has no pixel data")
    group, element = struct.unpack("<HH", header[:4])
    if (group << 16 | element) not in PIXEL_TAGS:
        raise FrameError("the instance has no pixel data")
    if implicit:
        (length,) = struct.unpack("<I", header[4:8])
    else:  # OB/OW: VR, 2 reserved bytes, 4-byte length
        (length,) = struct.unpack("<I", fh.read(4))
    if length == 0:
        raise FrameError("the instance's pixel data is empty")
    return fh.tell()


def _native(fh: BinaryIO, ds: Dataset, implicit: bool, numbers: Sequence[int]) -> list[bytes]:
    length = _frame_length(ds)
    start = _pixel_value_start(fh, implicit)
    frames = []
    for number in numbers:
        fh.seek(start + (number - 1) * length)
        frame = fh.read(length)
        if len(frame) != length:
            raise FrameError(f"frame {number} is truncated in the stored file")
        frames.append(frame)
    return frames


def _encapsulated(fh: BinaryIO, ds: Dataset, count: int, numbers: Sequence[int]) -> list[bytes]:
    start = _pixel_value_start(fh, implicit=False)
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    elif _empty_offset_table(fh, start):
        return _indexed(fh, count, numbers)
    frames = []
    for number in numbers:
        try:
            frames.append(encaps.get_frame(fh, number - 1, extended_offsets=extended,
                                           number_of_frames=count))
        except ValueError as exc:
            raise FrameError(f"frame {number} cannot be found in the encapsulated data") from exc
    return frames


def _empty_offset_table(fh: BinaryIO, start: int) -> bool:
    """Whether the Basic Offset Table item at `start` is empty; `fh` is left at it."""
    item = fh.read(8)
    fh.seek(start)
    return len(item) == 8 and item[4:] == b"\0\0\0\0"


def _indexed(fh: BinaryIO, count: int, numbers: Sequence[int]) -> list[bytes]:
    """Frames through the file's fragment index, built on its first read (fragment_index)."""
    frames: list[bytes] = []
    try:
        index = FRAGMENT_INDEXES.get(fh, lambda: fragment_index.build(fh, count))
        for number in numbers:
            frames.append(index.read_frame(fh, number - 1))
    except ValueError as exc:
        raise FrameError(f"frame {numbers[len(frames)]} cannot be found in the encapsulated"
                         " data") from exc
    return frames


def _decoded(path: Path, numbers: Sequence[int]) -> list[bytes]:
    ds = dcmread(path)
    if "PixelData" not in ds:
        raise FrameError("the instance has no pixel data")
    length = _frame_length(ds)
    data = bytes(ds.PixelData)
    swap = ds.file_meta.TransferSyntaxUID == _BIG_ENDIAN and int(ds.BitsAllocated) in (16, 32)
    frames = []
    for number in numbers:
        frame = data[(number - 1) * length: number * length]
        if len(frame) != length:
            raise FrameError(f"frame {number} is truncated in the stored file")
        frames.append(_swapped(frame, int(ds.BitsAllocated) // 8) if swap else frame)
    return frames


def _swapped(frame: bytes, width: int) -> bytes:
    """Big endian words -> little endian (pydicom keeps Pixel Data as stored)."""
    out = bytearray(frame)
    for i in range(width):
        out[i::width] = frame[width - 1 - i::width]
    return bytes(out)
