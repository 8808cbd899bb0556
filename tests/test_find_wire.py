"""C-FIND on the wire (dimse/find_scp.py): pre-encoded identifiers, one PDU per match.

A real `pacs-edge serve` answers a pynetdicom SCU; the identifiers must decode to
the same datasets whatever the transfer syntax and however small the SCU's
maximum PDU (which splits a response into several PDUs), and the operation
ends with Success.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import dcmtk
import dicomgen
import pytest
from conftest import HOST, EdgeServer
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
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
