"""HL7 v2 bytes -> the order service's requests: framing checks, decoding, field mapping.

This module only translates. It checks what HL7 itself requires of a
message (MSH first, valid encoding characters, a message type and a control
ID), decodes the text in the character set MSH-18 names, parses it with
python-hl7, and maps the fields the box uses (docs/workflow.md has the
table) into the service's typed requests. Anything it cannot translate is
an Hl7Error naming the field, which the listener answers with AR (a problem
of the message header: type, control ID, encoding) or AE (content). A field
it accepts without keeping it as sent (a PID-7 of reduced precision, which a
DICOM DA cannot hold; a description longer than its LO) is a Note of the Parsed
message, for the ACK and the log.

What is accepted: ORM^O01 and OMI^O23 (ORC-1 NW, XO, CA, DC, their filler forms
OC and OD, and SC with the status in ORC-5, as is XO with ORC-5 CM; one order per
ORC group), ADT^A01, A04 and A05 (registration), ADT^A08 (update), ADT^A40 (merge).
"""

from __future__ import annotations

import datetime
import enum
import functools
import hashlib
import logging
import re
from dataclasses import dataclass

import hl7
from hl7.exceptions import HL7Exception

from appliance.base.hl7_charsets import CHARSETS, charset_name
from appliance.base.uids import is_valid_uid
from appliance.hl7 import fields
from appliance.services.orders import (
    MessageHeader,
    OrderControl,
    OrderRequest,
    PatientMerge,
    PatientUpdate,
    Request,
)
from appliance.store.order_rows import Demographics, OrderDetails, OrderStatus, PatientKey

log = logging.getLogger(__name__)

SUPPORTED = {
    ("ORM", "O01"), ("OMI", "O23"), ("ADT", "A01"), ("ADT", "A04"), ("ADT", "A05"),
    ("ADT", "A08"), ("ADT", "A40"),
}
# IHE Patient Registration (RAD-1), which an image manager receives: admit (A01),
# register an outpatient (A04), pre-admit (A05). Each registers the patient in PID.
_REGISTRATIONS = frozenset({"A01", "A04", "A05"})
# The Demographics field each PID field sets (an ADT's null deletes it: fields.is_null).
_DEMOGRAPHIC_FIELDS = (("patient_name", 5), ("birth_date", 7), ("sex", 8))
# MSH-18 (HL7 table 0211): base/hl7_charsets.py. Empty means ASCII by the standard; the
# box reads [hl7] unnamed_charset instead, UTF-8 unless the site names another (UTF-8
# is a superset of ASCII; many European RIS send Latin-1 without naming it). ISO IR87
# and ISO IR159 are read as the first MSH-18 repetition, or as a later one after an
# empty or ASCII first (JAHIS: "~ISO IR87").
_ISO_2022_SETS = frozenset({"ISO IR87", "ISO IR159"})
# The worklist answers these in VRs of the default repertoire (PS3.5 6.2): CS, AE.
_CODE_STRING = re.compile(r"[A-Z0-9 _]*")
_AE_TITLE = re.compile(r"[ -\[\]-~]*")  # printable ASCII but backslash
_LEADING_DIGITS = re.compile(r"[0-9]{1,6}")  # ASCII only: \d also takes full-width digits
_DIGITS = re.compile(r"[0-9]*")
_TIME_ZONE = re.compile(r"[+-][0-9]{4}")
_SEGMENT_END = re.compile(rb"[\r\n]")
# XPN-8 / XCN-15 name representation code (HL7 table 4000) -> PN component group.
_REPRESENTATION = {"A": 0, "I": 1, "P": 2}
_MAX_NAME_REPEATS = 8  # a name's repetitions looked at (a sender may send thousands)
# What may not be inside a PN component: its delimiters (^, =, backslash), control characters.
_NOT_IN_PN = re.compile(r"[\^=\\\x00-\x1f\x7f]")
_NOT_IN_TEXT = re.compile(r"[\\\x00-\x1f\x7f]")  # nor in one SH or LO value
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# ORC-1 codes a RIS sends as the order's filler: cancelled (OC) and discontinued (OD)
# at the RIS, which the box applies as CA and DC.
_FILLER_CONTROLS = {"OC": OrderControl.CANCEL, "OD": OrderControl.DISCONTINUE}
# ORC-5 order status (HL7 table 0038) of an SC -> the status the box moves the order to;
# the others (A some results, SC scheduled, HD held, ER, RP) change nothing.
_REPORTED_STATUS = {"IP": OrderStatus.IN_PROGRESS, "CM": OrderStatus.COMPLETED,
                    "DC": OrderStatus.DISCONTINUED, "CA": OrderStatus.DISCONTINUED}
