"""The DIMSE edge answers each refusal with a named status chosen by the error's kind.

Services raise errors with a `kind` (appliance.base.errors); the edge maps kinds to
DICOM statuses with tables, never by reading a message. Every kind must have a
status, and the statuses must reach a real peer (C-STORE and C-MOVE/C-GET refusals
are proven on the wire in test_store_bad_input, test_deflate_limit and the retrieve
tests; C-FIND's here).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import pytest
from conftest import HOST, TEST_AE, EdgeServer
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
)

from appliance.base.errors import QueryRefusal, Rejection, RetrieveRefusal
from appliance.dimse.dicom_status import Status
from appliance.dimse.handlers import QUERY_STATUS, REJECTION_STATUS
from appliance.dimse.move_get import REFUSAL_STATUS

REFUSED_NOT_AUTHORIZED, IDENTIFIER_DOES_NOT_MATCH, UNABLE_TO_PROCESS = 0x0124, 0xA900, 0xC000
UNRECOGNIZED_OPERATION = 0x0211


@pytest.mark.parametrize(("kinds", "table"), [
    (Rejection, REJECTION_STATUS),
    (QueryRefusal, QUERY_STATUS),
    (RetrieveRefusal, REFUSAL_STATUS),
], ids=["store", "find", "move-get"])
def test_every_refusal_kind_has_a_named_failure_status(
        kinds: type[enum.Enum], table: Mapping[enum.Enum, Status]) -> None:
    assert set(table) == set(kinds)
    for status in table.values():
        assert isinstance(status, Status)
        assert status not in (Status.SUCCESS, Status.PENDING, Status.PENDING_WARNING)


def _find_statuses(edge: EdgeServer, aet: str, keys: dict[str, str],
                   model: str = StudyRootQueryRetrieveInformationModelFind) -> list[int]:
    ae = AE(aet)
    ae.add_requested_context(model)
    assoc = ae.associate(HOST, edge.port, ae_title=edge.ae_title)
    assert assoc.is_established, "association with pacs-edge refused"
    identifier = Dataset()
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    try:
        return [int(status.Status) for status, _ in assoc.send_c_find(identifier, model)]
    finally:
        if assoc.is_established:
            assoc.release()


def test_find_refusals_reach_the_peer_as_their_named_statuses(edge_server: EdgeServer) -> None:
    edge_server.add_peer("storeonly", "STOREONLY", 1, allow="store")
    assert _find_statuses(edge_server, "STOREONLY", {"QueryRetrieveLevel": "STUDY",
                                                     "StudyInstanceUID": ""}) == [
        REFUSED_NOT_AUTHORIZED]
    # The study root model has no PATIENT level: not in the model.
    assert _find_statuses(edge_server, "TESTSCU", {"QueryRetrieveLevel": "PATIENT",
                                                   "PatientID": ""}) == [
        IDENTIFIER_DOES_NOT_MATCH]
    # A date range with a malformed bound: a malformed key.
    assert _find_statuses(edge_server, "TESTSCU", {"QueryRetrieveLevel": "STUDY",
                                                   "StudyDate": "2024-01-01"}) == [
        UNABLE_TO_PROCESS]
    assert _find_statuses(edge_server, "TESTSCU", {"QueryRetrieveLevel": "STUDY",
                                                   "StudyInstanceUID": ""}) == [0x0000]


@pytest.mark.parametrize(("keyword", "value"), [
    ("StudyDate", "20240230"), ("StudyDate", "20240101-20241301"),
    ("StudyTime", "2530"), ("StudyTime", "1060-"),
])
def test_a_date_or_time_that_does_not_exist_is_unable_to_process(
        edge_server: EdgeServer, keyword: str, value: str) -> None:
    """docs/conformance.md: 0xC000 for malformed dates and times. 30 February and 25:30
    are (the HL7 edge answers them AE), not a query that matches nothing."""
    assert _find_statuses(edge_server, "TESTSCU", {"QueryRetrieveLevel": "STUDY",
                                                   "StudyInstanceUID": "",
                                                   keyword: value}) == [UNABLE_TO_PROCESS]


@pytest.mark.parametrize(("keyword", "value"), [
    ("AccessionNumber", "A*" * 30_000), ("ModalitiesInStudy", ["CT"] * 2000),
])
def test_a_value_too_long_or_too_many_values_are_unable_to_process(
        edge_server: EdgeServer, keyword: str, value: object) -> None:
    """docs/conformance.md: 0xC000 for a key value longer than 1024 characters, or more
    than 100 values of a key other than a UID key; SQLite could not compare them and
    the query failed (0xC001, an error in the log), or not, depending on the index."""
    ae = AE(TEST_AE)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(HOST, edge_server.port, ae_title=edge_server.ae_title)
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    tag = tag_for_keyword(keyword)
    identifier[tag] = DataElement(tag, dictionary_VR(tag), value,
                                  validation_mode=config.IGNORE)
    try:
        statuses = [int(status.Status) for status, _ in assoc.send_c_find(
            identifier, StudyRootQueryRetrieveInformationModelFind)]
        assert assoc.is_established
    finally:
        assoc.release()
    assert statuses == [UNABLE_TO_PROCESS]
    assert "find failed" not in edge_server.log()


def test_a_worklist_start_date_that_does_not_exist_is_unable_to_process(
        edge_server: EdgeServer) -> None:
    edge_server.add_peer("modality", "MODALITY", 1, allow="worklist")
    step = Dataset()
    step.ScheduledProcedureStepStartDate = "20230229"
    step.ScheduledProcedureStepStartTime = ""
    statuses = _find_statuses(edge_server, "MODALITY", {"ScheduledProcedureStepSequence": [step],
                                                        "PatientName": ""},
                              model=ModalityWorklistInformationFind)
    assert statuses == [UNABLE_TO_PROCESS]


def test_an_event_report_sent_to_the_box_is_an_unrecognized_operation(
        edge_server: EdgeServer) -> None:
    """The box sends N-EVENT-REPORTs (Storage Commitment) and takes none: one sent to it
    on the Storage Commitment or the MPPS context is answered 0x0211 in one log line,
    not 0x0110 after a traceback from pynetdicom's unbound handler."""
    ae = AE(TEST_AE)
    ae.add_requested_context(StorageCommitmentPushModel)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate(HOST, edge_server.port, ae_title=edge_server.ae_title)
    assert assoc.is_established
    info = Dataset()
    info.TransactionUID = "1.2.3.4"
    try:
        for sop_class, instance in ((StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1"),
                                    (ModalityPerformedProcedureStep, "1.2.3.4.5")):
            status, _ = assoc.send_n_event_report(info, 1, sop_class, instance)
            assert int(status.Status) == UNRECOGNIZED_OPERATION
        assert assoc.is_established
    finally:
        assoc.release()
    log = edge_server.log()
    assert log.count("n-event-report refused: this box takes no event reports") == 2
    assert "Traceback" not in log
