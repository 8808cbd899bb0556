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

A value of two double quotes (``""``) is HL7's null, "delete the value" (HL7 2.5
2.5.3): `value` reads it as empty, never as the two characters, and `is_null` says
that a field held it.

`\\Xhh..\\` holds bytes of the message's character set (HL7 2.10.5): ``M\\XC3BC\\ller``
in a UTF-8 message is "Müller", not "MÃ¼ller" (python-hl7 makes one character of
each byte). The set travels with the parsed message: `parse` builds it with a
python-hl7 Factory that carries the codec, so every segment knows it.

`\\Mxxyyzz\\` and `\\Cxxyy\\` switch character sets within a value (HL7 2.3 2.9.2,
for PN and XPN: the ISO 2022 escape without its ESC): ``\\M2442\\;3ED\\C2842\\`` is
"山田", the 7-bit JIS X 0208 bytes of ";3ED" read after ESC $ B. The switches
the ISO IR87 / ISO IR159 codec knows (_SWITCHES) are read so; others are dropped.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import hl7

# Formatting commands (HL7 2.10.6) that break or indent text: each becomes one space
# (the box's fields are names, IDs and descriptions: DICOM values that may not hold a
# CR); a repeat count is ignored. Fill-mode commands (.fi, .nf) become nothing.
_SPACING = frozenset({".br", ".sp", ".in", ".ti", ".sk", ".ce"})
# Character set switches read (HL7 2.3 2.9.2): the code after C or M is the ISO 2022
# escape without ESC. ASCII and JIS X 0201 Roman (\C2842\, \C284A\), JIS X 0208 of
# 1978 and 1983 (ISO IR87: \M2440\, \M2442\), JIS X 0212 (ISO IR159: \M242844\): the
# sets _SWITCHED_CODEC reads, all 7-bit, so their bytes are ASCII characters here.
_SWITCHES = frozenset({"C2842", "C284A", "M2440", "M2442", "M242844"})
_SWITCHED_CODEC = "iso2022_jp_2"


def parse(text: str, codec: str) -> hl7.Message:
    """python-hl7's parse of `text`, decoded from bytes in `codec`: its segments carry
    the codec for the `\\Xhh\\` escapes of their values."""
    return hl7.parse(text, factory=_factory(codec))


@lru_cache(maxsize=16)
def _factory(codec: str) -> type[hl7.Factory]:
    # python-hl7 documents Factory subclasses as the way to specialise its containers;
    # each container keeps the factory it was made by (`.factory`).
    return type(f"Factory_{codec}", (hl7.Factory,), {"codec": codec})


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


NULL = '""'  # HL7 2.5 2.5.3: a field (or component) of two double quotes: delete the value


def is_null(segment: hl7.Segment, field_num: int) -> bool:
    """Whether SEG-field_num is HL7's null: present, and its value to be deleted."""
    return field_num < len(segment) and str(segment(field_num)).strip() == NULL


def repeats(segment: hl7.Segment, field_num: int) -> int:
    """How many repetitions SEG-field_num has (0 when absent)."""
    if field_num >= len(segment):
        return 0
    node: Any = segment(field_num)
    return 1 if isinstance(node, str) else len(node)


def _leaf(segment: hl7.Segment, field_num: int, text: str) -> str:
    if str(segment(0)) == "MSH" and field_num in (1, 2):  # the delimiters themselves
        return text.strip()
    if text.strip() == NULL:  # no value: `is_null` tells a caller that deletes one
        return ""
    codec = getattr(segment.factory, "codec", "latin-1")
    return unescape(text, segment.separators, segment.esc, codec).strip()


def unescape(text: str, separators: str, esc: str, codec: str = "latin-1") -> str:
    """Undo HL7 escape sequences (2.10): \\F\\ \\S\\ \\T\\ \\R\\ \\E\\ are the delimiters,
    \\Xhh..\\ the bytes hh.. in the message's character set `codec` (bytes that set
    cannot read, such as \\XFC\\ in a UTF-8 message, one Latin-1 character each, as
    senders that escape Latin-1 mean them), formatting commands see _SPACING;
    a character set switch of _SWITCHES makes what follows it, up to the next switch,
    the 7-bit bytes of that set (escaped delimiters among them: bytes of a kanji that
    would split the field); highlighting, other switches, anything unknown and an
    escape left open at the end are dropped."""
    if not esc or esc not in text:
        return text
    delimiters = {"F": separators[1], "R": separators[2], "S": separators[3],
                  "T": separators[4] if len(separators) > 4 else "", "E": esc}
    parts = text.split(esc)  # outside escapes at even positions, sequences at odd ones
    runs: list[tuple[str, list[str]]] = [("", [parts[0]])]  # (switch in force, text)
    for n in range(1, len(parts) - 1, 2):  # an open escape at the end (parts[-1]): out
        switch = parts[n][:1] + parts[n][1:].upper()
        if switch in _SWITCHES:
            runs.append((switch, []))
        else:
            runs[-1][1].append(_sequence(parts[n], delimiters, codec))
        runs[-1][1].append(parts[n + 1])
    return "".join(_switched(switch, "".join(text)) for switch, text in runs)


def _switched(switch: str, text: str) -> str:
    """`text` read in the set `switch` designates ('' none: as it is). Its characters
    are that set's bytes; text that is not (not ASCII, half a kanji) stays as it is."""
    if not switch:
        return text
    try:
        return (b"\x1b" + bytes.fromhex(switch[1:]) + text.encode("ascii")).decode(
            _SWITCHED_CODEC)
    except UnicodeError:
        return text


def _sequence(sequence: str, delimiters: dict[str, str], codec: str) -> str:
    if sequence in delimiters:
        return delimiters[sequence]
    if sequence[:3] in _SPACING:
        return " "
    hex_digits = sequence[1:]
    if sequence[:1] == "X" and len(hex_digits) % 2 == 0 and all(
            c in "0123456789abcdefABCDEF" for c in hex_digits):
        return _hex_text(bytes.fromhex(hex_digits), codec)
    return ""


def _hex_text(data: bytes, codec: str) -> str:
    """The text of an escape's bytes: never longer than the bytes (so than the escape)."""
    try:
        return data.decode(codec)
    except (UnicodeDecodeError, LookupError):
        return data.decode("latin-1")
