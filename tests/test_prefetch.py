"""Prefetch of priors, end to end, with real peers.

- An HL7 order arrives over a real MLLP socket at `pacs-edge serve`; the
  patient's three CT priors were evicted to Azure (Azurite), one of them with
  its pack on the Archive tier; the running `pacs-edge sync` agent brings all
  three back before the order's scheduled start, and asks the archived pack's
  rehydration early, with High priority.
  What Azurite does, and so what this proves: Azurite keeps the Archive tier
  (a read is refused 409 BlobArchived, as on Azure), but a Set Blob Tier out of
  Archive finishes at once and Azurite neither reports a pending rehydration
  nor the priority. So the test checks the box's side: the prior went through
  `rehydrating`, Azurite received Set Blob Tier with rehydratePriority High
  for that pack (its request log, --debug), and the instances came back
  byte-identical. The hours-long wait of a real rehydration is covered by
  test_an_archived_prior_waits_in_rehydrating_until_the_cloud_is_done, on
  the local folder store whose rehydration takes as long as the test says.
- dcmtk's dcmqrscp stands in as the remote archive for priors the box never
  held: C-FIND for the patient, C-MOVE to the box's own AE title; while it is
  down, the request fails with a reason and `prefetch retry` completes it, or the
  serving process's automatic retry once the archive is back.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import dcmtk
import dicomgen
import hl7peer
import pydicom
import pydicom.config
from azurite import AzuriteServer
from conftest import EdgeServer, init_home, run_pacs_edge
from qrarchive import QrArchive
from syncagent import SyncAgent, evict, index_rows, sent_hashes, stored_hashes, sync_once

PATIENT = "PREFETCH-PAT-7"  # distinctive: the logs must never contain it
ISSUER = "HOSP"
DEADLINE = 120.0


def make_prior(folder: Path, seed: int, *, days_ago: int, modality: str = "CT",
               body_part: str = "HEAD", patient: str = PATIENT, issuer: str = ISSUER,
               instances: int = 3) -> list[dicomgen.GeneratedInstance]:
    """One study of the patient, `days_ago` old, of one modality and body part."""
    made = dicomgen.make_studies(folder / f"study-{seed}", seed=seed, series_per_study=1,
                                 instances_per_series=instances, modalities=(modality,),
                                 size=64)
    when = (date.today() - timedelta(days=days_ago)).strftime("%Y%m%d")
    for instance in made:
        ds = pydicom.dcmread(instance.path)
        ds.PatientID, ds.IssuerOfPatientID = patient, issuer
        ds.StudyDate = ds.SeriesDate = when
        ds.BodyPartExamined = body_part
        ds.StudyDescription = f"{modality} {body_part}"
        ds.save_as(instance.path, enforce_file_format=True)
    return [dicomgen.GeneratedInstance(i.path, dicomgen.read_header(i.path)) for i in made]


def prefetch_status(home: Path) -> list[dict[str, Any]]:
    result = run_pacs_edge("prefetch", "status", "--json", "--home", str(home))
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def wait_for(what: str, check: Callable[[], Any], *logs: Callable[[], str]) -> Any:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"{what}: not reached in {DEADLINE}s\n" +
                         "\n".join(log()[-3000:] for log in logs))


def all_done(home: Path, count: int) -> list[dict[str, Any]] | None:
    requests = prefetch_status(home)
    priors = [p for r in requests for p in r["priors"]]
    return requests if len(priors) == count and all(p["state"] == "done"
                                                    for p in priors) else None


def test_an_order_brings_three_evicted_priors_back_before_the_patient_arrives(
        tmp_path: Path) -> None:
    from sync.blobstore.azure import AzureBlobStore
    from sync.blobstore.base import Tier

    debug_log = tmp_path / "azurite-requests.log"
    azurite = AzuriteServer(tmp_path / "azurite", debug_log=debug_log).start()
    server = agent = None
    try:
        home = init_home(tmp_path / "home")
        credentials = home / "secrets" / "azure.conn"
        credentials.write_text(azurite.connection_string)
        credentials.chmod(0o600)
        hl7_port = dcmtk.free_port()
        server = EdgeServer(home)
        server.configure(
            cloud={"url": "azure://prefetch", "credentials_file": str(credentials)},
            sync={"stable_after_seconds": 0.0, "recall_poll_seconds": 0.2,
                  "rehydrate_poll_seconds": 0.2, "segment_size": 8192},
            hl7={"port": hl7_port}, prefetch={"nightly_at": ""})
        server.cli("peers", "add", "ris", "--ae-title", "RIS", "--host", "127.0.0.1",
                   "--allow", "hl7")
        priors = [make_prior(tmp_path, 701, days_ago=30), make_prior(tmp_path, 702, days_ago=400),
                  make_prior(tmp_path, 703, days_ago=900)]
        other = make_prior(tmp_path, 704, days_ago=10, modality="MR")  # not the order's modality
        run_pacs_edge("import", "--home", str(home),
                      *(str(i.path) for study in [*priors, other] for i in study))
        sync_once(home)
        for study in priors:
            evict(home, study[0].study_uid)
        archived = priors[1][0].study_uid
        [(pack,)] = index_rows(home, "SELECT p.pack_name FROM packs p JOIN studies s"
                               f" ON s.id = p.study_fk WHERE s.study_uid = '{archived}'")
        store = AzureBlobStore("prefetch", azurite.connection_string)
        store.set_tier(pack, Tier.ARCHIVE)
        assert not store.stat(pack).online

        server.start()
        agent = SyncAgent(home).start()
        tomorrow = (date.today() + timedelta(days=1)).strftime("%Y%m%d")
        ack = hl7peer.send(hl7_port, hl7peer.orm(
            "PF-1", accession="ACC-PF-1", patient_id=PATIENT, start=f"{tomorrow}0900",
            modality="CT", procedure="CTHEAD^CT head without contrast^LOCAL"))
        assert ack.code == "AA", ack
        resent = hl7peer.send(hl7_port, hl7peer.orm(
            "PF-1", accession="ACC-PF-1", patient_id=PATIENT, start=f"{tomorrow}0900",
            modality="CT", procedure="CTHEAD^CT head without contrast^LOCAL"))
        assert resent.code == "AA"  # a duplicate: answered again, no second request

        [request] = wait_for("three priors done", lambda: all_done(home, 3), server.log,
                             agent.log)
        assert (request["trigger"], request["accession_number"], request["state"]) == (
            "order", "ACC-PF-1", "planned")
        chosen = {p["study_uid"]: p for p in request["priors"]}
        assert set(chosen) == {study[0].study_uid for study in priors}
        assert all(p["source"] == "cloud" and p["in_time"] for p in chosen.values())
        assert request["needed_at"] is not None  # in_time compares with it
        assert [uid for uid, p in chosen.items() if p["rehydrate_requested_at"]] == [archived]
        [(prior_id,)] = index_rows(home, "SELECT id FROM prefetch_priors WHERE study_uid ="
                                   f" '{archived}'")
        assert index_rows(home, "SELECT from_state, to_state FROM prefetch_transitions"
                          f" WHERE prior_fk = {prior_id} ORDER BY id") == [
            ("pending", "rehydrating"), ("rehydrating", "recalling"), ("recalling", "done")]
        # What Azurite was asked: the archived pack out of Archive, with High priority.
        requests = debug_log.read_text(errors="replace")
        assert '"rehydratePriority":"High"' in requests
        assert store.stat(pack).tier is Tier.HOT
        store.close()
        for study in priors:
            assert index_rows(home, "SELECT tier_state FROM studies WHERE study_uid ="
                              f" '{study[0].study_uid}'") == [("replicated",)]
        assert sent_hashes(i for s in priors for i in s).items() <= stored_hashes(home).items()

        # Held: an eviction pass that takes every idle study spares the priors.
        agent.stop()
        server.configure(sync={"evict_after_days": 1e-9})
        sync_once(home)
        states = dict(index_rows(home, "SELECT study_uid, tier_state FROM studies"))
        assert states[other[0].study_uid] == "evicted"
        assert {states[s[0].study_uid] for s in priors} == {"replicated"}
        assert PATIENT not in server.log() and PATIENT not in agent.log()
    finally:
        if agent is not None:
            agent.stop()
        if server is not None:
            server.stop()
        azurite.stop()


def test_priors_not_in_the_box_come_from_the_remote_archive(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer]) -> None:
    server = edge_server_factory(start=False)
    server.configure(prefetch={"modalities": ["CT"], "remote_archive": "archive",
                               "nightly_at": ""})
    local = make_prior(tmp_path, 711, days_ago=20)
    remote = [make_prior(tmp_path, 712, days_ago=200, body_part="BRAIN"),
              make_prior(tmp_path, 713, days_ago=800, body_part="CHEST")]
    unwanted = [make_prior(tmp_path, 714, days_ago=5, modality="MR"),
                make_prior(tmp_path, 715, days_ago=50, issuer="OTHER")]
    run_pacs_edge("import", "--home", str(server.home), *(str(i.path) for i in local))
    server.start()
    archive = QrArchive(tmp_path / "qr", destinations={server.ae_title: server.port})
    archive.load(i.path for study in [*remote, *unwanted] for i in study)
    server.add_peer("archive", archive.ae_title, archive.port, allow="store")
    try:
        # The archive is down: the local prior is held at once, the request fails.
        out = server.cli("prefetch", "--patient-id", PATIENT, "--issuer", ISSUER).stdout
        assert "1 prior(s)" in out and "remote archive not asked" in out
        [request] = prefetch_status(server.home)
        assert (request["state"], request["error_kind"]) == ("failed", "remote_unreachable")
        assert [(p["source"], p["state"]) for p in request["priors"]] == [("local", "done")]

        archive.start()
        assert "retrying 1 request(s)" in server.cli("prefetch", "retry").stdout
        [request] = wait_for("remote priors moved", lambda: all_done(server.home, 3),
                             server.log, archive.log)
        assert request["state"] == "planned"
        assert [(p["study_uid"], p["source"]) for p in request["priors"]] == [
            (local[0].study_uid, "local"), (remote[0][0].study_uid, "remote"),
            (remote[1][0].study_uid, "remote")]
        # Byte-identical to the archive's copies; the MR study and the other issuer's
        # study (same Patient ID) were not fetched.
        assert sent_hashes(i for s in remote for i in s).items() <= \
            stored_hashes(server.home).items()
        stored = {uid for (uid,) in index_rows(server.home, "SELECT study_uid FROM studies")}
        assert stored == {local[0].study_uid, remote[0][0].study_uid, remote[1][0].study_uid}
        table = server.cli("prefetch", "status").stdout
        assert "done 3" in table and "failed 0" in table
    finally:
        archive.stop()


def test_a_request_chosen_again_holds_no_more_than_max_priors(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer]) -> None:
    """`max_priors = 2`. The archive is down when the request is chosen: the two local
    priors are held and the request fails. Chosen again once the archive is back, the
    newest two are the archive's, and they were added to the two kept: four priors held,
    two moved, for a budget of two. A request holds at most max_priors priors: those
    chosen before keep their rows and count, the new choice fills what is left."""
    server = edge_server_factory(start=False)
    server.configure(prefetch={"modalities": ["CT"], "remote_archive": "archive",
                               "nightly_at": "", "max_priors": 2})
    local = [make_prior(tmp_path, 781, days_ago=300), make_prior(tmp_path, 782, days_ago=400)]
    remote = [make_prior(tmp_path, 783, days_ago=20), make_prior(tmp_path, 784, days_ago=40)]
    run_pacs_edge("import", "--home", str(server.home), *(str(i.path) for s in local for i in s))
    server.start()
    archive = QrArchive(tmp_path / "qr", destinations={server.ae_title: server.port})
    archive.load(i.path for study in remote for i in study)
    server.add_peer("archive", archive.ae_title, archive.port, allow="store")
    try:
        out = server.cli("prefetch", "--patient-id", PATIENT, "--issuer", ISSUER).stdout
        assert "2 prior(s)" in out and "remote archive not asked" in out
        archive.start()
        assert "retrying 1 request(s)" in server.cli("prefetch", "retry").stdout

        def chosen_again() -> dict[str, Any] | None:
            [request] = prefetch_status(server.home)
            return request if request["state"] == "planned" else None

        request = wait_for("the request chosen again", chosen_again, server.log, archive.log)
        assert sorted(p["study_uid"] for p in request["priors"]) == sorted(
            s[0].study_uid for s in local)
        assert all(p["state"] == "done" for p in request["priors"])
    finally:
        archive.stop()
    assert index_rows(server.home, "SELECT COUNT(*) FROM prefetch_transitions"
                      " WHERE trigger = 'move'") == [(0,)]


def test_a_patient_id_holding_a_wildcard_character_fetches_no_other_patients_study(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer]) -> None:
    """The patient's ID goes to the archive as a C-FIND matching key, in which ? and *
    are wildcards (HL7 PID-3 and --patient-id take them): MRN-1234? matched MRN-12345,
    whose study was chosen and moved into the box as this patient's prior."""
    server = edge_server_factory(start=False)
    server.configure(prefetch={"modalities": ["any"], "remote_archive": "archive",
                               "nightly_at": ""})
    other = make_prior(tmp_path, 771, days_ago=100, patient="MRN-12345")
    own = make_prior(tmp_path, 772, days_ago=200, patient="MRN-1234?")
    server.start()
    with QrArchive(tmp_path / "qr", destinations={server.ae_title: server.port}) as archive:
        archive.load(i.path for study in (other, own) for i in study)
        server.add_peer("archive", archive.ae_title, archive.port, allow="store")
        out = server.cli("prefetch", "--patient-id", "MRN-1234?", "--issuer", ISSUER).stdout
        assert "1 prior(s)" in out and own[0].study_uid in out, out
        assert other[0].study_uid not in out, out
        wait_for("the prior moved", lambda: all_done(server.home, 1), server.log)
    stored = {uid for (uid,) in index_rows(server.home, "SELECT study_uid FROM studies")}
    assert stored == {own[0].study_uid}


