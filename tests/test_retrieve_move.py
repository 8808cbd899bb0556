"""C-MOVE end to end: a real `pacs-edge serve`, dcmtk movescu and pynetdicom as clients,
dcmtk storescp and a pynetdicom Storage SCP as destinations.

What is proven here: instances arrive byte-identical (dataset after the File Meta
group) in the transfer syntax they were stored in; the allowlist gates both the
requester (`move` permission, else 0x0124) and the destination (unknown: 0xA801);
the identifier selects by level in both information models; pending responses
count down; a destination that rejects a transfer syntax or does not answer gives
the right counts and final status (0xB000, 0xA702); a lost C-STORE response is
retried on a fresh association and counted once; C-CANCEL stops the move (0xFE00);
hundreds of sub-operations arrive exactly once.

dcmtk tools leave Nagle on unless the environment says TCP_NODELAY=1 (dcmtk reads
that variable); with it off each sub-operation to storescp costs a delayed ACK
(~40 ms), so every test here runs dcmtk with it set.
"""

from __future__ import annotations

import re
import sqlite3
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import dcmtk
import dicomgen
import pydicom
import pytest
from conftest import HOST, TEST_AE, EdgeServer
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
)
from storepeer import StorePeer
from syncagent import evict, sync_once

MODELS = {
    "patient": PatientRootQueryRetrieveInformationModelMove,
    "study": StudyRootQueryRetrieveInformationModelMove,
}
SUCCESS, PENDING, CANCEL = 0x0000, 0xFF00, 0xFE00
REFUSED_NOT_AUTHORIZED, DESTINATION_UNKNOWN = 0x0124, 0xA801
IDENTIFIER_DOES_NOT_MATCH, ALL_FAILED, SOME_FAILED = 0xA900, 0xA702, 0xB000
MANY = 240


@pytest.fixture(autouse=True)
def dcmtk_without_nagle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCP_NODELAY", "1")


@pytest.fixture(scope="module")
def many_instances(tmp_path_factory: pytest.TempPathFactory) -> list[dicomgen.GeneratedInstance]:
    """One study of MANY small CT/MR images (two series)."""
    return dicomgen.make_study(tmp_path_factory.mktemp("many"), seed=31, series_per_study=2,
                               instances_per_series=MANY // 2, size=8)


# --- peers -------------------------------------------------------------------------------

@pytest.fixture
def destination() -> Iterator[StorePeer]:
    with StorePeer() as dest:
        yield dest


def c_move(edge: EdgeServer, keys: dict[str, object], move_destination: str, *,
           model: str = "study", aet: str = TEST_AE,
           on_pending: Callable[[object, int, int], None] | None = None,
           ) -> list[tuple[Dataset, Dataset | None]]:
    """C-MOVE from pynetdicom; every (status, identifier) response, in order.
    `on_pending(assoc, context_id, n)` runs after the n-th pending response."""
    ae = AE(aet)
    ae.dimse_timeout = 60
    ae.add_requested_context(MODELS[model])
    assoc = ae.associate(HOST, edge.port, ae_title=edge.ae_title)
    assert assoc.is_established, "association with pacs-edge refused"
    identifier = Dataset()
    with pydicom_config.disable_value_validation():  # some tests send invalid UIDs
        for keyword, value in keys.items():
            setattr(identifier, keyword, value)
    responses: list[tuple[Dataset, Dataset | None]] = []
    try:
        for status, ident in assoc.send_c_move(identifier, move_destination, MODELS[model]):
            responses.append((status, ident))
            if on_pending and status.get("Status") == PENDING:
                on_pending(assoc, assoc.accepted_contexts[0].context_id, len(responses))
    finally:
        if assoc.is_established:
            assoc.release()
    assert responses and "Status" in responses[-1][0], "no final C-MOVE response"
    return responses


def final(responses: list[tuple[Dataset, Dataset | None]]) -> tuple[int, dict[str, int]]:
    status = responses[-1][0]
    counts = {key: int(status.get(f"NumberOf{key.capitalize()}Suboperations", -1))
              for key in ("completed", "failed", "warning", "remaining")}
    return int(status.Status), counts


def failed_list(responses: list[tuple[Dataset, Dataset | None]]) -> set[str]:
    ident = responses[-1][1]
    assert ident is not None, "final response without an identifier"
    value = ident.get("FailedSOPInstanceUIDList", [])
    return {str(v) for v in ([value] if isinstance(value, str) else value)}


def cancel_at_first_pending(assoc: object, context_id: int, n: int) -> None:
    """c_move's on_pending: a C-CANCEL after the first Pending response."""
    if n == 1:
        assoc.send_c_cancel(1, context_id)  # type: ignore[attr-defined]


def store(edge: EdgeServer, instances: Sequence[dicomgen.GeneratedInstance]) -> None:
    result = dcmtk.storescu(edge.port, [i.path for i in instances], aec=edge.ae_title).check()
    assert result.store_responses() == ["Success"] * len(instances)


def store_with_pynetdicom(edge: EdgeServer,
                          instances: Sequence[dicomgen.GeneratedInstance]) -> None:
    ae = AE(TEST_AE)
    for inst in instances:
        ae.add_requested_context(inst.sop_class_uid, inst.transfer_syntax)
    assoc = ae.associate(HOST, edge.port, ae_title=edge.ae_title)
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(pydicom.dcmread(i.path)).Status) for i in instances]
    finally:
        assoc.release()
    assert statuses == [SUCCESS] * len(instances)


