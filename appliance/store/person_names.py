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
value without padding, case-folded (`str.casefold`: 'MÜLLER' is 'müller').

The store keeps the patient's name in this form (migration 0019, SQL function
`pacs_fold_pn`) and compares every other PN column through the same function;
the query service (appliance/services/query/matching.py) brings a request's
value to the same form. A change to `fold` changes what stored rows hold: it
needs a new SQL function name and a migration that rewrites the column.
"""

from __future__ import annotations

__all__ = ["fold", "strip_padding"]


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
    """The form person names are matched on: `value` without padding, case-folded."""
    return strip_padding(value).casefold()