def test_a_prior_moved_incomplete_is_moved_again_by_its_retry_not_taken_as_done(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer]) -> None:
    """A C-MOVE that brought two of three instances fails as move_incomplete, retried
    automatically; the retry found the study in the index (the two that came) and
    called the prior done, held with an instance missing. It moves again, and fails
    again while the instance cannot come."""
    server = edge_server_factory(start=False)
    server.configure(prefetch={"modalities": ["any"], "remote_archive": "archive",
                               "nightly_at": "", "retry_base_seconds": 1,
                               "retry_attempts": 1})
    remote = make_prior(tmp_path, 761, days_ago=100, instances=3)
    bad = pydicom.dcmread(remote[-1].path)  # a UID with letters: the box refuses it
    with pydicom.config.disable_value_validation():
        bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = (
            dicomgen.UID_ROOT + "abc.1")
        bad.save_as(remote[-1].path, enforce_file_format=True)
    server.start()
    with QrArchive(tmp_path / "qr", destinations={server.ae_title: server.port}) as archive:
        archive.load(i.path for i in remote)
        server.add_peer("archive", archive.ae_title, archive.port, allow="store")
        server.cli("prefetch", "--patient-id", PATIENT, "--issuer", ISSUER)

        def retried() -> Any:
            [request] = prefetch_status(server.home)
            [prior] = request["priors"]
            moves = index_rows(server.home, "SELECT COUNT(*) FROM prefetch_transitions"
                               " WHERE trigger = 'move'")[0][0]
            return prior if moves == 2 and prior["state"] in ("failed", "done") else None

        prior = wait_for("the retry's move", retried, server.log, archive.log)
    assert (prior["state"], prior["failure_kind"]) == ("failed", "move_incomplete"), prior
    assert index_rows(server.home, "SELECT instance_count FROM studies") == [(2,)]


