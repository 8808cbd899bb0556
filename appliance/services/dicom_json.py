"""DICOM JSON (PS3.18 F.2) of one header element, straight from its raw bytes.

Why: pydicom's `DataElement.to_json_dict` first turns every raw element into a
full `DataElement` (value conversion, validation, MultiValue, PersonName,
DSfloat/IS objects) only to flatten it again; for a 300-slice CT that was about
two thirds of a cold series-metadata build. `element_json` decodes the common,
well-formed cases itself (text, PN, UI, dates and times, DS/IS as JSON numbers,
binary numbers, AT, sequences item by item) with exactly pydicom's rules
(padding stripped, backslash split, the same character sets), and answers
None for anything else: a deferred or already converted value, implicit
private tags, UN, ambiguous VRs, an unusual character set, an empty value in
a multi-valued element, a number pydicom would parse differently.
`dataset_element_json` then asks pydicom, so the output is pydicom's in every
case (tests compare both on a wide set of files, pydicom's own among them),
with one exception: a DS, FL or FD element holding a value that is not a
finite number (an FD NaN or infinity, a DS "NaN" or "1e400", which overflows
a float) is answered empty, as an invalid DS is. PS3.18 F.2.3 makes these
values JSON numbers, and JSON has no NaN or Infinity: pydicom would write
text that browsers' JSON.parse refuses. Empty, rather than a null per bad
value: null is for an empty value (F.2.5), and a number that is there but
unusable is not one. And a second: a text value whose bytes its character set
cannot read (Latin-1 bytes under ISO_IR 192, common in real life) is read as
Latin-1, as the index reads it (dicom_header), where pydicom
puts U+FFFD for each of those letters.
"""

from __future__ import annotations

import base64
import math
import re
import struct
from functools import lru_cache
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

# SpecificCharacterSet values whose text decodes by one Python codec, no ISO 2022 escapes.
CODECS = {"": "iso8859", "ISO_IR 6": "iso8859", "ISO_IR 100": "latin_1", "ISO_IR 192": "UTF8"}
REPLACEMENT = "\ufffd"  # what pydicom puts for bytes its character set cannot read
_REPLACEMENT_UTF8 = REPLACEMENT.encode()
_ESC = b"\x1b"
_STRINGS = frozenset({"CS", "AS", "DA", "DT", "TM"})  # pydicom's convert_string
_TEXTS = frozenset({"SH", "LO", "UC"})  # split on backslash, each value decoded
_SINGLE_TEXTS = frozenset({"ST", "LT", "UT"})  # one value, decoded
_BINARY = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})
_NUMBERS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d",
            "UV": "Q", "SV": "q"}
_FLOATS = frozenset({"DS", "FL", "FD"})
_DS = re.compile(r" *[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)? *\Z")
_IS = re.compile(r" *[+-]?\d+ *\Z")


@lru_cache(maxsize=4096)
def dictionary_vr(tag: int) -> str | None:
    """The public dictionary's VR of `tag`; None if unknown, private or ambiguous."""
    if tag >> 16 & 1:
        return None
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return None
    return None if " " in vr else vr


def dataset_element_json(ds: Dataset, tag: int, codec: str | None) -> dict[str, Any]:
    """The DICOM JSON of `ds`'s element `tag`, as pydicom's to_json_dict (no bulk handler).

    `codec` is the Python codec of the dataset's character set (a value of CODECS;
    None if it has no such codec: text in that set is left to pydicom). A
    sequence is parsed by pydicom and its items' elements encoded here."""
    found = element_json(ds.get_item(tag), codec)
    if found is not None:
        return found
    elem = ds[tag]
    if elem.VR == "SQ":
        found = _sequence_json(elem.value, codec)
    return _finite_json(elem.to_json_dict(None, 1024)) if found is None else found


def _finite_json(found: dict[str, Any]) -> dict[str, Any]:
    """`found` (pydicom's JSON of an element) with every DS/FL/FD element that holds a
    non-finite number made empty, in nested sequence items too."""
    values = found.get("Value")
    if not values:
        return found
    vr = found.get("vr")
    if vr in _FLOATS:
        return found if all(_finite(v) for v in values) else {"vr": vr}
    if vr == "SQ":
        return {**found, "Value": [{key: _finite_json(elem) for key, elem in item.items()}
                                   for item in values]}
    return found


