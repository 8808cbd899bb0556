"""Reading one value out of a parsed HL7 segment, with HL7's escape sequences undone.

python-hl7's own accessor (`Segment.extract_field`) unescapes with
`hl7.util.unescape`, which the box must not run on what a sender controls:

- a formatting command repeats its text as often as the sender says, so
  ``\\.sp999999999\\`` (14 bytes) makes a string of a gigabyte, and
  ``\\.brx\\`` raises ValueError, which no ACK answers;
- an escape it does not know, or bad hex, is logged with the whole field
  value (a patient's name, in the service log).

So the tree is walked here (the same path rules: past a leaf only position 1
goes on, deeper than asked follows the first child) and values are unescaped
by `unescape`, whose output is never longer than its input and which logs
nothing.
"""

from __future__ import annotations

from typing import Any

import hl7

# Formatting commands (HL7 2.10.6) that break or indent text: each becomes one space
# (the box's fields are names, IDs and descriptions: DICOM values that may not hold a
# CR); a repeat count is ignored. Fill-mode commands (.fi, .nf) become nothing.
_SPACING = frozenset({".br", ".sp", ".in", ".ti", ".sk", ".ce"})


def value(segment: hl7.Segment, field_num: int, component: int = 1, sub: int = 1,
          repeat: int = 1) -> str:
    """SEG-field_num[repeat].component.sub unescaped and stripped; '' when absent."""
    if field_num >= len(segment):
        return ""
    node: Any = segment(field_num)  # python-hl7 containers are lists, leaves str
    for position in (repeat, component, sub):
        if isinstance(node, str):
            return "" if position != 1 else _leaf(segment, field_num, node)
        if position > len(node):
            return ""
        node = node(position)
    while not isinstance(node, str):  # deeper than asked: the first child
        node = node(1)
    return _leaf(segment, field_num, node)


def _leaf(segment: hl7.Segment, field_num: int, text: str) -> str:
    if str(segment(0)) == "MSH" and field_num in (1, 2):  # the delimiters themselves
        return text.strip()
    return unescape(text, segment.separators, segment.esc).strip()


def unescape(text: str, separators: str, esc: str) -> str:
    """Undo HL7 escape sequences (2.10): \\F\\ \\S\\ \\T\\ \\R\\ \\E\\ are the delimiters,
    \\Xhh..\\ the bytes hh.. (one character each, as python-hl7 reads them), formatting
    commands see _SPACING; highlighting, character set switches, anything unknown and
    an escape left open at the end are dropped."""
    if not esc or esc not in text:
        return text
    delimiters = {"F": separators[1], "R": separators[2], "S": separators[3],
                  "T": separators[4] if len(separators) > 4 else "", "E": esc}
    parts = text.split(esc)
    out = parts[0::2]  # outside escapes; parts[1::2] are sequences (the last maybe open)
    for n, sequence in enumerate(parts[1::2]):
        if 2 * n + 2 >= len(parts):
            break  # an open escape at the end
        out[n] += _sequence(sequence, delimiters)
    return "".join(out)


def _sequence(sequence: str, delimiters: dict[str, str]) -> str:
    if sequence in delimiters:
        return delimiters[sequence]
    if sequence[:3] in _SPACING:
        return " "
    hex_digits = sequence[1:]
    if sequence[:1] == "X" and len(hex_digits) % 2 == 0 and all(
            c in "0123456789abcdefABCDEF" for c in hex_digits):
        return "".join(chr(b) for b in bytes.fromhex(hex_digits))
    return ""