def _audit_records(home: Path) -> list[dict[str, Any]]:
    path = home / "audit" / "audit.log"
    return [json.loads(line)["record"] for line in path.read_text().splitlines()]


def _archive_asked(home: Path, event_id: str, archive_ae: str) -> list[dict[str, Any]]:
    """Records of `event_id` in which the remote archive is a participant."""
    return [r for r in _audit_records(home)
            if r["EventIdentification"]["EventID"]["csd-code"] == event_id
            and archive_ae in {p["UserID"] for p in r["ActiveParticipant"]}]


def test_what_a_prefetch_asks_the_remote_archive_is_audited_failures_too(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer]) -> None:
    """The C-FIND names the patient to another archive and the C-MOVE brings a study in:
    each is a record, as a migration's are, and one the archive did not answer is one
    with outcome 4."""
    server = edge_server_factory(start=False)
    server.configure(prefetch={"modalities": ["CT"], "remote_archive": "archive",
                               "nightly_at": ""})
    remote = make_prior(tmp_path, 741, days_ago=200)
    server.start()
    archive = QrArchive(tmp_path / "qr", destinations={server.ae_title: server.port})
    archive.load(i.path for i in remote)
    server.add_peer("archive", archive.ae_title, archive.port, allow="store")

    def moves() -> list[dict[str, Any]]:  # not the C-STOREs' records: those say no more
        return [r for r in _archive_asked(server.home, "110104", archive.ae_title)
                if r["EventIdentification"].get("EventOutcomeDescription", "").startswith(
                    "prefetch")]

    try:
        server.cli("prefetch", "--patient-id", PATIENT, "--issuer", ISSUER)  # archive down
        [down] = _archive_asked(server.home, "110112", archive.ae_title)
        assert down["EventIdentification"]["EventOutcomeIndicator"] == 4
        archive.start()
        server.cli("prefetch", "--patient-id", PATIENT, "--issuer", ISSUER)
        wait_for("the prior moved", lambda: moves(), server.log, archive.log)
    finally:
        archive.stop()
    query = _archive_asked(server.home, "110112", archive.ae_title)[-1]
    assert query["EventIdentification"]["EventOutcomeIndicator"] == 0
    assert PATIENT in {o["ParticipantObjectID"]
                       for o in query["ParticipantObjectIdentification"]}
    [moved] = moves()
    assert moved["EventIdentification"]["EventOutcomeIndicator"] == 0
    assert moved["EventIdentification"]["EventOutcomeDescription"] == (
        "prefetch C-MOVE: completed=3 failed=0")
    # The instances themselves: the archive's C-STOREs, per study and association.
    assert [r for r in _archive_asked(server.home, "110104", archive.ae_title)
            if "EventOutcomeDescription" not in r["EventIdentification"]]
    assert remote[0].study_uid in {o["ParticipantObjectID"]
                                   for o in moved["ParticipantObjectIdentification"]}
    assert PATIENT not in server.log()