def assert_arrived_as_sent(dest: StorePeer,
                           instances: Sequence[dicomgen.GeneratedInstance]) -> None:
    assert set(dest.arrivals) == {i.sop_instance_uid for i in instances}
    for inst in instances:
        for received in dest.arrivals[inst.sop_instance_uid]:
            assert received == dicomgen.dataset_bytes(inst.path), inst.path.name


def index_rows(edge: EdgeServer, sql: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(f"file:{edge.home / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


# --- dcmtk movescu -----------------------------------------------------------------------

def test_movescu_sends_a_study_to_dcmtk_storescp_byte_exact(
    edge_server: EdgeServer, storescp: dcmtk.StoreSCP,
    small_study: list[dicomgen.GeneratedInstance],
) -> None:
    store(edge_server, small_study)
    edge_server.add_peer("storescp", storescp.ae_title, storescp.port, allow="store")

    result = dcmtk.movescu(edge_server.port, {"StudyInstanceUID": small_study[0].study_uid},
                           storescp.ae_title, aec=edge_server.ae_title).check()

    assert "Received Final Move Response (Success)" in result.output
    assert len(re.findall(r"Received Move Response \d+ \(Pending\)", result.output)) == len(
        small_study)
    received = {str(dicomgen.read_header(p).SOPInstanceUID): p for p in storescp.files()}
    assert set(received) == {i.sop_instance_uid for i in small_study}
    for inst in small_study:
        assert dicomgen.dataset_bytes(received[inst.sop_instance_uid]) == dicomgen.dataset_bytes(
            inst.path)


def test_unknown_move_destination_is_refused_with_a801(
    edge_server: EdgeServer, small_study: list[dicomgen.GeneratedInstance],
) -> None:
    store(edge_server, small_study)
    result = dcmtk.movescu(edge_server.port, {"StudyInstanceUID": small_study[0].study_uid},
                           "NOWHERE", aec=edge_server.ae_title, args=("-d",))
    assert result.dimse_statuses()[-1] == DESTINATION_UNKNOWN
    assert "move refused reason=move destination 'NOWHERE' is not a known peer" in (
        edge_server.log())
    assert edge_server.echo().ok


def test_a_move_to_a_peer_without_a_port_is_refused_with_a801(
    edge_server: EdgeServer, small_study: list[dicomgen.GeneratedInstance],
) -> None:
    """An hl7-only peer has no port (the box never calls it): as a move destination it
    is unknown (0xA801 at once), not 0xA702 after trying to connect to port 0."""
    store(edge_server, small_study)
    edge_server.cli("peers", "add", "ris", "--ae-title", "RIS", "--host", HOST,
                    "--allow", "hl7")
    responses = c_move(edge_server, {"QueryRetrieveLevel": "STUDY",
                                     "StudyInstanceUID": small_study[0].study_uid}, "RIS")
    assert [int(status.Status) for status, _ in responses] == [DESTINATION_UNKNOWN]
    assert "move refused reason=move destination 'RIS' has no port" in edge_server.log()


def test_peer_without_move_permission_is_refused(
    edge_server: EdgeServer, storescp: dcmtk.StoreSCP,
    small_study: list[dicomgen.GeneratedInstance],
) -> None:
    store(edge_server, small_study)
    edge_server.add_peer("storescp", storescp.ae_title, storescp.port, allow="store")
    edge_server.add_peer("viewer", "VIEWER", 1, allow="find,store")

    result = dcmtk.movescu(edge_server.port, {"StudyInstanceUID": small_study[0].study_uid},
                           storescp.ae_title, aet="VIEWER", aec=edge_server.ae_title,
                           args=("-d",))

    assert result.dimse_statuses()[-1] == REFUSED_NOT_AUTHORIZED
    assert storescp.files() == []
    assert "move refused reason=peer lacks permission 'move' calling=VIEWER" in edge_server.log()


@pytest.mark.parametrize("kind", ["dcmtk-storescp", "pynetdicom"])
def test_hundreds_of_suboperations_each_arrive_exactly_once(
    kind: str, edge_server: EdgeServer, tmp_path: Path,
    many_instances: list[dicomgen.GeneratedInstance],
) -> None:
    store(edge_server, many_instances)
    study = many_instances[0].study_uid
    if kind == "pynetdicom":
        with StorePeer() as dest:
            edge_server.add_peer("dest", dest.ae_title, dest.port, allow="store")
            result = dcmtk.movescu(edge_server.port, {"StudyInstanceUID": study},
                                   dest.ae_title, aec=edge_server.ae_title).check()
        assert dest.counts() == {i.sop_instance_uid: 1 for i in many_instances}
        assert_arrived_as_sent(dest, many_instances)
    else:
        with dcmtk.StoreSCP(tmp_path / "scp", ae_title="STORESCP") as scp:
            edge_server.add_peer("dest", scp.ae_title, scp.port, allow="store")
            result = dcmtk.movescu(edge_server.port, {"StudyInstanceUID": study},
                                   scp.ae_title, aec=edge_server.ae_title).check()
        assert scp.log().count("Received Store Request") == MANY
        received = sorted(str(dicomgen.read_header(p).SOPInstanceUID) for p in scp.files())
        assert received == sorted(i.sop_instance_uid for i in many_instances)

    assert "Received Final Move Response (Success)" in result.output
    assert f"move finished status=0x0000 completed={MANY} failed=0 warning=0" in (
        edge_server.log())


def test_every_stored_syntax_moves_byte_exact_and_htj2k_fails_alone_at_dcmtk(
    edge_server: EdgeServer, tmp_path: Path, destination: StorePeer,
    syntax_set: dict[str, dicomgen.GeneratedInstance],
) -> None:
    everything = list(syntax_set.values())
    htj2k = [i for i in everything if i.transfer_syntax in dcmtk.HTJ2K_SYNTAXES]
    store(edge_server, [i for i in everything if i not in htj2k])
    store_with_pynetdicom(edge_server, htj2k)  # dcmtk 3.6.7 cannot send HTJ2K
    series = everything[0]
    keys = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": series.study_uid,
            "SeriesInstanceUID": series.series_uid}

    edge_server.add_peer("dest", destination.ae_title, destination.port, allow="store")
    status, counts = final(c_move(edge_server, keys, destination.ae_title))
    assert (status, counts["completed"]) == (SUCCESS, len(everything))
    assert_arrived_as_sent(destination, everything)

    # dcmtk's storescp cannot take HTJ2K: those fail, nothing is transcoded.
    with dcmtk.StoreSCP(tmp_path / "scp", ae_title="STORESCP") as scp:
        edge_server.add_peer("storescp", scp.ae_title, scp.port, allow="store")
        result = dcmtk.movescu(edge_server.port, {k: v for k, v in keys.items()
                                                  if k != "QueryRetrieveLevel"},
                               scp.ae_title, level="SERIES", aec=edge_server.ae_title,
                               args=("-d",))
        received = {str(dicomgen.read_header(p).SOPInstanceUID): p for p in scp.files()}
    assert result.dimse_statuses()[-1] == SOME_FAILED
    assert set(received) == {i.sop_instance_uid for i in everything if i not in htj2k}
    for inst in everything:
        if inst not in htj2k:
            assert dicomgen.dataset_bytes(received[inst.sop_instance_uid]) == (
                dicomgen.dataset_bytes(inst.path)), inst.transfer_syntax
    assert (f"completed={len(everything) - len(htj2k)} failed={len(htj2k)}"
            in edge_server.log())


# --- pynetdicom client -------------------------------------------------------------------

@pytest.mark.parametrize(("model", "level", "pick"), [
    ("patient", "PATIENT", "all"),
    ("patient", "STUDY", "all"),
    ("study", "STUDY", "all"),
    ("study", "SERIES", "mr-series"),
    ("study", "IMAGE", "two-ct-images"),
])
def test_identifier_selects_by_level_and_pending_responses_count_down(
    model: str, level: str, pick: str, edge_server: EdgeServer, destination: StorePeer,
    small_study: list[dicomgen.GeneratedInstance],
) -> None:
    store(edge_server, small_study)
    edge_server.add_peer("dest", destination.ae_title, destination.port, allow="store")
    first = small_study[0]
    keys: dict[str, object] = {"QueryRetrieveLevel": level}
    if model == "patient":
        keys["PatientID"] = first.patient_id
    if level != "PATIENT":
        keys["StudyInstanceUID"] = first.study_uid
    expected = list(small_study)
    if pick == "mr-series":
        expected = [i for i in small_study if i.header.Modality == "MR"]
        keys["SeriesInstanceUID"] = expected[0].series_uid
    elif pick == "two-ct-images":
        expected = [i for i in small_study if i.header.Modality == "CT"][:2]
        keys["SeriesInstanceUID"] = expected[0].series_uid
        keys["SOPInstanceUID"] = [i.sop_instance_uid for i in expected]

    responses = c_move(edge_server, keys, destination.ae_title, model=model)

    status, counts = final(responses)
    assert status == SUCCESS
    assert counts["completed"] == len(expected)
    assert (counts["failed"], counts["warning"]) == (0, 0)
    pending = [s for s, _ in responses[:-1]]
    assert [int(s.Status) for s in pending] == [PENDING] * len(expected)
    assert [int(s.NumberOfRemainingSuboperations) for s in pending] == list(
        range(len(expected) - 1, -1, -1))
    assert [int(s.NumberOfCompletedSuboperations) for s in pending] == list(
        range(1, len(expected) + 1))
    assert destination.counts() == {i.sop_instance_uid: 1 for i in expected}
    assert_arrived_as_sent(destination, expected)


def test_a_patient_level_move_sends_only_the_patient_of_the_issuer_asked_for(
    edge_server: EdgeServer, destination: StorePeer, tmp_path: Path,
) -> None:
    """A patient is a Patient ID and its issuer: C-FIND answers MRN-77 of HOSP-A and of
    HOSP-B as two patients. A workstation moving the first, with both keys it was
    answered, was sent the second's images too (the issuer was not read)."""
    patients = {issuer: dicomgen.make_study(tmp_path / issuer, seed=seed, series_per_study=1,
                                            instances_per_series=2, size=8)
                for seed, issuer in ((701, "HOSP-A"), (702, "HOSP-B"))}
    dcmtk.storescu(edge_server.port, [
        dicomgen.altered_copy(i, tmp_path / "sent" / issuer / i.path.name, PatientID="MRN-77",
                              IssuerOfPatientID=issuer)
        for issuer, study in patients.items() for i in study]).check()
    edge_server.add_peer("dest", destination.ae_title, destination.port, allow="store")
    found = dcmtk.findscu(edge_server.port, {"PatientID": "MRN-77", "IssuerOfPatientID": ""},
                          level="PATIENT", model="patient").check()
    assert sorted(found.values("IssuerOfPatientID")) == ["HOSP-A", "HOSP-B"]
    responses = c_move(edge_server, {"QueryRetrieveLevel": "PATIENT", "PatientID": "MRN-77",
                                     "IssuerOfPatientID": "HOSP-A"},
                       destination.ae_title, model="patient")
    assert final(responses)[0] == SUCCESS
    assert destination.counts() == {i.sop_instance_uid: 1 for i in patients["HOSP-A"]}


def test_nothing_matched_is_success_with_no_suboperations(
    edge_server: EdgeServer, destination: StorePeer,
) -> None:
    edge_server.add_peer("dest", destination.ae_title, destination.port, allow="store")
    responses = c_move(edge_server, {"QueryRetrieveLevel": "STUDY",
                                     "StudyInstanceUID": "1.2.3.4.5"}, destination.ae_title)
    assert final(responses)[0] == SUCCESS
    assert len(responses) == 1
    assert destination.counts() == {}


@pytest.mark.parametrize(("model", "keys"), [
    ("study", {"QueryRetrieveLevel": "PATIENT", "PatientID": "X"}),
    ("study", {"QueryRetrieveLevel": "STUDY"}),
    ("study", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.abc"}),
    ("study", {"StudyInstanceUID": "1.2.3"}),
    ("patient", {"QueryRetrieveLevel": "PATIENT"}),
    ("study", {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": ["1.2.3", "1.2.4"],
               "SeriesInstanceUID": "1.2.3.1"}),
], ids=["patient-level-in-study-root", "no-study-uid", "uid-with-letters", "no-level",
        "no-patient-id", "list-above-the-level"])
def test_identifier_that_does_not_fit_the_model_is_refused_with_a900(
    model: str, keys: dict[str, object], refusing_edge_server: EdgeServer,
) -> None:
    # TESTSCU is a known peer (nothing listens on its port): the refusal comes first.
    refusals = refusing_edge_server.log().count("move refused reason=")
    responses = c_move(refusing_edge_server, keys, TEST_AE, model=model)
    assert final(responses)[0] == IDENTIFIER_DOES_NOT_MATCH
    assert refusing_edge_server.log().count("move refused reason=") == refusals + 1
    assert refusing_edge_server.echo().ok


def test_destination_rejecting_stored_transfer_syntaxes_gives_b000_with_counts(
    edge_server: EdgeServer, syntax_set: dict[str, dicomgen.GeneratedInstance],
) -> None:
    chosen = [syntax_set[str(dicomgen.TRANSFER_SYNTAXES[name])]
              for name in ("implicit-le", "explicit-le", "jpeg-lossless", "rle")]
    store(edge_server, chosen)
    explicit = syntax_set[str(ExplicitVRLittleEndian)]
    rejected = {i.sop_instance_uid for i in chosen if i is not explicit}
    with StorePeer(transfer_syntaxes=[ExplicitVRLittleEndian]) as dest:
        edge_server.add_peer("dest", dest.ae_title, dest.port, allow="store")
        some = c_move(edge_server, {"QueryRetrieveLevel": "SERIES",
                                    "StudyInstanceUID": explicit.study_uid,
                                    "SeriesInstanceUID": explicit.series_uid}, dest.ae_title)
        one_rejected = next(i for i in chosen if i.sop_instance_uid in rejected)
        none = c_move(edge_server, {"QueryRetrieveLevel": "IMAGE",
                                    "StudyInstanceUID": explicit.study_uid,
                                    "SeriesInstanceUID": explicit.series_uid,
                                    "SOPInstanceUID": one_rejected.sop_instance_uid},
                      dest.ae_title)

    status, counts = final(some)
    assert status == SOME_FAILED
    assert (counts["completed"], counts["failed"], counts["warning"]) == (1, 3, 0)
    assert failed_list(some) == rejected
    assert_arrived_as_sent(dest, [explicit])

    status, counts = final(none)
    assert status == ALL_FAILED
    assert (counts["completed"], counts["failed"]) == (0, 1)
    assert failed_list(none) == {one_rejected.sop_instance_uid}
    assert "destination does not accept the stored transfer syntax (not transcoding)" in (
        edge_server.log())


def test_destination_accepting_no_stored_syntax_is_logged_as_such(
    edge_server: EdgeServer, small_study: list[dicomgen.GeneratedInstance],
) -> None:
    """pynetdicom aborts an association with no accepted context: the log line once said
    the destination "did not answer", sending the operator after a network fault."""
    store(edge_server, small_study)
    with StorePeer(transfer_syntaxes=[JPEGLosslessSV1]) as dest:
        edge_server.add_peer("dest", dest.ae_title, dest.port, allow="store")
        responses = c_move(edge_server, {"QueryRetrieveLevel": "STUDY",
                                         "StudyInstanceUID": small_study[0].study_uid},
                           dest.ae_title)
    assert final(responses)[0] == ALL_FAILED
    assert ("move destination does not accept any stored SOP class and transfer syntax "
            "(not transcoding)") in edge_server.log()


def test_destination_that_does_not_answer_fails_every_suboperation(
    edge_server: EdgeServer, free_port: Callable[[], int],
    small_study: list[dicomgen.GeneratedInstance],
) -> None:
    store(edge_server, small_study)
    edge_server.add_peer("gone", "GONE", free_port(), allow="store")
    responses = c_move(edge_server, {"QueryRetrieveLevel": "STUDY",
                                     "StudyInstanceUID": small_study[0].study_uid}, "GONE")
    status, counts = final(responses)
    assert status == ALL_FAILED
    assert (counts["completed"], counts["failed"]) == (0, len(small_study))
    assert failed_list(responses) == {i.sop_instance_uid for i in small_study}
    assert "move destination did not answer" in edge_server.log()
    # One failed connection attempt, not one per instance.
    assert edge_server.log().count("move destination did not answer") == 1


def test_destination_whose_host_does_not_resolve_fails_every_suboperation(
    edge_server: EdgeServer, small_study: list[dicomgen.GeneratedInstance],
) -> None:
    """pynetdicom resolves the host before it connects, and raises: the move once ended
    in a traceback and a response without a status."""
    store(edge_server, small_study)
    edge_server.add_peer("lost", "LOST", 11113, host="nowhere.invalid", allow="store")
    responses = c_move(edge_server, {"QueryRetrieveLevel": "STUDY",
                                     "StudyInstanceUID": small_study[0].study_uid}, "LOST")
    status, counts = final(responses)
    assert (status, counts["completed"], counts["failed"]) == (ALL_FAILED, 0, len(small_study))
    assert "move destination host not found" in edge_server.log()
    assert "Traceback" not in edge_server.log()


def test_instance_whose_file_is_gone_fails_alone(
    edge_server: EdgeServer, destination: StorePeer,
    small_study: list[dicomgen.GeneratedInstance],
) -> None:
    store(edge_server, small_study)
    edge_server.add_peer("dest", destination.ae_title, destination.port, allow="store")
    lost = small_study[2]
    [(path,)] = index_rows(edge_server, "SELECT path FROM instances WHERE sop_uid = "
                           f"'{lost.sop_instance_uid}'")
    (edge_server.home / "store" / str(path)).unlink()

    responses = c_move(edge_server, {"QueryRetrieveLevel": "STUDY",
                                     "StudyInstanceUID": lost.study_uid}, destination.ae_title)

    status, counts = final(responses)
    assert status == SOME_FAILED
    assert (counts["completed"], counts["failed"]) == (len(small_study) - 1, 1)
    assert failed_list(responses) == {lost.sop_instance_uid}
    assert_arrived_as_sent(destination, [i for i in small_study if i is not lost])
    assert "not on local disk" in edge_server.log()


def test_lost_store_response_is_retried_on_a_fresh_association_and_counted_once(
    edge_server_factory: Callable[..., EdgeServer],
    small_study: list[dicomgen.GeneratedInstance],
) -> None:
    edge = edge_server_factory(start=False)
    edge.configure(dicom={"suboperation_timeout": 1.0, "suboperation_retries": 2})
    edge.start()
    store(edge, small_study)
    victim = small_study[3].sop_instance_uid
    # The first C-STORE of `victim` gets its response only after the sender gave up.
    with StorePeer(stall=lambda uid, nth: 3.0 if uid == victim and nth == 1 else 0.0) as dest:
        edge.add_peer("dest", dest.ae_title, dest.port, allow="store")
        responses = c_move(edge, {"QueryRetrieveLevel": "STUDY",
                                  "StudyInstanceUID": small_study[0].study_uid}, dest.ae_title)

    status, counts = final(responses)
    assert status == SUCCESS
    assert (counts["completed"], counts["failed"], counts["warning"]) == (len(small_study), 0, 0)
    expected = {i.sop_instance_uid: 1 for i in small_study} | {victim: 2}
    assert dest.counts() == expected
    assert_arrived_as_sent(dest, small_study)
    assert "move sub-operation got no C-STORE response attempt=1 of 3" in edge.log()
    assert "failed after" not in edge.log()


def test_store_response_that_never_comes_fails_after_the_retries(
    edge_server_factory: Callable[..., EdgeServer],
    small_study: list[dicomgen.GeneratedInstance],
) -> None:
    edge = edge_server_factory(start=False)
    edge.configure(dicom={"suboperation_timeout": 1.0, "suboperation_retries": 1})
    edge.start()
    store(edge, small_study)
    victim = small_study[1].sop_instance_uid
    with StorePeer(stall=lambda uid, nth: 2.0 if uid == victim else 0.0) as dest:
        edge.add_peer("dest", dest.ae_title, dest.port, allow="store")
        responses = c_move(edge, {"QueryRetrieveLevel": "STUDY",
                                  "StudyInstanceUID": small_study[0].study_uid}, dest.ae_title)

    status, counts = final(responses)
    assert status == SOME_FAILED
    assert (counts["completed"], counts["failed"]) == (len(small_study) - 1, 1)
    assert failed_list(responses) == {victim}
    assert dest.counts()[victim] == 2
    assert "move sub-operation failed after 2 attempts" in edge.log()


def test_a_destination_that_stops_answering_fails_the_rest_of_the_move_at_once(
    edge_server_factory: Callable[..., EdgeServer],
    small_study: list[dicomgen.GeneratedInstance],
) -> None:
    """A destination that takes the association but answers no C-STORE costs two
    instances' attempts, not every instance's: at the default 3 attempts of 30 s, a
    300-image study would otherwise hold the requestor for 7.5 hours."""
    edge = edge_server_factory(start=False)
    edge.configure(dicom={"suboperation_timeout": 1.0, "suboperation_retries": 0})
    edge.start()
    store(edge, small_study)
    with StorePeer(stall=lambda uid, nth: 1.5) as dest:
        edge.add_peer("dest", dest.ae_title, dest.port, allow="store")
        responses = c_move(edge, {"QueryRetrieveLevel": "STUDY",
                                  "StudyInstanceUID": small_study[0].study_uid}, dest.ae_title)

    status, counts = final(responses)
    assert status == ALL_FAILED
    assert (counts["completed"], counts["failed"]) == (0, len(small_study))
    assert sum(dest.counts().values()) == 2
    assert "move destination stopped answering C-STOREs (2 instances in a row)" in edge.log()


def test_cancel_stops_the_move_with_fe00_and_counts(
    edge_server: EdgeServer, small_study: list[dicomgen.GeneratedInstance],
) -> None:
    store(edge_server, small_study)
    with StorePeer(stall=lambda uid, nth: 0.5) as dest:
        edge_server.add_peer("dest", dest.ae_title, dest.port, allow="store")
        responses = c_move(edge_server, {"QueryRetrieveLevel": "STUDY",
                                         "StudyInstanceUID": small_study[0].study_uid},
                           dest.ae_title, on_pending=cancel_at_first_pending)

    status, counts = final(responses)
    assert status == CANCEL
    assert counts["remaining"] >= 1
    assert counts["completed"] + counts["failed"] + counts["remaining"] == len(small_study)
    assert sum(dest.counts().values()) == counts["completed"]
    # The C-CANCEL-RQ has no Message ID: the operation metrics once failed on it.
    assert "Traceback" not in edge_server.log()


def test_a_store_response_sent_a_byte_at_a_time_is_given_up(
    edge_server_factory: Callable[..., EdgeServer],
    small_study: list[dicomgen.GeneratedInstance],
) -> None:
    """Each byte within the socket's timeout, the whole PDU never: the box read on for as
    long as the destination cared to send (a 100-byte response: 200 s at one byte per 2 s).
    A PDU begun must now be whole within network_timeout of its first byte."""
    edge = edge_server_factory(start=False)
    edge.configure(dicom={"network_timeout": 1.0, "suboperation_timeout": 1.0,
                          "suboperation_retries": 0})
    edge.start()
    store(edge, small_study[:1])
    sent: list[int] = []

    def trickle(event: evt.Event) -> int:
        sock = event.assoc.dul.socket.socket
        sock.sendall(struct.pack(">BBI", 0x04, 0, 100))  # a P-DATA-TF of 100 bytes...
        for n in range(100):  # ...of which one byte every 0.3 s
            time.sleep(0.3)
            try:
                sock.sendall(b"\0")
            except OSError:
                break
            sent.append(n)
        return 0

    ae = AE("TRICKLE")
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    server = ae.start_server((HOST, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, trickle)])
    try:
        edge.add_peer("trickle", "TRICKLE", server.server_address[1], allow="store")
        responses = c_move(edge, {"QueryRetrieveLevel": "STUDY",
                                  "StudyInstanceUID": small_study[0].study_uid}, "TRICKLE")
    finally:
        ae.shutdown()
    assert final(responses)[0] == ALL_FAILED
    assert len(sent) < 30, f"the box read {len(sent)} trickled bytes before giving up"


def test_cancel_stops_the_retries_of_a_store_response_that_never_came(
    edge_server_factory: Callable[..., EdgeServer],
    small_study: list[dicomgen.GeneratedInstance],
) -> None:
    """A C-CANCEL that arrives while a C-STORE response is awaited is answered after that
    wait, not after every retry of it ((retries + 1) x suboperation_timeout, 90 s at the
    defaults)."""
    edge = edge_server_factory(start=False)
    edge.configure(dicom={"suboperation_timeout": 1.0, "suboperation_retries": 2})
    edge.start()
    store(edge, small_study)
    first, victim = small_study[0].sop_instance_uid, small_study[1].sop_instance_uid
    with StorePeer(stall=lambda uid, nth: 0.0 if uid == first else 1.5) as dest:
        edge.add_peer("dest", dest.ae_title, dest.port, allow="store")
        responses = c_move(edge, {"QueryRetrieveLevel": "STUDY",
                                  "StudyInstanceUID": small_study[0].study_uid},
                           dest.ae_title, on_pending=cancel_at_first_pending)

    status, counts = final(responses)
    assert status == CANCEL
    assert (counts["completed"], counts["failed"]) == (1, 1)
    assert dest.counts() == {first: 1, victim: 1}


def test_cancel_while_a_recall_runs_ends_the_move_with_fe00(
    edge_server: EdgeServer, destination: StorePeer,
    small_study: list[dicomgen.GeneratedInstance],
) -> None:
    """pynetdicom's is_cancelled() consumes the C-CANCEL: seen while waiting for the
    recall, it must end the move there (it once re-planned and answered 0xA702)."""
    store(edge_server, small_study)
    study = small_study[0].study_uid
    sync_once(edge_server.home)
    evict(edge_server.home, study)  # no sync agent runs: the recall waits
    edge_server.add_peer("dest", destination.ae_title, destination.port, allow="store")

    responses = c_move(edge_server, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study},
                       destination.ae_title, on_pending=cancel_at_first_pending)

    status, counts = final(responses)
    assert status == CANCEL
    assert (counts["completed"], counts["failed"], counts["remaining"]) == (
        0, 0, len(small_study))
    assert destination.counts() == {}


