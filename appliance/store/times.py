"""Normalised DICOM TM values, so time ranges compare as strings.

A TM may be `HH`, `HHMM`, `HHMMSS` or `HHMMSS.FFFFFF` (and old `HH:MM:SS`).
The key pads it to `HHMMSS.FFFFFF`, filling missing parts with zeros, so that
`'1015' < '101530'` compares the way a clock does.
"""

from __future__ import annotations


def time_key(value: str) -> str:
    text = value.strip().replace(":", "")
    if not text:
        return ""
    whole, _, fraction = text.partition(".")
    if not whole.isdigit() or (fraction and not fraction.isdigit()):
        return ""
    return f"{whole[:6]:0<6}.{fraction[:6]:0<6}"