def test_a_remote_archive_down_at_order_time_is_asked_again_without_anyone_retrying(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer]) -> None:
    """[prefetch] retry_attempts / retry_base_seconds: the request whose C-FIND found the
    archive down is chosen again by the serving process once the archive is back, and
    its prior moved, with no `pacs-edge prefetch retry`."""
    server = edge_server_factory(start=False)
    server.configure(prefetch={"modalities": ["CT"], "remote_archive": "archive",
                               "nightly_at": "", "retry_base_seconds": 1})
    remote = make_prior(tmp_path, 716, days_ago=200)
    server.start()
    archive = QrArchive(tmp_path / "qr", destinations={server.ae_title: server.port})
    archive.load(i.path for i in remote)
    server.add_peer("archive", archive.ae_title, archive.port, allow="store")
    try:
        out = server.cli("prefetch", "--patient-id", PATIENT, "--issuer", ISSUER).stdout
        assert "remote archive not asked" in out  # failed; its retry is due in 1 s
        archive.start()
        [request] = wait_for("the prior moved", lambda: all_done(server.home, 1),
                             server.log, archive.log)
        assert (request["state"], request["retry_at"]) == ("planned", None)
        assert request["attempts"] >= 1
        assert sent_hashes(remote).items() <= stored_hashes(server.home).items()
        assert "prefetch retrying requests=1" in server.log()
    finally:
        archive.stop()