def test_recall_that_does_not_finish_fails_the_move_with_an_error_comment(
    edge_server_factory: Callable[..., EdgeServer], destination: StorePeer,
    small_study: list[dicomgen.GeneratedInstance],
) -> None:
    """0xA702 alone reads as "destination down": the Error Comment says it was the recall."""
    edge = edge_server_factory(start=False)
    edge.configure(sync={"recall_timeout_seconds": 1.0})
    edge.start()
    store(edge, small_study)
    study = small_study[0].study_uid
    sync_once(edge.home)
    evict(edge.home, study)  # no sync agent runs: the recall never finishes
    edge.add_peer("dest", destination.ae_title, destination.port, allow="store")

    responses = c_move(edge, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study},
                       destination.ae_title)

    status, counts = final(responses)
    assert (status, counts["failed"]) == (ALL_FAILED, len(small_study))
    assert responses[-1][0].ErrorComment == "recall of an evicted study from the cloud timed out"
    assert destination.counts() == {}


def test_a_move_longer_than_the_network_timeout_ends_with_a_release(
    edge_server_factory: Callable[..., EdgeServer],
    small_study: list[dicomgen.GeneratedInstance],
) -> None:
    """The requestor is silent while it waits for the responses: the box once aborted the
    association after the final response of any move longer than network_timeout, and
    movescu failed its release ("Peer aborted Association")."""
    edge = edge_server_factory(start=False)
    edge.configure(dicom={"network_timeout": 1.0})
    edge.start()
    store(edge, small_study)
    with StorePeer(stall=lambda uid, nth: 0.3) as dest:  # 6 x 0.3 s: longer than 1 s
        edge.add_peer("dest", dest.ae_title, dest.port, allow="store")
        result = dcmtk.movescu(edge.port, {"StudyInstanceUID": small_study[0].study_uid},
                               dest.ae_title, aec=edge.ae_title)

    assert "Received Final Move Response (Success)" in result.output
    assert result.ok, result.output
    assert "aborting association: no PDU within network_timeout" not in edge.log()


def test_move_stamps_the_study_access_time_before_it_sends(
    edge_server: EdgeServer, small_study: list[dicomgen.GeneratedInstance],
) -> None:
    """Eviction takes the least recently used study first: a study being moved is in use
    from the first sub-operation, not from the final response (a long move of an old
    study was the first to go under disk pressure, its files deleted under the move)."""
    store(edge_server, small_study)
    sql = "SELECT last_access_at FROM studies"
    [(before,)] = index_rows(edge_server, sql)
    during: list[object] = []

    def look(uid: str, nth: int) -> float:
        if not during:
            during.extend(index_rows(edge_server, sql)[0])
        return 0.0

    with StorePeer(stall=look) as destination:
        edge_server.add_peer("dest", destination.ae_title, destination.port, allow="store")
        c_move(edge_server, {"QueryRetrieveLevel": "STUDY",
                             "StudyInstanceUID": small_study[0].study_uid},
               destination.ae_title)
    assert len(during) == 1
    assert float(during[0]) > float(before)  # type: ignore[arg-type]
