"""DICOM DA and TM values: whether one is well formed, and TM keys that compare as strings.

A TM may be `HH`, `HHMM`, `HHMMSS` or `HHMMSS.FFFFFF` (and old `HH:MM:SS`).
The key pads it to `HHMMSS.FFFFFF`, filling missing parts with zeros, so that
`'1015' < '101530'` compares the way a clock does.

`date_problem` and `time_problem` say what is wrong with a value (None when
nothing is), in words a refusal can name without quoting the value: a C-FIND key
and an MPPS step's start and end are checked alike.
"""

from __future__ import annotations

import datetime
import re

_DATE = re.compile("[0-9]{8}")
_DIGITS = re.compile("[0-9]+")  # ASCII only: str.isdigit() takes "²", which int() refuses
# HH, HHMM, HHMMSS, HHMMSS.F to HHMMSS.FFFFFF (PS3.5 6.2), colons of `HH:MM:SS` removed.
_TIME = re.compile(r"[0-9]{2}(?:[0-9]{2}(?:[0-9]{2}(?:\.[0-9]{1,6})?)?)?")
_TIME_BOUNDS = (24, 60, 61)  # hour, minute, second: a second may be 60 (PS3.5 6.2)


def date_problem(value: str) -> str | None:
    """What makes `value` no DA (`YYYYMMDD` naming a calendar day), or None."""
    if not _DATE.fullmatch(value):
        return "is not YYYYMMDD"
    try:
        datetime.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return "names no calendar day"
    return None


def time_problem(value: str) -> str | None:
    """What makes `value` no TM (`HH[MM[SS[.FFFFFF]]]` within a day), or None.

    Stricter than `time_key`, which reads stored values as leniently as it can:
    `101` or `10150012` would be keyed as 10:10 or 10:15:00 there.
    """
    text = value.strip().replace(":", "")
    if not _TIME.fullmatch(text):
        return "is not HHMMSS.FFFFFF"
    whole = text.partition(".")[0]
    if any(int(whole[2 * i:2 * i + 2] or 0) >= bound for i, bound in enumerate(_TIME_BOUNDS)):
        return "is out of range"
    return None


def time_key(value: str) -> str:
    text = value.strip().replace(":", "")
    if not text:
        return ""
    whole, _, fraction = text.partition(".")
    if not _DIGITS.fullmatch(whole) or not _DIGITS.fullmatch(fraction or "0"):
        return ""
    return f"{whole[:6]:0<6}.{fraction[:6]:0<6}"
