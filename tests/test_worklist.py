"""Modality Worklist SCP end to end: a real `pacs-edge serve` answering dcmtk `findscu -W`, and
dcmtk `wlmscpfs`, fed the same items, as the reference answer.

What is proven here: PS3.4 K.6 matching on the keys a modality uses (Scheduled
Station AE Title, Modality, Scheduled Procedure Step Start Date/Time with
ranges, Patient Name wildcards, Accession Number, Requested Procedure ID)
returns the same items as wlmscpfs for each query; return keys are filled
from the order; only SCHEDULED orders are offered unless the query asks for
a status, and an order follows its procedure step (MPPS); a query naming no start
date reaches back `[workflow] worklist_past_days`; a peer without `worklist` is
refused (0x0124).

Orders are written with the orders store (appliance/store/order_rows.py) into the
home's index before the query: the HL7 listener that normally writes them is
tested on its own.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import dcmtk
import pytest
from conftest import HOST, EdgeServer, init_home
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
)

from appliance.services import worklist as worklist_service
from appliance.services.order_states import OrderTrigger, apply_sync
from appliance.store.order_rows import (
    Demographics,
    OrderDetails,
    PatientKey,
    find_order,
    insert_order,
)

MODALITY = "MODALITY"
REFUSED_NOT_AUTHORIZED = 0x0124

# (accession, station, modality, date, time, patient name, patient id, procedure id)
ORDERS = [
    ("ACC001", "CT01", "CT", "20240105", "080000", "Doe^Jane", "P001", "RP001"),
    ("ACC002", "CT01", "CT", "20240105", "101500", "Doe^John", "P002", "RP002"),
    ("ACC003", "MR01", "MR", "20240105", "120000", "Smith^Anna", "P003", "RP003"),
    ("ACC004", "CT01", "CT", "20240106", "090000", "Brown^Bob", "P004", "RP004"),
    ("ACC005", "MR01", "MR", "20240106", "153000", "Doe^Alice", "P005", "RP005"),
    ("ACC006", "CT02", "CT", "20240107", "070000", "Green^Carl", "P006", "RP006"),
]

RETURN_KEYS = ["PatientName", "PatientID", "AccessionNumber", "RequestedProcedureID",
               "StudyInstanceUID", "ScheduledProcedureStepSequence[0].Modality",
               "ScheduledProcedureStepSequence[0].ScheduledStationAETitle",
               "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate",
               "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime"]

SPS = "ScheduledProcedureStepSequence[0]."
QUERIES: dict[str, dict[str, str]] = {
    "station": {f"{SPS}ScheduledStationAETitle": "CT01"},
    "modality": {f"{SPS}Modality": "MR"},
    "date": {f"{SPS}ScheduledProcedureStepStartDate": "20240105"},
    "date_range": {f"{SPS}ScheduledProcedureStepStartDate": "20240106-20240107"},
    "open_date_range": {f"{SPS}ScheduledProcedureStepStartDate": "-20240105"},
    "station_and_date": {f"{SPS}ScheduledStationAETitle": "CT01",
                         f"{SPS}ScheduledProcedureStepStartDate": "20240105"},
    "time_range": {f"{SPS}ScheduledProcedureStepStartTime": "0800-1200"},
    "name_wildcard": {"PatientName": "Doe^*"},
    "name_question_mark": {"PatientName": "Doe^Jan?"},
    "accession": {"AccessionNumber": "ACC003"},
    "procedure_id": {"RequestedProcedureID": "RP005"},
    "no_match": {"AccessionNumber": "NOPE"},
    "everything": {},
}


def _order_keys(study_uids: dict[str, str]) -> Iterator[tuple[str, OrderDetails, PatientKey,
                                                              Demographics, str]]:
    for acc, station, modality, date, tm, name, pid, rp in ORDERS:
        details = OrderDetails(requested_procedure_id=rp, requested_procedure_desc="Exam",
                               sps_id=f"SPS{acc[3:]}", sps_description="Step",
                               modality=modality, station_ae_title=station,
                               sps_start_date=date, sps_start_time=tm)
        yield acc, details, PatientKey(pid), Demographics(name, "19700101", "F"), \
            study_uids[acc]


OrderKeys = tuple[str, OrderDetails, PatientKey, Demographics, str]


def insert_orders(home: Path, orders: Iterable[OrderKeys]) -> None:
    """Write orders (accession, details, patient, demographics, study UID) into the
    index of a home whose server has migrated it."""
    db = sqlite3.connect(home / "index.sqlite3", timeout=30, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        for acc, details, patient, demographics, study_uid in orders:
            insert_order(db, accession_number=acc, placer_order_number=f"PL{acc}",
                         filler_order_number="", study_uid=study_uid, details=details,
                         patient=patient, demographics=demographics, at=time.time())
        db.execute("COMMIT")
    finally:
        db.close()


def schedule(home: Path, study_uids: dict[str, str]) -> None:
    """Write ORDERS into the index of a home whose server has migrated it."""
    insert_orders(home, _order_keys(study_uids))


def named_order(acc: str, name: str) -> OrderKeys:
    """A CT order at CT01 on 2024-01-05 for a patient called `name` (PID<acc's digits>)."""
    number = acc[3:]
    details = OrderDetails(requested_procedure_id=f"RP{number}", requested_procedure_desc="Exam",
                           sps_id=f"SPS{number}", sps_description="Step", modality="CT",
                           station_ae_title="CT01", sps_start_date="20240105",
                           sps_start_time="0900")
    return acc, details, PatientKey(f"PID{number}"), Demographics(name, "", ""), \
        str(generate_uid())


def worklist_files(folder: Path, study_uids: dict[str, str]) -> None:
    """The same items as wlmscpfs worklist files (<folder>/<AE>/*.wl plus its lockfile)."""
    folder.mkdir(parents=True)
    (folder / "lockfile").touch()
    for acc, details, patient, demographics, study_uid in _order_keys(study_uids):
        step = Dataset()
        step.ScheduledStationAETitle = details.station_ae_title
        step.ScheduledProcedureStepStartDate = details.sps_start_date
        step.ScheduledProcedureStepStartTime = details.sps_start_time
        step.Modality = details.modality
        step.ScheduledPerformingPhysicianName = ""
        step.ScheduledProcedureStepDescription = details.sps_description
        step.ScheduledProcedureStepID = details.sps_id
        step.ScheduledProcedureStepStatus = "SCHEDULED"
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = demographics.patient_name
        ds.PatientID = patient.patient_id
        ds.PatientBirthDate = demographics.birth_date
        ds.PatientSex = demographics.sex
        ds.AccessionNumber = acc
        ds.RequestedProcedureID = details.requested_procedure_id
        ds.RequestedProcedureDescription = details.requested_procedure_desc
        ds.StudyInstanceUID = study_uid
        ds.ScheduledProcedureStepSequence = [step]
        # A bare dataset (no File Meta), as dump2dcm -F would write it; dcmtk detects it.
        dcmwrite(folder / f"{acc}.wl", ds, implicit_vr=False, little_endian=True)


@pytest.fixture(scope="module")
def study_uids() -> dict[str, str]:
    return {order[0]: str(generate_uid()) for order in ORDERS}


@pytest.fixture
def worklist_edge(edge_server_factory: Callable[..., EdgeServer], study_uids: dict[str, str]
                  ) -> Callable[..., EdgeServer]:
    def make(*, allow: str = "store,worklist,mpps") -> EdgeServer:
        server = edge_server_factory()
        server.add_peer("modality", MODALITY, 1, allow=allow)
        schedule(server.home, study_uids)
        return server

    return make


@pytest.fixture
def reference(tmp_path: Path, study_uids: dict[str, str]) -> Iterator[int]:
    """dcmtk wlmscpfs on a free port, serving the same items under AE title EDGE."""
    worklist_files(tmp_path / "wlm" / "EDGE", study_uids)
    port = dcmtk.free_port()
    proc = subprocess.Popen([dcmtk.dcmtk_tool("wlmscpfs"), "-dfr", "-dfp",
                             str(tmp_path / "wlm"), "--single-process", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not dcmtk.echoscu(port, aet=MODALITY).ok:
        assert proc.poll() is None and time.monotonic() < deadline, "wlmscpfs did not start"
        time.sleep(0.1)
    yield port
    proc.terminate()
    proc.wait(10)


def _query(port: int, keys: dict[str, str]) -> dcmtk.FindResult:
    wanted = {**dict.fromkeys(RETURN_KEYS, ""), **keys}
    return dcmtk.findscu(port, wanted, model="worklist", aet=MODALITY)


def _accessions(result: dcmtk.FindResult) -> list[str]:
    return sorted(result.values("AccessionNumber"))


def test_worklist_answers_what_wlmscpfs_answers(
        worklist_edge: Callable[..., EdgeServer], reference: int) -> None:
    edge = worklist_edge()
    for name, keys in QUERIES.items():
        ours, theirs = _query(edge.port, keys).check(), _query(reference, keys).check()
        assert _accessions(ours) == _accessions(theirs), name
    assert _accessions(_query(edge.port, QUERIES["station_and_date"])) == ["ACC001", "ACC002"]


def test_an_order_whose_value_cannot_be_encoded_is_left_out_and_the_rest_answered(
        worklist_edge: Callable[..., EdgeServer], study_uids: dict[str, str]) -> None:
    """The HL7 listener refuses a modality or station no CS or AE can hold, but an older
    row may have one: pynetdicom would end the whole answer with a failure at that
    item, so it is left out (one warning) and every other item is answered."""
    edge = worklist_edge()
    acc, details, patient, demographics, study_uid = named_order("ACC900", "Doe^X")
    unencodable = dataclasses.replace(details, station_ae_title="\u00c9TAGE\u2462")
    insert_orders(edge.home, [(acc, unencodable, patient, demographics, study_uid)])
    answered = _query(edge.port, QUERIES["everything"]).check()
    assert _accessions(answered) == sorted(order[0] for order in ORDERS)
    assert "worklist item left out: a value cannot be encoded" in edge.log()
    assert "Traceback" not in edge.log()


# Start Date and Start Time both ranges: one period (PS3.4 C.2.2.2.5), as wlmscpfs reads them.
COMBINED_QUERIES: dict[str, tuple[dict[str, str], list[str]]] = {
    "closed_period": ({f"{SPS}ScheduledProcedureStepStartDate": "20240105-20240106",
                       f"{SPS}ScheduledProcedureStepStartTime": "1000-1300"},
                      ["ACC002", "ACC003", "ACC004"]),
    "open_period": ({f"{SPS}ScheduledProcedureStepStartDate": "20240106-",
                     f"{SPS}ScheduledProcedureStepStartTime": "1200-"}, ["ACC005", "ACC006"]),
    "period_ending": ({f"{SPS}ScheduledProcedureStepStartDate": "-20240106",
                       f"{SPS}ScheduledProcedureStepStartTime": "-0900"},
                      ["ACC001", "ACC002", "ACC003", "ACC004"]),
    # A single date with a time range is not a period: each key matches on its own.
    "day_and_time_range": ({f"{SPS}ScheduledProcedureStepStartDate": "20240105",
                            f"{SPS}ScheduledProcedureStepStartTime": "1000-1300"},
                           ["ACC002", "ACC003"]),
}


def test_start_date_and_time_ranges_match_as_one_period_as_wlmscpfs_does(
        worklist_edge: Callable[..., EdgeServer], reference: int) -> None:
    edge = worklist_edge()
    for name, (keys, expected) in COMBINED_QUERIES.items():
        ours, theirs = _query(edge.port, keys).check(), _query(reference, keys).check()
        assert _accessions(ours) == _accessions(theirs) == expected, name


def test_return_keys_are_filled_from_the_order(
        worklist_edge: Callable[..., EdgeServer], study_uids: dict[str, str]) -> None:
    edge = worklist_edge()
    result = _query(edge.port, {"AccessionNumber": "ACC003"}).check()
    assert len(result.responses) == 1
    item = result.responses[0]
    assert str(item.PatientName) == "Smith^Anna" and item.PatientID == "P003"
    assert item.StudyInstanceUID == study_uids["ACC003"]
    assert item.RequestedProcedureID == "RP003"
    step = item.ScheduledProcedureStepSequence[0]
    assert (step.Modality, step.ScheduledStationAETitle) == ("MR", "MR01")
    assert (step.ScheduledProcedureStepStartDate,
            step.ScheduledProcedureStepStartTime) == ("20240105", "120000")


def _steps(port: int, sequence: list[Dataset]) -> list[dict[str, str]]:
    """The Scheduled Procedure Step items answered (pynetdicom) to a query for ACC003
    whose Scheduled Procedure Step Sequence is `sequence`."""
    ae = AE(MODALITY)
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate(HOST, port, ae_title="EDGE")
    assert assoc.is_established
    query = Dataset()
    query.AccessionNumber = "ACC003"
    query.ScheduledProcedureStepSequence = sequence
    try:
        answers = [identifier for status, identifier in
                   assoc.send_c_find(query, ModalityWorklistInformationFind)
                   if identifier is not None and int(status.Status) in (0xFF00, 0xFF01)]
    finally:
        assoc.release()
    return [{e.keyword: str(e.value) for e in step}
            for answer in answers for step in answer.ScheduledProcedureStepSequence]


@pytest.mark.parametrize("sequence", [[], [Dataset()]], ids=["no-item", "empty-item"])
def test_an_empty_step_sequence_in_a_query_is_answered_with_the_whole_step(
        worklist_edge: Callable[..., EdgeServer], reference: int,
        sequence: list[Dataset]) -> None:
    """PS3.4 C.2.2.2.6: a sequence key without item keys asks for the whole sequence.
    The box answered one empty item: the modality saw the patient, but not its station,
    modality or time, as wlmscpfs answers them."""
    edge = worklist_edge()
    [ours], [theirs] = _steps(edge.port, sequence), _steps(reference, sequence)
    filled = {k: v for k, v in theirs.items() if v}  # wlmscpfs adds keys the box has not
    assert {k: ours.get(k) for k in filled} == filled
    assert (ours["Modality"], ours["ScheduledStationAETitle"]) == ("MR", "MR01")


def test_an_item_is_answered_in_the_requests_character_set_when_it_holds_the_names(
        worklist_edge: Callable[..., EdgeServer]) -> None:
    """A modality that asks in ISO_IR 100 gets Müller in ISO_IR 100 (it got UTF-8, which
    a console without ISO_IR 192 shows as "MÃ¼ller"); a name its set cannot hold, or a
    request in no set, is answered in ISO_IR 192 (pynetdicom as the modality)."""
    edge = worklist_edge()
    insert_orders(edge.home, [named_order("ACC801", "Müller^Jürgen"),
                              named_order("ACC802", "Иванов^Пётр")])
    ae = AE(MODALITY)
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate(HOST, edge.port, ae_title=edge.ae_title)
    assert assoc.is_established
    answers = {}
    for asked in ("ISO_IR 100", "ISO_IR 144", None):
        query = Dataset()
        if asked:
            query.SpecificCharacterSet = asked
        query.PatientName = ""
        query.AccessionNumber = "ACC80?"
        answers[asked] = {ident.AccessionNumber: (ident.get("SpecificCharacterSet"),
                                                  str(ident.PatientName))
                          for status, ident in assoc.send_c_find(
                              query, ModalityWorklistInformationFind)
                          if status.Status == 0xFF00}
    assoc.release()
    assert answers == {
        "ISO_IR 100": {"ACC801": ("ISO_IR 100", "Müller^Jürgen"),
                       "ACC802": ("ISO_IR 192", "Иванов^Пётр")},
        "ISO_IR 144": {"ACC801": ("ISO_IR 192", "Müller^Jürgen"),
                       "ACC802": ("ISO_IR 144", "Иванов^Пётр")},
        None: {"ACC801": ("ISO_IR 192", "Müller^Jürgen"),
               "ACC802": ("ISO_IR 192", "Иванов^Пётр")}}


def test_a_non_ascii_procedure_code_sets_the_items_character_set(
        worklist_edge: Callable[..., EdgeServer]) -> None:
    """Requested Procedure Code Value and Coding Scheme count when the answer's set is
    chosen: a local code "RÖ1" beside an ASCII meaning went out as a Latin-1 byte with
    no Specific Character Set, and beside a Cyrillic meaning asked in ISO_IR 144 as
    "R?1" (pynetdicom as the modality)."""
    edge = worklist_edge()
    coded = {"ACC811": "Chest X-ray", "ACC812": "Рентген"}
    orders = []
    for acc, meaning in coded.items():
        acc, details, patient, demographics, study_uid = named_order(acc, "Doe^Jane")
        orders.append((acc, dataclasses.replace(
            details, requested_procedure_desc=meaning, procedure_code_value="RÖ1",
            procedure_code_scheme="LOCAL", procedure_code_meaning=meaning),
            patient, demographics, study_uid))
    insert_orders(edge.home, orders)
    ae = AE(MODALITY)
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate(HOST, edge.port, ae_title=edge.ae_title)
    assert assoc.is_established
    answers = {}
    for asked in ("ISO_IR 144", None):
        query = Dataset()
        if asked:
            query.SpecificCharacterSet = asked
        query.AccessionNumber = "ACC81?"
        query.RequestedProcedureCodeSequence = [Dataset()]
        for ident in (ident for status, ident in assoc.send_c_find(
                query, ModalityWorklistInformationFind) if status.Status == 0xFF00):
            code = ident.RequestedProcedureCodeSequence[0]
            answers[asked, ident.AccessionNumber] = (
                ident.get("SpecificCharacterSet"), code.CodeValue, code.CodeMeaning)
    assoc.release()
    assert answers == {
        ("ISO_IR 144", "ACC811"): ("ISO_IR 192", "RÖ1", "Chest X-ray"),
        ("ISO_IR 144", "ACC812"): ("ISO_IR 192", "RÖ1", "Рентген"),
        (None, "ACC811"): ("ISO_IR 192", "RÖ1", "Chest X-ray"),
        (None, "ACC812"): ("ISO_IR 192", "RÖ1", "Рентген")}


def test_patient_name_matching_ignores_case(worklist_edge: Callable[..., EdgeServer]) -> None:
    edge = worklist_edge()
    assert _accessions(_query(edge.port, {"PatientName": "doe^*"})) == [
        "ACC001", "ACC002", "ACC005"]


def test_patient_names_match_without_trailing_empty_components_and_groups(
        worklist_edge: Callable[..., EdgeServer]) -> None:
    """PS3.5 6.2.1: 'DOE^JOHN^^^' and 'Doe^John==' are the name 'Doe^John', whether the
    RIS padded the order's name or the modality pads its query."""
    edge = worklist_edge()
    insert_orders(edge.home, [named_order("ACC901", "PADDED^PAT^^^"),
                              named_order("ACC902", "Grouped^Pat==")])
    for asked, expected in (("Padded^Pat", ["ACC901"]), ("grouped^pat", ["ACC902"]),
                            ("Padded^Pat^*", ["ACC901"]), ("DOE^JOHN^^^", ["ACC002"]),
                            ("Doe^John==", ["ACC002"]), ("Doe^John^=^", ["ACC002"])):
        assert _accessions(_query(edge.port, {"PatientName": asked}).check()) == expected, asked


def in_progress(study_uid: str, accession: str, step_id: str, start_time: str) -> Dataset:
    """An MPPS N-CREATE data set: a CT step at CT01, IN PROGRESS, for one order."""
    item = Dataset()
    item.StudyInstanceUID = study_uid
    item.AccessionNumber = accession
    attrs = Dataset()
    attrs.ScheduledStepAttributesSequence = [item]
    attrs.PerformedProcedureStepID = step_id
    attrs.PerformedStationAETitle = "CT01"
    attrs.PerformedProcedureStepStartDate = "20240105"
    attrs.PerformedProcedureStepStartTime = start_time
    attrs.PerformedProcedureStepStatus = "IN PROGRESS"
    attrs.Modality = "CT"
    return attrs


def complete(assoc: Any, sop_uid: str, end_time: str) -> None:
    """The step's N-SET COMPLETED, ending on 2024-01-05 at `end_time`."""
    done = Dataset()
    done.PerformedProcedureStepStatus = "COMPLETED"
    done.PerformedProcedureStepEndDate = "20240105"
    done.PerformedProcedureStepEndTime = end_time
    status, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, sop_uid)
    assert status.Status == 0


def test_started_order_leaves_the_worklist_and_follows_its_step(
        worklist_edge: Callable[..., EdgeServer], study_uids: dict[str, str]) -> None:
    edge = worklist_edge()
    ae = AE(MODALITY)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate(HOST, edge.port, ae_title=edge.ae_title)
    assert assoc.is_established
    try:
        attrs = in_progress(study_uids["ACC001"], "ACC001", "PPS1", "080500")
        attrs.PatientID = "P001"
        sop_uid = str(generate_uid())
        status, _ = assoc.send_n_create(attrs, ModalityPerformedProcedureStep, sop_uid)
        assert status.Status == 0
        station = {f"{SPS}ScheduledStationAETitle": "CT01"}
        assert _accessions(_query(edge.port, station)) == ["ACC002", "ACC004"]
        started = {**station, f"{SPS}ScheduledProcedureStepStatus": "STARTED"}
        assert _accessions(_query(edge.port, started)) == ["ACC001"]
        complete(assoc, sop_uid, "083000")
    finally:
        assoc.release()
    completed = {f"{SPS}ScheduledProcedureStepStatus": "COMPLETED"}
    assert _accessions(_query(edge.port, completed)) == ["ACC001"]


def test_an_order_that_arrives_after_its_steps_start_is_completed_by_the_step(
        worklist_edge: Callable[..., EdgeServer]) -> None:
    """The modality started the step (N-CREATE naming the accession typed in) before the
    RIS's order arrived: the step's COMPLETED found the order SCHEDULED, whose only
    move was a start, and left it on every station's worklist for ever."""
    edge = worklist_edge()
    late = named_order("ACC950", "Late^Order")
    ae = AE(MODALITY)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate(HOST, edge.port, ae_title=edge.ae_title)
    assert assoc.is_established
    try:
        sop_uid = str(generate_uid())
        status, _ = assoc.send_n_create(in_progress(late[4], "ACC950", "PPS9", "090000"),
                                        ModalityPerformedProcedureStep, sop_uid)
        assert status.Status == 0
        insert_orders(edge.home, [late])  # the order, late
        complete(assoc, sop_uid, "093000")
    finally:
        assoc.release()
    assert "ACC950" not in _accessions(_query(edge.port, {}))
    completed = {f"{SPS}ScheduledProcedureStepStatus": "COMPLETED"}
    assert _accessions(_query(edge.port, completed)) == ["ACC950"]


def test_worklist_answers_on_the_tls_port(edge_server_factory: Callable[..., EdgeServer],
                                          study_uids: dict[str, str], tmp_path: Path) -> None:
    edge = edge_server_factory(start=False)
    tls_port = dcmtk.free_port()
    edge.configure(dicom={"tls_port": tls_port})
    edge.start()
    edge.add_peer("modality", MODALITY, 1, allow="worklist")
    schedule(edge.home, study_uids)
    certs = tmp_path / "modality"
    edge.cli("certs", "issue", "modality", "--out", str(certs))
    tls = ["+tls", str(certs / "modality.key"), str(certs / "modality.pem"),
           "+cf", str(certs / "ca.pem"), "--profile-bcp195-nd"]
    result = dcmtk.findscu(tls_port, {**dict.fromkeys(RETURN_KEYS, ""),
                                      f"{SPS}Modality": "MR"},
                           model="worklist", aet=MODALITY, args=tls).check()
    assert _accessions(result) == ["ACC003", "ACC005"]


def test_step_of_a_cancelled_order_is_recorded_and_the_order_stays_cancelled(
        worklist_edge: Callable[..., EdgeServer], study_uids: dict[str, str]) -> None:
    edge = worklist_edge()
    db = sqlite3.connect(edge.home / "index.sqlite3", timeout=30, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        order = find_order(db, "ACC002")
        assert order is not None
        apply_sync(db, order, OrderTrigger.CANCEL, source="test")
        db.execute("COMMIT")
    finally:
        db.close()
    ae = AE(MODALITY)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate(HOST, edge.port, ae_title=edge.ae_title)
    assert assoc.is_established
    try:
        attrs = in_progress(study_uids["ACC002"], "ACC002", "PPS2", "101600")
        status, _ = assoc.send_n_create(attrs, ModalityPerformedProcedureStep,
                                        str(generate_uid()))
        assert status.Status == 0
    finally:
        assoc.release()
    discontinued = {f"{SPS}ScheduledProcedureStepStatus": "DISCONTINUED"}
    assert _accessions(_query(edge.port, discontinued)) == ["ACC002"]
    assert "procedure step leaves its order unchanged" in edge.log()


def test_worklist_refused_to_a_peer_without_worklist_permission(
        worklist_edge: Callable[..., EdgeServer]) -> None:
    edge = worklist_edge(allow="store")
    result = dcmtk.findscu(edge.port, dict.fromkeys(RETURN_KEYS, ""), model="worklist",
                           aet=MODALITY, args=("-d",))
    assert result.responses == []
    assert REFUSED_NOT_AUTHORIZED in result.dimse_statuses()


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["*"], ["SCHEDULED"]),
        (["**"], ["SCHEDULED"]),
        ([""], ["SCHEDULED"]),
        (["SCHED*"], ["SCHEDULED"]),
        (["?TARTED"], ["IN PROGRESS"]),
        (["*ED"], ["SCHEDULED", "IN PROGRESS", "COMPLETED", "DISCONTINUED"]),
        (["COMPLETED", "DISCONTINUED"], ["COMPLETED", "DISCONTINUED"]),
        (["scheduled"], []),
        (["NOPE"], []),
    ],
)
def test_status_key_of_only_star_is_universal_and_wildcards_match(
        values: list[str], expected: list[str]) -> None:
    """`*` alone is universal matching (PS3.4 C.2.2.2.4): what no value selects, not
    nothing; other wildcards match the SPS Status names, case-sensitively."""
    assert worklist_service._statuses(values) == expected


