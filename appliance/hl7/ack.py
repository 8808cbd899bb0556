"""HL7 original-mode acknowledgements (ACK with MSA, and ERR when something failed).

Codes (MSA-1): AA the message's effect is committed; AE it was understood
but not applied (content error: ERR names the field); AR it was rejected
for its header (type, control ID, encoding characters, character set) or
because the box could not apply it now (the sender should resend).

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


def ack_code(ack: bytes) -> str:
    """MSA-1 of an ACK that build_ack made (its second segment): AA, AE or AR. Every set
    the box answers in keeps ASCII as is, so the bytes are split as they are."""
    return ack.split(b"\r", 2)[1].split(b"|", 2)[1].decode("ascii")


def build_ack(code: AckCode, header: MessageHeader | None, *, text: str = "",
              location: str = "", error: ErrorCode | None = None,
              notes: tuple[Note, ...] = ()) -> bytes:
    """The ACK message, segments joined by CR, encoded (see the module docstring)."""
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
    segments = ["|".join(["MSA", code.value, _esc(h.control_id if h else ""),
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