def test_remote_priors_move_two_at_once_and_a_shared_prior_once(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer]) -> None:
    """`[prefetch] associations = 2`: the two remote priors of a request are C-MOVEd at
    the same time (each one's move began before either ended), and a second request
    wanting the same two studies does not move them again."""
    server = edge_server_factory(start=False)
    server.configure(prefetch={"modalities": ["any"], "remote_archive": "archive",
                               "nightly_at": "", "associations": 2})
    remote = [make_prior(tmp_path, 741, days_ago=90, instances=40),
              make_prior(tmp_path, 742, days_ago=400, modality="MR", instances=40)]
    server.start()
    with QrArchive(tmp_path / "qr", destinations={server.ae_title: server.port}) as archive:
        archive.load(i.path for study in remote for i in study)
        server.add_peer("archive", archive.ae_title, archive.port, allow="store")
        for _ in range(2):
            out = server.cli("prefetch", "--patient-id", PATIENT, "--issuer", ISSUER).stdout
            assert "2 prior(s)" in out
        wait_for("all priors done", lambda: all_done(server.home, 4), server.log, archive.log)
    assert sent_hashes(i for s in remote for i in s).items() <= stored_hashes(server.home).items()
    moves = index_rows(server.home, "SELECT p.study_uid, t.trigger, t.at FROM"
                       " prefetch_transitions t JOIN prefetch_priors p ON p.id = t.prior_fk"
                       " WHERE t.trigger IN ('move', 'moved')")
    started = {uid: at for uid, trigger, at in moves if trigger == "move"}
    ended = {uid: at for uid, trigger, at in moves if trigger == "moved"}
    assert sorted(started) == sorted(ended) == sorted(s[0].study_uid for s in remote)
    assert len(moves) == 4  # one move per study: the other request found it in the index
    assert max(started.values()) < min(ended.values())


