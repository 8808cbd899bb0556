"""MPPS SCP end to end: a real `pacs-edge serve`, pynetdicom as the modality (N-CREATE, N-SET,
N-GET; dcmtk has no MPPS SCU).

What is proven here: a step goes IN PROGRESS -> COMPLETED or DISCONTINUED and is a
committed row with the keys that link it to its order; PS3.4 F.7 state rules:
no change after a final state (0x0110 with an Error Comment), a duplicate
N-CREATE is 0x0111, N-CREATE must be IN PROGRESS, a final state needs its end
date/time, an N-SET of an unknown step is 0x0112, an N-SET changing an attribute
Table F.7.2-1 does not allow in N-SET leaves it (Warning 0x0107) and applies the rest; N-GET
(MPPS Retrieve, F.8) answers the requested attributes of the step as it stands;
a peer without `mpps` is refused (0x0124); every step is audited as a
Procedure Record.
"""

from __future__ import annotations

import json
import sqlite3
import warnings
from collections.abc import Callable, Iterator
from io import BytesIO
from typing import Any

import pytest
from conftest import HOST, EdgeServer
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    ModalityPerformedProcedureStepRetrieve,
)

from appliance.store.mpps_rows import (
    TRANSITIONS,
    MppsState,
    MppsTransitionError,
    MppsTrigger,
    next_state,
)

MODALITY = "MODALITY"
SUCCESS, REFUSED_NOT_AUTHORIZED, PROCESSING_FAILURE = 0x0000, 0x0124, 0x0110
DUPLICATE, NO_SUCH_INSTANCE = 0x0111, 0x0112
ATTRIBUTE_LIST_ERROR, INVALID_ATTRIBUTE_VALUE = 0x0107, 0x0106
MISSING_ATTRIBUTE, MISSING_VALUE = 0x0120, 0x0121
UNRECOGNIZED_OPERATION = 0x0211
NO_LONGER_UPDATABLE = 0xA710  # Error ID of 0x0110 for a step in a final state


class MppsScu:
    """A modality's MPPS SCU on one association (pynetdicom)."""

    def __init__(self, edge: EdgeServer, ae_title: str = MODALITY) -> None:
        ae = AE(ae_title)
        ae.add_requested_context(ModalityPerformedProcedureStep)
        ae.add_requested_context(ModalityPerformedProcedureStepRetrieve)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        self.assoc = ae.associate(HOST, edge.port, ae_title=edge.ae_title)
        assert self.assoc.is_established

    def create(self, sop_uid: str, attrs: Dataset) -> Dataset:
        status, _ = self.assoc.send_n_create(attrs, ModalityPerformedProcedureStep, sop_uid)
        return status

    def set(self, sop_uid: str, modification: Dataset) -> Dataset:
        status, _ = self.assoc.send_n_set(modification, ModalityPerformedProcedureStep, sop_uid)
        return status

    def get(self, sop_uid: str, keywords: list[str], *,
            sop_class: Any = ModalityPerformedProcedureStepRetrieve
            ) -> tuple[Dataset, Dataset | None]:
        tags = [Tag(keyword) for keyword in keywords]
        status, attributes = self.assoc.send_n_get(tags, sop_class, sop_uid)
        return status, attributes

    def release(self) -> None:
        self.assoc.release()


def in_progress(study_uid: str = "", accession: str = "ACC100") -> Dataset:
    """An N-CREATE attribute list as a modality sends it for a scheduled step."""
    item = Dataset()
    item.StudyInstanceUID = study_uid or str(generate_uid())
    item.AccessionNumber = accession
    item.RequestedProcedureID = "RP100"
    item.ScheduledProcedureStepID = "SPS100"
    ds = Dataset()
    ds.ScheduledStepAttributesSequence = [item]
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID100"
    ds.PerformedProcedureStepID = "PPS100"
    ds.PerformedStationAETitle = MODALITY
    ds.PerformedProcedureStepStartDate = "20240105"
    ds.PerformedProcedureStepStartTime = "101500"
    ds.PerformedProcedureStepEndDate = ""
    ds.PerformedProcedureStepEndTime = ""
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.Modality = "CT"
    ds.PerformedSeriesSequence = []
    return ds


