"""Failed accesses are in the audit trail, grouped so that a flood stays small.

A real `pacs-edge serve` and real peers (pynetdicom): C-STOREs the box refuses
are one failed Instances Transferred record per association and status, however
many were refused. The audit log is read as written; records are polled for
with a deadline.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dicomgen
import pydicom
import pynetdicom.association
import pytest
from conftest import PRODUCT_SITE, EdgeServer
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE

TRANSFERRED = "110104"  # DICOM Instances Transferred
DEADLINE = 60.0
CANNOT_UNDERSTAND, DOES_NOT_MATCH = 0xC000, 0xA900
PROCESSING_FAILURE = 0x0110


def records(home: Path) -> list[dict[str, Any]]:
    path = home / "audit" / "audit.log"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return [json.loads(line)["record"] for line in text.splitlines()]


def event(record: dict[str, Any]) -> str:
    return str(record["EventIdentification"]["EventID"]["csd-code"])


def outcome(record: dict[str, Any]) -> int:
    return int(record["EventIdentification"]["EventOutcomeIndicator"])


def action(record: dict[str, Any]) -> str:
    return str(record["EventIdentification"]["EventActionCode"])


def description(record: dict[str, Any]) -> str:
    return str(record["EventIdentification"].get("EventOutcomeDescription", ""))


def requestors(record: dict[str, Any]) -> set[str]:
    return {p["UserID"] for p in record["ActiveParticipant"] if p["UserIsRequestor"]}


def object_details(record: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {o["ParticipantObjectID"]: {d["type"]: d["value"]
                                       for d in o.get("ParticipantObjectDetail", ())}
            for o in record["ParticipantObjectIdentification"]}


def settled(home: Path, where: Callable[[dict[str, Any]], bool], count: int
            ) -> list[dict[str, Any]]:
    """The records satisfying `where` once there are at least `count` of them."""
    deadline = time.monotonic() + DEADLINE
    while True:
        found = [r for r in records(home) if where(r)]
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{count} audit record(s) expected, have {len(found)}")
        time.sleep(0.1)


def send_in_one_association(server: EdgeServer, paths: list[Path], aet: str = "TESTSCU"
                            ) -> list[int]:
    """C-STORE each file's bytes as they are, over one association; their statuses."""
    with pydicom.config.disable_value_validation():
        metas = [read_file_meta_info(p) for p in paths]
        ae = AE(ae_title=aet)
        for meta in {(m.MediaStorageSOPClassUID, m.TransferSyntaxUID) for m in metas}:
            ae.add_requested_context(*meta)
        assoc = ae.associate(server.host, server.port, ae_title=server.ae_title)
        assert assoc.is_established
        try:
            return [int(assoc.send_c_store(p).Status) for p in paths]
        finally:
            assoc.release()


def failed_stores(record: dict[str, Any]) -> bool:
    return event(record) == TRANSFERRED and outcome(record) == 4


def test_refused_stores_are_one_failed_record_per_association_and_status(
    edge_server: EdgeServer, raw_sender: None, tmp_path: Path,
    small_study: list[dicomgen.GeneratedInstance],
) -> None:
    garbage = dicomgen.make_garbage_payload(tmp_path)
    ct = str(read_file_meta_info(garbage).MediaStorageSOPClassUID)

    # An association whose 40 stores all fail: one failed record, counting them all.
    assert send_in_one_association(edge_server, [garbage] * 40) == [CANNOT_UNDERSTAND] * 40
    [record] = settled(edge_server.home, failed_stores, 1)
    assert "TESTSCU" in requestors(record)
    assert "0xC000 cannot understand" in description(record)
    assert "40 instance(s)" in description(record)
    assert object_details(record) == {ct: {"NumberOfInstances": "40"}}

    # Some fail, with two statuses, beside stored ones: a record per status, and the
    # stored study's success record as before.
    good = [i.path for i in small_study[:2]]
    forged = dicomgen.forged_copy(small_study[0].path, tmp_path / "forged.dcm")
    paths = [good[0], garbage, forged, garbage, good[1]]
    assert send_in_one_association(edge_server, paths) == [
        0, CANNOT_UNDERSTAND, DOES_NOT_MATCH, CANNOT_UNDERSTAND, 0]
    failed = settled(edge_server.home, failed_stores, 3)[1:]
    assert len(failed) == 2
    by_status = {description(r).split(":")[0]: r for r in failed}
    assert set(by_status) == {"C-STORE failed 0xC000 cannot understand",
                              "C-STORE failed 0xA900 dataset does not match sop class"}
    assert "2 instance(s)" in description(by_status["C-STORE failed 0xC000 cannot understand"])
    stored = [r for r in records(edge_server.home)
              if event(r) == TRANSFERRED and outcome(r) == 0]
    assert len(stored) == 1
    assert small_study[0].study_uid in object_details(stored[0])



