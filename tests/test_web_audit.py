"""Web access audit: one record per user, study, address and kind of access per window.

A real `pacs-edge serve` over HTTPS; two studies of one 40-slice CT series each go
in with storescu, and come out frame by frame as a viewer reads them (requests,
one GET per frame). The audit log is read as written (hash-chained JSON lines);
records are polled for with a deadline, never waited for with a sleep.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dcmtk
import dicomgen
import pytest
import webpeer
from conftest import EdgeServer

from appliance.audit.web_access import AccessKey, AccessWindows

OCTETS = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
RETRIEVE = "110104"  # DICOM Instances Transferred
QUERY = "110112"
LOGIN = "110114"  # User Authentication
DEADLINE = 60.0


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[dicomgen.GeneratedInstance]:
    """Two studies of one patient, each one CT series of 40 slices (small images)."""
    return dicomgen.make_studies(tmp_path_factory.mktemp("web-audit-studies"), seed=77,
                                 studies_per_patient=2, series_per_study=1,
                                 instances_per_series=40, modalities=("CT",), size=16)


def _studies(series: list[dicomgen.GeneratedInstance]
             ) -> tuple[list[dicomgen.GeneratedInstance], list[dicomgen.GeneratedInstance]]:
    first = series[0].study_uid
    return ([i for i in series if i.study_uid == first],
            [i for i in series if i.study_uid != first])


def _server(folder: Path, series: list[dicomgen.GeneratedInstance], *,
            window: float) -> EdgeServer:
    server = EdgeServer(webpeer.web_home(folder / "web-home", dcmtk.free_port()))
    server.configure(audit={"access_window_seconds": window})
    server.start()
    webpeer.add_user(server, "rad", "radiologist")
    dcmtk.storescu(server.port, [i.path for i in series]).check()
    return server


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory,
        series: list[dicomgen.GeneratedInstance]) -> Iterator[EdgeServer]:
    """A server whose window (an hour) outlasts every test of the module."""
    server = _server(tmp_path_factory.mktemp("web-audit"), series, window=3600.0)
    try:
        yield server
    finally:
        server.stop()
    assert not server.unclean_stops, server.unclean_stops


# --- reading the log ---------------------------------------------------------------------

def records(server: EdgeServer) -> list[dict[str, Any]]:
    path = server.home / "audit" / "audit.log"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return [json.loads(line)["record"] for line in text.splitlines()]


def details(record: dict[str, Any]) -> dict[str, str]:
    objects = record["ParticipantObjectIdentification"] or [{}]
    return {d["type"]: d["value"] for d in objects[0].get("ParticipantObjectDetail", ())}


def web_records(server: EdgeServer, code: str, user: str, *, study: str = "",
                summary: bool = False, failed: bool = False) -> list[dict[str, Any]]:
    """Records of event `code` requested by web user `user` (about `study`): first
    accesses, or with `summary` the counts written when a window ends."""
    found = []
    for record in records(server):
        event = record["EventIdentification"]
        if event["EventID"]["csd-code"] != code:
            continue
        if (event["EventOutcomeIndicator"] != 0) != failed:
            continue
        if not any(p["UserID"] == user and p["UserIsRequestor"]
                   for p in record["ActiveParticipant"]):
            continue
        ids = {o["ParticipantObjectID"] for o in record["ParticipantObjectIdentification"]}
        if study and study not in ids:
            continue
        if ("FirstTime" in details(record)) == summary:
            found.append(record)
    return found


def wait_for_records(server: EdgeServer, code: str, user: str, count: int,
                     **where: Any) -> list[dict[str, Any]]:
    """Poll until there are `count` such records; fail on more, or too few by the deadline."""
    deadline = time.monotonic() + DEADLINE
    while True:
        found = web_records(server, code, user, **where)
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) == count, [r["EventIdentification"] for r in found]
            return found
        time.sleep(0.1)


def read_frames(server: EdgeServer, user: str, instances: list[dicomgen.GeneratedInstance],
                *, expect: int = 200, password: str = webpeer.PASSWORD) -> None:
    """Frame 1 of each instance, one request each (as OHIF reads a series)."""
    http = webpeer.session(server, user, password=password)
    base = webpeer.base_url(server)
    for item in instances:
        got = http.get(f"{base}/dicom-web/studies/{item.study_uid}/series/{item.series_uid}"
                       f"/instances/{item.sop_instance_uid}/frames/1",
                       headers={"Accept": OCTETS}, timeout=60)
        assert got.status_code == expect, got.text


# --- tests ---------------------------------------------------------------------------------

def test_forty_frames_of_a_series_write_one_retrieve_record(
        web: EdgeServer, series: list[dicomgen.GeneratedInstance]) -> None:
    study, _ = _studies(series)
    assert len(study) == 40
    read_frames(web, "rad", study)
    (record,) = wait_for_records(web, RETRIEVE, "rad", 1, study=study[0].study_uid)
    user = next(p for p in record["ActiveParticipant"] if p["UserID"] == "rad")
    assert user["NetworkAccessPointID"] == "127.0.0.1"
    assert "radiologist" in user["UserName"]
    assert {"radiologist"} == {c["csd-code"] for c in user["RoleIDCode"]
                               if c["codeSystemName"] == "99PACSEDGE"}
    objects = record["ParticipantObjectIdentification"]
    assert objects[0]["ParticipantObjectIDTypeCode"]["csd-code"] == "110180"  # Study UID
    assert objects[0]["ParticipantObjectID"] == study[0].study_uid
    assert study[0].patient_id in {o["ParticipantObjectID"] for o in objects}
    assert details(record)["Requests"] == "1" and details(record)["Instances"] == "1"
    # The first access was written before it was answered: nothing waits for a flush.
    assert record["EventIdentification"]["EventOutcomeDescription"] == "WADO-RS frames"


def test_another_user_or_another_study_writes_its_own_record(
        web: EdgeServer, series: list[dicomgen.GeneratedInstance]) -> None:
    first, second = _studies(series)
    webpeer.add_user(web, "rad2", "radiologist")
    read_frames(web, "rad2", first[:5])
    read_frames(web, "rad", second[:5])
    read_frames(web, "rad", first[:5])  # still inside rad's window on the first study
    wait_for_records(web, RETRIEVE, "rad2", 1, study=first[0].study_uid)
    wait_for_records(web, RETRIEVE, "rad", 1, study=second[0].study_uid)
    wait_for_records(web, RETRIEVE, "rad", 1, study=first[0].study_uid)


def test_refused_reads_and_failed_logins_are_audited_once_per_window(
        web: EdgeServer, series: list[dicomgen.GeneratedInstance]) -> None:
    first, second = _studies(series)
    webpeer.add_user(web, "doc", "referring", referring="NOBODY^NOONE")
    read_frames(web, "doc", first[:10], expect=404)
    read_frames(web, "doc", second[:10], expect=404)
    (refused,) = wait_for_records(web, RETRIEVE, "doc", 1, failed=True)
    assert "scope" in refused["EventIdentification"]["EventOutcomeDescription"]
    assert first[0].study_uid in {o["ParticipantObjectID"]
                                  for o in refused["ParticipantObjectIdentification"]}
    assert web_records(web, RETRIEVE, "doc") == []  # nothing was handed out
    # Wrong passwords: UserService audits each refusal once per window (one record
    # for the wrong passwords, one for the lock-out they reached, as for an account),
    # and the 401 of DICOMweb adds no record of its own.
    read_frames(web, "mallory", first[:10], expect=401, password="not the password")
    logins = wait_for_records(web, LOGIN, "mallory", 2, failed=True)
    assert sorted(r["EventIdentification"]["EventOutcomeDescription"] for r in logins) == [
        "too many failed logins: the account is locked for a while",
        "unknown user or wrong password"]
    assert {r["ActiveParticipant"][0]["NetworkAccessPointID"] for r in logins} == {"127.0.0.1"}
    assert web_records(web, RETRIEVE, "mallory", failed=True) == []


def test_repeated_searches_are_one_query_record(
        web: EdgeServer, series: list[dicomgen.GeneratedInstance]) -> None:
    study = series[0].study_uid
    http = webpeer.session(web, "rad")
    base = webpeer.base_url(web)
    for _ in range(5):
        assert http.get(f"{base}/dicom-web/studies/{study}/series", timeout=60,
                        headers={"Accept": "application/dicom+json"}).status_code == 200
        assert http.get(f"{base}/dicom-web/studies?PatientID={series[0].patient_id}",
                        headers={"Accept": "application/dicom+json"},
                        timeout=60).status_code == 200
    wait_for_records(web, QUERY, "rad", 1, study=study)  # the study's series
    searches = [r for r in web_records(web, QUERY, "rad")
                if len(r["ParticipantObjectIdentification"]) == 1]
    assert len(searches) == 1


def test_every_refused_search_is_a_failed_query_record_with_its_reason(
        web: EdgeServer, series: list[dicomgen.GeneratedInstance]) -> None:
    """A search answered 400 is audited (outcome 4, the reason, the query string) whatever
    refused it: a value the matching rules refuse, and as well the query string itself
    (an unknown key, a key given twice, a value that does not fit its attribute, a bad
    limit, a bad UID in the path), which went unaudited. No value of it is logged."""
    webpeer.add_user(web, "probe", "radiologist")
    http = webpeer.session(web, "probe")
    base = f"{webpeer.base_url(web)}/dicom-web"
    patient = series[0].patient_id
    refused = {
        "/studies?StudyDate=2020-01-01": "a range key is malformed",
        "/studies?SecretKeyword=1": "not a DICOM attribute keyword or tag",
        f"/studies?PatientID={patient}&PatientID=X": "given more than once",
        "/studies?includefield=SecretKeyword": "not a DICOM attribute keyword or tag",
        "/instances?InstanceNumber=abc": "does not fit its attribute",
        "/studies?ReferencedStudySequence=x": "sequence",
        "/studies?limit=-1": "limit must be",
        "/studies/1.2.x/series": "study is not a valid UID",
    }
    for path in refused:
        got = http.get(f"{base}{path}", headers={"Accept": "application/dicom+json"},
                       timeout=60)
        assert got.status_code == 400, (path, got.status_code)
    reasons = set(refused.values())
    found = wait_for_records(web, QUERY, "probe", len(reasons), failed=True)
    described = [r["EventIdentification"]["EventOutcomeDescription"] for r in found]
    assert {reason for reason in reasons if any(reason in d for d in described)} == reasons
    queries = {base64.b64decode(o["ParticipantObjectQuery"]).decode()
               for r in found for o in r["ParticipantObjectIdentification"]
               if o.get("ParticipantObjectQuery")}
    assert f"PatientID={patient}&PatientID=X" in queries
    assert patient not in web.log() and "SecretKeyword" not in web.log()


def test_uploads_of_one_study_are_one_store_record(web: EdgeServer, tmp_path: Path) -> None:
    study = dicomgen.make_study(tmp_path / "stow", seed=78, series_per_study=1,
                                instances_per_series=3)
    http = webpeer.session(web, "rad")
    for item in study:  # one STOW-RS request per instance, as some tools send
        body, content_type = webpeer.multipart_body([item.path])
        got = http.post(f"{webpeer.base_url(web)}/dicom-web/studies", data=body, timeout=60,
                        headers={"Content-Type": content_type,
                                 "Accept": "application/dicom+json"})
        assert got.status_code == 200, got.text
    stored = [r for r in web_records(web, RETRIEVE, "rad", study=study[0].study_uid)
              if r["EventIdentification"]["EventActionCode"] == "C"]
    assert len(stored) == 1
    sop_classes = stored[0]["ParticipantObjectIdentification"][0][
        "ParticipantObjectDescription"]["SOPClass"]
    assert [c["NumberOfInstances"] for c in sop_classes] == [1]


def test_an_upload_refused_for_the_users_role_is_a_failed_store_record_once_per_window(
        web: EdgeServer, tmp_path: Path) -> None:
    """A referring physician may not store: the 403 is audited as refused reads are,
    outcome 4 with the reason, once per user, address and reason in a window."""
    study = dicomgen.make_study(tmp_path / "refused-stow", seed=79, series_per_study=1,
                                instances_per_series=1)
    webpeer.add_user(web, "refstow", "referring", referring="WELBY^MARCUS")
    http = webpeer.session(web, "refstow")
    body, content_type = webpeer.multipart_body([study[0].path])
    for _ in range(2):
        got = http.post(f"{webpeer.base_url(web)}/dicom-web/studies/{study[0].study_uid}",
                        data=body, timeout=60, headers={"Content-Type": content_type,
                                                        "Accept": "application/dicom+json"})
        assert got.status_code == 403, got.text
    [refused] = wait_for_records(web, RETRIEVE, "refstow", 1, failed=True)
    event = refused["EventIdentification"]
    assert event["EventActionCode"] == "C"
    assert "role" in event["EventOutcomeDescription"]
    assert study[0].study_uid in {o["ParticipantObjectID"]
                                  for o in refused["ParticipantObjectIdentification"]}


def test_beyond_max_windows_every_access_is_recorded_in_full() -> None:
    windows = AccessWindows(3600.0, max_windows=2)
    keys = [AccessKey("retrieve", "rad", "radiologist", "127.0.0.1", study_uid=f"1.2.{n}")
            for n in range(3)]
    assert [windows.note(k) for k in keys] == [True, True, True]
    assert [windows.note(k) for k in keys] == [False, False, True]  # the third never folds
    assert [(w.key.study_uid, w.requests) for w in windows.drain()] == [("1.2.0", 1),
                                                                       ("1.2.1", 1)]


def test_a_new_window_writes_again_and_the_last_is_summarised_at_stop(
        tmp_path: Path, series: list[dicomgen.GeneratedInstance]) -> None:
    study, _ = _studies(series)
    uid = study[0].study_uid
    server = _server(tmp_path, series, window=1.0)
    try:
        deadline = time.monotonic() + DEADLINE
        while (len(web_records(server, RETRIEVE, "rad", study=uid)) < 2
               or not web_records(server, RETRIEVE, "rad", study=uid, summary=True)):
            assert time.monotonic() < deadline, "no second window, or no summary of the first"
            read_frames(server, "rad", study[:3])
        summary = web_records(server, RETRIEVE, "rad", study=uid, summary=True)[0]
        counted = details(summary)
        assert int(counted["Requests"]) >= 2 and counted["Accessed"].startswith("frames=")
        assert counted["Instances"] == counted["Requests"]
        assert summary["EventIdentification"]["EventOutcomeIndicator"] == 0
    finally:
        server.stop()
    assert not server.unclean_stops, server.unclean_stops
    verified = server.cli("audit", "verify", "--local-only", check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_serve_stop_writes_the_open_window_as_a_summary(
        tmp_path: Path, series: list[dicomgen.GeneratedInstance]) -> None:
    study, _ = _studies(series)
    server = _server(tmp_path, series, window=3600.0)
    try:
        read_frames(server, "rad", study[:6])
        wait_for_records(server, RETRIEVE, "rad", 1, study=study[0].study_uid)
        assert web_records(server, RETRIEVE, "rad", summary=True) == []
    finally:
        server.stop()
    assert not server.unclean_stops, server.unclean_stops
    (summary,) = web_records(server, RETRIEVE, "rad", study=study[0].study_uid, summary=True)
    assert details(summary)["Requests"] == "5" and details(summary)["Instances"] == "5"
    assert details(summary)["Accessed"] == "frames=5"
    exported = server.cli("audit", "export")
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert sum(1 for line in lines if "frames=5" in json.dumps(line)) == 1
    verified = server.cli("audit", "verify", "--local-only", check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_no_user_or_study_in_the_operational_log(
        web: EdgeServer, series: list[dicomgen.GeneratedInstance]) -> None:
    read_frames(web, "rad", series[:3])
    log = web.log()
    assert series[0].study_uid not in log and series[0].patient_id not in log
