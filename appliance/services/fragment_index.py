"""Where each frame of an encapsulated Pixel Data value lies in its file, when the value
has neither a Basic nor an Extended Offset Table to say so.

Without an offset table the only frame boundaries are in the fragments themselves
(PS3.5 A.4): one fragment a frame when there are as many fragments as frames,
otherwise a JPEG end-of-image / end-of-codestream marker (FFD9) near the end of a
fragment closes a frame. pydicom's `encaps.get_frame` finds frame N by reading
every fragment before it, so a viewer reading a cine frame by frame read the
file's first frame N times and its last once: quadratic in the length of the cine.

`FragmentIndex` records, once per file, each fragment's value position and
length and where each frame starts, reading only the 8-byte item headers and
the last few bytes of each fragment (the marker test looks at no more). A frame
is then one seek and read per fragment. The boundaries are pydicom's, rule for
rule (`get_frame`, pydicom 3): the frames answered are byte for byte those
pydicom answers, which tests/test_pixel_frames_fragments.py checks against
`generate_frames`.

`FragmentIndexCache` keeps the indexes of the files read most recently, keyed by
the file's identity (device, inode, size, modification time: a stored file is
never rewritten in place, and a recalled one is a new file), within a bound on
their total size (16 bytes a fragment, 4 a frame). Thread-safe: frame reads run
in worker threads. Data that cannot be split into the frame asked for raises
ValueError, as pydicom's get_frame does (pixel_frames maps both to FrameError).
"""

from __future__ import annotations

import os
import struct
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

ITEM = 0xFFFEE000
SEQUENCE_DELIMITER = 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
EOI_MARKER = b"\xff\xd9"
MARKER_WINDOW = 10  # pydicom looks for the marker in a fragment's last 10 bytes
DEFAULT_MAX_BYTES = 16 << 20
# 4 MB of index, 40x the fragments of a 2000-frame cine at 3 a frame; a file with more
# is refused (404) rather than indexed without bound.
MAX_FRAGMENTS = 1 << 18


@dataclass(frozen=True)
class FragmentIndex:
    offsets: array  # file position of each fragment's value
    lengths: array  # length of each fragment's value
    frame_starts: array  # first fragment of each frame, then the fragment count

    @property
    def frame_count(self) -> int:
        return len(self.frame_starts) - 1

    @property
    def nbytes(self) -> int:
        return sum(a.itemsize * len(a) for a in (self.offsets, self.lengths,
                                                  self.frame_starts))

    def read_frame(self, fh: BinaryIO, index: int) -> bytes:
        """Frame `index` (0-based): its fragments' values, concatenated."""
        if not 0 <= index < self.frame_count:
            raise ValueError(f"the encapsulated data holds {self.frame_count} frames")
        parts = []
        for fragment in range(self.frame_starts[index], self.frame_starts[index + 1]):
            fh.seek(self.offsets[fragment])
            value = fh.read(self.lengths[fragment])
            if len(value) != self.lengths[fragment]:
                raise ValueError("a fragment is truncated in the stored file")
            parts.append(value)
        return b"".join(parts)


def build(fh: BinaryIO, number_of_frames: int) -> FragmentIndex:
    """The index of the fragments that follow the (empty) Basic Offset Table item
    at `fh`'s position, split into frames as pydicom's get_frame splits them."""
    offsets, lengths, marked = _fragments(fh)
    count = len(offsets)
    if count == 1:
        starts = array("I", [0, 1])  # a single fragment is a single frame
    elif count == number_of_frames:
        starts = array("I", range(count + 1))
    elif number_of_frames == 1:
        starts = array("I", [0, count])
    else:
        starts = array("I", [0])
        starts.extend(fragment + 1 for fragment in range(count) if marked[fragment])
        if starts[-1] != count:  # fragments after the last marker: one more frame
            starts.append(count)
    return FragmentIndex(offsets, lengths, starts)


def _fragments(fh: BinaryIO) -> tuple[array, array, bytearray]:
    """(value positions, lengths, whether a marker ends it) of every fragment item,
    at most MAX_FRAGMENTS (memory: the index is built as it is kept)."""
    bot = fh.read(8)
    if len(bot) != 8 or _tag(bot) != ITEM:
        raise ValueError("the encapsulated data does not start with an offset table item")
    fh.seek(struct.unpack("<I", bot[4:])[0], os.SEEK_CUR)
    offsets, lengths, marked = array("Q"), array("Q"), bytearray()
    while True:
        header = fh.read(8)
        if len(header) < 4:
            break  # end of file: pydicom stops there too
        tag = _tag(header)
        if tag == SEQUENCE_DELIMITER:
            break
        if tag != ITEM:
            raise ValueError("unexpected tag among the encapsulated fragments")
        if len(header) != 8:
            raise ValueError("a fragment's item header is cut short")
        (length,) = struct.unpack("<I", header[4:])
        if length == UNDEFINED:
            raise ValueError("a fragment has an undefined length")
        if len(offsets) == MAX_FRAGMENTS:
            raise ValueError(f"more than {MAX_FRAGMENTS} fragments")
        start = fh.tell()
        offsets.append(start)
        lengths.append(length)
        tail = min(length, MARKER_WINDOW)
        fh.seek(start + length - tail)
        marked.append(EOI_MARKER in fh.read(tail))
        fh.seek(start + length)
    return offsets, lengths, marked


def _tag(header: bytes) -> int:
    group, element = struct.unpack("<HH", header[:4])
    return int(group) << 16 | int(element)


class FragmentIndexCache:
    """The indexes of recently read files, least recently used dropped first once
    their total size passes `max_bytes` (the one being added always stays)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.builds = 0  # indexes built: a file read twice is built once
        self._entries: OrderedDict[tuple[int, ...], FragmentIndex] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, fh: BinaryIO, make: Callable[[], FragmentIndex]) -> FragmentIndex:
        stat = os.fstat(fh.fileno())
        key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found
        index = make()  # outside the lock: other files' frames need not wait
        with self._lock:
            self.builds += 1
            if key not in self._entries:
                self._entries[key] = index
                self._bytes += index.nbytes
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.nbytes
        return index
