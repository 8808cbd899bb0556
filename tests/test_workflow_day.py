"""A whole day at an imaging center, in one real `pacs-edge serve`: order to commitment.

The RIS sends 20 orders over one MLLP connection (python-hl7's client) for four
stations and two days; the modalities ask the Modality Worklist (dcmtk
`findscu -W`) by their station AE title and by date; they report their exams
with MPPS (pynetdicom: N-CREATE IN PROGRESS, N-SET COMPLETED or DISCONTINUED,
one left running), send the images with dcmtk `storescu` carrying the Study
Instance UID, accession and patient the worklist gave them, and ask for
Storage Commitment (pynetdicom; the N-EVENT-REPORT lists the images sent as
committed and an instance never sent as failed, 0x0112). Meanwhile the RIS
cancels an order (CA: it leaves the worklist) and renames a patient (A08: the
worklist and C-FIND answer the new name). At the end `pacs-edge worklist list
--json` and `worklist show` give every order's status and images received.

What each piece does alone is proven in test_hl7_orders.py, test_worklist.py,
test_mpps.py and test_storage_commitment.py; this proves they agree with each
other on one box, through the keys a modality copies from the worklist.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dcmtk
import dicomgen
import hl7peer
import pydicom
import pytest
from conftest import HOST, EdgeServer, init_home
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    StorageCommitmentPushModel,
)
from reportinbox import ReportInbox

DAYS = ("20240311", "20240312")
STATIONS = (("CT1", "CT"), ("MR1", "MR"), ("CT2", "CT"), ("US1", "US"))
PATIENTS = 15  # orders n and n + 15 are for the same patient
WELL_KNOWN_COMMITMENT = "1.2.840.10008.1.20.1.1"
SUCCESS, NO_SUCH_OBJECT, FAILURES_EXIST = 0x0000, 0x0112, 2
REPORT_TIMEOUT = 60.0
SPS = "ScheduledProcedureStepSequence[0]."
RETURN_KEYS = ["PatientName", "PatientID", "IssuerOfPatientID", "AccessionNumber",
               "RequestedProcedureID", "StudyInstanceUID", f"{SPS}Modality",
               f"{SPS}ScheduledStationAETitle", f"{SPS}ScheduledProcedureStepStartDate",
               f"{SPS}ScheduledProcedureStepStartTime", f"{SPS}ScheduledProcedureStepID"]


@dataclass(frozen=True)
class Order:
    accession: str
    patient_id: str
    name: str
    station: str
    modality: str
    day: str
    time: str  # HHMM


def _orders() -> list[Order]:
    """20 orders: stations in turn, ten a day from 08:00 to 17:00, 15 patients."""
    orders = []
    for n in range(20):
        station, modality = STATIONS[n % len(STATIONS)]
        orders.append(Order(f"DAY{n:02d}", f"DP{n % PATIENTS:02d}",
                            f"PATIENT{n % PATIENTS:02d}^DAY", station, modality,
                            DAYS[n // 10], f"{8 + n % 10:02d}00"))
    return orders


ORDERS = {order.accession: order for order in _orders()}


def _accessions(*, station: str = "", day: str = "", drop: tuple[str, ...] = ()) -> list[str]:
    return sorted(o.accession for o in ORDERS.values()
                  if (not station or o.station == station) and (not day or o.day == day)
                  and o.accession not in drop)


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EdgeServer, int]]:
    """One server for the day: HL7 on, the RIS and two modalities (CT1, MR1) allowed."""
    home = init_home(tmp_path_factory.mktemp("day") / "edge-home")
    server = EdgeServer(home)
    hl7_port = dcmtk.free_port()
    server.configure(hl7={"port": hl7_port})
    server.cli("peers", "add", "ris", "--ae-title", "RIS", "--host", HOST, "--allow", "hl7")
    for station in ("CT1", "MR1"):
        server.add_peer(station.lower(), station, 1, allow="store,worklist,mpps,commit")
    server.start()
    yield server, hl7_port
    server.stop()
    assert not server.unclean_stops, server.unclean_stops


def _worklist(edge: EdgeServer, keys: dict[str, str], *, aet: str = "CT1"
              ) -> dcmtk.FindResult:
    return dcmtk.findscu(edge.port, {**dict.fromkeys(RETURN_KEYS, ""), **keys},
                         model="worklist", aet=aet).check()


def _listed(edge: EdgeServer, keys: dict[str, str]) -> list[str]:
    return sorted(_worklist(edge, keys).values("AccessionNumber"))


def _item(edge: EdgeServer, accession: str, aet: str) -> Dataset:
    """The worklist item of one order, as the modality at `aet` gets it."""
    [item] = _worklist(edge, {"AccessionNumber": accession}, aet=aet).responses
    return item


class Modality:
    """One modality's association for an exam: MPPS and Storage Commitment (pynetdicom),
    taking the commitment report on the same association."""

    def __init__(self, edge: EdgeServer, ae_title: str) -> None:
        ae = AE(ae_title)
        ae.add_requested_context(ModalityPerformedProcedureStep)
        ae.add_requested_context(StorageCommitmentPushModel)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        self.ae_title = ae_title
        self.reports = ReportInbox(
            lambda event: (int(event.request.EventTypeID), event.event_information))
        self.assoc: Association = ae.associate(
            HOST, edge.port, ae_title=edge.ae_title,
            evt_handlers=self.reports.handlers)
        assert self.assoc.is_established

    def start(self, item: Dataset, step_id: str) -> str:
        """N-CREATE IN PROGRESS for the worklist item, its keys copied; the step's UID."""
        scheduled = Dataset()
        step = item.ScheduledProcedureStepSequence[0]
        scheduled.StudyInstanceUID = item.StudyInstanceUID
        scheduled.AccessionNumber = item.AccessionNumber
        scheduled.RequestedProcedureID = item.RequestedProcedureID
        scheduled.ScheduledProcedureStepID = step.ScheduledProcedureStepID
        attrs = Dataset()
        attrs.ScheduledStepAttributesSequence = [scheduled]
        attrs.PatientName = item.PatientName
        attrs.PatientID = item.PatientID
        attrs.PerformedProcedureStepID = step_id
        attrs.PerformedStationAETitle = self.ae_title
        attrs.PerformedProcedureStepStartDate = step.ScheduledProcedureStepStartDate
        attrs.PerformedProcedureStepStartTime = step.ScheduledProcedureStepStartTime
        attrs.PerformedProcedureStepStatus = "IN PROGRESS"
        attrs.Modality = step.Modality
        sop_uid = str(generate_uid())
        status, _ = self.assoc.send_n_create(attrs, ModalityPerformedProcedureStep, sop_uid)
        assert status.Status == SUCCESS
        return sop_uid

    def end(self, sop_uid: str, status: str) -> None:
        change = Dataset()
        change.PerformedProcedureStepStatus = status
        change.PerformedProcedureStepEndDate = DAYS[0]
        change.PerformedProcedureStepEndTime = "235900"
        result, _ = self.assoc.send_n_set(change, ModalityPerformedProcedureStep, sop_uid)
        assert result.Status == SUCCESS

    def commit(self, items: list[tuple[str, str]]) -> tuple[int, set[str], dict[str, int]]:
        """N-ACTION for (SOP class, SOP instance) items; the report: event type,
        committed UIDs, failed UIDs with their reasons."""
        info = Dataset()
        info.TransactionUID = str(generate_uid())
        info.ReferencedSOPSequence = [_reference(c, u) for c, u in items]
        status, _ = self.assoc.send_n_action(info, 1, StorageCommitmentPushModel,
                                             WELL_KNOWN_COMMITMENT)
        assert status.Status == SUCCESS
        try:
            event_type, report = self.reports.get(timeout=REPORT_TIMEOUT)
        except queue.Empty:
            pytest.fail(f"no commitment report within {REPORT_TIMEOUT}s", pytrace=False)
        assert str(report.TransactionUID) == str(info.TransactionUID)
        committed = {str(i.ReferencedSOPInstanceUID)
                     for i in report.get("ReferencedSOPSequence", [])}
        failed = {str(i.ReferencedSOPInstanceUID): int(i.FailureReason)
                  for i in report.get("FailedSOPSequence", [])}
        return event_type, committed, failed

    def release(self) -> None:
        self.assoc.release()


