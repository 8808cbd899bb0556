"""DICOM attribute matching (PS3.4 C.2.2.2): what a request value selects.

Every function returns a matching term of the store
(appliance.store.cfind.conditions: plain values, no SQL) or None for universal
matching; the store turns terms into SQL, with request values only ever as
parameters.

Rules, per kind of attribute:

- Universal: an empty value, or a value made only of `*`, matches everything.
  A key with several values (backslash-separated) matches when any value does,
  which for UIDs is List of UID matching.
- TEXT (SH, LO, CS ...): case-sensitive. Without wildcards it is an equality;
  with `*` / `?` it is a wildcard pattern (any other character is literal).
- PERSON_NAME (PN): case-insensitive, because many modalities send names in
  upper case and a workstation user types `mueller*` or `Müller*`. Both sides
  are compared after Unicode case folding (`str.casefold`) in NFC, so `MÜLLER`
  matches `Müller`, and `Müller` typed composed matches it stored decomposed
  (u and a combining diaeresis; appliance/store/person_names.py says why). The
  whole PN string is matched, component groups
  (`alphabetic=ideographic=phonetic`) included; `Yamada*` finds
  `Yamada^Tarou=山田^太郎`. Padding is not part of a name (PS3.5 6.2.1):
  trailing empty components and groups are left out on both sides
  (appliance/store/person_names.py), so `DOE^JOHN`, `Doe^John^^^` and
  `Doe^John==` are one name, and a value of padding only (`^^`) is empty,
  hence universal. A `^*` (or `^^*` ...) at the end of a group, and a last
  group of only `*`, may also stand for components or groups left out:
  `Doe^John^*` finds `Doe^John^Q` and `Doe^John`, `Doe^*` finds `Doe`, as
  they would find the padded spellings `Doe^John^` and `Doe^`.
- DATE (DA): `YYYYMMDD`, or a range `A-`, `-B`, `A-B` (inclusive); a date that
  names no calendar day (`20240230`) is malformed, as the HL7 edge says of it.
- TIME (TM): compared as normalised keys (`appliance.store.times`). A value
  with reduced precision stands for its whole period: `1015` matches
  10:15:00 to 10:15:59.999999, and `-1015` ends at 10:15:59.999999. An hour,
  minute or second out of range (`2530`; a second may be 60, PS3.5 6.2) is malformed.
- UID: list of UID matching; no wildcards (a `*` in a UID is a literal).
- INTEGER (IS): equality.
- Entities whose value is empty never match a non-universal key.
- Combined date-time matching (an extended negotiation option): when both
  the date and the time of a pair are ranges, they bound one period, e.g.
  `20240105-20240107` with `1000-1800` is 5 Jan 10:00 to 7 Jan 18:00.

Malformed dates, times and integers raise QueryError 0xC000, and so do values no
query needs, which the index could not compare: a value longer than
MAX_VALUE_CHARS characters (SQLite refuses a GLOB pattern of more than 50,000
bytes), and a key other than a UID key with more than MAX_VALUES values (each
is a condition of its own; a UID list is one parameter, of any length).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Sequence

from appliance.base.errors import QueryError, QueryRefusal
from appliance.store.cfind.attributes import Match
from appliance.store.cfind.conditions import (
    AnyOf,
    Between,
    Equals,
    FoldedWildcard,
    OneOf,
    Period,
    Term,
    Wildcard,
)
from appliance.store.person_names import fold, strip_padding
from appliance.store.times import date_problem, time_key, time_problem

__all__ = ["Match", "combined_datetime", "restricts", "term"]

# `^*`, `^^*`, `^*^*` ... at the end of a PN group: may stand for left-out components.
_TRAILING_ANY_COMPONENTS = re.compile(r"(?:\^+\*+)+$")
_PN_GROUPS = 3  # alphabetic, ideographic, phonetic
_DAY_START, _DAY_END = "000000.000000", "235959.999999"
MAX_VALUE_CHARS = 1024  # 16 times the longest value a matching key's VR allows (LO, PN)
MAX_VALUES = 100  # each an OR in a row: SQLite takes no expression 1000 deep


def term(kind: Match, values: Sequence[str]) -> Term | None:
    """What a key of `kind` sent with `values` selects; None when it matches everything."""
    clean = _name_value if kind is Match.PERSON_NAME else str.strip
    wanted = [v for v in map(clean, values) if v]
    if kind is Match.RETURN_ONLY or not wanted:
        return None
    if any(len(v) > MAX_VALUE_CHARS for v in wanted):
        raise QueryError(QueryRefusal.MALFORMED_KEY,
                         f"a key value is longer than {MAX_VALUE_CHARS} characters")
    if kind is not Match.UID and len(wanted) > MAX_VALUES:
        raise QueryError(QueryRefusal.MALFORMED_KEY, f"a key has more than {MAX_VALUES} values")
    if any(_universal(v) for v in wanted):
        return None
    if kind is Match.UID:
        return OneOf(tuple(wanted))
    build = _BUILDERS[kind]
    terms = [build(value) for value in wanted]
    return terms[0] if len(terms) == 1 else AnyOf(tuple(terms))


def restricts(values: Sequence[str], *, person_name: bool = False) -> bool:
    """Whether a key sent with `values` would select less than everything: a value that
    is neither empty nor universal. For keys the index does not match on, whose values
    `term` never reads (nor bounds)."""
    clean = _name_value if person_name else str.strip
    return any(v and not _universal(v) for v in map(clean, values))


def combined_datetime(date_value: str, time_value: str) -> Period | None:
    """One period bounded by a date range and a time range; None unless both are ranges.

    An open side of the time range is the start or the end of its day.
    """
    date_value, time_value = date_value.strip(), time_value.strip()
    if not (_is_range(date_value) and _is_range(time_value)):
        return None
    first_day, last_day = _range(date_value, _check_date)
    first_time, last_time = _range(time_value, _check_time)
    return Period(
        first_day=first_day,
        first_time=time_key(first_time) if first_time else _DAY_START,
        last_day=last_day,
        last_time=_time_upper(last_time) if last_time else _DAY_END,
    )


def _is_range(value: str) -> bool:
    return "-" in value


def _universal(value: str) -> bool:
    return set(value) == {"*"}


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _text(value: str) -> Term:
    return Wildcard(value) if _has_wildcard(value) else Equals(value)


def _name_value(value: str) -> str:
    return strip_padding(value.strip())


def _person_name(value: str) -> Term:
    patterns = _name_patterns(fold(value))  # the stored names' form (padding is gone)
    if len(patterns) == 1:
        return FoldedWildcard(patterns[0])
    return AnyOf(tuple(FoldedWildcard(p) for p in patterns))


def _name_patterns(name: str) -> list[str]:
    """The patterns that together select what the PN pattern `name` (without padding)
    selects among stored names without padding: `name` itself, plus its forms with a
    trailing `^*` of a group, or a trailing group of `*` only, left out (those match
    the padding that stored names no longer have). A pattern left empty by that would
    select empty names, which never match: left out; one of `*` only becomes `?*` (any
    name that is not empty). More groups than a PN has: `name` alone."""
    groups = name.split("=")
    if len(groups) > _PN_GROUPS:
        return [name]
    choices = [dict.fromkeys([group, _TRAILING_ANY_COMPONENTS.sub("", group)])
               for group in groups]
    found: dict[str, None] = {}
    for picked in itertools.product(*choices):
        kept = list(picked)
        while True:
            pattern = strip_padding("=".join(kept))
            if pattern:
                found.setdefault("?*" if _universal(pattern) else pattern)
            if len(kept) == 1 or kept[-1].strip("*"):
                break
            kept.pop()  # a last group of `*` only may match a group left out
    return list(found)


def _integer(value: str) -> Term:
    try:
        return Equals(int(value))
    except ValueError:
        raise QueryError(QueryRefusal.MALFORMED_KEY, "an integer key is malformed") from None


def _date(value: str) -> Term:
    if not _is_range(value):
        return Equals(_check_date(value))
    return Between(*_range(value, _check_date))


def _time(value: str) -> Term:
    if not _is_range(value):
        _check_time(value)
        return Between(time_key(value), _time_upper(value))
    first, last = _range(value, _check_time)
    return Between(time_key(first) if first else "", _time_upper(last) if last else "")


def _range(value: str, check: Callable[[str], str]) -> tuple[str, str]:
    first, sep, last = value.partition("-")
    if not sep or "-" in last:
        raise QueryError(QueryRefusal.MALFORMED_KEY, "a range key is malformed")
    first, last = first.strip(), last.strip()
    if not first and not last:
        raise QueryError(QueryRefusal.MALFORMED_KEY, "a range key has no bound")
    return (check(first) if first else "", check(last) if last else "")


def _check_date(value: str) -> str:
    problem = date_problem(value)
    if problem:
        raise QueryError(QueryRefusal.MALFORMED_KEY, f"a date key {problem}")
    return value


def _check_time(value: str) -> str:
    problem = time_problem(value)
    if problem:
        raise QueryError(QueryRefusal.MALFORMED_KEY, f"a time key {problem}")
    return value


def _time_upper(value: str) -> str:
    """The last moment a reduced-precision time stands for, as a time key."""
    whole, _, fraction = value.strip().replace(":", "").partition(".")
    return f"{whole[:6]:9<6}.{fraction[:6]:9<6}"


_BUILDERS: dict[Match, Callable[[str], Term]] = {
    Match.TEXT: _text,
    Match.PERSON_NAME: _person_name,
    Match.DATE: _date,
    Match.TIME: _time,
    Match.INTEGER: _integer,
}