def test_a_cancelled_order_ends_its_prefetch(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer]) -> None:
    """ORC-1 CA over MLLP: the priors are no longer held, and a request that could not
    ask the (down) remote archive is not asked again by `prefetch retry`."""
    hl7_port = dcmtk.free_port()
    server = edge_server_factory(start=False)
    server.configure(prefetch={"remote_archive": "archive", "nightly_at": ""},
                     hl7={"port": hl7_port})
    server.cli("peers", "add", "ris", "--ae-title", "RIS", "--host", "127.0.0.1",
               "--allow", "hl7")
    local = make_prior(tmp_path, 721, days_ago=20)
    run_pacs_edge("import", "--home", str(server.home), *(str(i.path) for i in local))
    server.start()
    archive = QrArchive(tmp_path / "qr")  # never started: the archive is down
    server.add_peer("archive", archive.ae_title, archive.port, allow="store")
    tomorrow = (date.today() + timedelta(days=1)).strftime("%Y%m%d")
    order = {"accession": "ACC-PC-1", "patient_id": PATIENT, "start": f"{tomorrow}0900"}
    assert hl7peer.send(hl7_port, hl7peer.orm("PC-1", **order)).code == "AA"

    def chosen() -> dict[str, Any] | None:
        requests = prefetch_status(server.home)
        return requests[0] if requests and requests[0]["state"] == "failed" else None

    request = wait_for("the priors chosen", chosen, server.log)
    assert request["error_kind"] == "remote_unreachable"
    assert [(p["source"], p["state"]) for p in request["priors"]] == [("local", "done")]
    [(held_until,)] = index_rows(server.home, "SELECT hold_until FROM prefetch_requests")
    assert held_until > time.time() + 86400  # tomorrow's start plus keep_local_days

    assert hl7peer.send(hl7_port, hl7peer.orm("PC-2", "CA", **order)).code == "AA"
    [request] = prefetch_status(server.home)
    assert (request["state"], request["error_kind"]) == ("failed", "order_cancelled")
    [(held_until,)] = index_rows(server.home, "SELECT hold_until FROM prefetch_requests")
    assert held_until <= time.time()  # eviction may take the priors again
    assert "retrying 0 request(s) and 0 prior(s)" in server.cli("prefetch", "retry").stdout
    backlog = json.loads(server.cli("status", "--json").stdout)["backlog"]
    assert (backlog["prefetch_waiting"], backlog["prefetch_failed"]) == (0, 0)
    assert "prefetch ended request=1 reason=order_cancelled" in server.log()
    assert PATIENT not in server.log()


def test_a_remote_archive_that_does_not_know_the_box_fails_the_move_with_its_status(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer]) -> None:
    server = edge_server_factory(start=False)
    server.configure(prefetch={"remote_archive": "archive", "nightly_at": ""})
    remote = make_prior(tmp_path, 731, days_ago=100)
    server.start()
    with QrArchive(tmp_path / "qr") as archive:  # no move destinations configured
        archive.load(i.path for i in remote)
        server.add_peer("archive", archive.ae_title, archive.port, allow="store")
        out = server.cli("prefetch", "--patient-id", PATIENT, "--issuer", ISSUER).stdout
        assert "1 prior(s)" in out and "(remote)" in out

        def failed() -> dict[str, Any] | None:
            [request] = prefetch_status(server.home)
            [prior] = request["priors"]
            return prior if prior["state"] == "failed" else None

        prior = wait_for("the move failed", failed, server.log, archive.log)
    assert prior["failure_kind"] == "move_failed"
    assert "0xA801" in prior["error"]  # Refused: Move Destination unknown
    [refused] = wait_for("the failed move audited", lambda: [
        r for r in _archive_asked(server.home, "110104", archive.ae_title)
        if "0xA801" in r["EventIdentification"].get("EventOutcomeDescription", "")],
        server.log)  # buffered: written within [audit] flush_seconds
    assert refused["EventIdentification"]["EventOutcomeIndicator"] == 4
    assert index_rows(server.home, "SELECT COUNT(*) FROM studies") == [(0,)]
    assert "failed 1" in server.cli("prefetch", "status").stdout
    # `status` says so too, for whoever looks at the box rather than at prefetch.
    backlog = json.loads(server.cli("status", "--json").stdout)["backlog"]
    assert (backlog["prefetch_waiting"], backlog["prefetch_failed"]) == (0, 1)
    assert "0 priors waiting, 1 failed" in server.cli("status").stdout


