"""HL7 dates of reduced precision and the character set of ACKs, over MLLP into a real
`pacs-edge serve`; the worklist item is read back with dcmtk `findscu -W`.

- PID-7 of YYYY or YYYYMM (a birth date known to the year or month): AA, the
  order is scheduled with an empty Patient's Birth Date (DA holds no partial
  date, and no day is made up); the AA carries an ERR of severity W naming
  PID-7; the log names the field and the reason, not the value.
- A scheduled start (TQ1-7, ORC-7.4, OBR-27.4, ...) of YYYY or YYYYMM: AE naming
  the field, saying the date lacks a day. A date without a time, or a time of
  hours only, is scheduled with the digits given (a TM may be HH or HHMM).
- A scheduled start sent with a UTC offset lands in the worklist in the box's local
  time (the box runs with TZ=America/New_York here, a zone with daylight saving):
  a RIS that sends UTC does not move an evening step to the next day; on the
  fall-back night both 01:30s are 01:30, and 02:30 EST on the spring-forward night
  is 03:30 EDT. A start without an offset is the site's local time, kept as sent.
- An ACK is in the message's character set and names it in MSH-18; one that set
  cannot hold is UTF-8 and says UNICODE UTF-8.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dcmtk
import hl7peer
import pytest
from conftest import EdgeServer, init_home

MODALITY = "MODALITY"
ORM = "ORM^O01^ORM_O01"
# The box's zone (docs/operator-guide.md, "Time zones"): one with daylight saving.
BOX_ZONE = ("env", "TZ=America/New_York")


@pytest.fixture(scope="module")
def hl7_edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EdgeServer, int]]:
    """One server for the module (each test its own control IDs and accessions): the HL7
    listener on, the RIS allowed to send HL7, a modality allowed to query the worklist."""
    server = EdgeServer(init_home(tmp_path_factory.mktemp("hl7dates") / "edge-home"))
    port = dcmtk.free_port()
    hl7peer.listen(server, port)
    server.add_peer("modality", MODALITY, 1, allow="worklist")
    server.start(prefix=BOX_ZONE)
    try:
        yield server, port
    finally:
        server.stop()
    assert not server.unclean_stops, server.unclean_stops


def _worklist_item(server: EdgeServer, accession: str) -> Any:
    result = dcmtk.findscu(server.port, {
        "AccessionNumber": accession, "PatientID": "", "PatientBirthDate": "",
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate": "",
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime": ""},
        model="worklist", aet=MODALITY).check()
    [item] = result.responses
    return item


def _accessions(server: EdgeServer) -> set[str]:
    orders = json.loads(server.cli("worklist", "list", "--json").stdout)
    return {order["accession_number"] for order in orders}


def _ack_bytes(port: int, message: bytes) -> bytes:
    """The ACK's bytes as the box sent them, unframed."""
    sock = hl7peer.raw(port)
    try:
        sock.sendall(hl7peer.frame(message))
        data = b""
        while not data.endswith(hl7peer.EB + hl7peer.CR):
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
    finally:
        sock.close()
    assert data.startswith(hl7peer.SB)
    return data[1:-2]


def _msh18(ack: bytes) -> bytes:
    fields = ack.split(b"\r", 1)[0].split(b"|")
    return fields[17] if len(fields) > 17 else b""


def _in_charset(message: str, control_id: str, charset: str, *, facility: str = "HOSP") -> str:
    """`message` (built with control ID `control_id`) with MSH-4 = `facility` and
    MSH-18 = `charset`."""
    plain = hl7peer.msh(control_id, ORM)
    wanted = hl7peer.msh(control_id, ORM, charset=charset).replace("|RIS|HOSP|",
                                                                   f"|RIS|{facility}|", 1)
    assert plain in message
    return message.replace(plain, wanted, 1)


# --- PID-7 --------------------------------------------------------------------------

