"""HL7 orders over MLLP into a real `pacs-edge serve`: ACK rules, idempotence,
durability, hostile input. The sender is python-hl7's MLLP client (hl7peer.send) or
raw frames (hl7peer.raw) for what no library would send."""

from __future__ import annotations

import hashlib
import json
import selectors
import socket
import sqlite3
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dcmtk
import dicomgen
import hl7peer
import pytest
from conftest import EdgeServer, init_home, serving
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

IDLE_CONNECTIONS = 200
MAX_CONNECTIONS = 8


@pytest.fixture
def hl7_edge(edge_server_factory: Callable[..., EdgeServer],
             free_port: Callable[[], int]) -> Iterator[tuple[EdgeServer, int]]:
    """A started server with the HL7 listener on a free port and the RIS (127.0.0.1)
    allowed to send HL7."""
    server = edge_server_factory(start=False)
    port = free_port()
    hl7peer.listen(server, port, max_message_bytes=16384, idle_timeout=30.0,
                   max_connections=MAX_CONNECTIONS)
    server.start()
    yield server, port


@pytest.fixture(scope="module")
def refusing_edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EdgeServer, int]]:
    """One server for the tests of messages it refuses: nothing they send is applied, so
    they share it (each with its own control ID: a refusal is recorded under it)."""
    server = EdgeServer(init_home(tmp_path_factory.mktemp("hl7") / "edge-home"))
    port = dcmtk.free_port()
    hl7peer.listen(server, port, max_message_bytes=16384, idle_timeout=30.0,
                   max_connections=MAX_CONNECTIONS)
    with serving(server):
        yield server, port


def worklist(server: EdgeServer, *args: str) -> list[dict[str, Any]]:
    return json.loads(server.cli("worklist", "list", "--json", *args).stdout)  # type: ignore[no-any-return]


def show(server: EdgeServer, accession: str) -> dict[str, Any]:
    return json.loads(server.cli("worklist", "show", accession, "--json").stdout)  # type: ignore[no-any-return]


# --- each message type, applied and acknowledged ------------------------------------