async def test_an_archived_prior_waits_in_rehydrating_until_the_cloud_is_done(
        tmp_path: Path) -> None:
    """The slow path Azurite cannot show: the pack stays offline for as long as the
    folder store's rehydration says (here: until the test finishes it); the prior waits
    in `rehydrating`, polled every rehydrate_poll_seconds, the study still evicted; once
    online, the next round recalls it."""
    from prometheus_client import REGISTRY

    from appliance.base.config import load_config
    from appliance.services.prefetch import PrefetchService
    from appliance.store import database
    from appliance.store import prefetch_rows as rows
    from appliance.store.order_rows import PatientKey
    from sync.blobstore.base import Tier
    from sync.blobstore.local import LocalFolderStore
    from sync.cloud import PackService
    from sync.context import open_context
    from sync.prefetch_rehydrate import PrefetchRecalls

    def recalled_count() -> float:
        return REGISTRY.get_sample_value("pacs_edge_prefetch_priors_total",
                                         {"source": "cloud", "outcome": "done"}) or 0.0

    home = init_home(tmp_path / "home")
    EdgeServer(home).configure(sync={"rehydrate_poll_seconds": 0.001})
    prior = make_prior(tmp_path, 721, days_ago=60)
    run_pacs_edge("import", "--home", str(home), *(str(i.path) for i in prior))
    sync_once(home)
    evict(home, prior[0].study_uid)
    cloud = home / "cloud"
    pack = next(i.name for i in LocalFolderStore(cloud).list() if i.name.endswith("pack"))
    LocalFolderStore(cloud).set_tier(pack, Tier.ARCHIVE)

    config = load_config(home)
    async with open_context(config) as opened:
        slow = LocalFolderStore(cloud, rehydrate_delay=3600.0)  # hours, as on Azure
        ctx = dataclasses.replace(opened, store=slow,
                                  packs=PackService.for_home(config, slow, opened.files))
        service = PrefetchService(ctx.index, config.prefetch)
        request = await service.request_manual(PatientKey(PATIENT, ISSUER))
        [pending] = await database.run_sync(ctx.index.reader, rows.pending_requests)
        await service.plan(pending)
        job = PrefetchRecalls(ctx)

        async def state() -> tuple[str, str]:
            [prior_row] = await database.run_sync(ctx.index.reader, rows.priors_of, [request])
            tier = await database.run_sync(ctx.index.reader, rows.study_tier_state,
                                           prior[0].study_uid)
            return prior_row.state, tier

        for _ in range(3):  # asked once, then polled: still offline
            assert await job.run() == 0
            assert await state() == ("rehydrating", "evicted")
        job = PrefetchRecalls(ctx)  # the agent restarted: the prior resumes, still waiting
        assert await job.run() == 0
        assert await state() == ("rehydrating", "evicted")
        [prior_row] = await database.run_sync(ctx.index.reader, rows.priors_of, [request])
        assert await database.run_sync(ctx.index.reader, rows.transitions_of, prior_row.id) == [
            ("pending", "rehydrating", "rehydrate"), ("rehydrating", "pending", "resume"),
            ("pending", "rehydrating", "rehydrate")]
        assert slow.stat(pack).tier is Tier.ARCHIVE and not slow.stat(pack).online
        LocalFolderStore(cloud).set_tier(pack, Tier.HOT)  # the cloud finished
        counted = recalled_count()
        assert await job.run() == 1
        assert await state() == ("done", "replicated")
        assert recalled_count() == counted + 1  # pacs_edge_prefetch_priors_total
    assert sent_hashes(prior).items() <= stored_hashes(home).items()


