"""The index's attributes of a Part 10 file by walking its element headers, no pydicom.

pydicom's dcmread builds a Dataset of every element and converts each value the
index reads: ~1 ms of CPU for a CT slice, on the C-STORE critical path. The index
needs a handful of short text values. This walks the top-level element headers
(values are skipped, sequences of undefined length walked without building
anything), keeps the raw values of INDEX tags, and checks on the way that the
dataset is complete: every element ends within the file and the last one ends
exactly where the file does.

Only the plain case is decoded here: Little Endian (explicit or implicit VR), every
kept value ASCII, single-valued, with the VR the dictionary gives. Then each value
is what pydicom's conversion would give, trailing padding removed as pydicom
removes it (tests/test_header_scan.py compares both on pydicom's own test files).
Anything else (big endian, another character repertoire, multiple values, an odd
VR, a malformed header, a dataset that does not end where the file does) returns
None and the caller asks pydicom, which also words the error for a truncated
file or one that is not DICOM at all.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword

from appliance.services.element_encoding import (
    ITEM,
    ITEM_END,
    LONG_VRS,
    SEQUENCE_END,
    UNDEFINED_LENGTH,
)

# Bytes read at a time: most headers fit, and a read this small costs ~5 us where
# 64 KiB cost ~30 us on the ingest path (a fresh 64 KiB buffer faults its pages in).
_WINDOW = 1 << 13
_MAX_DEPTH = 64
_MAX_VALUE = 1 << 12  # an index value longer than this is not plain: pydicom decides
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_SHORT_HEADER = 8  # tag, then VR and 16-bit length (explicit) or 32-bit length
_LONG_HEADER = 12  # tag, VR, 2 reserved bytes, 32-bit length
_TAG_LENGTH = struct.Struct("<HHI")
_LENGTH = struct.Struct("<I")
# What an explicit VR may look like here: two upper-case ASCII letters.
_VR_SHAPES = frozenset(bytes((a, b)) for a in range(65, 91) for b in range(65, 91))
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM",
                       "UC", "UI", "UT", "IS"})


class _NotPlain(Exception):
    """The walk met something only pydicom should judge (a value past the end of the
    file, an implausible VR)."""


class _Source:
    """Positioned reads of a file through one window: a header costs no system call."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.start = 0  # file position of data[0]
        self.data = b""

    def read(self, pos: int, length: int) -> bytes:
        if pos + length > self.size:
            raise _NotPlain
        offset = pos - self.start
        if offset < 0 or offset + length > len(self.data):
            self.load(pos, length)
            offset = 0
        return self.data[offset:offset + length]

    def load(self, pos: int, length: int = 0) -> None:
        """Move the window to start at `pos` (it holds `length` bytes at least, or up to
        the end of the file)."""
        self.start = pos
        self.data = os.pread(self.fd, max(length, _WINDOW), pos)


class _Walker:
    def __init__(self, source: _Source) -> None:
        self.source = source

    def header(self, pos: int, implicit: bool) -> tuple[int, bytes, int, int]:
        """(tag, VR or b"", value length, value position) of the element at `pos`.

        The hot loop of the scan (once per element): it reads the window in place
        rather than through `_Source.read`, which would copy each header out."""
        source = self.source
        data = source.data
        offset = pos - source.start
        available = len(data) - offset
        if offset < 0 or available < _LONG_HEADER:
            if pos + _SHORT_HEADER > source.size:
                raise _NotPlain
            source.load(pos)
            data, offset = source.data, 0
            available = len(data)  # < _LONG_HEADER only when the file ends within it
        group, element, length = _TAG_LENGTH.unpack_from(data, offset)
        if implicit or group == 0xFFFE:
            return group << 16 | element, b"", length, pos + _SHORT_HEADER
        vr = data[offset + 4:offset + 6]
        if vr not in _VR_SHAPES:
            raise _NotPlain  # implicit VR where explicit was declared: an odd writer
        if vr in LONG_VRS:
            if available < _LONG_HEADER:
                raise _NotPlain
            return (group << 16 | element, vr, _LENGTH.unpack_from(data, offset + 8)[0],
                    pos + _LONG_HEADER)
        return group << 16 | element, vr, length >> 16, pos + _SHORT_HEADER

    def skip_sequence(self, pos: int, implicit: bool, depth: int) -> int:
        """Past the sequence delimiter of an undefined-length value starting at `pos`."""
        if depth > _MAX_DEPTH:
            raise ValueError("sequences nested too deep")
        while True:
            tag, _, length, start = self.header(pos, True)
            if tag == SEQUENCE_END:
                return start
            if tag != ITEM:
                raise ValueError("not an item in a sequence")
            pos = (self.skip_items_elements(start, implicit, depth + 1)
                   if length == UNDEFINED_LENGTH else start + length)

    def skip_items_elements(self, pos: int, implicit: bool, depth: int) -> int:
        """Past the item delimiter of an undefined-length item starting at `pos`."""
        while True:
            tag, vr, length, start = self.header(pos, implicit)
            if tag == ITEM_END:
                return start
            if length == UNDEFINED_LENGTH:
                pos = self.skip_sequence(start, implicit or vr == b"UN", depth)
            else:
                pos = start + length


