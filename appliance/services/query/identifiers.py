"""C-FIND response identifiers encoded straight from index rows.

pydicom's encoder builds a Dataset and a DataElement per value and walks them
in Python for every response: about 1 ms per match on this box, most of a
C-FIND's cost once the index answers from an index. The identifiers of one
query all have the same elements in the same order, and only the values of
the index columns differ from row to row. So a `Template` encodes, once per
query and with pydicom itself, every element whose value is the same in each
response (QueryRetrieveLevel, RetrieveAETitle, keys the index does not know),
and per row only frames the column values: a tag, a VR and a length, the
value, one pad byte.

Contract: the bytes equal pydicom's `write_dataset` of the Dataset that
`find.response()` builds for the same row (tests/test_query_identifiers.py
compares them over every level, both Little Endian syntaxes and values in
several scripts). That holds for the values the index returns (text, integers,
NULL) in Implicit and Explicit VR Little Endian; a row holding anything else,
or a value too long for an explicit 16-bit length, is encoded by pydicom.

The index keeps decoded text. A response holding a non-ASCII value is in the
request's own single-byte Specific Character Set (ISO_IR 100, 144, ...) when that
set holds every value of the response, else in UTF-8 ("ISO_IR 192"); the
character set element (0008,0005) is inserted at its place in tag order. Many
workstations and modalities read no UTF-8 and ask in their own set: Müller in
UTF-8 is "MÃ¼ller" there (PS3.4 C.4.1.1.3.2 lets the SCP answer in another set
than asked, so UTF-8 stays the answer to what the asked set cannot hold). An
ASCII-only response has no character set element (the default repertoire).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.tag import BaseTag, Tag

__all__ = ["CHARACTER_SET", "SINGLE_BYTE_SETS", "UTF8", "Column", "Template",
           "asked_character_set", "pydicom_bytes", "response_character_set"]

CHARACTER_SET = Tag(0x0008, 0x0005)
UTF8 = "ISO_IR 192"
# The single-byte Specific Character Sets (PS3.3 Table C.12-2) an answer may be given
# in, and the Python codec of each (pydicom's, so that both encode alike).
SINGLE_BYTE_SETS = {
    "ISO_IR 100": "latin_1", "ISO_IR 101": "iso8859_2", "ISO_IR 109": "iso8859_3",
    "ISO_IR 110": "iso8859_4", "ISO_IR 144": "iso8859_5", "ISO_IR 127": "iso8859_6",
    "ISO_IR 126": "iso8859_7", "ISO_IR 138": "iso8859_8", "ISO_IR 148": "iso8859_9",
    "ISO_IR 203": "iso8859_15", "ISO_IR 166": "tis_620",
}
# VRs whose explicit length field is 4 bytes (PS3.5 7.1.2); the column VRs never are.
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR",
                       "UT", "UV"})
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH",
                       "ST", "TM", "UC", "UI", "UR", "UT"})
_SHORT_MAX = 0xFFFF

Row = Sequence[object]


def asked_character_set(value: object) -> str:
    """A request's Specific Character Set value, if it is one set of SINGLE_BYTE_SETS;
    else "" (none, UTF-8, several sets, ISO 2022): answers are then UTF-8."""
    asked = value.strip() if isinstance(value, str) else ""
    return asked if asked in SINGLE_BYTE_SETS else ""


def response_character_set(asked: str, texts: Iterable[str]) -> str:
    """The set a response holding non-ASCII `texts` is in: `asked` (asked_character_set)
    when it can encode every one of them, else UTF-8."""
    codec = SINGLE_BYTE_SETS.get(asked)
    if codec is None:
        return UTF8
    try:
        for text in texts:
            text.encode(codec)
    except UnicodeEncodeError:
        return UTF8
    return asked


class Column:
    """An element whose value is one value of the row (position `index`)."""

    __slots__ = ("index", "pad", "prefix", "tag")

    def __init__(self, tag: BaseTag, vr: str, index: int, *, implicit: bool) -> None:
        if vr not in _TEXT_VRS or vr in _LONG_VRS:
            raise ValueError(f"no direct encoding for VR {vr}")
        self.tag = tag
        self.index = index
        self.pad = b"\0" if vr == "UI" else b" "
        # Tag, then (explicit) the VR; the length follows.
        self.prefix = struct.pack("<HH", tag.group, tag.element)
        if not implicit:
            self.prefix += vr.encode("ascii")


class Template:
    """Encodes the response identifiers of one query; see the module docstring.

    `constant` holds the elements whose value is the same in every response
    (a Dataset, encoded here by pydicom); `columns` are (tag, VR) of the row's
    values, in row order. `fallback(row)` builds the response Dataset of a row
    the template cannot frame.
    """

    def __init__(self, constant: Dataset, columns: Sequence[tuple[BaseTag, str]], *,
                 implicit: bool, fallback: Callable[[Row], Dataset], asked: str = "") -> None:
        """`asked`: the request's set (asked_character_set), tried before UTF-8."""
        self.implicit = implicit
        self.fallback = fallback
        self._length = struct.Struct("<L" if implicit else "<H").pack
        # In tag order: bytes for a constant element, a Column for a row value, and
        # None where the character set goes when the row needs one.
        parts: list[tuple[BaseTag, bytes | Column | None]] = [
            (element.tag, pydicom_bytes(_single(constant, element.tag), implicit=implicit))
            for element in constant
        ]
        parts += [(tag, Column(tag, vr, i, implicit=implicit))
                  for i, (tag, vr) in enumerate(columns)]
        parts.append((CHARACTER_SET, None))
        parts.sort(key=lambda part: part[0])
        self._parts = [part for _, part in parts]
        self._charset = _charset_bytes(UTF8, implicit)
        self._codec = SINGLE_BYTE_SETS.get(asked)
        self._asked = _charset_bytes(asked, implicit) if self._codec else b""

    def encode(self, row: Row) -> bytes:
        """The encoded identifier of `row`."""
        framed = self._framed(row, "utf-8")
        if framed is None:
            return pydicom_bytes(self.fallback(row), implicit=self.implicit)
        out, non_ascii = framed
        charset = self._charset if non_ascii else b""
        if non_ascii and self._codec is not None:
            try:
                again = self._framed(row, self._codec)
            except UnicodeEncodeError:  # a value the asked set cannot hold: UTF-8
                again = None
            if again is not None:
                out, charset = again[0], self._asked
        return b"".join(charset if part is None else part for part in out)

    def _framed(self, row: Row, codec: str) -> tuple[list[bytes | None], bool] | None:
        """The parts of `row`'s identifier with its text in `codec` (None where the
        character set goes), and whether a value is not ASCII; None: pydicom's to do."""
        out: list[bytes | None] = []
        non_ascii = False
        length = self._length
        for part in self._parts:
            if part is None or part.__class__ is bytes:
                out.append(part)  # type: ignore[arg-type]  # None: the charset's place
                continue
            column: Column = part  # type: ignore[assignment]
            value = row[column.index]
            if value is None or value == "":
                data = b""
            elif value.__class__ is str:
                data = value.encode(codec)  # type: ignore[union-attr]
                non_ascii = non_ascii or not value.isascii()  # type: ignore[union-attr]
            elif value.__class__ is int:
                data = str(value).encode("ascii")
            else:
                return None
            if len(data) & 1:
                data += column.pad
            if len(data) > _SHORT_MAX and not self.implicit:
                return None
            out.append(column.prefix + length(len(data)) + data)
        return out, non_ascii


def _charset_bytes(charset: str, implicit: bool) -> bytes:
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    return pydicom_bytes(ds, implicit=implicit)


def _single(dataset: Dataset, tag: BaseTag) -> Dataset:
    one = Dataset()
    one[tag] = dataset[tag]
    return one


def pydicom_bytes(dataset: Dataset, *, implicit: bool) -> bytes:
    """`dataset` encoded by pydicom in Implicit or Explicit VR Little Endian."""
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = True
    write_dataset(fp, dataset)
    return fp.getvalue()