def _dated_order(acc: str, days_ago: int | None) -> OrderKeys:
    """A CT order at CT01 scheduled `days_ago` days before today at 09:00 (None: no date)."""
    day = "" if days_ago is None else (
        datetime.date.today() - datetime.timedelta(days=days_ago)).strftime("%Y%m%d")
    acc_, details, patient, demographics, study_uid = named_order(acc, "Late^Lee")
    return acc_, dataclasses.replace(details, sps_start_date=day,
                                     sps_start_time="0900" if day else ""), \
        patient, demographics, study_uid


def test_a_query_naming_no_date_leaves_out_steps_older_than_worklist_past_days(
        edge_server_factory: Callable[..., EdgeServer], tmp_path: Path) -> None:
    """An order the RIS never cancelled (a no-show) stayed SCHEDULED and on every
    modality's list for good, until a broad query met MAX_ITEMS and was refused. On
    the default (30 days), a query naming no start date gets the steps from 30 days ago
    on, and those without a date; one naming a date or range gets what it names."""
    home = init_home(tmp_path / "edge-home", worklist_past_days=None)
    edge = edge_server_factory(home)
    edge.add_peer("modality", MODALITY, 1, allow="worklist")
    insert_orders(edge.home, [_dated_order("ACC101", 0), _dated_order("ACC102", 29),
                              _dated_order("ACC103", 31), _dated_order("ACC104", 400),
                              _dated_order("ACC105", None)])
    assert _accessions(_query(edge.port, {})) == ["ACC101", "ACC102", "ACC105"]
    status = {f"{SPS}ScheduledProcedureStepStatus": "SCHEDULED"}
    assert _accessions(_query(edge.port, status)) == ["ACC101", "ACC102", "ACC105"]
    old = (datetime.date.today() - datetime.timedelta(days=400)).strftime("%Y%m%d")
    assert _accessions(_query(edge.port, {f"{SPS}ScheduledProcedureStepStartDate":
                                          f"{old}-"})) == ["ACC101", "ACC102", "ACC103",
                                                           "ACC104"]
    assert _accessions(_query(edge.port, {"AccessionNumber": "ACC104"})) == []
    listed = json.loads(edge.cli("worklist", "list", "--json").stdout)
    assert sorted(row["accession_number"] for row in listed) == [
        "ACC101", "ACC102", "ACC103", "ACC104", "ACC105"]


def test_a_status_key_of_many_stars_is_answered_and_the_box_keeps_serving(
        worklist_edge: Callable[..., EdgeServer]) -> None:
    """`****...SCHEDULED` in SPS Status: each `*` became a `.*` of a regular expression,
    and 40 of them took hours to try against a status name, on the event loop: no
    answer to this query, nor to any other the box was asked meanwhile. A run of `*`
    is one `*`."""
    edge = worklist_edge()
    many = {f"{SPS}ScheduledProcedureStepStatus": "*" * 40 + "SCHEDULED"}
    # findscu's DIMSE timeout (-td) ends the wait for an answer that does not come.
    found = dcmtk.findscu(edge.port, {**dict.fromkeys(RETURN_KEYS, ""), **many},
                          model="worklist", aet=MODALITY, args=("-td", "30"), timeout=90)
    assert _accessions(found.check()) == sorted(order[0] for order in ORDERS)
    assert _accessions(_query(edge.port, {}).check()) == sorted(order[0] for order in ORDERS)
    assert "Traceback" not in edge.log()
