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

Values are UTF-8: the index keeps decoded text, and a response holding a
non-ASCII value says SpecificCharacterSet "ISO_IR 192" (0008,0005), inserted
at its place in tag order; an ASCII-only response has no character set
element (ASCII is the default repertoire).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.tag import BaseTag, Tag

__all__ = ["CHARACTER_SET", "UTF8", "Column", "Template", "pydicom_bytes"]

CHARACTER_SET = Tag(0x0008, 0x0005)
UTF8 = "ISO_IR 192"
# VRs whose explicit length field is 4 bytes (PS3.5 7.1.2); the column VRs never are.
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR",
                       "UT", "UV"})
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH",
                       "ST", "TM", "UC", "UI", "UR", "UT"})
_SHORT_MAX = 0xFFFF

Row = Sequence[object]


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
                 implicit: bool, fallback: Callable[[Row], Dataset]) -> None:
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
        charset = Dataset()
        charset.SpecificCharacterSet = UTF8
        self._charset = pydicom_bytes(charset, implicit=implicit)

    def encode(self, row: Row) -> bytes:
        """The encoded identifier of `row`."""
        out: list[bytes] = []
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
                data = value.encode("utf-8")  # type: ignore[union-attr]
                non_ascii = non_ascii or len(data) != len(value)  # type: ignore[arg-type]
            elif value.__class__ is int:
                data = str(value).encode("ascii")
            else:
                return pydicom_bytes(self.fallback(row), implicit=self.implicit)
            if len(data) & 1:
                data += column.pad
            if len(data) > _SHORT_MAX and not self.implicit:
                return pydicom_bytes(self.fallback(row), implicit=self.implicit)
            out.append(column.prefix + length(len(data)) + data)
        charset = self._charset if non_ascii else b""
        return b"".join(charset if part is None else part for part in out)


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
