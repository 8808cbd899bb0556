"""HL7 original-mode acknowledgements (ACK with MSA, and ERR when something failed).

Codes (MSA-1): AA the message's effect is committed; AE it was understood
but not applied (content error: ERR names the field); AR it was rejected
for its header (type, control ID, encoding characters, character set) or
because the box could not apply it now (the sender should resend).

The ACK uses the standard delimiters ``|^~\\&`` whatever the message used
(a message with bad encoding characters must be answered too); values echoed
from the message are escaped with python-hl7's escaping. MSA-2 echoes
MSH-10 when it could be read.
"""

from __future__ import annotations

import enum
import itertools
import os
from datetime import UTC, datetime

import hl7

from appliance.hl7.messages import ErrorCode
from appliance.services.orders import MessageHeader

BOX_APPLICATION = "PACS-EDGE"
_ESCAPER = hl7.Message(separators="\r|~^&", esc="\\")
_counter = itertools.count(1)


class AckCode(enum.StrEnum):
    ACCEPT = "AA"
    ERROR = "AE"
    REJECT = "AR"


def _esc(value: str) -> str:
    return str(_ESCAPER.escape(value)) if value else ""


def _location(location: str) -> str:
    """``ORC-1`` -> ``ORC^1^1`` (ERL: segment, sequence, field)."""
    segment, _, position = location.partition("-")
    return f"{segment}^1^{position}" if position else f"{segment}^1"


def control_id() -> str:
    """A message control ID for our ACKs, unique per process and time."""
    return f"{datetime.now(UTC):%Y%m%d%H%M%S}{os.getpid() % 100000:05d}{next(_counter):06d}"


def ack_code(ack: str) -> str:
    """MSA-1 of an ACK that build_ack made (its second segment): AA, AE or AR."""
    return ack.split("\r", 2)[1].split("|", 2)[1]


def build_ack(code: AckCode, header: MessageHeader | None, *, text: str = "",
              location: str = "", error: ErrorCode | None = None) -> str:
    """The ACK message as text (segments joined by CR)."""
    h = header
    now = f"{datetime.now(UTC):%Y%m%d%H%M%S}+0000"
    msh = "|".join([
        "MSH", "^~\\&", _esc(h.receiving_application if h and h.receiving_application
                             else BOX_APPLICATION),
        _esc(h.receiving_facility if h else ""), _esc(h.sending_application if h else ""),
        _esc(h.sending_facility if h else ""), now, "",
        f"ACK^{_esc(h.trigger_event) if h else ''}^ACK", control_id(),
        _esc(h.processing_id) if h and h.processing_id else "P",
        _esc(h.version) if h and h.version else "2.5",
    ])
    segments = [msh, "|".join(["MSA", code.value, _esc(h.control_id if h else ""),
                               _esc(text[:80])])]
    if error is not None:
        segments.append("|".join([
            "ERR", "", _location(location) if location else "",
            f"{error.value}^{_esc(error.name.replace('_', ' ').lower())}^HL70357",
            "E", "", "", "", _esc(text)]))
    return "\r".join(segments) + "\r"
