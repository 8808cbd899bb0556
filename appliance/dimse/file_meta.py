"""The File Meta group ahead of each received C-STORE dataset, encoded from a template.

pynetdicom builds that group per instance with pydicom: `create_file_meta` makes a
FileMetaDataset of seven elements and `write_file_meta_info` writes it element by
element through a file-like wrapper, a dozen small writes. That was about 12% of
the Python time of receiving a CT slice. The group is always the same seven
Explicit VR Little Endian elements (PS3.10 7.1), so it is encoded here in one
piece, byte for byte what pydicom writes for it (tests/test_file_meta.py compares
the two), and the spool gets it in one write. Values that are not plain ASCII
strings of a sane length (an empty one, which pydicom refuses, too) return None:
the caller then goes pydicom's way.
"""

from __future__ import annotations

import struct
from typing import Any

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

_MAX_VALUE = 0xFFFE  # a short explicit VR length field, even


def _short(tag: tuple[int, int], vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", tag[0], tag[1], vr, len(value)) + value


def _text(value: Any, pad: bytes) -> bytes | None:
    if not value or not isinstance(value, str) or not value.isascii() or "\\" in value:
        return None
    encoded = value.encode("ascii")
    if len(encoded) % 2:
        encoded += pad
    return encoded if len(encoded) <= _MAX_VALUE else None


_VERSION = struct.pack("<HH2s2sI", 0x0002, 0x0001, b"OB", b"\x00\x00", 2) + b"\x00\x01"
_IMPLEMENTATION = (_short((0x0002, 0x0012), b"UI", _text(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")
                          or b"")
                   + _short((0x0002, 0x0013), b"SH",
                            _text(PYNETDICOM_IMPLEMENTATION_VERSION, b" ") or b""))


def encode_file_meta(sop_class_uid: Any, sop_instance_uid: Any,
                     transfer_syntax: Any) -> bytes | None:
    """The File Meta group (from its group length on, without the preamble) that
    pydicom's write_file_meta_info writes for pynetdicom's create_file_meta of these
    values; None when a value needs pydicom's own handling."""
    values = [_text(v, b"\x00") for v in (sop_class_uid, sop_instance_uid, transfer_syntax)]
    if any(v is None for v in values):
        return None
    sop_class, sop_instance, syntax = (v or b"" for v in values)
    body = (_VERSION
            + _short((0x0002, 0x0002), b"UI", sop_class)
            + _short((0x0002, 0x0003), b"UI", sop_instance)
            + _short((0x0002, 0x0010), b"UI", syntax)
            + _IMPLEMENTATION)
    return struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body
