"""C-FIND on the wire (dimse/find_scp.py): pre-encoded identifiers, one PDU per match.

A real `pacs-edge serve` answers a pynetdicom SCU; the identifiers must decode to
the same datasets whatever the transfer syntax and however small the SCU's
maximum PDU (which splits a response into several PDUs), and the operation
ends with Success. The SOP Class Extended Negotiation of the FIND classes
(dimse/query_options.py) is tested here too: what the A-ASSOCIATE-AC answers, and
what the C-FINDs of that association then match.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import dcmtk
import dicomgen
import pydicom
import pytest
from conftest import HOST, EdgeServer
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from appliance.services.dicom_header import read_header
from appliance.store.cfind.search import FETCH_BATCH
from appliance.store.index import Index, StoredFile

PENDING, PENDING_WARNING, SUCCESS = 0xFF00, 0xFF01, 0x0000
KEYS = ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "StudyDate",
        "StudyDescription", "ModalitiesInStudy", "SeriesInstanceUID", "Modality",
        "SeriesNumber", "SOPInstanceUID", "InstanceNumber", "RetrieveAETitle",
        "PatientComments")


def image_query() -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    for keyword in KEYS:
        setattr(query, keyword, "")
    return query


def answers(edge: EdgeServer, syntax: str, max_pdu: int) -> tuple[list[Dataset], list[int]]:
    ae = AE("TESTSCU")
    ae.maximum_pdu_size = max_pdu
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind, [syntax])
    assoc = ae.associate(HOST, edge.port, ae_title=edge.ae_title)
    assert assoc.is_established
    try:
        results = list(assoc.send_c_find(image_query(),
                                          PatientRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    statuses = [int(status.Status) for status, _ in results]
    return [ds for _, ds in results if ds is not None], statuses


@pytest.fixture
def served(edge_server: EdgeServer, tmp_path: Path,
           small_study: list[dicomgen.GeneratedInstance]) -> EdgeServer:
    special = dicomgen.make_non_ascii_instance(tmp_path, name="Yamada^Tarou=山田^太郎")
    dcmtk.storescu(edge_server.port, [*(i.path for i in small_study), special.path]).check()
    return edge_server


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian],
                         ids=["implicit", "explicit"])
def test_matches_arrive_whole_in_any_syntax_and_pdu_size(
        served: EdgeServer, small_study: list[dicomgen.GeneratedInstance], syntax: str) -> None:
    whole, statuses = answers(served, syntax, 0)
    assert statuses == [PENDING] * (len(small_study) + 1) + [SUCCESS]
    split, statuses = answers(served, syntax, 128)  # identifiers span several PDUs
    assert statuses == [PENDING] * (len(small_study) + 1) + [SUCCESS]
    key = "SOPInstanceUID"
    assert sorted(whole, key=lambda ds: ds[key].value) == sorted(
        split, key=lambda ds: ds[key].value)
    by_uid = {ds.SOPInstanceUID: ds for ds in whole}
    assert set(by_uid) == {i.sop_instance_uid for i in small_study} | {
        ds.SOPInstanceUID for ds in whole if "SpecificCharacterSet" in ds}
    [special] = [ds for ds in whole if "SpecificCharacterSet" in ds]
    assert special.SpecificCharacterSet == "ISO_IR 192"
    assert str(special.PatientName) == "Yamada^Tarou=山田^太郎"
    for ds in whole:
        assert ds.QueryRetrieveLevel == "IMAGE"
        assert ds.RetrieveAETitle == served.ae_title
        assert ds.PatientComments == ""
        assert set(KEYS) <= set(ds.dir())


def test_a_key_sent_with_a_value_the_box_does_not_match_on_is_answered_pending_ff01(
        served: EdgeServer) -> None:
    """PS3.4 C.4.1.1.4: 0xFF00 says every optional key was supported as a required key
    is. A key the index does not match on (unknown, of a level below the query's, a
    sequence) sent with a value leaves the matches unfiltered by it: each is 0xFF01, so
    dcmtk's findscu says "Warning: Unsupported optional keys". Return keys, universal
    values and Timezone Offset From UTC (no key) leave it 0xFF00."""
    studies = 2  # the small study and the non-ASCII one
    ignored = (["PatientAge=045Y"], ["Modality=CT"], ["PatientComments=*x*"],
               ["ReferencedStudySequence[0].ReferencedSOPInstanceUID=1.2.3"])
    kept = (["PatientAge"], ["PatientAge=*"], ["TimezoneOffsetFromUTC=+0100"],
            ["ReferencedStudySequence[0].ReferencedSOPInstanceUID"], ["StudyDate=19000101-"])
    for keys, pending in [*((k, PENDING_WARNING) for k in ignored),
                          *((k, PENDING) for k in kept)]:
        found = dcmtk.findscu(served.port, ["StudyInstanceUID", *keys], args=("-d",)).check()
        assert found.dimse_statuses() == [pending] * studies + [SUCCESS], keys
        assert len(found.responses) == studies, keys


def test_a_match_is_answered_in_the_requests_character_set_when_it_holds_the_values(
        edge_server: EdgeServer, tmp_path: Path) -> None:
    """findscu asks in ISO_IR 100: Müller comes back in ISO_IR 100 (it came in UTF-8,
    "MÃ¼ller" on a workstation without ISO_IR 192), a Cyrillic name its set cannot hold
    in ISO_IR 192; asked in no set, both are UTF-8."""
    made = [dicomgen.make_non_ascii_instance(tmp_path / "de", seed=230, name="Müller^Jürgen",
                                             charset="ISO_IR 100"),
            dicomgen.make_non_ascii_instance(tmp_path / "ru", seed=231, name="Иванов^Пётр",
                                             charset="ISO_IR 144")]
    dcmtk.storescu(edge_server.port, [i.path for i in made]).check()
    for asked, expected in (("ISO_IR 100", ["ISO_IR 100", "ISO_IR 192"]),
                            ("", ["ISO_IR 192", "ISO_IR 192"])):
        keys = {"PatientName": "", "StudyInstanceUID": ""}
        found = dcmtk.findscu(edge_server.port, {**keys, "SpecificCharacterSet": asked}
                              if asked else keys).check()
        by_name = {str(ds.PatientName): ds.SpecificCharacterSet for ds in found.responses}
        assert by_name == dict(zip(["Müller^Jürgen", "Иванов^Пётр"], expected, strict=True))


def test_an_answer_longer_than_one_read_batch_arrives_whole(
        edge_server_factory: Callable[..., EdgeServer], tmp_path: Path) -> None:
    """More matches than the first read holds (FETCH_BATCH): the rest are read a batch at
    a time while the answer is sent; every match arrives once. C-FIND reads the index
    only, so the instances are indexed straight from their headers (storing 1,100 files
    would take most of a minute)."""
    count = FETCH_BATCH * 2 + 100
    made = dicomgen.make_studies(tmp_path / "many", seed=91, series_per_study=1,
                                 instances_per_series=count, size=16)
    edge = edge_server_factory(start=False)

    async def index_them() -> None:
        async with Index(edge.home / "index.sqlite3") as index:
            await asyncio.gather(*(index.record_instance(
                read_header(i.path), StoredFile(f"{n}.dcm", 1000, 0, i.sop_instance_uid, 0.0))
                for n, i in enumerate(made)))

    asyncio.run(index_them())
    edge.start()
    for syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        found, statuses = answers(edge, syntax, 0)
        assert statuses == [PENDING] * count + [SUCCESS]
        assert sorted(ds.SOPInstanceUID for ds in found) == sorted(
            i.sop_instance_uid for i in made)


# (StudyDate, StudyTime) of each study. StudyDate 20240105-20240106 with StudyTime
# 1000-1300 matches only the first when date and time match apart, and the first,
# second and fourth when they bound one period (5 Jan 10:00 to 6 Jan 13:00).
DATE_TIMES = (("20240105", "110000"), ("20240105", "150000"), ("20240106", "140000"),
              ("20240106", "090000"), ("20240105", "090000"))
APART, ONE_PERIOD = {DATE_TIMES[0]}, {DATE_TIMES[0], DATE_TIMES[1], DATE_TIMES[3]}
PATIENT_FIND = str(PatientRootQueryRetrieveInformationModelFind)
STUDY_FIND = str(StudyRootQueryRetrieveInformationModelFind)


@pytest.fixture
def dated(edge_server: EdgeServer, tmp_path: Path) -> EdgeServer:
    """The box holding one study at each of DATE_TIMES."""
    paths = []
    for n, (date, time) in enumerate(DATE_TIMES):
        [made] = dicomgen.make_study(tmp_path / str(n), seed=300 + n, series_per_study=1,
                                     instances_per_series=1, size=16)
        ds = pydicom.dcmread(made.path)
        ds.StudyDate, ds.StudyTime = date, time
        ds.save_as(made.path, enforce_file_format=True)
        paths.append(made.path)
    dcmtk.storescu(edge_server.port, paths).check()
    return edge_server


def _proposal(sop_class: str, info: bytes) -> SOPClassExtendedNegotiation:
    item = SOPClassExtendedNegotiation()
    item.sop_class_uid = sop_class
    item.service_class_application_information = info
    return item


def period_queries(edge: EdgeServer, proposals: dict[str, bytes]
                   ) -> tuple[dict[str, bytes], dict[str, set[tuple[str, str]]]]:
    """Propose `proposals` ({SOP class: application information}) and ask the period
    query in Patient Root and in Study Root on that association: the A-ASSOCIATE-AC's
    answers, and the (StudyDate, StudyTime) of the matches of each model."""
    ae = AE("TESTSCU")
    for sop_class in (PATIENT_FIND, STUDY_FIND):
        ae.add_requested_context(sop_class)
    assoc = ae.associate(HOST, edge.port, ae_title=edge.ae_title,
                         ext_neg=[_proposal(*item) for item in proposals.items()] or None)
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyDate, query.StudyTime = "20240105-20240106", "1000-1300"
    found = {}
    try:
        answered = {str(uid): info for uid, info in assoc.acceptor.sop_class_extended.items()}
        for sop_class in (PATIENT_FIND, STUDY_FIND):
            results = list(assoc.send_c_find(query, sop_class))
            assert int(results[-1][0].Status) == SUCCESS
            found[sop_class] = {(ds.StudyDate, ds.StudyTime) for _, ds in results[:-1]}
    finally:
        assoc.release()
    return answered, found


def test_combined_datetime_matching_is_answered_and_applied_where_negotiated(
        dated: EdgeServer) -> None:
    """PS3.4 C.5.1.1: asked for Study Root, combined date-time matching is answered 1 and
    that context's C-FIND matches one period; the Patient Root context of the same
    association, not asked, matches date and time apart."""
    answered, found = period_queries(dated, {STUDY_FIND: b"\x01\x01"})
    assert answered == {STUDY_FIND: b"\x01\x01"}
    assert found == {PATIENT_FIND: APART, STUDY_FIND: ONE_PERIOD}


def test_unsupported_find_options_are_answered_0_and_others_not_at_all(
        dated: EdgeServer) -> None:
    """Every FIND option asked gets its byte: relational-queries and combined date-time
    matching 1, fuzzy semantic matching, timezone adjustment and multi-frame conversion
    0; one asked 0 is answered 0 (Study Root matches apart), and a class the box does not
    negotiate (C-MOVE) gets no answer."""
    answered, found = period_queries(dated, {
        PATIENT_FIND: b"\x01\x01\x01\x01\x01",
        STUDY_FIND: b"\x01\x00",
        str(StudyRootQueryRetrieveInformationModelMove): b"\x01",
    })
    assert answered == {PATIENT_FIND: b"\x01\x01\x00\x00\x00", STUDY_FIND: b"\x01\x00"}
    assert found == {PATIENT_FIND: ONE_PERIOD, STUDY_FIND: APART}


def test_without_extended_negotiation_dates_and_times_match_apart(dated: EdgeServer) -> None:
    answered, found = period_queries(dated, {})
    assert answered == {}
    assert found == {PATIENT_FIND: APART, STUDY_FIND: APART}


def test_one_pdu_is_what_pynetdicom_encodes_for_the_same_message() -> None:
    from pynetdicom.pdu import P_DATA_TF

    from appliance.dimse.find_scp import c_find_rsp, one_pdu, pdus

    command = c_find_rsp(msg_id=7, sop_class="1.2.840.10008.5.1.4.1.2.2.1", status=PENDING)
    identifier = b"\x08\x00\x52\x00CS\x06\x00STUDY "
    [primitive] = list(pdus(3, command, identifier, 16384))
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    assert one_pdu(3, command, identifier, 16384) == pdu.encode()
    assert one_pdu(3, command, identifier, len(command) + len(identifier)) is None