_PRIORITIES = {"S": "STAT", "A": "HIGH", "R": "ROUTINE", "P": "MEDIUM", "T": "MEDIUM",
               "C": "MEDIUM"}


class ErrorCode(enum.IntEnum):
    """HL7 table 0357, message error condition codes."""

    MESSAGE_ACCEPTED = 0  # in an AA's ERR of severity W: applied, but see ERR-2 / ERR-8
    SEGMENT_SEQUENCE = 100
    REQUIRED_FIELD_MISSING = 101
    DATA_TYPE = 102
    TABLE_VALUE_NOT_FOUND = 103
    UNSUPPORTED_MESSAGE_TYPE = 200
    UNSUPPORTED_EVENT = 201
    UNSUPPORTED_PROCESSING_ID = 202
    UNSUPPORTED_VERSION = 203
    UNKNOWN_KEY = 204
    DUPLICATE_KEY = 205
    INTERNAL = 207


class Hl7Error(Exception):
    """The message cannot be applied; `location` is the field (e.g. ``ORC-1``).

    `reject` is True for header problems (answered AR), False for content
    (answered AE). `header` is what could be read of MSH, for the ACK.
    """

    def __init__(self, text: str, location: str, code: ErrorCode, *, reject: bool,
                 header: MessageHeader | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.location = location
        self.code = code
        self.reject = reject
        self.header = header


@dataclass(frozen=True)
class Note:
    """A field the box accepted but could not keep as sent: the ACK is AA with an ERR of
    severity W naming the field; the log names the field and `reason`, never the value."""

    location: str  # e.g. PID-7
    reason: str  # a key=value word for the log, e.g. reduced_precision
    text: str  # for the sender (ERR-8)


@dataclass(frozen=True)
class Parsed:
    """A decoded message: its header, its request for the service, and its notes."""

    header: MessageHeader
    request: Request
    notes: tuple[Note, ...] = ()


def read_header(raw: bytes, unnamed_charset: str) -> tuple[MessageHeader, hl7.Message]:
    """Check MSH, decode in its character set (`unnamed_charset` when MSH-18 names
    none); return the header and the parsed message."""
    if not raw.startswith(b"MSH"):
        raise Hl7Error("message does not start with an MSH segment", "MSH-1",
                       ErrorCode.SEGMENT_SEQUENCE, reject=True)
    # MSH ends at CR or LF (segment terminators, below): MSH-18 and MSH-10 are read here,
    # before decoding, and must not be looked for in the segments after it.
    first_line = _SEGMENT_END.split(raw, 1)[0]
    if len(first_line) < 8:
        raise Hl7Error("MSH segment is truncated", "MSH-2", ErrorCode.DATA_TYPE, reject=True)
    separator = first_line[3:4]
    end = first_line.find(separator, 4)
    encoding_chars = first_line[4:end] if end > 0 else b""
    specials = separator + encoding_chars
    if (separator.isalnum() or separator in b"\r\n " or len(encoding_chars) not in (4, 5)
            or len(set(specials)) != len(specials) or any(
                chr(c).isalnum() or chr(c).isspace() for c in encoding_chars)):
        raise Hl7Error("MSH-1/MSH-2 are not valid field separator and encoding characters",
                       "MSH-2", ErrorCode.DATA_TYPE, reject=True)
    # MSH-18 may repeat: the first is the message's character set, the others are sets
    # that escape sequences switch to (which fields.py drops).
    charset_field = first_line.split(separator)[17:18]
    charsets = [charset_name(c.decode("ascii", "replace")) for c in
                charset_field[0].split(encoding_chars[1:2])] if charset_field else [""]
    charset = charsets[0]
    read_as = charset or charset_name(unnamed_charset)
    as_sent = _msh_as_sent(raw, first_line, separator, encoding_chars[:1], charset, read_as)
    codec = CHARSETS.get(read_as)
    if charset in ("", "ASCII") and _ISO_2022_SETS.intersection(charsets[1:]):
        codec = CHARSETS["ISO IR87"]  # ASCII, escaping to the kanji sets the others name
    if codec is None:
        raise Hl7Error(f"character set {charset!r} is not supported", "MSH-18",
                       ErrorCode.TABLE_VALUE_NOT_FOUND, reject=True, header=as_sent)
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError:
        unnamed = "" if charset else " (MSH-18 names no set: read as [hl7] unnamed_charset)"
        raise Hl7Error(f"message is not valid {codec}{unnamed}", "MSH-18",
                       ErrorCode.DATA_TYPE, reject=True, header=as_sent) from None
    # One segment terminator: CR (some senders use LF or CRLF).
    text = text.replace("\r\n", "\r").replace("\n", "\r")
    # Blank lines between segments (senders that end segments with CRLF and a CR) are
    # skipped; a segment without an ID is refused. python-hl7 would raise IndexError
    # looking up any segment in a message holding either.
    segments = [segment for segment in text.split("\r") if segment]
    if any(segment.startswith(text[3]) for segment in segments):
        raise Hl7Error("a segment has no segment ID", "MSH", ErrorCode.SEGMENT_SEQUENCE,
                       reject=True, header=as_sent)
    # Messages run together in one block (a sender's batch without FHS/BHS): read as one,
    # the second message's orders would join the first's, under the first's PID.
    if sum(segment.startswith("MSH" + text[3]) for segment in segments) > 1:
        raise Hl7Error("the MLLP block holds more than one message (a second MSH): send"
                       " each in its own block", "MSH", ErrorCode.SEGMENT_SEQUENCE,
                       reject=True, header=as_sent)
    text = "\r".join(segments) + "\r"
    try:
        message = fields.parse(text, codec)
    except (HL7Exception, ValueError, IndexError) as exc:
        raise Hl7Error(f"message cannot be parsed ({type(exc).__name__})", "MSH",
                       ErrorCode.DATA_TYPE, reject=True, header=as_sent) from None
    msh = message.segment("MSH")
    code, event = _get(msh, 9, 1), _get(msh, 9, 2)
    header = MessageHeader(
        sending_application=_get(msh, 3), sending_facility=_get(msh, 4),
        receiving_application=_get(msh, 5), receiving_facility=_get(msh, 6),
        control_id=_get(msh, 10), message_code=code, trigger_event=event,
        processing_id=_get(msh, 11), version=_get(msh, 12),
        sha256=as_sent.sha256, charset=charset,
        read_as=read_as, raw_sha256=hashlib.sha256(raw).hexdigest(),
        accept_ack=_get(msh, 15).upper(), application_ack=_get(msh, 16).upper(),
    )
    if not code:
        raise Hl7Error("message type is missing", "MSH-9", ErrorCode.REQUIRED_FIELD_MISSING,
                       reject=True, header=header)
    if not header.control_id:
        raise Hl7Error("message control ID is missing", "MSH-10",
                       ErrorCode.REQUIRED_FIELD_MISSING, reject=True, header=header)
    if header.version and not header.version.startswith("2."):
        raise Hl7Error(f"HL7 version {header.version!r} is not supported (2.x is)", "MSH-12",
                       ErrorCode.UNSUPPORTED_VERSION, reject=True, header=header)
    if (code, event) not in SUPPORTED:
        known_code = code in {c for c, _ in SUPPORTED}
        raise Hl7Error(
            f"message type {code}^{event} is not supported", "MSH-9",
            ErrorCode.UNSUPPORTED_EVENT if known_code else ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
            reject=True, header=header)
    return header, message


def _content_sha256(raw: bytes, first_line: bytes, separator: bytes) -> str:
    """SHA-256 of the message as sent but for MSH-7 (date/time of message): what tells a
    resend (after a lost ACK) from another message under the same control ID. Senders
    that resend by building the message again stamp it anew, and that resend must still
    be the message already applied."""
    fields = first_line.split(separator)
    if len(fields) > 6:
        fields[6] = b""
    return hashlib.sha256(separator.join(fields) + raw[len(first_line):]).hexdigest()


def _msh_as_sent(raw: bytes, first_line: bytes, separator: bytes,
                 component: bytes, charset: str, read_as: str) -> MessageHeader:
    """MSH read from the bytes as sent (first components, ASCII), for the AR of a message
    refused before it could be decoded or parsed: MSA-2 still echoes MSH-10, the control
    ID by which the sender matches an ACK to its message."""
    fields = first_line.split(separator)

    def field(number: int, index: int = 0) -> str:  # MSH-number; MSH-1 is the separator
        value = fields[number - 1] if number - 1 < len(fields) else b""
        parts = value.split(component) if component else [value]
        return parts[index].decode("ascii", "replace").strip() if index < len(parts) else ""

    return MessageHeader(
        sending_application=field(3), sending_facility=field(4),
        receiving_application=field(5), receiving_facility=field(6),
        control_id=field(10), message_code=field(9), trigger_event=field(9, 1),
        processing_id=field(11), version=field(12),
        sha256=_content_sha256(raw, first_line, separator),
        charset=charset, read_as=read_as,
        accept_ack=field(15).upper(), application_ack=field(16).upper(),
    )


def parse(raw: bytes, unnamed_charset: str) -> Parsed:
    """Translate one MLLP block; raises Hl7Error naming the field at fault."""
    header, message = read_header(raw, unnamed_charset)
    notes: list[Note] = []
    try:
        if header.message_code == "ADT":
            request = _adt(message, header, notes)
        else:
            request = _orders(message, header, notes)
    except Hl7Error as exc:
        exc.header = header
        raise
    return Parsed(header, request, tuple(notes))


# --- field access ------------------------------------------------------------------

def _get(segment: hl7.Segment, field_num: int, component: int = 1, sub: int = 1,
         repeat: int = 1) -> str:
    """A field's value, unescaped, '' when absent (fields.py: not python-hl7's accessor)."""
    return fields.value(segment, field_num, component, sub, repeat)


def _segment(message: hl7.Message, name: str) -> hl7.Segment:
    try:
        return message.segment(name)
    except KeyError:
        raise Hl7Error(f"{name} segment is missing", name, ErrorCode.SEGMENT_SEQUENCE,
                       reject=False) from None


def _person_name(segment: hl7.Segment, field_num: int, *, offset: int = 0) -> str:
    """XPN (family^given^middle^suffix^prefix) -> DICOM PN (family^given^middle^prefix^
    suffix); with offset 1, an XCN (id^family^given^...).

    The first repetition is the name. Repetitions whose name representation code
    (XPN-8, XCN-15; HL7 table 4000) is I or P give the ideographic and phonetic
    component groups (PS3.5 6.2.1.2), as Japanese registration systems send them:
    ``Yamada^Tarou^^^^^L^A~山田^太郎^^^^^L^I~やまだ^たろう^^^^^L^P`` is
    ``Yamada^Tarou=山田^太郎=やまだ^たろう``. A PN delimiter that an escape put into a
    component (``O\\S\\BRIEN`` is "O^BRIEN", ``\\E\\`` a backslash, the value
    separator) or a control character becomes a space: it would split the name."""
    code_at = 15 if offset else 8  # XCN-15, XPN-8
    groups = ["", "", ""]
    for repeat in range(1, min(fields.repeats(segment, field_num), _MAX_NAME_REPEATS) + 1):
        code = _get(segment, field_num, code_at, repeat=repeat).upper()
        group = _REPRESENTATION.get(code, 0 if repeat == 1 else None)
        if group is None or groups[group]:
            continue  # another name (an alias, a maiden name) or a second one of a kind
        parts = [_get(segment, field_num, offset + n, repeat=repeat) for n in (1, 2, 3, 5, 4)]
        groups[group] = "^".join(_NOT_IN_PN.sub(" ", part).strip() for part in parts).rstrip("^")
    return "=".join(groups).rstrip("=")


def _split_date(value: str, location: str) -> tuple[str, str]:
    """A DT/DTM's date and what follows it. The date is YYYYMMDD, or HL7's reduced
    precision YYYY or YYYYMM (then only a time zone may follow: a time needs a day);
    anything else, and a day or month that does not exist (20240230, 197013), is
    refused (AE): a modality would write it into the study's DA attributes as is."""
    digits = _DIGITS.match(value)
    count = len(digits.group()) if digits else 0
    if count >= 8:
        date, rest = value[:8], value[8:]
        valid = _is_calendar_day(date)
    else:
        date, rest = value[:count], value[count:]
        valid = count in (4, 6) and (not rest or bool(_TIME_ZONE.fullmatch(rest))) and (
            _is_calendar_day((date + "0101")[:8]))
    if value and not valid:
        raise Hl7Error(f"{location} is not a date (YYYY[MM[DD]]...)", location,
                       ErrorCode.DATA_TYPE, reject=False)
    return date, rest


def _scheduled(value: str, location: str) -> tuple[str, str]:
    """A scheduled start's DICOM date (YYYYMMDD) and time of day (the digits given:
    HH, HHMM or HHMMSS, all legal in a TM), in the box's local time. A date of only a
    year or a month schedules nothing a modality can pick up: refused (AE) naming the
    field."""
    date, rest = _split_date(value, location)
    if date and len(date) < 8:
        raise Hl7Error(f"{location} date lacks a day ({'YYYY' if len(date) == 4 else 'YYYYMM'}"
                       " only): a procedure step needs YYYYMMDD", location,
                       ErrorCode.DATA_TYPE, reject=False)
    time = _time_of_day(rest, location)
    offset = _TIME_ZONE.search(rest)
    if not time or offset is None:
        return date, time
    return _in_local_time(date, time, offset.group(), location)


@functools.cache
def _box_zone_may_be_wrong(offset: str) -> None:
    """Said once per offset and process: a RIS sends local times of another offset than
    UTC while the box runs in UTC, which is most often a box whose host zone was never
    set. The converted starts are then hours off the site's day (docs/operator-guide.md,
    "Time zones")."""
    log.warning("hl7 scheduled starts arrive with UTC offset %s while this box's time zone"
                " is UTC: they are converted to UTC; if the site is not in UTC, set the"
                " host's time zone (timedatectl set-timezone) and restart", offset)


def _in_local_time(date: str, time: str, offset: str, location: str) -> tuple[str, str]:
    """A start sent with a UTC offset (+/-HHMM) as the date and time of the box's own
    zone (TZ, else /etc/localtime), which is the site's: DICOM DA and TM without a
    Timezone Offset From UTC are local time, and a modality asking for today's steps
    asks in its local date. A RIS that sends UTC (+0000) would otherwise put an
    evening step on the next day. The precision sent is kept, longer only where the
    offset moves a finer part (09 at +0530 is 0330 UTC)."""
    hours, minutes = int(offset[1:3]), int(offset[3:5])
    if hours >= 24 or minutes >= 60:
        raise Hl7Error(f"{location} time zone is not an offset from UTC (+/-HHMM, under"
                       " 24 hours)", location, ErrorCode.DATA_TYPE, reject=False)
    zone = datetime.timezone((-1 if offset[0] == "-" else 1)
                             * datetime.timedelta(hours=hours, minutes=minutes))
    padded = time.ljust(6, "0")
    try:
        local = datetime.datetime(
            int(date[:4]), int(date[4:6]), int(date[6:8]), int(padded[:2]), int(padded[2:4]),
            int(padded[4:6]), tzinfo=zone).astimezone()
    except (OverflowError, OSError):  # a year at the calendar's ends (0001, 9999)
        raise Hl7Error(f"{location} is out of the range of dates the box can convert",
                       location, ErrorCode.DATA_TYPE, reject=False) from None
    if not local.utcoffset() and zone.utcoffset(None):
        _box_zone_may_be_wrong(offset)
    clock = local.strftime("%H%M%S")
    given = len(time)
    while given < 6 and clock[given:].strip("0"):
        given += 2
    return local.strftime("%Y%m%d"), clock[:given]


def _birth_date(value: str, notes: list[Note]) -> str:
    """PID-7 as a DICOM DA, or '' for a reduced-precision date (YYYY, YYYYMM: a birth
    date the registration desk does not know to the day). DA cannot hold a partial
    date and a made-up day would be a wrong one, so it is left out, and noted."""
    date, _ = _split_date(value, "PID-7")
    if date and len(date) < 8:
        notes.append(Note("PID-7", "reduced_precision",
                          "birth date has reduced precision (no day): not stored, DICOM"
                          " Patient's Birth Date cannot hold a partial date"))
        return ""
    return date


def _is_calendar_day(day: str) -> bool:
    try:
        datetime.date(int(day[:4]), int(day[4:6]), int(day[6:8]))
    except ValueError:
        return False
    return True


def _fits(value: str, limit: int, location: str, what: str) -> str:
    """`value`, refused (AE) when longer than its DICOM attribute may hold, or holding a
    backslash (an escaped \\E\\), which separates values in DICOM, or a control
    character (an escaped \\X0D\\): a modality would cut it or read two values, and what
    it sends back would match no order or patient."""
    if len(value) > limit:
        raise Hl7Error(f"{what} is longer than DICOM allows ({len(value)} > {limit}"
                       " characters)", location, ErrorCode.DATA_TYPE, reject=False)
    if "\\" in value:
        raise Hl7Error(f"{what} holds a backslash, which separates values in DICOM",
                       location, ErrorCode.DATA_TYPE, reject=False)
    if _CONTROL.search(value):  # an escape made one (\X0D\): no SH or LO holds it
        raise Hl7Error(f"{what} holds a control character", location, ErrorCode.DATA_TYPE,
                       reject=False)
    return value


def _text(value: str) -> str:
    """A descriptive value (a description, a code, a station's name) as one DICOM value:
    a backslash (an escaped \\E\\, the value separator) or a control character
    becomes a space."""
    return _NOT_IN_TEXT.sub(" ", value)


def _cut(value: str, limit: int, location: str, what: str, notes: list[Note]) -> str:
    """A descriptive value cut to what its DICOM attribute holds (LO 64, SH 16), and
    noted (AA with an ERR of severity W): RIS descriptions of 70 or 80 characters are
    common, and a modality sent a longer LO may refuse the worklist answer or copy the
    value into its images' headers as is. Identifiers are refused instead (_fits)."""
    if len(value) <= limit:
        return value
    note = Note(location, "too_long", f"{what} cut to {limit} characters, as much as its"
                " DICOM attribute holds")
    if note not in notes:  # once, however many orders the message holds
        notes.append(note)
    return value[:limit].rstrip()


def _patient(message: hl7.Message, notes: list[Note]
             ) -> tuple[PatientKey, Demographics, frozenset[str]]:
    """The message's one patient, and the Demographics fields it deletes (PID-5, PID-7 or
    PID-8 sent as HL7's null, ``""``). A second PID (another patient's orders, or A40's
    repeated merge groups) is refused, as its orders would be filed under the first."""
    if sum(1 for segment in message if str(segment[0][0]) == "PID") > 1:
        raise Hl7Error("the message holds more than one PID segment: one patient a message",
                       "PID", ErrorCode.SEGMENT_SEQUENCE, reject=False)
    pid = _segment(message, "PID")
    patient_id = _fits(_get(pid, 3), 64, "PID-3", "patient identifier")  # LO
    if not patient_id:
        raise Hl7Error("patient identifier is missing", "PID-3",
                       ErrorCode.REQUIRED_FIELD_MISSING, reject=False)
    sex = _get(pid, 8).upper()
    demographics = Demographics(
        patient_name=_person_name(pid, 5), birth_date=_birth_date(_get(pid, 7), notes),
        sex={"M": "M", "F": "F", "O": "O", "U": "O", "A": "O", "N": "O"}.get(sex, ""))
    issuer = _fits(_get(pid, 3, 4), 64, "PID-3", "issuer of patient identifier")  # LO
    cleared = frozenset(name for name, field_num in _DEMOGRAPHIC_FIELDS
                        if fields.is_null(pid, field_num))
    return PatientKey(patient_id, issuer), demographics, cleared


# --- ADT ---------------------------------------------------------------------------

def _adt(message: hl7.Message, header: MessageHeader, notes: list[Note]) -> Request:
    patient, demographics, cleared = _patient(message, notes)
    if header.trigger_event != "A40":
        return PatientUpdate(patient, demographics,
                             register=header.trigger_event in _REGISTRATIONS,
                             cleared=cleared)
    mrg = _segment(message, "MRG")
    prior = PatientKey(_get(mrg, 1), _get(mrg, 1, 4))
    if not prior.patient_id:
        raise Hl7Error("prior patient identifier is missing", "MRG-1",
                       ErrorCode.REQUIRED_FIELD_MISSING, reject=False)
    return PatientMerge(prior=prior, surviving=patient, demographics=demographics,
                        cleared=cleared)


# --- ORM^O01 / OMI^O23 -------------------------------------------------------------

def _groups(message: hl7.Message) -> list[dict[str, hl7.Segment]]:
    """One dict per order: an ORC and the first OBR, TQ1, IPC and ZDS after it.

    An OBR after its group's OBR (``ORC OBR OBR``, one ORC for several procedures,
    which some RIS send although ORM and OMI give each OBR its ORC) is one more order
    with that ORC and its TQ1 (the order's timing): answering AA while keeping only
    the first OBR would drop the other procedures unseen."""
    groups: list[dict[str, hl7.Segment]] = []
    for segment in message:
        name = str(segment[0][0])
        if name == "ORC":
            groups.append({"ORC": segment})
        elif groups and name == "OBR" and "OBR" in groups[-1]:
            shared = {key: groups[-1][key] for key in ("ORC", "TQ1") if key in groups[-1]}
            groups.append({**shared, "OBR": segment})
        elif groups and name in ("OBR", "TQ1", "IPC", "ZDS"):
            groups[-1].setdefault(name, segment)
    return groups


def _orders(message: hl7.Message, header: MessageHeader, notes: list[Note]) -> Request:
    patient, demographics, _ = _patient(message, notes)  # an order's patient: as sent
    groups = _groups(message)
    if not groups:
        raise Hl7Error("ORC segment is missing", "ORC", ErrorCode.SEGMENT_SEQUENCE,
                       reject=False)
    try:
        referring = _person_name(message.segment("PV1"), 8, offset=1)
    except KeyError:
        referring = ""
    omi = header.message_code == "OMI"
    return tuple(_order(group, patient, demographics, referring, notes, omi=omi)
                 for group in groups)


def _order(group: dict[str, hl7.Segment], patient: PatientKey, demographics: Demographics,
           referring: str, notes: list[Note], *, omi: bool) -> OrderRequest:
    orc = group["ORC"]
    obr = group.get("OBR")
    if obr is None:
        raise Hl7Error("OBR segment is missing", "OBR", ErrorCode.SEGMENT_SEQUENCE,
                       reject=False)
    ipc = group.get("IPC")
    if omi and ipc is None:
        raise Hl7Error("IPC segment is missing", "IPC", ErrorCode.SEGMENT_SEQUENCE,
                       reject=False)
    control_code = _get(orc, 1).upper()
    try:
        control = _FILLER_CONTROLS.get(control_code) or OrderControl(control_code)
    except ValueError:
        raise Hl7Error(f"order control {control_code!r} is not supported (NW, XO, CA, DC,"
                       " OC, OD, SC)", "ORC-1", ErrorCode.TABLE_VALUE_NOT_FOUND,
                       reject=False) from None
    order_status = _get(orc, 5).upper()
    if control is OrderControl.CHANGE and order_status == "CM":
        # IHE's Procedure Updated (RAD-13) says "procedure completed" with XO and ORC-5
        # CM, sent once the exam is done, when the order is IN PROGRESS or COMPLETED
        # already: a completion, not a change of details (refused once started).
        control = OrderControl.STATUS
    placer = _get(orc, 2) or _get(obr, 2)
    filler = _get(orc, 3) or _get(obr, 3)
    if ipc is not None:
        key_field, accession = "IPC-1", _get(ipc, 1)
        procedure_id, study_uid, sps_id = _get(ipc, 2), _get(ipc, 3), _get(ipc, 4)
        study_field = "IPC-3"
        modality, station_name = _get(ipc, 5), _get(ipc, 7)
        location, station_ae = _get(ipc, 8), _get(ipc, 9)
        modality_field, station_field = "IPC-5", "IPC-9"
    else:
        zds = group.get("ZDS")
        key_field, accession = "OBR-18", _get(obr, 18)
        procedure_id, sps_id = _get(obr, 19), _get(obr, 20)
        study_uid, study_field = (_get(zds, 1) if zds is not None else ""), "ZDS-1"
        modality, station_ae = _get(obr, 24), _get(obr, 21)
        station_name, location = "", ""
        modality_field, station_field = "OBR-24", "OBR-21"
    if not accession:
        key_field, accession = "ORC-3", filler
    if not accession:
        raise Hl7Error("accession number is missing", "IPC-1" if ipc is not None else "OBR-18",
                       ErrorCode.REQUIRED_FIELD_MISSING, reject=False)
    _fits(accession, 16, key_field, "accession number")  # SH
    _fits(procedure_id, 16, "IPC-2" if ipc is not None else "OBR-19",
          "requested procedure ID")  # SH
    _fits(sps_id, 16, "IPC-4" if ipc is not None else "OBR-20",
          "scheduled procedure step ID")  # SH
    if study_uid and not is_valid_uid(study_uid):
        raise Hl7Error("Study Instance UID is not a valid UID", study_field,
                       ErrorCode.DATA_TYPE, reject=False)
    modality = modality.upper()[:16]
    if not _CODE_STRING.fullmatch(modality):
        raise Hl7Error("modality is not a DICOM code string (A-Z, 0-9, space, _)",
                       modality_field, ErrorCode.DATA_TYPE, reject=False)
    station_ae = station_ae[:16]
    if not _AE_TITLE.fullmatch(station_ae):
        raise Hl7Error("scheduled station AE title has characters an AE title cannot hold",
                       station_field, ErrorCode.DATA_TYPE, reject=False)
    start, start_field = _start(group)
    start_date, start_time = _scheduled(start, start_field)
    description = _cut(_text(_get(obr, 4, 2)), 64, "OBR-4", "procedure description", notes)
    details = OrderDetails(
        requested_procedure_id=procedure_id or accession,
        requested_procedure_desc=description,
        procedure_code_value=_text(_get(obr, 4, 1)),  # UC when long: worklist.py
        procedure_code_scheme=_cut(_text(_get(obr, 4, 3)), 16, "OBR-4",
                                   "coding scheme designator", notes),
        procedure_code_meaning=description,
        priority=_PRIORITIES.get(_get(orc, 7, 6).upper() or _get(obr, 27, 6).upper(), ""),
        sps_id=sps_id or procedure_id or accession,
        sps_description=description, modality=modality,
        station_ae_title=station_ae,
        station_name=_cut(_text(station_name), 16, "IPC-7", "scheduled station name", notes),
        sps_location=_cut(_text(location), 16, "IPC-8", "scheduled step location", notes),
        sps_start_date=start_date, sps_start_time=start_time,
        referring_physician=referring,
        requesting_physician=_person_name(orc, 12, offset=1) or _person_name(obr, 16, offset=1),
    )
    return OrderRequest(control=control, accession_number=accession,
                        placer_order_number=placer, filler_order_number=filler,
                        study_uid=study_uid, details=details, patient=patient,
                        demographics=demographics, key_field=key_field,
                        study_field=study_field,
                        reported_status=_REPORTED_STATUS.get(order_status)
                        if control is OrderControl.STATUS else None)


def _time_of_day(rest: str, location: str) -> str:
    """HHMMSS of what follows a timestamp's date: its leading digits, whole hours,
    minutes and seconds only (a time zone, fractions or junk after them go). An hour,
    minute or second out of range is refused (AE), as a day that does not exist is."""
    digits = _LEADING_DIGITS.match(rest)
    time = digits.group() if digits else ""
    time = time[:min(6, len(time) - len(time) % 2)]
    limits = (24, 60, 60)
    if any(int(time[n:n + 2]) >= limit for n, limit in zip(range(0, len(time), 2), limits,
                                                           strict=False)):
        raise Hl7Error(f"{location} is not a time of day (HHMMSS)", location,
                       ErrorCode.DATA_TYPE, reject=False)
    return time


def _start(group: dict[str, hl7.Segment]) -> tuple[str, str]:
    """Scheduled start and the field it came from: TQ1-7, else ORC-7.4 / OBR-27.4
    (quantity/timing), else OBR-36, else OBR-7."""
    candidates = []
    if "TQ1" in group:
        candidates.append((_get(group["TQ1"], 7), "TQ1-7"))
    candidates.append((_get(group["ORC"], 7, 4), "ORC-7"))
    obr = group["OBR"]
    candidates += [(_get(obr, 27, 4), "OBR-27"), (_get(obr, 36), "OBR-36"),
                   (_get(obr, 7), "OBR-7")]
    return next((found for found in candidates if found[0]), ("", "TQ1-7"))
