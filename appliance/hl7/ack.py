"""HL7 acknowledgements (ACK with MSA, and ERR when something failed).

Codes (MSA-1): AA the message's effect is committed; AE it was understood
but not applied (content error: ERR names the field); AR it was rejected
for its header (type, control ID, encoding characters, character set) or
because the box could not apply it now (the sender should resend).

Which ACK a message gets (`reply`): at most one, on its connection, once the
message is applied or refused. With MSH-15 and MSH-16 both empty (original
mode), that ACK, always. A sender that fills either asks for enhanced mode
(HL7 v2.5 2.9.3), whose conditions (table 0155: AL always, NE never, ER on an
error or reject, SU on success) the box follows as far as one connection and
a box that never calls the sender allow:
- MSH-16 asks for an application ACK for this outcome: the ACK above (AA, AE,
  AR). NE/AL is the standard's own spelling of original mode; with AL/AL the
  box sends no separate accept ACK before it: it would arrive where a sender
  that reads one answer a message expects the next message's;
- else MSH-15 asks for an accept ACK: CA (committed: given after the commit,
  as AA is), CE (the content was refused: nothing is stored, so nothing is
  committed) or CR (the header, or the box could not apply it now);
- else nothing is written: the sender asked for no answer (NE/NE, or ER and
  SU for the outcome they leave out). The message is applied all the same.
A condition outside table 0155 counts as AL: an answer the sender did not
expect is better than none it waits for.

An AA may carry ERR segments of severity W (ERR-3 0, "message accepted"):
a field the box applied without keeping it as sent (messages.Note: a birth
date of reduced precision), ERR-2 naming the field, ERR-8 saying why.

The ACK uses the standard delimiters ``|^~\\&`` whatever the message used
(a message with bad encoding characters must be answered too); in values
echoed from the message they are escaped (``\\F\\`` ...), and so are control
characters (``\\X0D\\``: one byte in every set the box answers in); other
characters are written as they are, in the ACK's character set. (python-hl7's
escape wrote every non-ASCII character as ``\\X<code point>\\``, which is no
byte sequence of any set: ``\\Xdc\\`` for a UTF-8 Ü.) MSA-2 echoes MSH-10 when
it could be read.

Character set (HL7 v2.5 2.15.9.18; an ACK is a message like any other): the
ACK is encoded in the set the message was read in, and its MSH-18 names that
set as the message's first MSH-18 repetition did (a message without MSH-18 is
read, and answered, in ``[hl7] unnamed_charset``, UTF-8 by default, and its ACK has
no MSH-18 either). When the box
does not read the set the message named (that message is answered AR), or the
ACK holds a character that set cannot encode (a ``\\Xhh\\`` escape echoed into an
ASCII ACK, say), the ACK is UTF-8 and its MSH-18 says ``UNICODE UTF-8``.
"""

from __future__ import annotations

import enum
import itertools
import os
from dataclasses import dataclass
from datetime import UTC, datetime

from appliance.base.hl7_charsets import CHARSETS
from appliance.hl7.messages import ErrorCode, Note
from appliance.services.orders import MessageHeader

