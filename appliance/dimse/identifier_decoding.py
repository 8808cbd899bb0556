"""Query and retrieve identifiers from their bytes: strictly, quietly, one way for all.

C-FIND, Modality Worklist C-FIND, C-MOVE and C-GET read their identifier here, not
through pynetdicom (`event.identifier`, dsutils.decode), which hands the bytes to
pydicom's read_dataset. That forgives what a request must not get away with:

- an element whose length runs past the end is cut short (a truncated Patient's Name
  was matched as the bytes that came: 0x0000, with matches);
- an undefined length on a value that is no sequence reads to the end and loses every
  element (read as empty: 0xA900, a missing level, when none was missing);
- bytes after the last whole element are dropped;
- a deflated identifier is inflated whole, whatever it inflates to.

Here the element structure is walked first (PS3.5 7.1, 7.5): every header and value
within its container, an explicit VR that is a VR, an undefined length only on a
sequence (SQ or UN; in Implicit VR a tag whose VR is SQ or that the dictionary does
not know) and on its items, each closed by its delimiter, nesting at most 64 deep, and
the last element ending where the identifier does. A deflated identifier may inflate
to MAX_INFLATED, the most of any data set the box holds in memory for a request
(docs/conformance.md). What fails raises QueryError(UNDECODABLE), which all four
services answer 0xC000 Unable to Process.

Then pydicom reads it and every value is converted here, not when a service first
reads it. pydicom logs a WARNING line for each element it reads badly (an unknown
tag in Implicit VR, a value its character set cannot read): 10,000 lines for an
identifier of 10,000 such elements. While a thread decodes, those are held back and
counted (pydicom_remarks.held_back: other threads' pydicom lines still show); one
line with the count is logged instead.

A text value whose bytes its Specific Character Set cannot read (Latin-1 bytes under
ISO_IR 192, as real modalities send them) is read as Latin-1, as the index reads such
a stored value (dicom_header, dicom_json.latin1_fallback): a modality that stored
'Weiß' that way finds its study asking that way.
"""

from __future__ import annotations

import logging
import struct
import zlib
from io import BytesIO
from typing import Any

from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pydicom.valuerep import VR

from appliance.base.errors import QueryError, QueryRefusal
from appliance.services import pydicom_remarks
from appliance.services.dicom_json import REPLACEMENT, latin1_fallback
from appliance.services.element_encoding import (
    ITEM,
    ITEM_END,
    LONG_VRS,
    SEQUENCE_END,
    UNDEFINED_LENGTH,
)

log = logging.getLogger(__name__)

MAX_INFLATED = 16 << 20
_MAX_DEPTH = 64
_VRS = frozenset(vr.value.encode("ascii") for vr in VR)
# The VRs whose bytes the Specific Character Set decodes (PS3.5 6.1.2.3).
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})


class _Malformed(Exception):
    """The bytes are no data set in the transfer syntax; the reason names no value."""


def decode_identifier(raw: bytes, syntax: UID, *, label: str) -> Dataset:
    """The identifier `raw`, encoded in `syntax`, as a Dataset whose values are all
    converted; QueryError(UNDECODABLE) when it is no data set. `label` names the peer
    in the one log line of pydicom's remarks, if there were any."""
    try:
        data = _inflated(raw) if syntax.is_deflated else raw
        implicit = syntax.is_implicit_VR and not syntax.is_deflated
        little = syntax.is_little_endian or syntax.is_deflated
        _Walk(data, little).elements(0, len(data), implicit, 0, delimited=False)
    except _Malformed as exc:
        raise QueryError(QueryRefusal.UNDECODABLE,
                         f"the identifier cannot be decoded: {exc}") from None
    with pydicom_remarks.held_back() as remarks:
        try:
            identifier = read_dataset(BytesIO(data), implicit, little)
            _convert(identifier)
        except Exception as exc:  # pydicom's many types for a value it cannot convert
            raise QueryError(QueryRefusal.UNDECODABLE, "the identifier cannot be decoded:"
                             f" a value cannot be read ({type(exc).__name__})") from None
    if remarks:
        log.warning("identifier read: pydicom remarks not logged count=%d %s", len(remarks),
                    label)
    return identifier


def read_identifier(event: Any, label: str) -> Dataset:
    """The identifier of a C-FIND, C-MOVE or C-GET request `event` (decode_identifier)."""
    return decode_identifier(identifier_bytes(event.request.Identifier),
                             UID(event.context.transfer_syntax), label=label)


def identifier_bytes(identifier: BytesIO | None) -> bytes:
    """The bytes pynetdicom received as a request's identifier (none: b"")."""
    return identifier.getvalue() if identifier is not None else b""