@pytest.mark.parametrize("birth", ["1937", "193703"])
def test_a_birth_date_of_only_a_year_is_accepted_and_left_out_of_the_worklist_item(
        hl7_edge: tuple[EdgeServer, int], birth: str) -> None:
    server, port = hl7_edge
    accession = f"BD{len(birth)}"
    order = hl7peer.orm(accession, accession=accession).replace("|19700101|", f"|{birth}|", 1)
    ack = hl7peer.send(port, order)
    # Applied, with a warning (ERR-4 W, ERR-3 0 "message accepted") naming PID-7.
    assert (ack.code, ack.control_id) == ("AA", accession)
    assert (ack.error_field, ack.error_code) == ("PID-7", "0")
    item = _worklist_item(server, accession)
    assert item.PatientID == "PAT1"
    assert item.PatientBirthDate == ""  # not 19370101, not 1937
    step = item.ScheduledProcedureStepSequence[0]
    assert (step.ScheduledProcedureStepStartDate,
            step.ScheduledProcedureStepStartTime) == ("20240102", "1030")
    lines = [line for line in server.log().splitlines() if "field=PID-7" in line]
    assert any("not stored as sent" in line and "reason=reduced_precision" in line
               for line in lines)
    assert not any(birth in line for line in lines)  # the field, never its value