BOX_APPLICATION = "PACS-EDGE"
_ESCAPES = {"|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\", "\\": "\\E\\"}
_counter = itertools.count(1)
FALLBACK_CHARSET = "UNICODE UTF-8"


class AckCode(enum.StrEnum):
    ACCEPT = "AA"
    ERROR = "AE"
    REJECT = "AR"


def _esc(value: str) -> str:
    return "".join(_ESCAPES.get(c) or (f"\\X{ord(c):02X}\\" if ord(c) < 0x20 or c == "\x7f"
                                       else c) for c in value)


def _location(location: str) -> str:
    """``ORC-1`` -> ``ORC^1^1`` (ERL: segment, sequence, field)."""
    segment, _, position = location.partition("-")
    return f"{segment}^1^{position}" if position else f"{segment}^1"


def control_id() -> str:
    """A message control ID for our ACKs, unique per process and time."""
    return f"{datetime.now(UTC):%Y%m%d%H%M%S}{os.getpid() % 100000:05d}{next(_counter):06d}"


# Enhanced mode's accept acknowledgement (HL7 table 0008) for each outcome.
_COMMIT_CODES = {AckCode.ACCEPT: "CA", AckCode.ERROR: "CE", AckCode.REJECT: "CR"}


@dataclass(frozen=True)
class Reply:
    """A message's outcome (`code`, as original mode says it: what the metrics count)
    and the ACK written back for it, None when the sender asked for none."""

    code: AckCode
    ack: bytes | None


def reply(code: AckCode, header: MessageHeader | None, *, text: str = "",
          location: str = "", error: ErrorCode | None = None,
          notes: tuple[Note, ...] = ()) -> Reply:
    """The ACK the sender asked for with MSH-15 and MSH-16 (the module docstring)."""
    if header is None or not (header.accept_ack or header.application_ack) or _wanted(
            header.application_ack, code):
        commit = False
    elif _wanted(header.accept_ack, code):
        commit = True
    else:
        return Reply(code, None)
    return Reply(code, build_ack(code, header, text=text, location=location, error=error,
                                 notes=notes, commit=commit))


def _wanted(condition: str, code: AckCode) -> bool:
    """Whether an MSH-15 or MSH-16 condition asks for an ACK of this outcome ('' is none:
    the other field was filled)."""
    return {"NE": False, "": False, "ER": code is not AckCode.ACCEPT,
            "SU": code is AckCode.ACCEPT}.get(condition, True)


def build_ack(code: AckCode, header: MessageHeader | None, *, text: str = "",
              location: str = "", error: ErrorCode | None = None,
              notes: tuple[Note, ...] = (), commit: bool = False) -> bytes:
    """The ACK message, segments joined by CR, encoded (see the module docstring); with
    `commit`, an accept ACK (CA, CE, CR)."""
    h = header
    now = f"{datetime.now(UTC):%Y%m%d%H%M%S}+0000"
    msh = [
        "MSH", "^~\\&", _esc(h.receiving_application if h and h.receiving_application
                             else BOX_APPLICATION),
        _esc(h.receiving_facility if h else ""), _esc(h.sending_application if h else ""),
        _esc(h.sending_facility if h else ""), now, "",
        f"ACK^{_esc(h.trigger_event) if h else ''}^ACK", control_id(),
        _esc(h.processing_id) if h and h.processing_id else "P",
        _esc(h.version) if h and h.version else "2.5",
    ]
    segments = ["|".join(["MSA", _COMMIT_CODES[code] if commit else code.value,
                          _esc(h.control_id if h else ""),
                          _esc(text[:80])])]
    if error is not None:
        segments.append(_err(location, error, "E", text))
    segments += [_err(n.location, ErrorCode.MESSAGE_ACCEPTED, "W", n.text) for n in notes]
    charset = h.charset if h else ""
    codec = CHARSETS.get(h.read_as if h else "")
    if codec is not None:
        try:
            return _joined(msh, charset, segments).encode(codec)
        except UnicodeEncodeError:
            pass
    return _joined(msh, FALLBACK_CHARSET, segments).encode("utf-8")


def _err(location: str, error: ErrorCode, severity: str, text: str) -> str:
    return "|".join(["ERR", "", _location(location) if location else "",
                     f"{error.value}^{_esc(error.name.replace('_', ' ').lower())}^HL70357",
                     severity, "", "", "", _esc(text)])


def _joined(msh: list[str], charset: str, segments: list[str]) -> str:
    """MSH (with MSH-18 = `charset` if any: MSH-13 to MSH-17 empty) and the segments."""
    header = "|".join([*msh, "", "", "", "", "", charset] if charset else msh)
    return "\r".join([header, *segments]) + "\r"
