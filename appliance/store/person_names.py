"""Person Name (PN) values in the one form that matching compares (PS3.5 6.2.1).

A PN value is up to three component groups (alphabetic, ideographic, phonetic)
separated by `=`, each of up to five components separated by `^`. PS3.5
6.2.1.1 and 6.2.1.2 let a writer leave out trailing empty components and
trailing empty groups, so 'Doe^John^^^', 'Doe^John==' and 'Doe^John' are one
name, and modalities and RIS systems differ in which spelling they send.

`strip_padding` removes that padding: the empty components at the end of each
group, then the empty groups at the end of the value. Nothing else changes
(an empty component or group in the middle is significant: 'Doe^^Q' keeps
its empty given name). `fold` is the key person names are matched on: the
value without padding, case-folded (`str.casefold`: 'MÜLLER' is 'müller'), in
Unicode NFC: 'ü' sent composed (U+00FC) and decomposed ('u' and U+0308, as
macOS and some RIS and modalities write it) is one letter, so a name stored in
one form matches a query typed in the other, and `M?ller` finds both. DICOM
says nothing of normalization; a user sees one name.

The store keeps the patient's name in this form (migration 0033, SQL function
`pacs_fold_pn_nfc`) and compares every other PN column through the same function;
the query service (appliance/services/query/matching.py) brings a request's
value to the same form. A change to `fold` changes what stored rows hold: it
needs a new SQL function name and a migration that rewrites the column.
`fold_0019` is the form before 0033, which migrations 0019 and 0029 still write
on an index older than them.
"""

from __future__ import annotations

import unicodedata

__all__ = ["fold", "fold_0019", "strip_padding"]


def strip_padding(value: str) -> str:
    """`value` without trailing empty components in each group and without trailing
    empty groups: 'Doe^John^^=^^' -> 'Doe^John'."""
    if "^" not in value and "=" not in value:  # the common case: nothing to strip
        return value
    groups = [group.rstrip("^") for group in value.split("=")]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def fold(value: str) -> str:
    """The form person names are matched on: `value` without padding, case-folded, NFC
    (the canonical caseless form of Unicode 3.13, composed)."""
    stripped = strip_padding(value)
    if stripped.isascii():  # the common case: nothing to normalize
        return stripped.lower()
    return unicodedata.normalize(
        "NFC", unicodedata.normalize("NFD", stripped).casefold())


def fold_0019(value: str) -> str:
    """The folded form of migration 0019: without padding, case-folded, not normalized."""
    return strip_padding(value).casefold()