def test_a_long_description_is_cut_to_its_vr_and_a_long_code_is_a_long_code_value(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """RIS procedure descriptions of 70-80 characters reached the modality as LO values
    of that length (LO holds 64), and a code of over 16 characters as an SH Code Value:
    a strict modality refuses such an answer, others copy it into their images. Now
    the description is cut to 64 (AA with an ERR of severity W naming OBR-4), and the
    code is answered whole as a Long Code Value (UC)."""
    server, port = hl7_edge
    description = "MRI BRAIN WITH AND WITHOUT CONTRAST INCLUDING DIFFUSION AND PERFUSION IMAGING"
    order = hl7peer.orm("LONG1", accession="LONG1",
                        procedure=f"RAD-MR-BRAIN-WWO-001^{description}^LOCAL")
    ack = hl7peer.send(port, order)
    assert (ack.code, ack.error_field, ack.error_code) == ("AA", "OBR-4", "0")
    result = dcmtk.findscu(server.port, {
        "AccessionNumber": "LONG1", "RequestedProcedureDescription": "",
        "RequestedProcedureCodeSequence[0].CodeValue": "",
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepDescription": ""},
        model="worklist", aet=MODALITY).check()
    [item] = result.responses
    assert item.RequestedProcedureDescription == description[:64].rstrip()
    step = item.ScheduledProcedureStepSequence[0]
    assert step.ScheduledProcedureStepDescription == description[:64].rstrip()
    [code] = item.RequestedProcedureCodeSequence
    assert (code.get("CodeValue"), code.LongCodeValue) == (None, "RAD-MR-BRAIN-WWO-001")
    assert (code.CodingSchemeDesignator, code.CodeMeaning) == ("LOCAL", description[:64].rstrip())
    assert "field=OBR-4 reason=too_long" in server.log()


def test_a_birth_date_with_a_day_that_does_not_exist_is_still_refused(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    server, port = hl7_edge
    # Full-width digits (an IME's) were AA'd: regex \d and int() take any Unicode
    # digit; the worklist could not encode the DA and left the order out.
    full_width = "19700101".translate({ord(d): ord(d) + 0xFEE0 for d in "0123456789"})
    for n, birth in enumerate(("197013", "19370230", "19370", full_width)):
        order = hl7peer.orm(f"BDX{n}", accession="BDX").replace("|19700101|", f"|{birth}|", 1)
        ack = hl7peer.send(port, order)
        assert (ack.code, ack.error_field) == ("AE", "PID-7"), birth
    assert "BDX" not in _accessions(server)


# --- scheduled start ----------------------------------------------------------------

def _orm_start_in_obr27(control_id: str, start: str) -> str:
    """An ORM whose start is OBR-27.4 (ORC-7 empty)."""
    message = hl7peer.orm(control_id, accession=control_id, start="")
    return message.replace("|||CT\r", f"|||CT|||^^^{start}\r", 1)


@pytest.mark.parametrize(("message", "field"), [
    (hl7peer.orm("SD1", accession="SD1", start="2024"), "ORC-7"),
    (hl7peer.orm("SD2", accession="SD2", start="202401"), "ORC-7"),
    (_orm_start_in_obr27("SD3", "202401"), "OBR-27"),
    (hl7peer.omi("SD4", accession="SD4").replace("TQ1|1||||||20240103141500",
                                                 "TQ1|1||||||202401+0100", 1), "TQ1-7"),
])
def test_a_scheduled_date_without_a_day_is_refused_naming_the_field(
        hl7_edge: tuple[EdgeServer, int], message: str, field: str) -> None:
    server, port = hl7_edge
    ack = hl7peer.send(port, message)
    assert (ack.code, ack.error_field, ack.error_code) == ("AE", field, "102")
    assert field in ack.text and "lacks a day" in ack.text
    assert ack.control_id not in _accessions(server)


def test_a_scheduled_date_without_a_time_or_with_hours_only_keeps_the_digits_given(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    server, port = hl7_edge
    for accession, message in (
            ("ST1", hl7peer.orm("ST1", accession="ST1", start="20240105")),
            ("ST2", hl7peer.orm("ST2", accession="ST2", start="2024010509+0100")),
            ("ST3", _orm_start_in_obr27("ST3", "202401050930"))):
        assert hl7peer.send(port, message).code == "AA", accession
    starts = {}
    for accession in ("ST1", "ST2", "ST3"):
        step = _worklist_item(server, accession).ScheduledProcedureStepSequence[0]
        starts[accession] = (step.ScheduledProcedureStepStartDate,
                             step.ScheduledProcedureStepStartTime)
    # ST2: 09:00 at +0100 is 03:00 in New York (EST), still to the hour.
    assert starts == {"ST1": ("20240105", ""), "ST2": ("20240105", "03"),
                      "ST3": ("20240105", "0930")}


@pytest.mark.parametrize(("accession", "start", "local"), [
    # The fall-back night (1 Nov 2026, 02:00 EDT -> 01:00 EST): 01:30 is there twice.
    ("TZ1", "20261101013000-0400", ("20261101", "013000")),  # the first, EDT
    ("TZ2", "20261101013000-0500", ("20261101", "013000")),  # the second, EST
    ("TZ3", "20261101053000+0000", ("20261101", "013000")),  # the first, sent in UTC
    # 21:00 EST on 1 Nov sent in UTC is 2 Nov there; the modality asks for 1 Nov.
    ("TZ4", "20261102020000+0000", ("20261101", "210000")),
    # The spring-forward night (14 Mar 2027, 02:00 EST -> 03:00 EDT): 02:30 EST is 03:30.
    ("TZ5", "20270314023000-0500", ("20270314", "033000")),
    # Without an offset it is the site's local time as sent, even one the clock skips.
    ("TZ6", "20270314023000", ("20270314", "023000")),
    # The precision sent, longer where the offset moves a finer part.
    ("TZ7", "2024010509+0530", ("20240104", "2230")),
    ("TZ8", "202401021030+0100", ("20240102", "0430")),
    ("TZ9", "20240105+0100", ("20240105", "")),  # a day is not a moment: as sent
])
def test_a_scheduled_start_with_a_utc_offset_lands_in_the_boxs_local_time(
        hl7_edge: tuple[EdgeServer, int], accession: str, start: str,
        local: tuple[str, str]) -> None:
    server, port = hl7_edge
    assert hl7peer.send(port, hl7peer.orm(accession, accession=accession, start=start)).code \
        == "AA"
    step = _worklist_item(server, accession).ScheduledProcedureStepSequence[0]
    assert (step.ScheduledProcedureStepStartDate, step.ScheduledProcedureStepStartTime) == local


def test_a_modality_asking_for_today_finds_an_evening_step_the_ris_sent_in_utc(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    server, port = hl7_edge
    order = hl7peer.orm("EVE", accession="EVE", start="20261204013000+0000")
    assert hl7peer.send(port, order).code == "AA"
    result = dcmtk.findscu(server.port, {
        "AccessionNumber": "EVE",
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate": "20261203",
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime": "1800-2359"},
        model="worklist", aet=MODALITY).check()
    assert [item.AccessionNumber for item in result.responses] == ["EVE"]


def test_a_box_left_in_utc_warns_once_when_the_ris_sends_another_offset(
        tmp_path: Path) -> None:
    """Offsets are converted to the box's zone: a box whose host zone was never set (UTC)
    shows a New York RIS's 09:00 as 14:00, and nothing said why."""
    server = EdgeServer(init_home(tmp_path / "edge-home"))
    port = dcmtk.free_port()
    hl7peer.listen(server, port)
    server.start(prefix=("env", "TZ=UTC"))
    try:
        for n in range(2):
            order = hl7peer.orm(f"UTC{n}", accession=f"UTC{n}", start="20261204090000-0500")
            assert hl7peer.send(port, order).code == "AA"
        utc = hl7peer.orm("UTC2", accession="UTC2", start="20261204140000+0000")
        assert hl7peer.send(port, utc).code == "AA"
    finally:
        server.stop()
    warned = [line for line in server.log().splitlines() if "time zone is UTC" in line]
    assert len(warned) == 1, warned
    assert "offset -0500" in warned[0]


@pytest.mark.parametrize("start", ["202401051030+2400", "202401051030+0160"])
def test_a_scheduled_start_whose_offset_is_not_one_is_refused_naming_the_field(
        hl7_edge: tuple[EdgeServer, int], start: str) -> None:
    server, port = hl7_edge
    ack = hl7peer.send(port, hl7peer.orm("TZX", accession="TZX", start=start))
    assert (ack.code, ack.error_field, ack.error_code) == ("AE", "ORC-7", "102")
    assert "TZX" not in _accessions(server)


# --- the ACK's character set --------------------------------------------------------

def test_an_ack_to_a_latin1_message_is_latin1_and_says_so(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """The sending facility (MSH-4) comes back in the ACK's MSH-6 as Latin-1 bytes, and
    the ACK's MSH-18 names 8859/1 as the message did."""
    server, port = hl7_edge
    order = _in_charset(hl7peer.orm("L1", accession="L1", name="M\u00dcLLER^JANE"), "L1",
                        "8859/1", facility="M\u00dcNCHEN")
    ack = _ack_bytes(port, order.encode("latin-1"))
    assert _msh18(ack) == b"8859/1"
    assert ack.split(b"\r")[0].split(b"|")[5] == "M\u00dcNCHEN".encode("latin-1")
    assert ack.split(b"\r")[1].split(b"|")[:3] == [b"MSA", b"AA", b"L1"]
    assert "L1" in _accessions(server)


@pytest.mark.parametrize(("charset", "encoding", "facility", "ack_charset", "ack_facility"), [
    # No MSH-18: read as UTF-8 and answered so, without MSH-18.
    ("", "utf-8", "H\u00d6SP", b"", "H\u00d6SP".encode()),
    ("UNICODE UTF-8", "utf-8", "H\u00d6SP", b"UNICODE UTF-8", "H\u00d6SP".encode()),
    ("8859/15", "iso8859-15", "\u20acHOSP", b"8859/15", "\u20acHOSP".encode("iso8859-15")),
    # An escaped u-umlaut in an ASCII message: an ASCII ACK cannot hold it, so UTF-8.
    ("ASCII", "ascii", "H\\XFC\\SP", b"UNICODE UTF-8", "H\u00fcSP".encode()),
])
def test_an_ack_is_in_its_messages_character_set_or_says_it_is_utf8(
        hl7_edge: tuple[EdgeServer, int], charset: str, encoding: str, facility: str,
        ack_charset: bytes, ack_facility: bytes) -> None:
    _, port = hl7_edge
    control_id = "C" + "".join(c for c in charset if c.isalnum())[:12]
    order = _in_charset(hl7peer.orm(control_id, accession=control_id), control_id, charset,
                        facility=facility)
    ack = _ack_bytes(port, order.encode(encoding))
    assert _msh18(ack) == ack_charset
    assert ack.split(b"\r")[0].split(b"|")[5] == ack_facility
    assert ack.split(b"\r")[1].split(b"|")[1] == b"AA"


def test_an_ack_to_a_message_in_a_set_the_box_does_not_read_is_utf8_and_says_so(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    _, port = hl7_edge
    order = _in_charset(hl7peer.orm("K1", accession="K1"), "K1", "KLINGON")
    ack = _ack_bytes(port, order.encode())
    assert _msh18(ack) == b"UNICODE UTF-8"
    assert ack.split(b"\r")[1].split(b"|")[:3] == [b"MSA", b"AR", b"K1"]


def test_a_message_naming_no_character_set_is_read_in_the_one_the_site_configures(
        edge_server_factory: Callable[..., EdgeServer], free_port: Callable[[], int]) -> None:
    """Many European RIS send Latin-1 without MSH-18, which the standard reads as ASCII
    and the box read as UTF-8: every order for a Müller was AR "not valid utf-8", and
    its resend too, with no setting to read it. With [hl7] unnamed_charset = "8859/1"
    it is read and answered in Latin-1 (without MSH-18, as it came), and the modality
    finds Müller; a message that names its set is still read in that one."""
    server = edge_server_factory(start=False)
    port = free_port()
    hl7peer.listen(server, port, unnamed_charset="8859/1")
    server.add_peer("modality", MODALITY, 1, allow="worklist")
    server.start()
    order = _in_charset(hl7peer.orm("U1", accession="U1", name="M\u00dcLLER^J\u00dcRGEN"),
                        "U1", "", facility="M\u00dcNCHEN")
    ack = _ack_bytes(port, order.encode("latin-1"))
    assert ack.split(b"\r")[1].split(b"|")[:3] == [b"MSA", b"AA", b"U1"]
    assert _msh18(ack) == b""
    assert ack.split(b"\r")[0].split(b"|")[5] == "M\u00dcNCHEN".encode("latin-1")
    named = _in_charset(hl7peer.orm("U2", accession="U2", name="M\u00dcLLER^ANNA"), "U2",
                        "UNICODE UTF-8")
    assert _ack_bytes(port, named.encode()).split(b"\r")[1].split(b"|")[1] == b"AA"
    result = dcmtk.findscu(server.port, {"AccessionNumber": "U?", "PatientName": ""},
                           model="worklist", aet=MODALITY).check()
    assert sorted(str(item.PatientName) for item in result.responses) == [
        "M\u00dcLLER^ANNA", "M\u00dcLLER^J\u00dcRGEN"]


# --- MSH-15 / MSH-16: the acknowledgements a sender asks for ------------------------

def _asking(message: str, accept: str, application: str) -> str:
    """`message` with MSH-15 (accept ACK) and MSH-16 (application ACK) conditions."""
    return message.replace("|P|2.5\r", f"|P|2.5|||{accept}|{application}\r", 1)


@pytest.mark.parametrize(("accept", "application", "applied", "refused"), [
    ("", "", "AA", "AE"),  # original mode
    ("NE", "AL", "AA", "AE"),  # original mode, as enhanced mode spells it
    ("AL", "AL", "AA", "AE"),  # one ACK: the application ACK, no accept ACK before it
    ("AL", "NE", "CA", "CE"),  # an accept ACK only
    ("AL", "", "CA", "CE"),
    ("ER", "NE", None, "CE"),
    ("SU", "NE", "CA", None),
    ("NE", "ER", None, "AE"),
    ("NE", "SU", "AA", None),
    ("NE", "NE", None, None),  # no ACK at all
])
def test_a_message_gets_the_acknowledgement_its_msh15_and_msh16_ask_for(
        hl7_edge: tuple[EdgeServer, int], accept: str, application: str,
        applied: str | None, refused: str | None) -> None:
    """The box answered every message with an original-mode ACK whatever MSH-15 and
    MSH-16 said: AA to a sender that asked for an accept ACK (CA) alone, and an ACK to
    one that asked for none (NE/NE), which such a sender never reads: its socket
    buffer fills until the box stops reading it and closes the connection. Now each
    message gets the one ACK its conditions ask for, or none. On one connection: an
    order applied, an order refused (XO of an unknown order), then an original-mode
    order whose AA must be the next ACK read, so that no answer was left unread."""
    server, port = hl7_edge
    tag = f"M{accept or 'x'}{application or 'x'}"
    sock = hl7peer.raw(port)
    try:
        sent = [(f"{tag}A", _asking(hl7peer.orm(f"{tag}A", accession=f"{tag}A"), accept,
                                    application), applied),
                (f"{tag}R", _asking(hl7peer.orm(f"{tag}R", "XO", accession=f"{tag}R"), accept,
                                    application), refused),
                (f"{tag}O", hl7peer.orm(f"{tag}O", accession=f"{tag}O"), "AA")]
        for _, message, _ in sent:
            sock.sendall(hl7peer.frame(message))
        answers = hl7peer.read_acks(sock, sum(code is not None for _, _, code in sent))
    finally:
        sock.close()
    assert [(a.code, a.control_id) for a in answers] == [
        (code, control_id) for control_id, _, code in sent if code is not None]
    for answer in answers:
        if answer.code in ("AE", "CE"):
            assert (answer.error_field, answer.error_code) == ("OBR-18", "204"), answer
    assert {f"{tag}A", f"{tag}O"} <= _accessions(server)


def test_a_rejected_header_gets_a_commit_reject_when_only_an_accept_ack_is_asked_for(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    _, port = hl7_edge
    message = _asking(hl7peer.orm("MCR", accession="MCR"), "AL", "NE").replace(
        "|P|2.5|", "|P|3.0|", 1)
    ack = hl7peer.parse_ack(hl7peer.frame(_ack_bytes(port, message.encode())))
    assert (ack.code, ack.control_id, ack.error_field, ack.error_code) == (
        "CR", "MCR", "MSH-12", "203")