def _finite(value: object) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def element_json(elem: RawDataElement | DataElement, codec: str | None
                 ) -> dict[str, Any] | None:
    """The DICOM JSON of a raw element; None: not a case decoded here, ask pydicom."""
    if not isinstance(elem, RawDataElement):
        return None
    value = elem.value
    if value is None:
        return None
    vr = elem.VR or (None if elem.is_implicit_VR is False else dictionary_vr(elem.tag))
    if vr is None or vr == "UN":  # pydicom may replace UN by the dictionary's VR
        return None
    if not value:
        return {"vr": vr} if vr != "SQ" else None
    try:
        found = _value(vr, value, codec, elem.is_little_endian)
    except UnicodeDecodeError:
        if latin1_fallback(value) is None:
            return None
        found = _value(vr, value, "latin_1", elem.is_little_endian)
    except struct.error:
        return None
    if found is None:
        return None
    if found is _INLINE:
        return {"vr": vr, "InlineBinary": base64.b64encode(value).decode()}
    return {"vr": vr, "Value": found} if found else {"vr": vr}  # padding only: empty


_INLINE: list[Any] = []  # marker: binary value, inline


def _value(vr: str, raw: bytes, codec: str | None, little: bool) -> list[Any] | None:
    if codec is None and (vr in _TEXTS or vr in _SINGLE_TEXTS or vr == "PN"):
        return None
    if vr in _STRINGS or vr == "UI":
        text = raw.decode("iso8859")
        items = (text.rstrip("\0 ") if vr == "UI" else text).rstrip(" \x00").split("\\")
        return _strings(items)
    if vr in _TEXTS:
        return _strings([v.rstrip("\0 ") for v in raw.decode(codec).split("\\")])
    if vr in _SINGLE_TEXTS:
        text = raw.decode(codec).rstrip("\0 ")
        return [text] if text else []
    if vr == "AE":
        return _strings([v.strip() for v in raw.decode("iso8859").split("\\")])
    if vr == "PN":
        return _names(raw, codec)
    if vr == "DS":
        items = _strings(raw.decode("iso8859").rstrip(" \x00").split("\\"))
        if items is None or not all(_DS.match(v) for v in items):
            return None
        return _finite_or_empty([float(v) for v in items])
    if vr == "IS":
        items = _strings(raw.decode("iso8859").rstrip(" \x00").split("\\"))
        if items is None or not all(_IS.match(v) for v in items):
            return None
        return [int(v) for v in items]
    if vr in _NUMBERS:
        code = _NUMBERS[vr]
        size = struct.calcsize(code)
        if len(raw) % size:
            return None
        values = list(struct.unpack(f"{'<' if little else '>'}{len(raw) // size}{code}", raw))
        return _finite_or_empty(values) if vr in _FLOATS else values
    if vr == "AT":
        if len(raw) % 4:
            return None
        pairs = struct.unpack(f"{'<' if little else '>'}{len(raw) // 2}H", raw)
        return [f"{pairs[i] << 16 | pairs[i + 1]:08X}" for i in range(0, len(pairs), 2)]
    if vr in _BINARY:
        return _INLINE
    return None


def latin1_fallback(raw: bytes | None) -> str | None:
    """The text of a value pydicom could not read in its character set, as Latin-1
    (every byte is a letter there); None when the bytes hold an ISO 2022 escape (a
    broken multi-byte set is no Latin-1) or the replacement character itself."""
    if not raw or _ESC in raw or _REPLACEMENT_UTF8 in raw:
        return None
    return raw.decode("latin-1").strip(" \0")


def _finite_or_empty(values: list[float]) -> list[float]:
    """`values`, or none (an empty element) when one is NaN or infinite: see above."""
    return values if all(map(math.isfinite, values)) else []


def _strings(items: list[str]) -> list[str] | None:
    """The Value of split strings: [] for one empty value; None (pydicom) for empty parts."""
    if len(items) == 1:
        return items if items[0] else []
    return None if "" in items else items


def _names(raw: bytes, codec: str | None) -> list[dict[str, str]] | None:
    items = _strings(raw.rstrip(b"\x00 ").decode(codec).split("\\"))
    if items is None:
        return None
    out = []
    for item in items:
        groups = item.split("=")
        if len(groups) > 3 or any(g != g.rstrip(" ") or not g for g in groups[1:]):
            return None
        name = {"Alphabetic": groups[0]}
        if len(groups) > 1:
            name["Ideographic"] = groups[1]
        if len(groups) > 2:
            name["Phonetic"] = groups[2]
        out.append(name)
    return out


def _sequence_json(items: list[Dataset], codec: str | None) -> dict[str, Any] | None:
    values = []
    for item in items:
        if "SpecificCharacterSet" in item:
            return None
        values.append({f"{tag:08X}": dataset_element_json(item, tag, codec)
                       for tag in tuple(item.keys())})
    return {"vr": "SQ", "Value": values}