def final(status: str = "COMPLETED", *, with_end: bool = True) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    if with_end:
        ds.PerformedProcedureStepEndDate = "20240105"
        ds.PerformedProcedureStepEndTime = "103000"
    return ds


@pytest.fixture
def mpps_edge(edge_server_factory: Callable[..., EdgeServer]) -> Callable[..., EdgeServer]:
    def make(*, allow: str = "store,mpps") -> EdgeServer:
        server = edge_server_factory(start=False)
        server.add_peer("modality", MODALITY, 1, allow=allow)
        return server.start()

    return make


@pytest.fixture
def scu(mpps_edge: Callable[..., EdgeServer]) -> Iterator[tuple[EdgeServer, MppsScu]]:
    edge = mpps_edge()
    client = MppsScu(edge)
    yield edge, client
    client.release()


def _step(edge: EdgeServer, sop_uid: str) -> dict[str, Any] | None:
    db = sqlite3.connect(f"file:{edge.home / 'index.sqlite3'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        row = db.execute("SELECT * FROM mpps_steps WHERE sop_uid = ?", (sop_uid,)).fetchone()
        if row is None:
            return None
        refs = db.execute("SELECT * FROM mpps_step_refs WHERE step_fk = ?", (row["id"],))
        return {**dict(row), "refs": [dict(r) for r in refs]}
    finally:
        db.close()


def _audit_events(edge: EdgeServer) -> list[dict[str, Any]]:
    path = edge.home / "audit" / "audit.log"
    return [json.loads(line)["record"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("status", ["COMPLETED", "DISCONTINUED"])
def test_step_goes_in_progress_then_to_its_final_state(
        scu: tuple[EdgeServer, MppsScu], status: str) -> None:
    edge, client = scu
    sop_uid, study_uid = str(generate_uid()), str(generate_uid())
    assert client.create(sop_uid, in_progress(study_uid)).Status == SUCCESS
    step = _step(edge, sop_uid)
    assert step is not None and step["state"] == "in_progress"
    assert step["refs"][0]["study_uid"] == study_uid
    assert step["refs"][0]["accession_number"] == "ACC100"
    update = Dataset()
    update.PerformedProcedureStepDescription = "CT head"
    assert client.set(sop_uid, update).Status == SUCCESS
    assert client.set(sop_uid, final(status)).Status == SUCCESS
    step = _step(edge, sop_uid)
    assert step is not None and step["state"] == status.lower()
    assert (step["end_date"], step["end_time"]) == ("20240105", "103000")
    client.release()
    records = [r for r in _audit_events(edge)
               if r["EventIdentification"]["EventID"]["csd-code"] == "110109"]
    assert [r["EventIdentification"]["EventActionCode"] for r in records] == ["C", "U", "U"]


@pytest.mark.parametrize("status", ["COMPLETED", "DISCONTINUED"])
def test_no_change_after_a_final_state(scu: tuple[EdgeServer, MppsScu], status: str) -> None:
    edge, client = scu
    sop_uid = str(generate_uid())
    client.create(sop_uid, in_progress())
    assert client.set(sop_uid, final(status)).Status == SUCCESS
    for change in (final("IN PROGRESS", with_end=False), final("COMPLETED"),
                   final("DISCONTINUED")):
        refused = client.set(sop_uid, change)
        assert refused.Status == PROCESSING_FAILURE
        assert "may no longer be updated" in str(refused.ErrorComment)
        assert refused.ErrorID == NO_LONGER_UPDATABLE  # PS3.4 Table F.7.2-2
    step = _step(edge, sop_uid)
    assert step is not None and step["state"] == status.lower()


def test_duplicate_create_is_refused(scu: tuple[EdgeServer, MppsScu]) -> None:
    _, client = scu
    sop_uid = str(generate_uid())
    assert client.create(sop_uid, in_progress()).Status == SUCCESS
    assert client.create(sop_uid, in_progress()).Status == DUPLICATE


def test_create_or_set_on_the_retrieve_context_is_an_unrecognized_operation(
        scu: tuple[EdgeServer, MppsScu]) -> None:
    """The MPPS Retrieve SOP Class has N-GET only (PS3.4 F.8): an N-CREATE or N-SET sent
    there is an operation it does not have (0x0211), and nothing is created or changed."""
    edge, client = scu
    created, stray = str(generate_uid()), str(generate_uid())
    assert client.create(created, in_progress()).Status == SUCCESS
    status, _ = client.assoc.send_n_create(in_progress(), ModalityPerformedProcedureStepRetrieve,
                                           stray)
    assert status.Status == UNRECOGNIZED_OPERATION
    assert _step(edge, stray) is None
    status, _ = client.assoc.send_n_set(final(), ModalityPerformedProcedureStepRetrieve, created)
    assert status.Status == UNRECOGNIZED_OPERATION
    step = _step(edge, created)
    assert step is not None and step["state"] == "in_progress"


def test_create_must_be_in_progress(scu: tuple[EdgeServer, MppsScu]) -> None:
    edge, client = scu
    attrs = in_progress()
    attrs.PerformedProcedureStepStatus = "COMPLETED"
    sop_uid = str(generate_uid())
    assert client.create(sop_uid, attrs).Status == INVALID_ATTRIBUTE_VALUE
    assert _step(edge, sop_uid) is None


def test_a_status_sent_empty_is_a_missing_value_in_create_and_set(
        scu: tuple[EdgeServer, MppsScu]) -> None:
    """Performed Procedure Step Status is Type 1 (PS3.4 Table F.7.2-1): sent empty it is
    0x0121 Missing Attribute Value, as any other required attribute sent empty; it was
    0x0106 ("must be IN PROGRESS"), which sends the modality looking at a value."""
    edge, client = scu
    attrs = in_progress()
    attrs.PerformedProcedureStepStatus = ""
    sop_uid = str(generate_uid())
    refused = client.create(sop_uid, attrs)
    assert (refused.Status, str(refused.ErrorComment)) == (
        MISSING_VALUE, "PerformedProcedureStepStatus has no value")
    assert _step(edge, sop_uid) is None
    client.create(sop_uid, in_progress())
    assert client.set(sop_uid, final("")).Status == MISSING_VALUE
    step = _step(edge, sop_uid)
    assert step is not None and step["state"] == "in_progress"


def test_create_without_a_required_attribute_is_refused(
        scu: tuple[EdgeServer, MppsScu]) -> None:
    _, client = scu
    attrs = in_progress()
    del attrs.PerformedStationAETitle
    refused = client.create(str(generate_uid()), attrs)
    assert refused.Status == MISSING_ATTRIBUTE
    assert "PerformedStationAETitle" in str(refused.ErrorComment)


def test_an_attribute_list_that_cannot_be_encoded_is_refused_in_one_log_line(
        scu: tuple[EdgeServer, MppsScu]) -> None:
    """The step is kept encoded (Explicit VR Little Endian): a value pydicom cannot
    convert (a 3-byte US, sent in Implicit VR) is refused as an invalid attribute
    value, and pydicom's message, which may quote the value's bytes, is not logged."""
    edge, client = scu
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = True, True
    write_dataset(fp, in_progress())
    odd_us = b"\x40\x00\x70\x02\x03\x00\x00\x00PHI"  # (0040,0270), 3 bytes
    attrs = read_dataset(BytesIO(fp.getvalue() + odd_us), True, True)
    sop_uid = str(generate_uid())
    assert client.create(sop_uid, attrs).Status == INVALID_ATTRIBUTE_VALUE
    assert _step(edge, sop_uid) is None
    log = edge.log()
    assert "a data set cannot be encoded error=" in log
    assert "Traceback" not in log and "PHI" not in log


def test_final_state_needs_its_end_date_and_time(scu: tuple[EdgeServer, MppsScu]) -> None:
    edge, client = scu
    sop_uid = str(generate_uid())
    client.create(sop_uid, in_progress())
    assert client.set(sop_uid, final("COMPLETED", with_end=False)).Status == MISSING_VALUE
    step = _step(edge, sop_uid)
    assert step is not None and step["state"] == "in_progress"


def test_a_start_or_end_that_is_no_date_or_time_is_refused_naming_the_attribute(
        scu: tuple[EdgeServer, MppsScu]) -> None:
    edge, client = scu
    for keyword, value in (("PerformedProcedureStepStartDate", "20240230"),
                           ("PerformedProcedureStepStartDate", "2024-01-05"),
                           ("PerformedProcedureStepStartTime", "2530"),
                           ("PerformedProcedureStepStartTime", "ten"),
                           ("PerformedProcedureStepEndDate", "2024010"),
                           ("PerformedProcedureStepEndTime", "106000")):
        attrs = in_progress()
        sop_uid = str(generate_uid())
        with warnings.catch_warnings():  # pydicom warns of the value it then sends
            warnings.simplefilter("ignore")
            setattr(attrs, keyword, value)
            refused = client.create(sop_uid, attrs)
        assert refused.Status == INVALID_ATTRIBUTE_VALUE, (keyword, value)
        assert keyword in str(refused.ErrorComment) and value not in str(refused.ErrorComment)
        assert _step(edge, sop_uid) is None
    sop_uid = str(generate_uid())
    assert client.create(sop_uid, in_progress()).Status == SUCCESS
    ended_on_no_day = final()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ended_on_no_day.PerformedProcedureStepEndDate = "20241301"
        assert client.set(sop_uid, ended_on_no_day).Status == INVALID_ATTRIBUTE_VALUE
    step = _step(edge, sop_uid)
    assert step is not None and step["state"] == "in_progress"
    assert client.set(sop_uid, final()).Status == SUCCESS


def test_set_of_an_unknown_step_is_refused(scu: tuple[EdgeServer, MppsScu]) -> None:
    _, client = scu
    assert client.set(str(generate_uid()), final()).Status == NO_SUCH_INSTANCE


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "99EDGE", meaning
    return item


def _listed(status: Dataset) -> list[Any]:
    """Attribute Identifier List (0000,1005) of a response: one tag or several."""
    listed = status.get("AttributeIdentifierList")
    if listed is None:
        return []
    return list(listed) if isinstance(listed, (list, MultiValue)) else [listed]


def test_a_set_changing_what_n_set_may_not_change_applies_the_rest_with_a_warning(
        scu: tuple[EdgeServer, MppsScu]) -> None:
    """PS3.4 Table F.7.2-1 allows no N-SET of who the patient is, which order was performed
    (Scheduled Step Attributes Sequence) or how the step started (ID, station, start,
    modality, Study ID). They were taken: the Patient ID changed while the order links
    stayed those of the N-CREATE, and N-GET showed another sequence than the one linked.
    Now they keep the N-CREATE's values and the rest of the N-SET is applied, answered
    Warning 0x0107 naming them in Attribute Identifier List; the same values sent again
    (a modality repeating its whole attribute set) are no change and plain success."""
    edge, client = scu
    sop_uid, study_uid = str(generate_uid()), str(generate_uid())
    created = in_progress(study_uid)
    assert client.create(sop_uid, created).Status == SUCCESS
    other_order = Dataset()
    other_order.StudyInstanceUID, other_order.AccessionNumber = str(generate_uid()), "ACC999"
    for n, (keyword, value) in enumerate((
            ("PatientID", "PID999"), ("PatientName", "Roe^Richard"),
            ("ScheduledStepAttributesSequence", [other_order]),
            ("PerformedProcedureStepID", "PPS999"), ("PerformedStationAETitle", "OTHER"),
            ("PerformedProcedureStepStartDate", "20240106"),
            ("PerformedProcedureStepStartTime", "090000"), ("Modality", "MR"),
            ("StudyID", "S999"))):
        change = final("IN PROGRESS", with_end=False)
        change.PerformedProcedureStepDescription = f"CT head {n}"
        setattr(change, keyword, value)
        answered = client.set(sop_uid, change)
        assert answered.Status == ATTRIBUTE_LIST_ERROR, keyword
        assert _listed(answered) == [Tag(keyword)]
        assert keyword in str(answered.ErrorComment)
        _, found = client.get(sop_uid, ["PerformedProcedureStepDescription"])
        assert found is not None and found.PerformedProcedureStepDescription == f"CT head {n}"
    resent = final()
    for element in created:
        if element.keyword not in resent:
            resent.add(element)
    resent.PatientID, resent.Modality = "PID999", "MR"
    answered = client.set(sop_uid, resent)
    assert answered.Status == ATTRIBUTE_LIST_ERROR
    assert _listed(answered) == [Tag("Modality"), Tag("PatientID")]
    status, found = client.get(sop_uid, [])
    assert status.Status == SUCCESS and found is not None
    assert found.PerformedProcedureStepStatus == "COMPLETED"
    assert (found.PatientID, str(found.PatientName), found.Modality) == (
        "PID100", "Doe^Jane", "CT")
    assert [i.StudyInstanceUID for i in found.ScheduledStepAttributesSequence] == [study_uid]
    assert (found.PerformedProcedureStepID, found.PerformedStationAETitle) == (
        "PPS100", MODALITY)
    assert (found.PerformedProcedureStepStartDate, found.PerformedProcedureStepStartTime) == (
        "20240105", "101500")
    assert "StudyID" not in found
    step = _step(edge, sop_uid)
    assert step is not None and (step["state"], step["patient_id"]) == ("completed", "PID100")
    assert [r["study_uid"] for r in step["refs"]] == [study_uid]


def test_a_set_repeating_the_creates_values_is_plain_success(
        scu: tuple[EdgeServer, MppsScu]) -> None:
    """A modality that sends its whole attribute set again with COMPLETED, unchanged."""
    edge, client = scu
    sop_uid = str(generate_uid())
    created = in_progress()
    assert client.create(sop_uid, created).Status == SUCCESS
    resent = final()
    for element in created:
        if element.keyword not in resent:
            resent.add(element)
    answered = client.set(sop_uid, resent)
    assert answered.Status == SUCCESS and "AttributeIdentifierList" not in answered
    step = _step(edge, sop_uid)
    assert step is not None and step["state"] == "completed"


def test_a_set_of_the_attributes_n_set_allows_is_taken(
        scu: tuple[EdgeServer, MppsScu]) -> None:
    """What Table F.7.2-1 allows in N-SET (status, end, description, codes, comments,
    performed series, and attributes of other modules: dose, billing) is still taken."""
    edge, client = scu
    sop_uid = str(generate_uid())
    assert client.create(sop_uid, in_progress()).Status == SUCCESS
    series = Dataset()
    series.SeriesInstanceUID, series.ProtocolName = str(generate_uid()), "Head"
    series.PerformingPhysicianName = series.OperatorsName = "Smith^Ann"
    series.SeriesDescription = series.RetrieveAETitle = ""
    series.ReferencedImageSequence = series.ReferencedNonImageCompositeSOPInstanceSequence = []
    change = final("DISCONTINUED")
    change.SpecificCharacterSet = "ISO_IR 100"
    change.PerformedProcedureStepDescription = "CT head"
    change.PerformedProcedureTypeDescription = "CT"
    change.CommentsOnThePerformedProcedureStep = "patient moved"
    change.ProcedureCodeSequence = [_code("CTHEAD", "CT head")]
    change.PerformedProtocolCodeSequence = [_code("P1", "Head protocol")]
    change.PerformedProcedureStepDiscontinuationReasonCodeSequence = [
        _code("110514", "Incorrect worklist entry selected")]
    change.PerformedSeriesSequence = [series]
    change.TotalNumberOfExposures = 3
    change.CommentsOnRadiationDose = "low dose"
    change.BillingProcedureStepSequence = []
    assert client.set(sop_uid, change).Status == SUCCESS
    status, found = client.get(sop_uid, [])
    assert status.Status == SUCCESS and found is not None
    assert found.PerformedProcedureStepStatus == "DISCONTINUED"
    assert found.ProcedureCodeSequence[0].CodeValue == "CTHEAD"
    assert found.PerformedSeriesSequence[0].ProtocolName == "Head"
    assert (found.TotalNumberOfExposures, found.CommentsOnRadiationDose) == (3, "low dose")
    step = _step(edge, sop_uid)
    assert step is not None and step["state"] == "discontinued"


def test_get_answers_the_requested_attributes_of_the_step_as_it_stands(
        scu: tuple[EdgeServer, MppsScu]) -> None:
    edge, client = scu
    sop_uid, study_uid = str(generate_uid()), str(generate_uid())
    assert client.create(sop_uid, in_progress(study_uid)).Status == SUCCESS
    update = Dataset()
    update.PerformedProcedureStepDescription = "CT head"
    assert client.set(sop_uid, update).Status == SUCCESS
    status, found = client.get(sop_uid, [
        "PerformedProcedureStepStatus", "PerformedProcedureStepDescription",
        "ScheduledStepAttributesSequence", "PerformedProcedureStepEndDate", "SOPInstanceUID",
        "CommentsOnThePerformedProcedureStep"])
    assert status.Status == SUCCESS and found is not None
    assert found.PerformedProcedureStepStatus == "IN PROGRESS"
    assert found.PerformedProcedureStepDescription == "CT head"
    assert found.ScheduledStepAttributesSequence[0].StudyInstanceUID == study_uid
    assert found.SOPInstanceUID == sop_uid
    # Held without a value, or not held at all: returned empty.
    assert found.PerformedProcedureStepEndDate == ""
    assert found.CommentsOnThePerformedProcedureStep == ""
    assert "PatientID" not in found  # only what was asked for
    assert client.set(sop_uid, final("DISCONTINUED")).Status == SUCCESS
    # No list: every attribute; and on the MPPS context too, where some SCUs send it.
    status, everything = client.get(sop_uid, [], sop_class=ModalityPerformedProcedureStep)
    assert status.Status == SUCCESS and everything is not None
    assert everything.PerformedProcedureStepStatus == "DISCONTINUED"
    assert (everything.PatientID, everything.PerformedProcedureStepEndTime) == (
        "PID100", "103000")
    status, _ = client.get(str(generate_uid()), ["PerformedProcedureStepStatus"])
    assert status.Status == NO_SUCH_INSTANCE
    client.release()
    records = [r for r in _audit_events(edge)
               if r["EventIdentification"]["EventID"]["csd-code"] == "110109"]
    assert [r["EventIdentification"]["EventActionCode"] for r in records] == [
        "C", "U", "R", "U", "R"]


def test_a_set_in_another_character_set_keeps_the_names_of_the_create(
        scu: tuple[EdgeServer, MppsScu]) -> None:
    """An N-SET in another Specific Character Set than its N-CREATE: the step holds both
    sets' text (a Cyrillic name created in UTF-8 came back "??????^????" after an N-SET
    in Latin-1, re-encoded in the N-SET's set, which cannot hold it)."""
    _, client = scu
    for created, name, updated, description in (
            ("ISO_IR 192", "Иванов^Пётр", "ISO_IR 100", "Schädel nativ"),
            ("ISO_IR 100", "Müller^Jürgen", "ISO_IR 144", "Голова")):
        sop_uid = str(generate_uid())
        attrs = in_progress()
        attrs.SpecificCharacterSet, attrs.PatientName = created, name
        assert client.create(sop_uid, attrs).Status == SUCCESS
        update = final()
        update.SpecificCharacterSet = updated
        update.PerformedProcedureStepDescription = description
        assert client.set(sop_uid, update).Status == SUCCESS
        status, found = client.get(sop_uid, ["PatientName", "PerformedProcedureStepDescription"])
        assert status.Status == SUCCESS and found is not None
        assert (str(found.PatientName), found.PerformedProcedureStepDescription) == (
            name, description)


def test_mpps_refused_to_a_peer_without_mpps_permission(
        mpps_edge: Callable[..., EdgeServer]) -> None:
    edge = mpps_edge(allow="store")
    client = MppsScu(edge)
    sop_uid = str(generate_uid())
    try:
        assert client.create(sop_uid, in_progress()).Status == REFUSED_NOT_AUTHORIZED
        status, found = client.get(sop_uid, ["PerformedProcedureStepStatus"])
        assert (status.Status, found) == (REFUSED_NOT_AUTHORIZED, None)
    finally:
        client.release()
    assert _step(edge, sop_uid) is None


# --- the state table (in process: a pure function) ------------------------------------------

@pytest.mark.parametrize("state", list(MppsState))
@pytest.mark.parametrize("trigger", list(MppsTrigger))
def test_mpps_state_table_allows_only_its_pairs(state: MppsState,
                                                trigger: MppsTrigger) -> None:
    if (state, trigger) in TRANSITIONS:
        assert next_state(state, trigger) is TRANSITIONS[(state, trigger)]
    else:
        assert state is not MppsState.IN_PROGRESS  # final states accept nothing
        with pytest.raises(MppsTransitionError):
            next_state(state, trigger)