def with_a_broken_ingest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes started from now on (serve) find ingest raising an error no code path
    expects, a bug's (in the spool's fsync, which only ingest starts): a sitecustomize
    ahead of the product site's, which it runs too."""
    hook = tmp_path / "broken-ingest"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        f"exec(open({str(PRODUCT_SITE / 'sitecustomize.py')!r}).read())\n"
        "from appliance.store.spool import SpoolFile\n"
        "def _broken(self):\n"
        "    raise RuntimeError('a bug')\n"
        "SpoolFile.start_sync = _broken\n")
    monkeypatch.setenv("PYTHONPATH", f"{hook}{os.pathsep}{os.environ['PYTHONPATH']}")


def test_stores_failed_by_an_unexpected_error_are_a_failed_record_too(
    edge_home: Path, edge_server_factory: Callable[..., EdgeServer], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, small_study: list[dicomgen.GeneratedInstance],
) -> None:
    """A C-STORE whose ingest raised something unexpected was answered 0x0110 with no
    audit record, where every other failed C-STORE is counted into one per association
    and status."""
    with_a_broken_ingest(tmp_path, monkeypatch)
    server = edge_server_factory(edge_home)
    paths = [i.path for i in small_study[:3]]
    assert send_in_one_association(server, paths) == [PROCESSING_FAILURE] * 3
    [record] = settled(server.home, failed_stores, 1)
    assert "TESTSCU" in requestors(record)
    assert description(record) == ("C-STORE failed 0x0110 processing failure: 3 instance(s);"
                                   " first: unexpected error: RuntimeError")
    sop_class = small_study[0].sop_class_uid
    assert object_details(record) == {sop_class: {"NumberOfInstances": "3"}}


STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
QUERY = "110112"
SECURITY_ALERT, RESTRICTED_FUNCTION = "110113", "110132"
REFUSED_NOT_AUTHORIZED = 0x0124
# A sequence of undefined length holding no item and never delimited: no decoder reads it.
UNDECODABLE = b"\x08\x00\x10\x11\xff\xff\xff\xff\x01\x00\x02\x00\x04\x00\x00\x00abcd"