def test_new_order_is_acknowledged_and_scheduled_with_a_study_uid(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    server, port = hl7_edge
    ack = hl7peer.send(port, hl7peer.orm("MSG1", accession="ACC1"))
    assert (ack.code, ack.control_id) == ("AA", "MSG1")
    [order] = worklist(server)
    assert order["accession_number"] == "ACC1" and order["status"] == "SCHEDULED"
    assert order["patient_id"] == "PAT1" and order["issuer"] == "HOSP"
    assert order["patient_name"] == "DOE^JANE" and order["birth_date"] == "19700101"
    assert (order["modality"], order["station_ae_title"]) == ("CT", "CT1")
    assert (order["sps_start_date"], order["sps_start_time"]) == ("20240102", "1030")
    assert order["requested_procedure_id"] == "RPACC1" and order["sps_id"] == "SPSACC1"
    assert order["requested_procedure_desc"] == "CT head"
    assert order["referring_physician"] == "WELBY^MARCUS"
    assert order["study_uid"] and order["study_uid"].replace(".", "").isdigit()


def test_omi_order_keeps_the_ris_study_uid_and_scheduled_station(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    server, port = hl7_edge
    uid = "1.2.826.0.1.3680043.8.498.4242"
    assert hl7peer.send(port, hl7peer.omi("OMI1", accession="ACC2", study_uid=uid)).code == "AA"
    order = show(server, "ACC2")
    assert order["study_uid"] == uid
    assert (order["station_ae_title"], order["station_name"], order["sps_location"]) == (
        "MR1", "MRSTATION", "ROOM2")
    assert (order["sps_start_date"], order["sps_start_time"]) == ("20240103", "141500")


def test_change_cancel_and_discontinue_follow_the_order_state_table(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    server, port = hl7_edge
    for n, accession in enumerate(("A1", "A2")):
        assert hl7peer.send(port, hl7peer.orm(f"N{n}", accession=accession)).code == "AA"
    change = hl7peer.send(port, hl7peer.orm("X1", "XO", accession="A1", modality="MR",
                                            station="MR9"))
    assert change.code == "AA"
    changed = show(server, "A1")
    assert (changed["modality"], changed["station_ae_title"], changed["status"]) == (
        "MR", "MR9", "SCHEDULED")
    assert hl7peer.send(port, hl7peer.orm("C1", "CA", accession="A1")).code == "AA"
    assert hl7peer.send(port, hl7peer.orm("D1", "DC", accession="A2")).code == "AA"
    assert {o["accession_number"]: o["status"] for o in worklist(server)} == {
        "A1": "DISCONTINUED", "A2": "DISCONTINUED"}
    # No move out of a final state: the answer names ORC-1.
    again = hl7peer.send(port, hl7peer.orm("C2", "XO", accession="A1"))
    assert (again.code, again.error_field) == ("AE", "ORC-1")
    history = show(server, "A1")["history"]
    assert [(h["from_state"], h["to_state"], h["trigger"]) for h in history] == [
        ("SCHEDULED", "DISCONTINUED", "cancel")]
    assert worklist(server, "--status", "SCHEDULED") == []


def _status_change(control_id: str, accession: str, status: str) -> str:
    """An ORM with ORC-1 SC (status changed) and ORC-5 `status` for `accession`."""
    return hl7peer.orm(control_id, "SC", accession=accession).replace(
        f"|FL{accession}||", f"|FL{accession}||{status}", 1)


def test_status_changes_and_filler_cancels_from_the_ris_move_the_order(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """A RIS reports an exam's progress with SC and ORC-5 (IP, CM, DC, CA), as its
    radiographers start and finish exams on modalities that send no MPPS, and cancels
    as the order's filler with OC and OD. They were refused (AE, ORC-1 unsupported),
    so such an exam stayed on the modality's worklist as SCHEDULED."""
    server, port = hl7_edge
    for n, accession in enumerate(("ST1", "ST2", "ST3", "ST4", "ST5")):
        assert hl7peer.send(port, hl7peer.orm(f"SN{n}", accession=accession)).code == "AA"
    acks = [hl7peer.send(port, message) for message in (
        _status_change("SC1", "ST1", "IP"),
        _status_change("SC2", "ST1", "IP"),  # said twice: one move
        _status_change("SC3", "ST1", "CM"),
        _status_change("SC4", "ST2", "CM"),  # completed from scheduled: start, complete
        _status_change("SC5", "ST3", "SC"),  # a status the box does not act on
        hl7peer.orm("OC1", "OC", accession="ST4"),
        hl7peer.orm("OD1", "OD", accession="ST5"),
    )]
    assert [ack.code for ack in acks] == ["AA"] * 7, acks
    refused = hl7peer.send(port, _status_change("SC6", "ST1", "DC"))
    assert (refused.code, refused.error_field) == ("AE", "ORC-5")
    assert {o["accession_number"]: o["status"] for o in worklist(server)} == {
        "ST1": "COMPLETED", "ST2": "COMPLETED", "ST3": "SCHEDULED", "ST4": "DISCONTINUED",
        "ST5": "DISCONTINUED"}
    for accession in ("ST1", "ST2"):
        assert [(h["from_state"], h["to_state"], h["trigger"])
                for h in show(server, accession)["history"]] == [
            ("SCHEDULED", "IN PROGRESS", "start"), ("IN PROGRESS", "COMPLETED", "complete")]
    assert [o["accession_number"] for o in worklist(server, "--status", "SCHEDULED")] == [
        "ST3"]


def test_an_ihe_procedure_completed_xo_after_the_modalitys_mpps_completes_the_order(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """IHE's Procedure Updated (RAD-13) says "procedure completed" with XO and ORC-5 CM,
    once the modality has started (or finished) the exam. It was read as a change of
    details, which a started order refuses (AE 207): one error on the RIS per exam. A
    plain XO after the start is still refused, and the modality's N-SET COMPLETED that
    follows is a success that leaves the completed order as it is."""
    server, port = hl7_edge
    server.add_peer("modality", "MODALITY", 1, allow="mpps")
    assert hl7peer.send(port, hl7peer.orm("IX1", accession="IHE1")).code == "AA"
    order = show(server, "IHE1")
    step = Dataset()
    step.StudyInstanceUID, step.AccessionNumber = order["study_uid"], "IHE1"
    attrs = Dataset()
    attrs.ScheduledStepAttributesSequence = [step]
    attrs.PerformedProcedureStepID, attrs.PerformedStationAETitle = "PPS1", "CT1"
    attrs.PerformedProcedureStepStartDate = "20240102"
    attrs.PerformedProcedureStepStartTime = "103000"
    attrs.PerformedProcedureStepStatus, attrs.Modality = "IN PROGRESS", "CT"
    ae = AE("MODALITY")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate(hl7peer.HOST, server.port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        sop_uid = "1.2.826.0.1.3680043.8.498.9901"
        status, _ = assoc.send_n_create(attrs, ModalityPerformedProcedureStep, sop_uid)
        assert status.Status == 0
        change = hl7peer.send(port, hl7peer.orm("IX2", "XO", accession="IHE1", station="CT2"))
        assert (change.code, change.error_field) == ("AE", "ORC-1")
        completed = hl7peer.orm("IX3", "XO", accession="IHE1").replace(
            "|FLIHE1||", "|FLIHE1||CM", 1)
        assert hl7peer.send(port, completed).code == "AA"
        done = Dataset()
        done.PerformedProcedureStepStatus = "COMPLETED"
        done.PerformedProcedureStepEndDate, done.PerformedProcedureStepEndTime = (
            "20240102", "104500")
        status, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, sop_uid)
        assert status.Status == 0
    finally:
        assoc.release()
    order = show(server, "IHE1")
    assert (order["status"], order["station_ae_title"]) == ("COMPLETED", "CT1")
    assert [(h["to_state"], h["source"]) for h in order["history"]] == [
        ("IN PROGRESS", "mpps"), ("COMPLETED", "hl7")]


def test_a_change_of_an_unknown_order_or_a_cancel_of_another_patients_is_an_application_error(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    server, port = hl7_edge
    for control_id, control in (("X9", "XO"), ("S9", "SC")):
        ack = hl7peer.send(port, hl7peer.orm(control_id, control, accession="NOPE"))
        assert (ack.code, ack.error_field, ack.error_code) == ("AE", "OBR-18", "204"), ack
    assert worklist(server) == []
    assert hl7peer.send(port, hl7peer.orm("N1", accession="A5")).code == "AA"
    for control_id, control in (("C1", "CA"), ("D1", "DC"), ("X1", "XO")):
        ack = hl7peer.send(port, hl7peer.orm(control_id, control, accession="A5",
                                             patient_id="PAT2", modality="MR"))
        assert (ack.code, ack.error_field, ack.error_code) == ("AE", "PID-3", "204")
    order = show(server, "A5")
    assert (order["status"], order["modality"]) == ("SCHEDULED", "CT")


def test_a_cancel_that_overtakes_its_new_order_keeps_the_late_order_off_the_worklist(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """Out-of-order delivery: the RIS's NW got an AR (resend it), its queue sent the CA
    next, then the NW again; or its feeds use two connections. The CA of an order the
    box had not seen was AE 204 and forgotten, so the late NW scheduled an exam the RIS
    had withdrawn, on a modality's worklist. Now the CA (or DC, or an SC reporting one)
    records the order, discontinued, and the late NW is refused saying so."""
    server, port = hl7_edge
    cases = (("CA", "", "cancel"), ("DC", "", "discontinue"), ("SC", "CA", "discontinue"))
    for n, (control, status, trigger) in enumerate(cases):
        accession = f"LATE{n}"
        early = hl7peer.orm(f"E{n}", control, accession=accession)
        if status:
            early = early.replace(f"ORC|SC|PL{accession}|FL{accession}|",
                                  f"ORC|SC|PL{accession}|FL{accession}||{status}", 1)
        ack = hl7peer.send(port, early)
        assert (ack.code, ack.text) == ("AA", "no such order yet: recorded as discontinued,"
                                        " a later new order is refused"), ack
        late = hl7peer.send(port, hl7peer.orm(f"N{n}", accession=accession))
        assert (late.code, late.error_code, late.text) == (
            "AE", "205", "duplicate_order: an order with this accession number exists and"
            " is discontinued"), late
        order = show(server, accession)
        assert order["status"] == "DISCONTINUED"
        assert [(step["from_state"], step["to_state"], step["trigger"])
                for step in order["history"]] == [("SCHEDULED", "DISCONTINUED", trigger)]
    assert worklist(server, "--status", "SCHEDULED") == []
    # Nor does the modality's worklist query (findscu -W: SCHEDULED steps).
    found = dcmtk.findscu(server.port, {"PatientID": "", "AccessionNumber": ""},
                          model="worklist").check()
    assert found.responses == []


def test_second_new_order_with_the_same_accession_is_refused_naming_what_differs(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    server, port = hl7_edge
    assert hl7peer.send(port, hl7peer.orm("N1", accession="ACC1")).code == "AA"
    ack = hl7peer.send(port, hl7peer.orm("N2", accession="ACC1", name="OTHER^NAME"))
    assert (ack.code, ack.error_field, ack.error_code) == ("AE", "OBR-18", "205")
    assert ack.error_text.endswith("exists with another patient demographics"), ack
    ack = hl7peer.send(port, hl7peer.orm("N3", accession="ACC1", patient_id="PAT2",
                                         modality="MR"))
    assert ack.error_text.endswith("exists with another patient, procedure details"), ack
    order = show(server, "ACC1")
    assert (order["patient_name"], order["modality"]) == ("DOE^JANE", "CT")


def test_a_new_order_sent_again_under_a_new_control_id_is_accepted_and_changes_nothing(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """A RIS operator's "send to the modality again" is the same NW under a new control
    ID: an AE 205 for it stops some interface engines' queues, and nothing about the
    order is wrong. Once the order is discontinued or completed, the same NW would not
    bring it back: refused, saying so."""
    server, port = hl7_edge
    assert hl7peer.send(port, hl7peer.orm("S1", accession="ACC1")).code == "AA"
    before = show(server, "ACC1")
    again = hl7peer.send(port, hl7peer.orm("S2", accession="ACC1"))
    assert (again.code, again.text) == ("AA", "the order exists as sent: nothing changed")
    assert show(server, "ACC1") == before
    assert server.log().count("order created") == 1, server.log()
    assert len(worklist(server)) == 1

    hl7peer.send(port, hl7peer.orm("S3", "CA", accession="ACC1"))
    ack = hl7peer.send(port, hl7peer.orm("S4", accession="ACC1"))
    assert (ack.code, ack.error_code, ack.text) == (
        "AE", "205", "duplicate_order: an order with this accession number exists and is"
        " discontinued"), ack
    assert show(server, "ACC1")["status"] == "DISCONTINUED"


def test_a_refused_message_logs_no_order_it_did_not_apply(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """Two orders in one message, the second another order under an accession number the
    box holds: the whole message is refused and its transaction rolled back, so the log
    names neither order as created (it used to log the first inside the transaction, as
    it would on a full disk)."""
    server, port = hl7_edge
    assert hl7peer.send(port, hl7peer.orm("D1", accession="ACC1")).code == "AA"
    second = hl7peer.orm("D2", accession="ACC1", modality="MR").split("\r")[3:5]  # ORC, OBR
    both = hl7peer.orm("D3", accession="ACC9") + "\r".join(second) + "\r"
    ack = hl7peer.send(port, both)
    assert (ack.code, ack.error_code) == ("AE", "205"), ack
    assert [order["accession_number"] for order in worklist(server)] == ["ACC1"]
    assert server.log().count("order created") == 1, server.log()


def test_an_orc_with_several_obr_segments_makes_one_order_of_each(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """Some RIS send one ORC for several procedures (ORC OBR OBR): each OBR is an order
    with that ORC's control code and start, not an AA that kept only the first."""
    server, port = hl7_edge

    def two_procedures(control_id: str, control: str) -> str:
        head = hl7peer.orm(control_id, control, accession="PROC1", start="202401021030")
        obr = hl7peer.orm(control_id, control, accession="PROC2", station="CT2",
                          procedure="CTCHEST^CT chest^LOCAL").split("\r")[4]
        return head + obr.replace("OBR|1|", "OBR|2|", 1) + "\r"

    assert hl7peer.send(port, two_procedures("MO1", "NW")).code == "AA"
    orders = {o["accession_number"]: o for o in worklist(server)}
    assert sorted(orders) == ["PROC1", "PROC2"]
    second = orders["PROC2"]
    assert (second["station_ae_title"], second["requested_procedure_desc"]) == (
        "CT2", "CT chest")
    assert (second["sps_start_date"], second["sps_start_time"]) == ("20240102", "1030")
    assert hl7peer.send(port, two_procedures("MO2", "CA")).code == "AA"
    assert {o["status"] for o in worklist(server)} == {"DISCONTINUED"}


def test_a_block_of_two_messages_or_a_message_of_two_patients_applies_nothing(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """A sender that runs messages together in one MLLP block (a batch without FHS/BHS),
    or a message with a second PID: read as one message, the second patient's order was
    filed under the first patient (PID is read once) and answered AA."""
    server, port = hl7_edge
    first = hl7peer.orm("TWO1", accession="TWO1", patient_id="PATA", name="ALPHA^ANN")
    second = hl7peer.orm("TWO2", accession="TWO2", patient_id="PATB", name="BETA^BOB")
    ack = hl7peer.send(port, first + second)
    assert (ack.code, ack.control_id, ack.error_field, ack.error_code) == (
        "AR", "TWO1", "MSH", "100")
    two_patients = first + "\r".join(second.split("\r")[1:])  # its PID, PV1, ORC, OBR
    ack = hl7peer.send(port, two_patients.replace("|TWO1|", "|TWO3|", 1))
    assert (ack.code, ack.error_field, ack.error_code) == ("AE", "PID", "100")
    assert worklist(server) == []
    # Each in its own block: each under its own patient.
    assert [a.code for a in hl7peer.send_many(port, [first, second])] == ["AA", "AA"]
    assert {o["accession_number"]: o["patient_id"] for o in worklist(server)} == {
        "TWO1": "PATA", "TWO2": "PATB"}


def _audit_records(server: EdgeServer) -> list[dict[str, Any]]:
    path = server.home / "audit" / "audit.log"
    if not path.exists():
        return []
    return [json.loads(line)["record"] for line in path.read_text().splitlines()]


def test_orders_and_patient_changes_are_audited_and_never_logged(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    server, port = hl7_edge
    canary = {"patient_id": "HL7CANARY7", "name": "KANARIE^HELGA"}
    assert hl7peer.send(port, hl7peer.orm("AU1", accession="ACCCANARY", **canary)).code == "AA"
    cancel = hl7peer.orm("AU2", "CA", accession="ACCCANARY", **canary)
    assert hl7peer.send(port, cancel).code == "AA"
    assert hl7peer.send(port, hl7peer.adt("AU3", "A08", **canary)).code == "AA"
    wanted = {("110109", "C"), ("110109", "D"), ("110110", "U")}
    deadline = time.monotonic() + 60
    seen: set[tuple[str, str]] = set()
    while not wanted <= seen and time.monotonic() < deadline:
        seen = {(r["EventIdentification"]["EventID"]["csd-code"],
                 r["EventIdentification"]["EventActionCode"]) for r in _audit_records(server)}
        time.sleep(0.2)  # polling the buffered audit log, not synchronising on time
    assert wanted <= seen
    audit_text = (server.home / "audit" / "audit.log").read_text()
    assert "HL7CANARY7" in audit_text and "ACCCANARY" in audit_text
    log = server.log()
    for phi in ("HL7CANARY7", "KANARIE", "ACCCANARY", show(server, "ACCCANARY")["study_uid"]):
        assert phi not in log
    assert "audit log intact" in server.cli("audit", "verify").stdout


def test_a_refused_order_or_patient_change_is_a_failed_record_with_the_reason(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """An attempt to change an order or a patient that the box refuses (AE) is in the
    trail as the change asked for, outcome 4, with why: a RIS cancelling another
    patient's order is what an auditor looks for."""
    server, port = hl7_edge
    assert hl7peer.send(port, hl7peer.orm("RF1", accession="ACCREF")).code == "AA"
    cancel = hl7peer.orm("RF2", "CA", accession="ACCREF", patient_id="INTRUDERPAT")
    assert hl7peer.send(port, cancel).code == "AE"
    merge = hl7peer.adt("RF3", "A40", patient_id="SAMEPAT", prior="SAMEPAT")
    assert hl7peer.send(port, merge).code == "AE"

    def refused(code: str) -> list[dict[str, Any]]:
        return [r for r in _audit_records(server)
                if r["EventIdentification"]["EventID"]["csd-code"] == code
                and r["EventIdentification"]["EventOutcomeIndicator"] == 4]

    order, = refused("110109")  # written before the ACK: a refusal is fsync'd at once
    assert order["EventIdentification"]["EventActionCode"] == "D"
    assert "other_patient" in order["EventIdentification"]["EventOutcomeDescription"]
    ids = {o["ParticipantObjectID"] for o in order["ParticipantObjectIdentification"]}
    assert "INTRUDERPAT" in ids
    patient, = refused("110110")
    assert "not_allowed" in patient["EventIdentification"]["EventOutcomeDescription"]
    assert "SAMEPAT" in {o["ParticipantObjectID"]
                         for o in patient["ParticipantObjectIdentification"]}
    assert "INTRUDERPAT" not in server.log() and "SAMEPAT" not in server.log()


def test_a_message_rejected_before_it_is_understood_is_a_failed_record_per_reason_and_window(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """A message the box cannot take (a training message, an unsupported type, a field
    it cannot read) left no trace but the ACK. Now each reason is a failed record,
    written before the ACK; a sender repeating it gets one summary per window, not one
    record per message."""
    server, port = hl7_edge
    training = [hl7peer.orm(f"TR{n}").replace("|P|2.5", "|T|2.5", 1) for n in range(5)]
    oru = [hl7peer.orm(f"OR{n}").replace("ORM^O01^ORM_O01", "ORU^R01^ORU_R01", 1)
           for n in range(3)]
    bad_date = hl7peer.orm("BD1").replace("|19700101|", "|19700230|")
    acks = hl7peer.send_many(port, [*training, *oru, bad_date])
    assert [a.code for a in acks] == ["AR"] * 8 + ["AE"]

    def failed() -> list[dict[str, Any]]:
        return [r for r in _audit_records(server)
                if r["EventIdentification"]["EventID"]["csd-code"] == "110109"
                and r["EventIdentification"]["EventOutcomeIndicator"] == 4]

    def described(record: dict[str, Any]) -> str:
        return str(record["EventIdentification"]["EventOutcomeDescription"])

    first = failed()  # fsync'd before each ACK
    assert sorted(described(r).split(":")[1].strip() for r in first) == [
        "AE PID-7 data_type", "AR MSH-11 unsupported_processing_id",
        "AR MSH-9 unsupported_message_type"]
    for record in first:
        assert {p["UserID"] for p in record["ActiveParticipant"]
                if p["UserIsRequestor"]} == {"ris"}
    server.stop()  # the windows end: what they counted beyond the first is summarised
    summaries = {described(r).split(":")[1].strip(): r for r in failed()[len(first):]}
    assert set(summaries) == {"AR MSH-11 unsupported_processing_id",
                              "AR MSH-9 unsupported_message_type"}
    counts = {reason: {d["type"]: d["value"] for d in
                       r["ParticipantObjectIdentification"][0]["ParticipantObjectDetail"]
                       }["Requests"] for reason, r in summaries.items()}
    assert counts == {"AR MSH-11 unsupported_processing_id": "4",
                      "AR MSH-9 unsupported_message_type": "2"}



def test_a_message_the_box_could_not_apply_is_a_failed_record_of_what_it_asked(
        hl7_edge: tuple[EdgeServer, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process holding the index's write lock (a `sqlite3` shell left in a
    transaction) past SQLite's 30 s busy timeout: the order is answered AR "could not
    apply the message now", and that attempt on the patient's data left no audit
    record. Now it is an Order Record, outcome 4, naming the patient and accession."""
    server, port = hl7_edge
    monkeypatch.setattr(hl7peer, "TIMEOUT", 120.0)  # the ACK waits for the busy timeout
    holder = sqlite3.connect(server.home / "index.sqlite3", isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        ack = hl7peer.send(port, hl7peer.orm("NA1", accession="ACCLOCKED",
                                             patient_id="LOCKEDPAT"))
    finally:
        holder.close()
    assert (ack.code, ack.text) == ("AR", "the box could not apply the message now;"
                                          " resend it")
    [record] = [r for r in _audit_records(server)
                if r["EventIdentification"]["EventID"]["csd-code"] == "110109"
                and r["EventIdentification"]["EventOutcomeIndicator"] == 4]
    assert record["EventIdentification"]["EventActionCode"] == "C"
    assert record["EventIdentification"]["EventOutcomeDescription"] == (
        "order create refused: not_applied: the box could not apply it now"
        " (IndexUnavailable)")
    patient, = record["ParticipantObjectIdentification"]
    assert patient["ParticipantObjectID"] == "LOCKEDPAT"
    assert {"type": "AccessionNumber", "value": "ACCLOCKED"} in patient[
        "ParticipantObjectDetail"]
    assert "LOCKEDPAT" not in server.log() and "ACCLOCKED" not in server.log()


# --- idempotence and durability -----------------------------------------------------

def test_duplicate_control_id_is_acknowledged_without_applying_twice(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    server, port = hl7_edge
    assert hl7peer.send(port, hl7peer.orm("DUP1", accession="ACC1")).code == "AA"
    assert hl7peer.send(port, hl7peer.orm("DUP2", "CA", accession="ACC1")).code == "AA"
    # The RIS resends both (it lost our ACKs): same answers, nothing applied again
    # (a second NW would have been refused as a duplicate accession).
    assert hl7peer.send(port, hl7peer.orm("DUP1", accession="ACC1")).code == "AA"
    assert hl7peer.send(port, hl7peer.orm("DUP2", "CA", accession="ACC1")).code == "AA"
    assert len(worklist(server)) == 1
    assert len(show(server, "ACC1")["history"]) == 1
    # A refused message resent gets the same refusal.
    first = hl7peer.send(port, hl7peer.orm("DUP3", "CA", accession="ACC1"))
    second = hl7peer.send(port, hl7peer.orm("DUP3", "CA", accession="ACC1"))
    assert (first.code, first.error_field) == (second.code, second.error_field) == (
        "AE", "ORC-1")


def test_a_control_id_reused_for_another_message_is_applied_and_a_restamped_resend_is_not(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """A RIS whose counter started again (reinstalled, or numbering per day) sends a new
    order under a control ID the box has seen: it is applied, not answered with the old
    message's AA (which said AA for an order no modality would ever see). A resend
    after a lost ACK that only stamps MSH-7 anew is still the message already applied."""
    server, port = hl7_edge
    first = hl7peer.orm("SEQ1", accession="FIRST")
    assert hl7peer.send(port, first).code == "AA"
    restamped = first.replace("|20240102083000|", "|20240102083007|", 1)
    again = hl7peer.send(port, restamped)
    assert (again.code, again.text) == ("AA", "duplicate: already applied")
    reused = hl7peer.orm("SEQ1", accession="SECOND")
    ack = hl7peer.send(port, reused)
    assert (ack.code, ack.text) == ("AA", "")
    assert sorted(o["accession_number"] for o in worklist(server)) == ["FIRST", "SECOND"]
    # The new message is the one remembered now: its own resend changes nothing.
    resent = hl7peer.send(port, reused)
    assert (resent.code, resent.text) == ("AA", "duplicate: already applied")
    assert len(worklist(server)) == 2
    assert "control id reused for another message" in server.log()


def test_a_resend_of_a_message_an_older_version_recorded_is_still_a_resend(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """Versions before the content hash left MSH-7 out recorded the hash of the bytes as
    sent. A RIS that resends across the upgrade (its ACK lost in the restart) must not
    have its message applied again: a new order would be refused as a duplicate (205)."""
    server, port = hl7_edge
    message = hl7peer.orm("OLD1", accession="OLD1")
    assert hl7peer.send(port, message).code == "AA"
    db = sqlite3.connect(server.home / "index.sqlite3", timeout=30, isolation_level=None)
    try:
        db.execute("UPDATE hl7_messages SET content_sha256 = ? WHERE control_id = 'OLD1'",
                   (hashlib.sha256(message.encode()).hexdigest(),))
    finally:
        db.close()
    again = hl7peer.send(port, message)
    assert (again.code, again.text) == ("AA", "duplicate: already applied")
    assert len(worklist(server)) == 1


def test_acknowledged_order_survives_sigkill_right_after_the_aa(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    server, port = hl7_edge
    sock = hl7peer.raw(port)
    sock.sendall(hl7peer.frame(hl7peer.orm("K1", accession="KILL1")))
    ack = hl7peer.read_ack(sock)
    server.kill()  # the power cut, right after the AA arrived
    sock.close()
    assert ack.code == "AA"
    server.start()
    assert show(server, "KILL1")["status"] == "SCHEDULED"
    # And the resent message (the RIS never saw... or did see the ACK) is not applied twice.
    assert hl7peer.send(port, hl7peer.orm("K1", accession="KILL1")).code == "AA"
    assert len(worklist(server)) == 1


# --- bad input ----------------------------------------------------------------------

def test_wrong_encoding_characters_are_rejected_naming_msh2(
        refusing_edge: tuple[EdgeServer, int]) -> None:
    server, port = refusing_edge
    good = hl7peer.orm("E1", accession="ENC1")
    header = "MSH|^~\\&|"
    for bad in (good.replace(header, "MSH|^~|", 1), good.replace(header, "MSH|^^\\&|", 1),
                good.replace(header, "MSHA^~\\&A", 1)):
        ack = hl7peer.send(port, bad)
        assert (ack.code, ack.error_field) == ("AR", "MSH-2"), bad[:20]
    assert worklist(server) == []


def test_missing_control_id_is_rejected_naming_msh10(refusing_edge: tuple[EdgeServer, int]) -> None:
    server, port = refusing_edge
    ack = hl7peer.send(port, hl7peer.orm("", accession="NOID"))
    assert (ack.code, ack.error_field, ack.error_code) == ("AR", "MSH-10", "101")
    assert worklist(server) == []


@pytest.mark.parametrize(("message_type", "code"), [("ORU^R01^ORU_R01", "200"),
                                                    ("ADT^A99^ADT_A01", "201"),
                                                    ("", "101")])
def test_unsupported_message_types_are_rejected_naming_msh9(
        refusing_edge: tuple[EdgeServer, int], message_type: str, code: str) -> None:
    _, port = refusing_edge
    text = hl7peer.orm("T1").replace("ORM^O01^ORM_O01", message_type, 1)
    ack = hl7peer.send(port, text)
    assert (ack.code, ack.control_id, ack.error_field, ack.error_code) == (
        "AR", "T1", "MSH-9", code)


@pytest.mark.parametrize(("edit", "field"), [
    (lambda m: m.replace("ORC|NW|", "ORC|ZZ|"), "ORC-1"),
    (lambda m: m.replace("PID|1||PAT1^^^HOSP|", "PID|1|||"), "PID-3"),
    (lambda m: m + "ZDS|not-a-uid\r", "ZDS-1"),
    (lambda m: m.replace("|ACC1|RPACC1|", "||RPACC1|").replace("FLACC1", ""), "OBR-18"),
    # The worklist answers these in VRs of the default repertoire (CS, AE).
    (lambda m: m.replace("|||CT\r", "|||CT\u00e9\r"), "OBR-24"),
    (lambda m: m.replace("|CT1|", "|CT\u00e91|"), "OBR-21"),
    # Longer than the DICOM attribute (SH 16, LO 64): a modality would cut it, and the
    # study it sends back would match no order or patient.
    (lambda m: m.replace("|ACC1|RPACC1|", f"|{'A' * 17}|RPACC1|"), "OBR-18"),
    (lambda m: m.replace("|RPACC1|", f"|{'R' * 17}|"), "OBR-19"),
    (lambda m: m.replace("PID|1||PAT1^^^HOSP|", f"PID|1||{'P' * 65}^^^HOSP|"), "PID-3"),
    # An escaped backslash: DICOM's value separator, so two values at the modality.
    (lambda m: m.replace("PID|1||PAT1^^^HOSP|", "PID|1||PAT\\E\\1^^^HOSP|"), "PID-3"),
    (lambda m: m.replace("|ACC1|RPACC1|", "|ACC\\E\\1|RPACC1|"), "OBR-18"),
    (lambda m: m.replace("|RPACC1|", "|RP\\E\\1|"), "OBR-19"),
    # An escaped control character (a CR), which no SH or LO holds: the ID a modality
    # copies into its images would be cut there, or refused.
    (lambda m: m.replace("PID|1||PAT1^^^HOSP|", "PID|1||PAT\\X0D\\1^^^HOSP|"), "PID-3"),
    (lambda m: m.replace("|ACC1|RPACC1|", "|ACC\\X09\\1|RPACC1|"), "OBR-18"),
    # Days and times that do not exist, named by the field they came from.
    (lambda m: m.replace("|19700101|", "|19700230|"), "PID-7"),
    (lambda m: m.replace("^^^202401021030^^R", "^^^202413021030^^R"), "ORC-7"),
    (lambda m: m.replace("^^^202401021030^^R", "^^^202401022530^^R"), "ORC-7"),
])
def test_content_errors_are_application_errors_naming_the_field(
        refusing_edge: tuple[EdgeServer, int], edit: Callable[[str], str], field: str,
        request: pytest.FixtureRequest) -> None:
    server, port = refusing_edge
    control_id = f"B{request.node.callspec.indices['edit']}"
    ack = hl7peer.send(port, edit(hl7peer.orm(control_id, accession="ACC1")))
    assert (ack.code, ack.error_field) == ("AE", field)
    assert worklist(server) == []


def test_training_and_debugging_messages_are_rejected_unless_the_box_accepts_them(
        edge_server_factory: Callable[..., EdgeServer],
        free_port: Callable[[], int]) -> None:
    """MSH-11 T or D on a box with [hl7] processing_ids = ["P"] (the default): AR 202 at
    MSH-11, no order; a test box that lists T applies it."""
    server = edge_server_factory(start=False)
    port = free_port()
    hl7peer.listen(server, port)
    server.start()
    for processing in ("T", "D"):
        message = hl7peer.orm(f"PI-{processing}", accession=f"PI{processing}")
        ack = hl7peer.send(port, message.replace("|P|2.5", f"|{processing}|2.5", 1))
        assert (ack.code, ack.error_field, ack.error_code) == ("AR", "MSH-11", "202")
    assert hl7peer.send(port, hl7peer.orm("PI-P", accession="PIP")).code == "AA"
    assert [o["accession_number"] for o in worklist(server)] == ["PIP"]
    server.stop()
    server.configure(hl7={"processing_ids": ["P", "T"]})
    server.start()
    training = hl7peer.orm("PI-T2", accession="PIT2").replace("|P|2.5", "|T|2.5", 1)
    assert hl7peer.send(port, training).code == "AA"


def test_blank_lines_between_segments_are_skipped_and_a_segment_without_id_rejected(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    server, port = hl7_edge
    # CRLF senders that also end with CR send an empty segment after every segment.
    blank = hl7peer.orm("BL1", accession="BLANK").replace("\r", "\r\n\r")
    assert hl7peer.send(port, blank).code == "AA"
    nameless = hl7peer.orm("BL2", accession="NONAME").replace("\rPV1|", "\r|PV1|")
    ack = hl7peer.send(port, nameless)
    assert (ack.code, ack.error_field, ack.error_code) == ("AR", "MSH", "100")
    assert [o["accession_number"] for o in worklist(server)] == ["BLANK"]
    assert "Traceback" not in server.log()


def test_a_message_refused_before_it_is_parsed_is_answered_with_its_control_id(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """The sender matches an ACK to its message by MSA-2: an AR for a character set we
    do not read, bytes not valid in the one named, or a segment without an ID still
    echoes MSH-10 (read from the bytes as sent)."""
    server, port = hl7_edge

    def in_charset(control_id: str, charset: str) -> str:
        orm_type = "ORM^O01^ORM_O01"
        return hl7peer.orm(control_id, accession=control_id).replace(
            hl7peer.msh(control_id, orm_type), hl7peer.msh(control_id, orm_type, charset=charset))

    unknown = in_charset("CS1", "KLINGON")
    not_ascii = in_charset("CS2", "ASCII").encode().replace(b"PID|1|", "PID|1|\u00e9".encode())
    nameless = hl7peer.orm("CS3", accession="CSET3").replace("\rPV1|", "\r|PV1|")
    for message, control_id, field in ((unknown, "CS1", "MSH-18"),
                                       (not_ascii, "CS2", "MSH-18"),
                                       (nameless, "CS3", "MSH")):
        ack = hl7peer.send(port, message)
        assert (ack.code, ack.control_id, ack.error_field) == ("AR", control_id, field)
    assert worklist(server) == []


def _peak_rss_kb(server: EdgeServer) -> int:
    status = Path(f"/proc/{server.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])


def test_escape_sequences_are_undone_in_bounded_memory_and_never_logged(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """A formatting command's repeat count is not honoured (\\.in75000000\\ was 300 MB of
    spaces from 13 bytes), a bad one is no crash without an ACK, and an escape the box
    does not know is dropped without logging the field it was in (a patient's name)."""
    server, port = hl7_edge
    before = _peak_rss_kb(server)
    names = {"ESC1": "KANARIE\\.in75000000\\\\.sp75000000\\^HELGA",
             "ESC2": "KANARIE\\.brx\\^HELGA", "ESC3": "KANARIE\\Q\\^HELGA",
             "ESC4": "KANARIE\\XZZ\\^HELGA", "ESC5": "KAN\\F\\ARIE\\.br\\X^HELGA"}
    for accession, name in names.items():
        ack = hl7peer.send(port, hl7peer.orm(accession, accession=accession, name=name))
        assert (ack.code, ack.control_id) == ("AA", accession)
    assert _peak_rss_kb(server) - before < 32 * 1024
    assert {o["accession_number"]: o["patient_name"] for o in worklist(server)} == {
        "ESC1": "KANARIE^HELGA", "ESC2": "KANARIE^HELGA", "ESC3": "KANARIE^HELGA",
        "ESC4": "KANARIE^HELGA", "ESC5": "KAN|ARIE X^HELGA"}
    log = server.log()
    assert "KANARIE" not in log and "Traceback" not in log


def test_hex_escapes_are_bytes_of_the_messages_character_set(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """\\Xhh\\ escapes bytes of the message's set: C3 9C in a UTF-8 message is one Ü (it
    was two characters, "Ã" and U+009C, in the worklist), A4 in 8859/15 is €; a byte
    the set cannot read (FC in a UTF-8 message, as senders escaping Latin-1 write it)
    stays one Latin-1 character."""
    server, port = hl7_edge
    names = {"HX1": ("UNICODE UTF-8", "M\\XC39C\\LLER^J\\XC39C\\RGEN", "M\u00dcLLER^J\u00dcRGEN"),
             "HX2": ("", "M\\XFC\\LLER^ANNA", "M\u00fcLLER^ANNA"),
             "HX3": ("8859/15", "EURO\\XA4\\^ANNA", "EURO\u20ac^ANNA")}
    for accession, (charset, name, _) in names.items():
        order = hl7peer.orm(accession, accession=accession, name=name)
        if charset:
            order = order.replace(hl7peer.msh(accession, "ORM^O01^ORM_O01"),
                                  hl7peer.msh(accession, "ORM^O01^ORM_O01", charset=charset))
        assert hl7peer.send(port, order.encode("utf-8")).code == "AA"
    assert {o["accession_number"]: o["patient_name"] for o in worklist(server)} == {
        accession: stored for accession, (_, _, stored) in names.items()}


def test_names_keep_their_ideographic_and_phonetic_groups_and_one_value(
        edge_server_factory: Callable[..., EdgeServer], free_port: Callable[[], int]) -> None:
    """PID-5 repetitions of name representation I and P (XPN-8), as Japanese RISs send
    them, are the PN's ideographic and phonetic groups (only the first repetition was
    kept); an escaped PN delimiter (\\S\\ is ^, \\E\\ a backslash, = is not
    special in HL7) is a space, not a second component or a second value (a backslash
    made a PatientName of two values in the worklist). Checked with findscu -W."""
    server = edge_server_factory(start=False)
    port = free_port()
    hl7peer.listen(server, port)
    server.add_peer("ct1", "CT1", 1, allow="worklist")
    server.start()
    names = {"PN1": "Yamada^Tarou^^^^^L^A~山田^太郎^^^^^L^I~やまだ^たろう^^^^^L^P",
             "PN2": "山田^花子^^^^^L^I~ヤマダ^ハナコ^^^^^L^P",
             "PN3": "O\\S\\BRIEN^PAT~ALIAS^PAT", "PN4": "BACK\\E\\SLASH^ANN",
             "PN5": "EQ=UAL^BOB"}
    for accession, name in names.items():
        order = hl7peer.orm(accession, accession=accession, name=name).replace(
            hl7peer.msh(accession, "ORM^O01^ORM_O01"),
            hl7peer.msh(accession, "ORM^O01^ORM_O01", charset="UNICODE UTF-8"))
        assert hl7peer.send(port, order.encode("utf-8")).code == "AA"
    found = dcmtk.findscu(server.port, {"SpecificCharacterSet": "ISO_IR 192", "PatientName": "",
                                        "AccessionNumber": ""},
                          model="worklist", aet="CT1").check()
    assert {ds.AccessionNumber: (ds["PatientName"].VM, str(ds.PatientName))
            for ds in found.responses} == {
        "PN1": (1, "Yamada^Tarou=山田^太郎=やまだ^たろう"),
        "PN2": (1, "=山田^花子=ヤマダ^ハナコ"),
        "PN3": (1, "O BRIEN^PAT"), "PN4": (1, "BACK SLASH^ANN"), "PN5": (1, "EQ UAL^BOB")}
    ideographic = dcmtk.findscu(server.port, {"SpecificCharacterSet": "ISO_IR 192",
                                              "PatientName": "*=山田*",
                                              "AccessionNumber": ""},
                                model="worklist", aet="CT1").check()
    assert sorted(ideographic.values("AccessionNumber")) == ["PN1", "PN2"]


def test_cyrillic_greek_and_japanese_character_sets_are_read(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """MSH-18 8859/5 and 8859/7 (answered AR before), ISO IR87 with its ISO 2022 escape
    sequences in the bytes, and JAHIS's "~ISO IR87" (ASCII escaping to kanji: read as
    UTF-8 before, so the name held ESC $ B and JIS bytes); the ACK is in the set."""
    server, port = hl7_edge
    orders = {"CY1": ("8859/5", "Иванов^Пётр", "iso8859-5"),
              "GR1": ("8859/7", "Παπαδόπουλος^Νίκος", "iso8859-7"),
              "JP1": ("ISO IR87", "山田^太郎", "iso2022_jp"),
              "JP2": ("~ISO IR87", "Yamada^Tarou^^^^^L^A~山田^太郎^^^^^L^I", "iso2022_jp")}
    for accession, (charset, name, codec) in orders.items():
        order = hl7peer.orm(accession, accession=accession, name=name).replace(
            hl7peer.msh(accession, "ORM^O01^ORM_O01"),
            hl7peer.msh(accession, "ORM^O01^ORM_O01", charset=charset))
        ack = hl7peer.send(port, order.encode(codec))
        assert (ack.code, ack.control_id) == ("AA", accession)
    assert {o["accession_number"]: o["patient_name"] for o in worklist(server)} == {
        "CY1": "Иванов^Пётр", "GR1": "Παπαδόπουλος^Νίκος", "JP1": "山田^太郎",
        "JP2": "Yamada^Tarou=山田^太郎"}


def test_character_set_switch_escapes_are_read_in_the_set_they_switch_to(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """HL7's own switches (\\M2442\\ is ESC $ B, \\C2842\\ ESC ( B; HL7 2.3 2.9.2, for
    XPN) in an ASCII message: the 7-bit JIS bytes between them are kanji and kana, an
    escaped delimiter among them one of those bytes (the ^ of やまだ, the & of たろう).
    The switches were dropped and the name stored as ";3ED^B@O:", answered AA."""
    server, port = hl7_edge

    def jis(text: str) -> str:  # as a sender in HL7 2.3 mode writes it
        body = text.encode("iso2022_jp")[3:-3].decode("ascii")
        for delimiter, escape in (("\\", "\\E\\"), ("^", "\\S\\"), ("&", "\\T\\"),
                                  ("~", "\\R\\"), ("|", "\\F\\")):
            body = body.replace(delimiter, escape)
        return f"\\M2442\\{body}\\C2842\\"

    name = (f"Yamada^Tarou^^^^^L^A~{jis('山田')}^{jis('太郎')}^^^^^L^I"
            f"~{jis('やまだ')}^{jis('たろう')}^^^^^L^P")
    assert "\\S\\" in name and "\\T\\" in name
    order = hl7peer.orm("SW1", accession="SW1", name=name).replace(
        hl7peer.msh("SW1", "ORM^O01^ORM_O01"),
        hl7peer.msh("SW1", "ORM^O01^ORM_O01", charset="ASCII~ISO IR87"))
    ack = hl7peer.send(port, order.encode("ascii"))
    assert (ack.code, ack.control_id) == ("AA", "SW1")
    assert show(server, "SW1")["patient_name"] == "Yamada^Tarou=山田^太郎=やまだ^たろう"


def test_an_escaped_backslash_in_a_description_is_a_space_not_a_second_value(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """OBR-4 "CT head\\E\\neck" was "CT head\\neck" in the worklist: two values of
    Requested Procedure Description (LO) at the modality."""
    server, port = hl7_edge
    order = hl7peer.orm("DESC1", accession="DESC1",
                        procedure="CTHN\\E\\1^CT head\\E\\neck\\X0D\\^LOCAL")
    assert hl7peer.send(port, order).code == "AA"
    item = show(server, "DESC1")
    assert (item["requested_procedure_desc"], item["sps_description"],
            item["procedure_code_value"]) == ("CT head neck", "CT head neck", "CTHN 1")


def test_lf_terminated_message_reads_its_character_set_from_msh_alone(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """Segments may end with LF: MSH-18 (and MSH-10 for an early AR) are read from MSH,
    not from the 18th field counted on into PID."""
    server, port = hl7_edge
    mothers_maiden_name = "PID|1||PAT1^^^HOSP||M\u00dcLLER^JANE|MAIDEN|19700101|F"
    order = hl7peer.orm("LF1", accession="LF1", name="M\u00dcLLER^JANE").replace(
        hl7peer.pid(name="M\u00dcLLER^JANE"), mothers_maiden_name).replace("\r", "\n")
    ack = hl7peer.send(port, order)
    assert (ack.code, ack.control_id) == ("AA", "LF1")
    latin = hl7peer.orm("LF2", accession="LF2", name="M\u00dcLLER^JANE").replace(
        hl7peer.msh("LF2", "ORM^O01^ORM_O01"),
        hl7peer.msh("LF2", "ORM^O01^ORM_O01", charset="8859/1")).replace("\r", "\n")
    assert hl7peer.send(port, latin.encode("latin-1")).code == "AA"
    assert {o["accession_number"]: o["patient_name"] for o in worklist(server)} == {
        "LF1": "M\u00dcLLER^JANE", "LF2": "M\u00dcLLER^JANE"}


def test_a_repeated_character_set_is_read_from_its_first_repetition(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """MSH-18 repeats: the first names the message's set, the others sets that escape
    sequences switch to. 8859/1~ISO IR87 is a Latin-1 message, not an unknown set."""
    server, port = hl7_edge
    order = hl7peer.orm("RC1", accession="RC1", name="M\u00dcLLER^JANE").replace(
        hl7peer.msh("RC1", "ORM^O01^ORM_O01"),
        hl7peer.msh("RC1", "ORM^O01^ORM_O01", charset="8859/1~ISO IR87"))
    ack = hl7peer.send(port, order.encode("latin-1"))
    assert (ack.code, ack.control_id) == ("AA", "RC1")
    assert show(server, "RC1")["patient_name"] == "M\u00dcLLER^JANE"


def test_truncated_frames_are_never_applied_and_the_listener_keeps_serving(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    server, port = hl7_edge
    whole = hl7peer.frame(hl7peer.orm("TR1", accession="TRUNC"))
    cut = hl7peer.raw(port)  # the sender dies mid-message
    cut.sendall(whole[: len(whole) // 2])
    cut.close()
    no_start = hl7peer.raw(port)  # a frame without <VT>: rejected, connection kept
    no_start.sendall(whole[1:])
    assert hl7peer.read_ack(no_start).code == "AR"
    no_start.sendall(whole)
    assert hl7peer.read_ack(no_start).code == "AA"
    no_start.close()
    assert [o["accession_number"] for o in worklist(server)] == ["TRUNC"]


def test_line_breaks_between_mllp_blocks_are_skipped(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """A sender that ends every block with <FS><CR><LF> leaves an LF before the next <VT>:
    that block, and its resends, must not be refused for not beginning with <VT>."""
    server, port = hl7_edge
    sock = hl7peer.raw(port)
    for n in range(3):
        sock.sendall(hl7peer.frame(hl7peer.orm(f"CRLF{n}", accession=f"CRLF{n}")) + b"\n")
        ack = hl7peer.read_ack(sock)
        assert (ack.code, ack.control_id) == ("AA", f"CRLF{n}")
    sock.sendall(b"\r\n\r\n" + hl7peer.frame(hl7peer.orm("CRLF3", accession="CRLF3")))
    assert hl7peer.read_ack(sock).code == "AA"
    sock.close()
    assert sorted(o["accession_number"] for o in worklist(server)) == [
        "CRLF0", "CRLF1", "CRLF2", "CRLF3"]


def test_a_block_ended_by_fs_alone_is_answered_at_once(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """A sender that ends its blocks with <FS> and no <CR> (some devices and hand-written
    senders) waited for an ACK until the idle timeout closed the connection, its order
    unread; a sender that ends them as MLLP says is answered as before on the same
    connection."""
    server, port = hl7_edge
    sock = hl7peer.raw(port)
    sock.settimeout(10.0)
    for n in range(2):
        sock.sendall(hl7peer.frame(hl7peer.orm(f"FS{n}", accession=f"FS{n}"))[:-1])
        ack = hl7peer.read_ack(sock)
        assert (ack.code, ack.control_id) == ("AA", f"FS{n}")
    sock.sendall(hl7peer.frame(hl7peer.orm("FS2", accession="FS2")))
    assert hl7peer.read_ack(sock).code == "AA"
    sock.close()
    assert sorted(o["accession_number"] for o in worklist(server)) == ["FS0", "FS1", "FS2"]


def test_oversized_message_is_rejected_and_its_connection_closed(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    server, port = hl7_edge
    big = hl7peer.orm("BIG1", accession="BIG") + "NTE|1||" + "x" * 200_000 + "\r"
    sock = hl7peer.raw(port)
    sock.sendall(hl7peer.frame(big))
    ack = hl7peer.read_ack(sock)
    assert (ack.code, ack.control_id) == ("AR", "")
    assert hl7peer.closed_by_peer(sock)
    sock.close()
    assert hl7peer.send(port, hl7peer.orm("OK1", accession="OK")).code == "AA"
    assert [o["accession_number"] for o in worklist(server)] == ["OK"]


def test_idle_connections_are_capped_and_the_listener_keeps_serving(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    _, port = hl7_edge
    idle = [hl7peer.raw(port) for _ in range(IDLE_CONNECTIONS)]
    try:
        assert hl7peer.send(port, hl7peer.orm("IDLE1", accession="IDLE")).code == "AA"
        # All but at most MAX_CONNECTIONS of the silent ones were closed by the box.
        selector = selectors.DefaultSelector()
        for sock in idle:
            selector.register(sock, selectors.EVENT_READ)
        closed: set[int] = set()
        deadline = time.monotonic() + 60
        while len(closed) < IDLE_CONNECTIONS - MAX_CONNECTIONS and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=1.0):
                sock = key.fileobj
                try:
                    data = sock.recv(4096)  # type: ignore[union-attr]
                except ConnectionResetError:
                    data = b""
                if not data:
                    closed.add(id(sock))
                    selector.unregister(sock)
        selector.close()
        assert len(closed) >= IDLE_CONNECTIONS - MAX_CONNECTIONS
    finally:
        for sock in idle:
            sock.close()


def _kept_open(port: int, control_id: str) -> socket.socket:
    """A connection that has had one order answered AA (so it is admitted) and stays open."""
    sock = hl7peer.raw(port)
    sock.sendall(hl7peer.frame(hl7peer.orm(control_id, accession=control_id)))
    assert hl7peer.read_ack(sock).code == "AA"
    return sock


def _long_order(control_id: str) -> bytes:
    return hl7peer.frame(hl7peer.orm(control_id, accession=control_id)
                         + "NTE|1||" + "x" * 8000 + "\r")


def _answer_to(sock: socket.socket, data: bytes) -> hl7peer.Ack | None:
    """`data` (a message, or its rest) sent; the ACK, or None when the box closed the
    connection instead."""
    try:
        sock.sendall(data)
        return hl7peer.read_ack_unless_closed(sock)
    except (ConnectionResetError, BrokenPipeError):
        return None


def test_a_connection_halfway_through_a_message_is_not_closed_to_admit_a_new_one(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """At the cap, a new connection closes the longest-idle one; a RIS that has begun a
    long message on its kept-open connection is not idle, however long ago its last ACK."""
    server, port = hl7_edge
    order = _long_order("HALF2")
    halfway = _kept_open(port, "HALF1")
    halfway.sendall(order[: len(order) // 2])
    others = [_kept_open(port, f"KEPT{n}") for n in range(MAX_CONNECTIONS - 1)]
    try:
        assert hl7peer.send(port, hl7peer.orm("NEW1", accession="NEW1")).code == "AA"
        ack = _answer_to(halfway, order[len(order) // 2:])
        assert ack is not None and (ack.code, ack.control_id) == ("AA", "HALF2")
        assert "HALF2" in {o["accession_number"] for o in worklist(server)}
    finally:
        halfway.close()
        for sock in others:
            sock.close()


def test_a_new_connection_is_closed_unanswered_while_every_one_has_a_message_in_hand(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """Nothing is cut to admit it: its order is not applied, and is accepted when the
    RIS resends it once a message in hand has been answered."""
    server, port = hl7_edge
    orders = [_long_order(f"HAND{n}") for n in range(MAX_CONNECTIONS)]
    halfway = [_kept_open(port, f"OPEN{n}") for n in range(MAX_CONNECTIONS)]
    try:
        for sock, order in zip(halfway, orders, strict=True):
            sock.sendall(order[: len(order) // 2])
        refused = hl7peer.raw(port)
        assert _answer_to(refused, hl7peer.frame(hl7peer.orm("LATE1", accession="LATE"))) is None
        refused.close()
        server.wait_for_log("hl7 connection refused: every connection has a message in hand")
        ack = _answer_to(halfway[0], orders[0][len(orders[0]) // 2:])
        assert ack is not None and (ack.code, ack.control_id) == ("AA", "HAND0")
        assert hl7peer.send(port, hl7peer.orm("LATE1", accession="LATE")).code == "AA"
        for n, (sock, order) in enumerate(zip(halfway, orders, strict=True)):
            if n:
                ack = _answer_to(sock, order[len(order) // 2:])
                assert ack is not None and (ack.code, ack.control_id) == ("AA", f"HAND{n}")
        assert {f"HAND{n}" for n in range(MAX_CONNECTIONS)} | {"LATE"} <= {
            o["accession_number"] for o in worklist(server)}
    finally:
        for sock in halfway:
            sock.close()


def test_connection_from_a_host_not_allowed_is_closed_unanswered(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    server, port = hl7_edge
    sock = hl7peer.raw(port, source="127.0.0.2")
    sock.sendall(hl7peer.frame(hl7peer.orm("EVIL1", accession="EVIL")))
    assert hl7peer.closed_by_peer(sock)
    sock.close()
    assert worklist(server) == []
    server.wait_for_log("host is not an hl7 peer address=127.0.0.2")


def _closed_unanswered(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.sendall(data)
        return sock.recv(4096) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True


def test_mllp_over_tls_needs_a_certificate_from_the_site_ca(
        edge_server_factory: Callable[..., EdgeServer], free_port: Callable[[], int],
        tmp_path: Path) -> None:
    server = edge_server_factory(start=False)
    port = free_port()
    hl7peer.listen(server, port, tls=True)
    server.start()
    server.cli("certs", "issue", "ris", "--out", str(tmp_path / "ris"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(server.home / "tls" / "ca.pem")
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname, anonymous.verify_mode = False, ssl.CERT_NONE
    with (socket.create_connection((hl7peer.HOST, port), timeout=hl7peer.TIMEOUT) as plain,
          anonymous.wrap_socket(plain) as tls):
        # TLS 1.3: a missing client certificate is refused just after the handshake.
        assert _closed_unanswered(tls, hl7peer.frame(hl7peer.orm("TLS0", accession="NOCERT")))
    context.load_cert_chain(tmp_path / "ris" / "ris.pem", tmp_path / "ris" / "ris.key")
    with (socket.create_connection((hl7peer.HOST, port), timeout=hl7peer.TIMEOUT) as plain,
          context.wrap_socket(plain) as tls):
        tls.sendall(hl7peer.frame(hl7peer.orm("TLS1", accession="TLS1")))
        assert hl7peer.read_ack(tls).code == "AA"  # type: ignore[arg-type]
    assert [o["accession_number"] for o in worklist(server)] == ["TLS1"]


# --- patients -------------------------------------------------------------------------

def _study_of(tmp_path: Path, server: EdgeServer, seed: int) -> list[dicomgen.GeneratedInstance]:
    study = dicomgen.make_study(tmp_path / f"study{seed}", seed=seed, series_per_study=1,
                                instances_per_series=1)
    dcmtk.storescu(server.port, [i.path for i in study]).check()
    return study


def _find(server: EdgeServer, patient_id: str) -> dcmtk.FindResult:
    return dcmtk.findscu(server.port, {"PatientID": patient_id, "PatientName": None,
                                       "PatientBirthDate": None, "StudyInstanceUID": None},
                         level="STUDY", model="patient")


def test_patient_update_changes_future_queries_and_orders(
        hl7_edge: tuple[EdgeServer, int], tmp_path: Path) -> None:
    server, port = hl7_edge
    [instance] = _study_of(tmp_path, server, seed=61)
    patient_id = instance.patient_id
    order = hl7peer.orm("P0", accession="PA1").replace("PAT1^^^HOSP", f"{patient_id}^^^")
    assert hl7peer.send(port, order).code == "AA"
    update = hl7peer.adt("P1", "A08", patient_id=patient_id, name="NEWNAME^ANNA",
                         birth="19800202", issuer="")
    assert hl7peer.send(port, update).code == "AA"
    found = _find(server, patient_id)
    assert found.values("PatientName") == ["NEWNAME^ANNA"]
    assert found.values("PatientBirthDate") == ["19800202"]
    assert show(server, "PA1")["patient_name"] == "NEWNAME^ANNA"
    assert hl7peer.send(port, hl7peer.adt("P2", "A04", patient_id="NEWCOMER")).code == "AA"


def test_a_field_sent_as_hl7_null_deletes_the_value_never_stores_the_quotes(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """HL7 2.5 2.5.3: a field of two double quotes is present and null, "delete the
    value". A registration desk's A08 that corrects the name and sends an unknown birth
    date as null was refused (AE 102 naming PID-7): the correction was lost; a null
    name was stored as the two quotes. An order's fields sent null are empty."""
    server, port = hl7_edge
    assert hl7peer.send(port, hl7peer.orm("HN0", accession="HN1")).code == "AA"
    ack = hl7peer.send(port, hl7peer.adt("HN2", "A08", name="SMITH^JANE", birth='""'))
    assert ack.code == "AA", ack
    order = show(server, "HN1")
    assert (order["patient_name"], order["birth_date"], order["sex"]) == ("SMITH^JANE", "", "F")
    assert hl7peer.send(port, hl7peer.adt("HN3", "A08", name='""', birth="", sex='""')).code == "AA"
    order = show(server, "HN1")
    assert (order["patient_name"], order["birth_date"], order["sex"]) == ("", "", "")
    nulls = hl7peer.orm("HN4", accession="HN5", name='""', modality='""')
    assert hl7peer.send(port, nulls).code == "AA"
    order = show(server, "HN5")
    assert (order["patient_name"], order["modality"]) == ("", "")


def test_an_admission_or_pre_admission_registers_the_patient_as_ihe_has_it(
        hl7_edge: tuple[EdgeServer, int]) -> None:
    """IHE Patient Registration (RAD-1), which an image manager receives, is ADT^A01
    (admit), A04 or A05 (pre-admit). A01 and A05 were AR 201 (unsupported event): every
    inpatient's admission refused, and an engine that resends an AR held the feed."""
    server, port = hl7_edge
    assert hl7peer.send(port, hl7peer.orm("AD0", accession="ADM1")).code == "AA"
    admit = hl7peer.adt("AD1", "A01", name="ADMITTED^JANE", birth="19700102")
    assert hl7peer.send(port, admit).code == "AA"
    assert (show(server, "ADM1")["patient_name"], show(server, "ADM1")["birth_date"]) == (
        "ADMITTED^JANE", "19700102")
    pre_admit = hl7peer.adt("AD2", "A05", name="PREADMITTED^JANE")
    assert hl7peer.send(port, pre_admit).code == "AA"
    assert show(server, "ADM1")["patient_name"] == "PREADMITTED^JANE"
    transfer = hl7peer.send(port, hl7peer.adt("AD3", "A02", name="TRANSFERRED^JANE"))
    assert (transfer.code, transfer.error_code) == ("AR", "201")
    assert show(server, "ADM1")["patient_name"] == "PREADMITTED^JANE"


def test_patient_merge_moves_studies_and_orders_to_the_surviving_id(
        hl7_edge: tuple[EdgeServer, int], tmp_path: Path) -> None:
    server, port = hl7_edge
    [old] = _study_of(tmp_path, server, seed=62)
    [kept] = _study_of(tmp_path, server, seed=63)
    order = hl7peer.orm("M0", accession="MA1").replace("PAT1^^^HOSP", f"{old.patient_id}^^^")
    assert hl7peer.send(port, order).code == "AA"
    merge = hl7peer.adt("M1", "A40", patient_id=kept.patient_id, name="KEPT^NAME",
                        prior=old.patient_id, issuer="")
    assert hl7peer.send(port, merge).code == "AA"
    assert _find(server, old.patient_id).responses == []
    found = _find(server, kept.patient_id)
    assert sorted(found.values("StudyInstanceUID")) == sorted([old.study_uid, kept.study_uid])
    assert set(found.values("PatientName")) == {"KEPT^NAME"}
    assert show(server, "MA1")["patient_id"] == kept.patient_id


def test_images_sent_with_a_merged_away_id_join_the_surviving_patient(
        hl7_edge: tuple[EdgeServer, int], tmp_path: Path) -> None:
    server, port = hl7_edge
    # Two studies of the prior patient, two instances each; one study of the surviving one.
    first, second = dicomgen.group_by(dicomgen.make_studies(
        tmp_path / "prior", seed=64, studies_per_patient=2, series_per_study=1,
        instances_per_series=2), "StudyInstanceUID").values()
    [kept] = _study_of(tmp_path, server, seed=65)
    prior_id = first[0].patient_id
    dcmtk.storescu(server.port, [first[0].path]).check()
    accession = str(second[0].header.AccessionNumber)
    order = hl7peer.orm("G0", accession=accession).replace("PAT1^^^HOSP", f"{prior_id}^^^")
    assert hl7peer.send(port, order).code == "AA"
    merge = hl7peer.adt("G1", "A40", patient_id=kept.patient_id, name="KEPT^NAME",
                        prior=prior_id, issuer="")
    assert hl7peer.send(port, merge).code == "AA"
    # After the merge the modality still sends the prior ID: a late instance of the merged
    # study, and a new study for the order (its accession, not its Study Instance UID).
    dcmtk.storescu(server.port, [first[1].path, *(i.path for i in second)]).check()
    patients = dcmtk.findscu(server.port, {"PatientID": prior_id}, level="PATIENT",
                             model="patient")
    assert patients.check().responses == []  # no row of the prior patient came back
    found = dcmtk.findscu(server.port, {"PatientID": kept.patient_id, "PatientName": None,
                                        "StudyInstanceUID": None,
                                        "NumberOfStudyRelatedInstances": None},
                          level="STUDY", model="patient").check()
    studies = dict(zip(found.values("StudyInstanceUID"),
                       found.values("NumberOfStudyRelatedInstances"), strict=True))
    assert studies == {first[0].study_uid: "2", second[0].study_uid: "2", kept.study_uid: "1"}
    assert set(found.values("PatientName")) == {"KEPT^NAME"}
    linked = show(server, accession)
    assert (linked["patient_id"], linked["images_received"]) == (kept.patient_id, 2)
