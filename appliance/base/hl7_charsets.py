"""HL7 v2 character set names (MSH-18, HL7 table 0211) and the Python codec of each.

In base because the configuration names one (``[hl7] unnamed_charset``) and must
refuse a name the HL7 reader (appliance/hl7/messages.py) would not know.

The 8859 parts are Europe's, Cyrillic (5), Arabic (6), Greek (7) and Hebrew (8)
among them. ISO IR87 and ISO IR159 (Japanese kanji) come as ISO 2022 escape
sequences in the bytes (ESC $ B ... ESC ( B), which iso2022_jp_2 reads.
"""

from __future__ import annotations

CHARSETS = {
    "ASCII": "ascii", "UNICODE UTF-8": "utf-8", "UTF-8": "utf-8",
    "8859/1": "latin-1", "8859/2": "iso8859-2", "8859/3": "iso8859-3",
    "8859/4": "iso8859-4", "8859/5": "iso8859-5", "8859/6": "iso8859-6",
    "8859/7": "iso8859-7", "8859/8": "iso8859-8", "8859/9": "iso8859-9",
    "8859/15": "iso8859-15", "ISO IR87": "iso2022_jp_2", "ISO IR159": "iso2022_jp_2",
}


def charset_name(value: str) -> str:
    """A set's name as MSH-18 and the config compare it: case and spaces around ignored."""
    return value.strip().upper()