def _reference(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_uid
    return item


def _images(folder: Path, item: Dataset, *, seed: int, count: int
            ) -> list[dicomgen.GeneratedInstance]:
    """`count` images of the exam, with the study, accession and patient of the item."""
    made = dicomgen.make_study(folder, seed=seed, series_per_study=1,
                               instances_per_series=count, size=16,
                               modalities=(str(item.ScheduledProcedureStepSequence[0].Modality),))
    out = []
    for instance in made:
        ds = pydicom.dcmread(instance.path)
        for keyword in ("StudyInstanceUID", "AccessionNumber", "PatientID",
                        "IssuerOfPatientID", "PatientName"):
            setattr(ds, keyword, item[keyword].value)
        ds.save_as(instance.path)
        out.append(dicomgen.GeneratedInstance(instance.path, dicomgen.read_header(instance.path)))
    return out


def _store(edge: EdgeServer, aet: str, images: list[dicomgen.GeneratedInstance]) -> None:
    dcmtk.storescu(edge.port, [i.path for i in images], aet=aet).check()


def _statuses(edge: EdgeServer) -> dict[str, tuple[str, int]]:
    listed: list[dict[str, Any]] = json.loads(edge.cli("worklist", "list", "--json").stdout)
    return {o["accession_number"]: (o["status"], o["images_received"]) for o in listed}


def _history(edge: EdgeServer, accession: str) -> list[tuple[str, str, str]]:
    shown = json.loads(edge.cli("worklist", "show", accession, "--json").stdout)
    return [(h["to_state"], h["trigger"], h["source"]) for h in shown["history"]]


def test_a_day_from_orders_to_commitment(day: tuple[EdgeServer, int], tmp_path: Path) -> None:
    edge, hl7_port = day

    # 07:00 The RIS sends the day's orders, one connection, each acknowledged AA.
    acks = hl7peer.send_many(hl7_port, [
        hl7peer.orm(f"ORD{n:02d}", accession=o.accession, patient_id=o.patient_id,
                    name=o.name, start=o.day + o.time, modality=o.modality, station=o.station)
        for n, o in enumerate(ORDERS.values())])
    assert [(a.code, a.control_id) for a in acks] == [("AA", f"ORD{n:02d}") for n in range(20)]

    # Each modality asks for its station, a day, or both; a date range with a time range
    # is one period (the night between the two days).
    assert _listed(edge, {f"{SPS}ScheduledStationAETitle": "CT1"}) == _accessions(station="CT1")
    assert _listed(edge, {f"{SPS}ScheduledProcedureStepStartDate": DAYS[1]}) == _accessions(
        day=DAYS[1])
    assert _listed(edge, {f"{SPS}ScheduledStationAETitle": "MR1",
                          f"{SPS}ScheduledProcedureStepStartDate": DAYS[0]}) == [
        "DAY01", "DAY05", "DAY09"]
    assert _listed(edge, {f"{SPS}ScheduledProcedureStepStartDate": "-".join(DAYS),
                          f"{SPS}ScheduledProcedureStepStartTime": "1600-1000"}) == [
        "DAY08", "DAY09", "DAY10", "DAY11", "DAY12"]
    item = _item(edge, "DAY16", "CT1")
    assert (str(item.PatientName), item.PatientID, item.IssuerOfPatientID) == (
        "PATIENT01^DAY", "DP01", "HOSP")

    # The RIS cancels an ultrasound: it leaves US1's worklist.
    us1 = {f"{SPS}ScheduledStationAETitle": "US1"}
    assert "DAY03" in _listed(edge, us1)
    cancel = hl7peer.orm("CAN03", "CA", accession="DAY03",
                         patient_id=ORDERS["DAY03"].patient_id)
    assert hl7peer.send(hl7_port, cancel).code == "AA"
    assert _listed(edge, us1) == _accessions(station="US1", drop=("DAY03",))

    # The exams: copied from the worklist, reported with MPPS, images stored, committed.
    ct1, mr1 = Modality(edge, "CT1"), Modality(edge, "MR1")
    try:
        exams = {}
        for accession, modality in (("DAY00", ct1), ("DAY01", mr1), ("DAY04", ct1),
                                    ("DAY05", mr1)):
            item = _item(edge, accession, modality.ae_title)
            exams[accession] = (item, modality.start(item, f"PPS{accession}"))
        # Started steps leave the worklist of their station.
        assert _listed(edge, {f"{SPS}ScheduledStationAETitle": "CT1"}) == _accessions(
            station="CT1", drop=("DAY00", "DAY04"))
        images = {accession: _images(tmp_path / accession, exams[accession][0], seed=700 + n,
                                     count=count)
                  for n, (accession, count) in enumerate((("DAY00", 2), ("DAY01", 2),
                                                          ("DAY04", 1)))}
        _store(edge, "CT1", images["DAY00"] + images["DAY04"])
        _store(edge, "MR1", images["DAY01"])
        ct1.end(exams["DAY00"][1], "COMPLETED")
        mr1.end(exams["DAY01"][1], "COMPLETED")
        ct1.end(exams["DAY04"][1], "DISCONTINUED")  # DAY05 stays IN PROGRESS

        never_sent = str(generate_uid())
        sent = [(i.sop_class_uid, i.sop_instance_uid) for i in images["DAY00"]]
        event_type, committed, failed = ct1.commit([*sent, (sent[0][0], never_sent)])
        assert event_type == FAILURES_EXIST
        assert committed == {uid for _, uid in sent}
        assert failed == {never_sent: NO_SUCH_OBJECT}
    finally:
        ct1.release()
        mr1.release()

    # The RIS renames the patient of DAY01 (and DAY16): worklist and C-FIND answer it.
    rename = hl7peer.adt("UPD01", "A08", patient_id="DP01", name="RENAMED^PATIENT",
                         birth="19750505", sex="F")
    assert hl7peer.send(hl7_port, rename).code == "AA"
    assert str(_item(edge, "DAY16", "CT1").PatientName) == "RENAMED^PATIENT"
    found = dcmtk.findscu(edge.port, {"PatientID": "DP01", "PatientName": None,
                                      "StudyInstanceUID": None},
                          level="STUDY", model="patient").check()
    assert found.values("StudyInstanceUID") == [str(exams["DAY01"][0].StudyInstanceUID)]
    assert found.values("PatientName") == ["RENAMED^PATIENT"]

    # 20:00 Every order's status and images, as the operator sees them.
    expected = {accession: ("SCHEDULED", 0) for accession in ORDERS}
    expected.update({"DAY00": ("COMPLETED", 2), "DAY01": ("COMPLETED", 2),
                     "DAY03": ("DISCONTINUED", 0), "DAY04": ("DISCONTINUED", 1),
                     "DAY05": ("IN PROGRESS", 0)})
    assert _statuses(edge) == expected
    assert _history(edge, "DAY00") == [("IN PROGRESS", "start", "mpps"),
                                       ("COMPLETED", "complete", "mpps")]
    assert _history(edge, "DAY03") == [("DISCONTINUED", "cancel", "hl7")]
    assert _history(edge, "DAY04") == [("IN PROGRESS", "start", "mpps"),
                                       ("DISCONTINUED", "discontinue", "mpps")]
    shown = edge.cli("worklist", "show", "DAY01").stdout
    assert "COMPLETED" in shown and "RENAMED^PATIENT" in shown