def _inflated(raw: bytes) -> bytes:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(raw, MAX_INFLATED + 1)
    except zlib.error:
        raise _Malformed("the deflated data cannot be inflated") from None
    if len(data) > MAX_INFLATED:
        raise _Malformed(f"it inflates beyond {MAX_INFLATED >> 20} MiB")
    if not inflater.eof:
        raise _Malformed("the deflated data is cut short")
    return data


def _convert(identifier: Dataset) -> None:
    """Convert every value of `identifier` and of its items now, Latin-1 for text its
    character set cannot read."""
    for tag in list(identifier.keys()):
        raw = identifier.get_item(tag)  # as read: the bytes, before conversion
        element = identifier[tag]
        if element.VR == VR.SQ:
            for item in element.value:
                _convert(item)
        elif (element.VR in _TEXT_VRS and isinstance(raw, RawDataElement)
              and REPLACEMENT in str(element.value)):
            text = latin1_fallback(raw.value)
            if text is not None:
                identifier[tag] = DataElement(tag, element.VR, text,
                                              validation_mode=config.IGNORE)


class _Walk:
    """The element structure of one data set, checked without building anything."""

    def __init__(self, data: bytes, little: bool) -> None:
        order = "<" if little else ">"
        self.data = data
        self.tag_length = struct.Struct(f"{order}HHI")
        self.short_length = struct.Struct(f"{order}H")
        self.long_length = struct.Struct(f"{order}I")

    def header(self, pos: int, end: int, implicit: bool) -> tuple[int, bytes, int, int]:
        """(tag, VR or b"", value length, value position) of the element at `pos`."""
        if pos + 8 > end:
            raise _Malformed("an element header runs past the end")
        group, number, length = self.tag_length.unpack_from(self.data, pos)
        tag = group << 16 | number
        if implicit or group == 0xFFFE:  # items and delimiters have no VR
            return tag, b"", length, pos + 8
        vr = self.data[pos + 4:pos + 6]
        if vr not in _VRS:
            raise _Malformed("an explicit VR is not a VR")
        if vr not in LONG_VRS:
            return tag, vr, self.short_length.unpack_from(self.data, pos + 6)[0], pos + 8
        if pos + 12 > end:
            raise _Malformed("an element header runs past the end")
        return tag, vr, self.long_length.unpack_from(self.data, pos + 8)[0], pos + 12

    def elements(self, pos: int, end: int, implicit: bool, depth: int, *,
                 delimited: bool) -> int:
        """Past the elements from `pos`: up to `end` exactly, or when `delimited` (an
        item of undefined length) up to its item delimiter, before `end`."""
        while pos < end:
            tag, vr, length, start = self.header(pos, end, implicit)
            if tag == ITEM_END and delimited:
                return start
            if tag >> 16 == 0xFFFE:
                raise _Malformed("an item or delimiter outside a sequence")
            sequence = _sequence(tag, vr)
            if length == UNDEFINED_LENGTH:
                if sequence is False:
                    raise _Malformed("an undefined length on a value that is no sequence")
                pos = self.items(start, end, implicit or vr == b"UN", depth + 1,
                                 delimited=True)
                continue
            if start + length > end:
                raise _Malformed("an element's length runs past the end")
            if sequence is True:
                self.items(start, start + length, implicit, depth + 1, delimited=False)
            pos = start + length
        if delimited:
            raise _Malformed("an item has no delimiter")
        return pos

    def items(self, pos: int, end: int, implicit: bool, depth: int, *,
              delimited: bool) -> int:
        """Past the items of a sequence from `pos`: up to `end` exactly, or when
        `delimited` (undefined length) up to its sequence delimiter, before `end`."""
        if depth > _MAX_DEPTH:
            raise _Malformed("sequences nested too deep")
        while pos < end:
            tag, _, length, start = self.header(pos, end, True)
            if tag == SEQUENCE_END and delimited:
                return start
            if tag != ITEM:
                raise _Malformed("a sequence holds something other than items")
            if length == UNDEFINED_LENGTH:
                pos = self.elements(start, end, implicit, depth, delimited=True)
                continue
            if start + length > end:
                raise _Malformed("an item's length runs past the end")
            self.elements(start, start + length, implicit, depth, delimited=False)
            pos = start + length
        if delimited:
            raise _Malformed("a sequence has no delimiter")
        return pos


def _sequence(tag: int, vr: bytes) -> bool | None:
    """Whether the element is a sequence: True, False, or None when only its value can
    tell (UN, or in Implicit VR a tag the dictionary does not know: pydicom reads it as
    a sequence when it holds items)."""
    if vr:
        return True if vr == b"SQ" else None if vr == b"UN" else False
    try:
        return dictionary_VR(tag) == VR.SQ
    except KeyError:
        return None