def send_undecodable(server: EdgeServer, sop_class: str,
                     monkeypatch: pytest.MonkeyPatch) -> int:
    """A C-FIND or C-MOVE whose identifier cannot be decoded (pynetdicom sends the
    bytes given in place of an encoded data set); the final status."""
    monkeypatch.setattr(pynetdicom.association, "encode", lambda *_: UNDECODABLE)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(sop_class, ImplicitVRLittleEndian)
    assoc = ae.associate(server.host, server.port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        responses = (assoc.send_c_find(identifier, sop_class) if sop_class == STUDY_ROOT_FIND
                     else assoc.send_c_move(identifier, "TESTSCU", sop_class))
        return [int(status.Status) for status, _ in responses][-1]
    finally:
        assoc.release()
        monkeypatch.undo()


def test_a_query_or_retrieve_whose_identifier_cannot_be_decoded_is_a_failed_record(
        edge_server: EdgeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Answered 0xC001 / 0xC000 with nothing in the trail before; now a failed Query
    record and a failed Instances Transferred record say why (both answered 0xC000:
    tests/test_identifier_decoding.py)."""
    assert send_undecodable(edge_server, STUDY_ROOT_FIND, monkeypatch) == CANNOT_UNDERSTAND
    assert send_undecodable(edge_server, STUDY_ROOT_MOVE, monkeypatch) == CANNOT_UNDERSTAND
    [query] = settled(edge_server.home, lambda r: event(r) == QUERY and outcome(r) == 4, 1)
    assert "TESTSCU" in requestors(query)
    assert description(query) == ("the identifier cannot be decoded:"
                                  " a sequence holds something other than items")
    [move] = settled(edge_server.home, failed_stores, 1)  # Instances Transferred, failed
    assert action(move) == "R"
    assert "move refused: the identifier cannot be decoded" in description(move)


STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
BAD_FINDS, BAD_MOVES, BAD_GETS = 300, 60, 40


def bad_requests(server: EdgeServer, finds: int, moves: int, gets: int) -> set[int]:
    """C-FINDs, C-MOVEs and C-GETs with no QueryRetrieveLevel, over one association;
    the final statuses they got."""
    ae = AE(ae_title="TESTSCU")
    for sop_class in (STUDY_ROOT_FIND, STUDY_ROOT_MOVE, STUDY_ROOT_GET):
        ae.add_requested_context(sop_class, ImplicitVRLittleEndian)
    assoc = ae.associate(server.host, server.port, ae_title=server.ae_title)
    assert assoc.is_established
    identifier = Dataset()
    identifier.PatientID = "BADPAT"  # no QueryRetrieveLevel: refused
    requests = ([lambda: assoc.send_c_find(identifier, STUDY_ROOT_FIND)] * finds
                + [lambda: assoc.send_c_move(identifier, "TESTSCU", STUDY_ROOT_MOVE)] * moves
                + [lambda: assoc.send_c_get(identifier, STUDY_ROOT_GET)] * gets)
    try:
        return {[int(status.Status) for status, _ in send()][-1] for send in requests}
    finally:
        assoc.release()


def test_repeated_bad_queries_and_retrieves_are_one_record_and_one_count_per_window(
        edge_server: EdgeServer) -> None:
    """A peer repeating a C-FIND, C-MOVE or C-GET the box refuses wrote one audit record
    per request (300 bad C-FINDs, 300 records; a retrieve's fsync'd one by one). Now the
    first of each kind and reason is written at once, the rest of the window is one
    summary carrying the count."""
    statuses = bad_requests(edge_server, BAD_FINDS, BAD_MOVES, BAD_GETS)
    assert statuses and all(status >= 0xA000 for status in statuses)

    def failed() -> list[dict[str, Any]]:
        return [r for r in records(edge_server.home)
                if event(r) in (QUERY, TRANSFERRED) and outcome(r) == 4]

    first = failed()  # written before each refusal was answered
    assert len(first) == 3
    assert all("TESTSCU" in requestors(r) for r in first)
    assert [object_details(r)[STUDY_ROOT_FIND]["Requests"] for r in first
            if event(r) == QUERY] == ["1"]
    edge_server.stop()  # the windows end: what they counted is one summary each
    summaries = failed()[len(first):]
    assert len(summaries) == 3
    counts = {("C-FIND" if event(r) == QUERY else description(r).split()[0]):
              [d["Requests"] for d in object_details(r).values()] for r in summaries}
    assert counts == {"C-FIND": [str(BAD_FINDS - 1)], "move": [str(BAD_MOVES - 1)],
                      "get": [str(BAD_GETS - 1)]}
    query = next(r for r in summaries if event(r) == QUERY)
    assert description(query).startswith(
        f"QueryRetrieveLevel is missing: {BAD_FINDS - 1} more request(s) between ")


def test_repeated_requests_for_a_service_the_peer_lacks_are_one_alert_and_one_count(
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    """A peer without `find` repeating its C-FIND wrote one Security Alert per request,
    each fsync'd before its refusal: 300 refusals, 300 records. Now the first is
    written at once and the rest of the window is one summary carrying the count."""
    server = edge_server_factory(start=False)
    server.add_peer("storeonly", "STOREONLY", 1, allow="store")
    server.start()
    ae = AE(ae_title="STOREONLY")
    ae.add_requested_context(STUDY_ROOT_FIND, ImplicitVRLittleEndian)
    assoc = ae.associate(server.host, server.port, ae_title=server.ae_title)
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientID = "ANY"
    try:
        statuses = {[int(status.Status) for status, _ in
                     assoc.send_c_find(identifier, STUDY_ROOT_FIND)][-1]
                    for _ in range(BAD_FINDS)}
    finally:
        assoc.release()
    assert statuses == {REFUSED_NOT_AUTHORIZED}

    def alerts() -> list[dict[str, Any]]:
        return [r for r in records(server.home) if event(r) == SECURITY_ALERT
                and [t["csd-code"] for t in r["EventIdentification"]["EventTypeCode"]]
                == [RESTRICTED_FUNCTION]]

    assert len(alerts()) == 1  # written before the first refusal was answered
    server.stop()  # the window ends: what it counted is one summary
    first, summary = alerts()
    assert outcome(first) == outcome(summary) == 4
    assert [d["Requests"] for d in object_details(summary).values()] == [str(BAD_FINDS - 1)]
    assert description(summary).startswith(f"{description(first)}: {BAD_FINDS - 1} more")