def wanted(keywords: Iterable[str]) -> dict[int, tuple[str, str]]:
    """tag -> (keyword, dictionary VR) for the index's keywords."""
    table = {}
    for keyword in keywords:
        tag = int(tag_for_keyword(keyword) or 0)
        table[tag] = (keyword, dictionary_VR(tag))
    return table


def scan(path: str | Path, tags: dict[int, tuple[str, str]], *,
         fd: int | None = None) -> tuple[dict[str, Any], str] | None:
    """({keyword: plain value}, transfer syntax UID) of a complete `path`, or None when
    this is not the plain case (see the module docstring). `fd`: a descriptor of `path`
    the caller holds open for reading (a spool's), read with pread and left open."""
    own = fd is None
    if fd is None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        source = _Source(fd, os.fstat(fd).st_size)
        try:
            return _scan(source, tags)
        except (_NotPlain, ValueError, struct.error, UnicodeDecodeError):
            return None
    finally:
        if own:
            os.close(fd)


def _scan(source: _Source, tags: dict[int, tuple[str, str]]) -> tuple[dict[str, Any], str] | None:
    if source.size < 144 or source.read(128, 4) != b"DICM":
        return None
    walker = _Walker(source)
    head = source.read(132, 12)
    if head[:8] != b"\x02\x00\x00\x00UL\x04\x00":  # File Meta Information Group Length
        return None
    meta_end = 144 + struct.unpack_from("<I", head, 8)[0]
    pos = 144
    syntax = None
    while pos < meta_end:  # File Meta: always explicit VR little endian
        tag, _, length, start = walker.header(pos, False)
        if tag >> 16 != 2 or length == UNDEFINED_LENGTH:
            return None
        if tag == 0x00020010:
            syntax = source.read(start, length).decode("ascii").rstrip("\0 ")
        pos = start + length
    if pos != meta_end:
        return None
    if syntax is None or syntax == _EXPLICIT_BE or syntax.startswith("1.2.840.10008.1.2.1.99"):
        return None
    implicit = syntax == _IMPLICIT_LE
    values: dict[str, Any] = {}
    elements = 0
    while pos < source.size:
        tag, vr, length, start = walker.header(pos, implicit)
        if tag >> 16 == 0xFFFE:
            raise _NotPlain  # an item or delimiter outside a sequence: pydicom stops there
        elements += 1
        if tag in tags:
            keyword, expected_vr = tags[tag]
            if (vr and vr.decode("ascii") != expected_vr) or length > _MAX_VALUE:
                return None
            value = _plain(source.read(start, length), expected_vr)
            if value is None:
                return None
            values[keyword] = value
        if length == UNDEFINED_LENGTH:
            pos = walker.skip_sequence(start, implicit or vr == b"UN", 1)
        else:
            pos = start + length
    if pos != source.size or not elements:
        raise _NotPlain
    return values, syntax


def _plain(raw: bytes, vr: str) -> Any:
    """The value as pydicom converts it, for one ASCII value; None otherwise."""
    if vr not in _TEXT_VRS or not raw.isascii() or b"\\" in raw or b"\x1b" in raw:
        return None
    text = raw.decode("ascii")
    if vr == "PN" and "=" in text:
        return None
    text = text.rstrip("\0 ")
    if vr == "IS":
        digits = text.strip()
        if not digits:
            return ""
        if not digits.lstrip("+-").isdigit():
            return None
        return int(digits)
    return text