def test_the_groups_home_reaches_status_and_retry_and_patient_id_goes_alone(
        tmp_path: Path) -> None:
    """`prefetch --home H status` reads H (not ./data); --patient-id before a command
    would be dropped: refused."""
    home = init_home(tmp_path / "home", default_peer=False)
    made = run_pacs_edge("prefetch", "--home", str(home), "--patient-id", PATIENT, "--issuer",
                         ISSUER).stdout
    assert "prefetch request 1: 0 prior(s)" in made
    listed = json.loads(run_pacs_edge("prefetch", "--home", str(home), "status",
                                      "--json").stdout)
    assert [(r["patient_id"], r["issuer"]) for r in listed] == [(PATIENT, ISSUER)]
    retried = run_pacs_edge("prefetch", "--home", str(home), "retry").stdout
    assert "retrying 0 request(s) and 0 prior(s)" in retried
    for args in (("--patient-id", "OTHER", "status"), ("--issuer", ISSUER, "retry")):
        proc = run_pacs_edge("prefetch", "--home", str(home), *args, check=False)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "do not go with" in proc.stderr and "Traceback" not in proc.stderr
    other = run_pacs_edge("prefetch", "--home", str(home), "status", "--home",
                          str(tmp_path / "other"), check=False)
    assert other.returncode == 2 and "two different --home" in other.stderr
    assert len(prefetch_status(home)) == 1


async def test_the_nightly_run_requests_tomorrows_orders_once(tmp_path: Path) -> None:
    """From nightly_at on, once a day: a request for every SCHEDULED order of tomorrow
    that has none (the order hook's request counts), with the order's start as needed_at
    and the hold keep_local_days after it."""
    from datetime import datetime

    from appliance.base.config import PrefetchConfig
    from appliance.services.prefetch import PrefetchService, scheduled_time
    from appliance.store import database
    from appliance.store import prefetch_rows as rows
    from appliance.store.index import Index
    from appliance.store.order_rows import Demographics, OrderDetails, PatientKey, insert_order

    evening = datetime.combine(date.today(), datetime.min.time()).replace(hour=21)
    tomorrow, later = ((date.today() + timedelta(days=n)).strftime("%Y%m%d") for n in (1, 2))
    async with Index(tmp_path / "index.sqlite3") as index:
        assert index.writer is not None

        def order(conn: Any, accession: str, day: str) -> int:
            return insert_order(
                conn, accession_number=accession, placer_order_number="",
                filler_order_number="", study_uid=f"1.2.3.{len(accession)}.{day}",
                details=OrderDetails(modality="CT", sps_start_date=day, sps_start_time="0930",
                                     requested_procedure_desc="CT HEAD"),
                patient=PatientKey(PATIENT, ISSUER), demographics=Demographics(), at=0.0)

        for accession, day in (("N-1", tomorrow), ("N-22", tomorrow), ("N-333", later)):
            await index.writer.submit_sync(lambda c, a=accession, d=day: order(c, a, d))
        service = PrefetchService(index, PrefetchConfig(nightly_at="20:00"))
        assert await service.on_new_order("N-1") is not None  # the hook came first
        assert await service.nightly(evening.replace(hour=19, minute=59)) is None
        assert await service.nightly(evening) == 1  # N-22; N-1 has one, N-333 is later
        assert await service.nightly(evening.replace(hour=23)) is None  # once a day
        requests = await database.run_sync(index.reader, rows.recent_requests)
        assert sorted((r.accession_number, r.trigger) for r in requests) == [
            ("N-1", "order"), ("N-22", "nightly")]
        needed = scheduled_time(tomorrow, "0930")  # after now: the hold counts from it
        assert needed is not None
        assert {r.needed_at for r in requests} == {needed}
        assert {r.hold_until for r in requests} == {needed + 7 * 86400}
        assert {(r.modality, r.procedure, r.exclude_study_uid[:6]) for r in requests} == {
            ("CT", "CT HEAD", "1.2.3.")}


async def test_the_worker_stops_when_an_order_wakes_it_at_the_same_moment(
        tmp_path: Path) -> None:
    """SIGTERM right after an order: the stop's cancel lands as the wake event fires.
    Python 3.11's asyncio.wait_for swallows such a cancel; the worker must stop anyway."""
    import asyncio

    from appliance.base.config import PrefetchConfig
    from appliance.services.prefetch import PrefetchService, PrefetchWorker
    from appliance.store.index import Index

    async with Index(tmp_path / "index.sqlite3") as index:
        worker = PrefetchWorker(PrefetchService(index, PrefetchConfig()))
        await worker.start()
        await asyncio.sleep(0.2)  # both loops have run a pass and wait for their wake
        worker.service.wake.set()
        stopping = asyncio.ensure_future(worker.stop())
        done, _ = await asyncio.wait({stopping}, timeout=10.0)
        assert done, "the prefetch worker is still running 10 s after its stop"
