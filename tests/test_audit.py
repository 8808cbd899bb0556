"""The audit trail with real actions: every event type, tamper detection, syslog outage.

- Every audited event is produced by what an operator or a peer really does:
  dcmtk tools against `pacs-edge serve`, the CLI, the drop folder, a sync
  pass, evict/recall and a tampered cloud blob. A canary patient travels
  through those paths: its name and ID are in the audit log (and nowhere in
  the server's, the agent's or the commands' output).
- `pacs-edge audit verify` names the first bad record after an edit, a
  deletion, a reordering, a cut-off tail (caught by the anchor) and a chain
  recomputed from scratch (caught by the anchor).
- Syslog forwarding: a TLS collector the test runs (stdlib ssl +
  socketserver, certificates made with cryptography) goes away while events
  happen; once it is back every record arrives exactly once, in order.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import itertools
import json
import re
import shutil
import socket
import socketserver
import sqlite3
import ssl
import stat
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dcmtk
import dicomgen
import pydicom
import pytest
import rawpdu
from conftest import EdgeServer, init_home, run_pacs_edge
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from syncagent import SyncAgent, evict, sync_once

from appliance.audit import verify
from appliance.audit.log import AuditLog, canonical, chain_hash
from appliance.base.errors import IndexUnavailable
from appliance.store.audit_reads import StudySubject, study_subjects
from appliance.store.index import Index, StoredFile
from appliance.store.instance_header import InstanceHeader

CANARY_NAME = "Kanarienvogel^Quirinus"
CANARY_ID = "CANARY-7Q4X9"
DEADLINE = 60.0


# --- helpers ---------------------------------------------------------------------------

def audit_log(home: Path) -> Path:
    return home / "audit" / "audit.log"


def records(home: Path) -> list[dict[str, Any]]:
    path = audit_log(home)
    if not path.exists():
        return []
    return [json.loads(line)["record"] for line in path.read_text().splitlines()]


def event(record: dict[str, Any]) -> str:
    return record["EventIdentification"]["EventID"]["csd-code"]


def types(record: dict[str, Any]) -> set[str]:
    return {c["csd-code"] for c in record["EventIdentification"].get("EventTypeCode", ())}


def outcome(record: dict[str, Any]) -> int:
    return int(record["EventIdentification"]["EventOutcomeIndicator"])


def action(record: dict[str, Any]) -> str:
    return str(record["EventIdentification"]["EventActionCode"])


def users(record: dict[str, Any]) -> set[str]:
    return {p["UserID"] for p in record["ActiveParticipant"]}


def object_ids(record: dict[str, Any]) -> set[str]:
    return {o["ParticipantObjectID"] for o in record["ParticipantObjectIdentification"]}


def matching(home: Path, code: str, where: Callable[[dict[str, Any]], bool] = lambda r: True
             ) -> list[dict[str, Any]]:
    return [r for r in records(home) if event(r) == code and where(r)]


def wait_for(home: Path, code: str, where: Callable[[dict[str, Any]], bool] = lambda r: True,
             timeout: float = DEADLINE) -> dict[str, Any]:
    """The first record of that event that satisfies `where`, polled with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        found = matching(home, code, where)
        if found:
            return found[0]
        if time.monotonic() > deadline:
            pytest.fail(f"no {code} audit record in time; have "
                        f"{[(event(r), sorted(types(r))) for r in records(home)]}")
        time.sleep(0.1)


def canary_study(folder: Path, source: list[dicomgen.GeneratedInstance]) -> list[Path]:
    """Two instances of a new study whose patient is the canary."""
    study_uid = dicomgen.make_uid(9001, "canary-study")
    out = []
    for k, instance in enumerate(source[:2]):
        ds = pydicom.dcmread(instance.path)
        ds.PatientName = CANARY_NAME
        ds.PatientID = CANARY_ID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = dicomgen.make_uid(9001, "canary-series")
        ds.SOPInstanceUID = dicomgen.make_uid(9001, "canary", k)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"canary{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def pack_of(home: Path, study_uid: str) -> str:
    db = sqlite3.connect(f"file:{home / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        (name,), = db.execute("SELECT p.pack_name FROM packs p JOIN studies st"
                              " ON p.study_fk = st.id WHERE st.study_uid = ?", (study_uid,))
        return str(name)
    finally:
        db.close()


# --- every event type -----------------------------------------------------------------

def test_every_access_event_is_audited_and_the_canary_is_only_in_the_audit_log(
    edge_server_factory: Callable[..., EdgeServer], small_study: list[dicomgen.GeneratedInstance],
    storescp: dcmtk.StoreSCP, tmp_path: Path,
) -> None:
    server = edge_server_factory(start=False)
    home = server.home
    # At debug level: what an operator turns on to look closer must not open the PHI
    # that libraries put in their own debug lines (aiosqlite logs each call's arguments).
    server.configure(audit={"flush_seconds": 0.2, "batch_seconds": 0.5},
                     dropfolder={"stable_seconds": 0.5, "rescan_seconds": 1.0},
                     log={"level": "debug"})
    server.start()
    canary = canary_study(tmp_path, small_study)
    canary_uid = str(pydicom.dcmread(canary[0]).StudyInstanceUID)
    outputs: list[str] = []

    def cli(*args: str, check: bool = True) -> Any:
        result = run_pacs_edge(*args, "--home", str(home), check=check)
        outputs.append(result.stdout + result.stderr)
        return result

    # Associations: accepted, and rejected (unknown calling AE = failed authentication).
    assert server.echo().ok
    assert not dcmtk.echoscu(server.port, aet="INTRUDER").ok
    # Instances stored per study and peer, one record at association end.
    dcmtk.storescu(server.port, canary).check()
    stored = wait_for(home, "110104", lambda r: action(r) == "C" and canary_uid in object_ids(r))
    assert {"TESTSCU", "EDGE"} <= users(stored) and CANARY_ID in object_ids(stored)
    study = next(o for o in stored["ParticipantObjectIdentification"]
                 if o["ParticipantObjectID"] == canary_uid)
    assert sum(s["NumberOfInstances"] for s in
               study["ParticipantObjectDescription"]["SOPClass"]) == len(canary)
    # Query, then a query by a peer without the find permission (access refused).
    found = dcmtk.findscu(server.port, {"PatientID": CANARY_ID, "StudyInstanceUID": None})
    found.check()
    assert len(found.responses) == 1
    server.add_peer("storeonly", "STOREONLY", 1, allow="store")
    refused = dcmtk.findscu(server.port, {"PatientID": CANARY_ID}, aet="STOREONLY")
    assert not refused.responses
    # Retrieve: C-MOVE to a known destination, C-GET back to the requestor.
    server.add_peer("dest", storescp.ae_title, storescp.port, allow="store")
    dcmtk.movescu(server.port, {"StudyInstanceUID": canary_uid}, storescp.ae_title).check()
    dcmtk.getscu(server.port, {"StudyInstanceUID": canary_uid}, tmp_path / "got").check()
    # Import from files: the drop folder (while serving) and `pacs-edge import`.
    incoming = home / "incoming"
    incoming.mkdir(exist_ok=True)
    shutil.copy(small_study[0].path, incoming / "dropped.dcm")
    cli("import", str(small_study[1].path))
    wait_for(home, "110107", lambda r: any(p.get("UserName") == "dropfolder"
                                           for p in r["ActiveParticipant"]))
    # Admin action: a peer removed (adds above are audited too).
    cli("peers", "remove", "storeonly")
    # The sync agent's side: export to the cloud, evict, recall, a tampered blob.
    outputs.append(sync_once(home).stdout)
    evict(home, canary_uid)
    cli("recall", canary_uid)
    evict(home, canary_uid)
    pack = home / "cloud" / pack_of(home, canary_uid)
    original = pack.read_bytes()
    pack.chmod(0o644)
    pack.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
    failed = cli("recall", canary_uid, check=False)
    assert failed.returncode == 2
    pack.write_bytes(original)
    agent = SyncAgent(home).start()  # anchors the head at once, records start and stop
    deadline = time.monotonic() + DEADLINE
    while not list((home / "cloud" / "audit" / "anchors").glob("0*")):
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.1)
    assert agent.stop() == 0
    server.stop()

    log = records(home)
    expect = {
        "association accepted": lambda r: event(r) == "110114" and outcome(r) == 0,
        "authentication failure": lambda r: event(r) == "110114" and outcome(r) == 4
        and "INTRUDER" in users(r),
        "stored": lambda r: event(r) == "110104" and action(r) == "C" and "TESTSCU" in users(r),
        "query": lambda r: event(r) == "110112" and CANARY_ID.encode() in base64.b64decode(
            r["ParticipantObjectIdentification"][0]["ParticipantObjectQuery"]),
        "access refused": lambda r: event(r) == "110113" and "110132" in types(r)
        and "STOREONLY" in users(r),
        "c-move": lambda r: event(r) == "110104" and action(r) == "R"
        and storescp.ae_title in users(r) and canary_uid in object_ids(r),
        "c-get": lambda r: event(r) == "110104" and action(r) == "R"
        and users(r) == {"TESTSCU", "EDGE"} and CANARY_ID in object_ids(r),
        "drop folder": lambda r: event(r) == "110107"
        and any(p.get("UserName") == "dropfolder" for p in r["ActiveParticipant"]),
        "import": lambda r: event(r) == "110107"
        and any(p.get("UserName") == "import" for p in r["ActiveParticipant"]),
        "peer added": lambda r: event(r) == "110113" and "110137" in types(r)
        and "STOREONLY" in object_ids(r),
        "peer removed": lambda r: event(r) == "110113" and "110137" in types(r) and any(
            {"type": "Action", "value": "remove"} in o.get("ParticipantObjectDetail", ())
            for o in r["ParticipantObjectIdentification"]),
        "export to cloud": lambda r: event(r) == "110106" and canary_uid in object_ids(r),
        "evict": lambda r: event(r) == "110103" and action(r) == "D",
        "recall": lambda r: event(r) == "110104" and action(r) == "C" and outcome(r) == 0
        and CANARY_ID in object_ids(r) and "TESTSCU" not in users(r),
        "recall failed": lambda r: event(r) == "110104" and outcome(r) == 8,
        "tampered blob": lambda r: event(r) == "110113" and "PE001" in types(r)
        and outcome(r) == 8,
        "serve start": lambda r: event(r) == "110100" and "110120" in types(r),
        "serve stop": lambda r: event(r) == "110100" and "110121" in types(r)
        and any(p.get("UserName") == "pacs-edge serve" for p in r["ActiveParticipant"]),
        "agent stop": lambda r: event(r) == "110100" and "110121" in types(r)
        and any(p.get("UserName") == "pacs-edge sync" for p in r["ActiveParticipant"]),
    }
    missing = [name for name, test in expect.items() if not any(test(r) for r in log)]
    assert not missing, [(event(r), sorted(types(r)), action(r), outcome(r)) for r in log]

    # PHI: in the audit log (0600), nowhere else, at debug level too.
    assert "DEBUG appliance.services.query.find: find answered" in server.log()
    text = audit_log(home).read_text()
    assert CANARY_NAME in text and CANARY_ID in text
    assert audit_log(home).stat().st_mode & 0o777 == 0o600
    for where, output in [("serve log", server.log()), ("agent log", agent.log()),
                          *(("command output", o) for o in outputs)]:
        assert CANARY_ID not in output and "Kanarienvogel" not in output, where

    verified = run_pacs_edge("audit", "verify", "--home", str(home))
    assert "audit log intact" in verified.stdout and "1 checked" in verified.stdout
    exported = run_pacs_edge("audit", "export", "--format", "dicom-xml", "--home", str(home))
    messages = ET.fromstring(exported.stdout).findall("AuditMessage")
    assert len(messages) == len(records(home))  # the export's own "Audit Log Used" included
    assert [m.get("csd-code") for m in messages[-1].iter("EventID")] == ["110101"]
    assert {s.get("AuditSourceID") for m in messages
            for s in m.iter("AuditSourceIdentification")} == {"EDGE"}


def test_verify_of_a_long_log_reports_its_progress(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The log is never rotated: a year's 3.8 GB took `audit verify` 3 min 22 s, silent.
    It hears how far the walk is every PROGRESS_BYTES, up to the log's size."""
    log = AuditLog(tmp_path / "audit" / "audit.log")
    log.append([{"event": n, "padding": "x" * 200} for n in range(60)])
    size = log.path.stat().st_size
    monkeypatch.setattr(verify, "PROGRESS_BYTES", size // 10)
    heard: list[tuple[int, int]] = []
    report = verify.verify_log(log, progress=lambda done, total: heard.append((done, total)))
    assert report.ok and report.records == 60
    assert 8 <= len(heard) <= 10, heard
    assert {total for _, total in heard} == {size}
    checked = [done for done, _ in heard]
    assert checked == sorted(checked) and checked[-1] <= size
    assert all(b - a >= size // 10 for a, b in itertools.pairwise(checked))


# --- what the audit reads from the index ------------------------------------------------


def _header(study_uid: str, patient_id: str, patient_name: str, accession: str) -> InstanceHeader:
    return InstanceHeader(
        patient_id=patient_id, issuer_of_patient_id="", patient_name=patient_name,
        birth_date="", sex="", study_uid=study_uid, study_date="", study_time="",
        accession_number=accession, study_id="", study_description="",
        referring_physician="", character_set="ISO_IR 192", series_uid=f"{study_uid}.1",
        modality="CT", series_number=1, series_description="", body_part="", series_date="",
        series_time="", sop_uid=f"{study_uid}.1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        instance_number=1, transfer_syntax="1.2.840.10008.1.2.1")


async def test_retrieve_audit_reads_patient_and_accession_of_known_studies(
        tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    async with Index(path) as index:
        for header in (_header("1.2.3.1", CANARY_ID, CANARY_NAME, "ACC-1"),
                       _header("1.2.3.2", "OTHER-1", "Other^Pat", "")):
            await index.record_instance(header, StoredFile(f"{header.sop_uid}.dcm", 10, 0,
                                                           header.sop_uid, 0.0))
        # The serving process holds the index open while the audit reads it.
        assert study_subjects(path, ["1.2.3.1", "1.2.3.2", "1.2.3.9"]) == {
            "1.2.3.1": StudySubject("1.2.3.1", CANARY_ID, CANARY_NAME, "ACC-1"),
            "1.2.3.2": StudySubject("1.2.3.2", "OTHER-1", "Other^Pat", ""),
        }
    assert study_subjects(path, []) == {}


def test_retrieve_audit_reads_nothing_and_creates_nothing_without_an_index(
        tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    assert study_subjects(path, ["1.2.3.1"]) == {}
    assert not path.exists()


def test_retrieve_audit_of_a_damaged_index_raises_index_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(IndexUnavailable) as caught:
        study_subjects(path, ["1.2.3.1"])
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)
    assert caught.value.hint


def test_a_command_whose_audit_record_cannot_be_written_fails(edge_home: Path) -> None:
    """A complete but unreadable last line (not a torn append) stops the chain; the
    command's record cannot be written, and the command says so instead of exiting 0."""
    log = edge_home / "audit" / "audit.log"
    log.write_bytes(log.read_bytes() + b"\xff\xfe not a record\n")
    result = run_pacs_edge("peers", "add", "ws9", "--home", str(edge_home), "--ae-title", "WS9",
                           "--host", "127.0.0.1", "--port", "104", "--allow", "find",
                           check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "1 audit record(s) of this command could not be written" in result.stderr
    assert "the last audit record cannot be read" in result.stderr
    assert "Traceback" not in result.stderr


def test_export_names_the_lines_it_cannot_read_and_exits_1(edge_home: Path) -> None:
    """A damaged line in the middle of the log (the last one stops all writing, above):
    the export holds every readable record and says which lines it left out."""
    for n in range(2):
        run_pacs_edge("peers", "add", f"ws{n}", "--home", str(edge_home), "--ae-title",
                      f"WS{n}", "--host", "127.0.0.1", "--port", "104", "--allow", "find")
    log = edge_home / "audit" / "audit.log"
    lines = log.read_bytes().splitlines(keepends=True)
    lines[1] = b"\xff\xfe not a record\n"
    log.write_bytes(b"".join(lines))
    result = run_pacs_edge("audit", "export", "--home", str(edge_home), check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 line(s) of the audit log cannot be read and are not in the export (lines 2)" \
        in result.stderr
    assert [json.loads(x)["seq"] for x in result.stdout.splitlines()] == [1, 3, 4]


def test_export_selects_by_event_time(edge_home: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    before = run_pacs_edge("audit", "export", "--until", (now - dt.timedelta(days=1)).isoformat(),
                           "--home", str(edge_home)).stdout
    assert before == ""
    lines = run_pacs_edge("audit", "export", "--since", (now - dt.timedelta(days=1)).isoformat(),
                          "--home", str(edge_home)).stdout.splitlines()
    # init's `peers add testscu`, then each export's "Audit Log Used" (written first)
    assert [json.loads(x)["record"]["EventIdentification"]["EventID"]["csd-code"]
            for x in lines] == ["110113", "110101", "110101"]
    assert [json.loads(x)["seq"] for x in lines] == [1, 2, 3]


def test_export_out_never_overwrites_nor_follows_a_symlink(edge_home: Path,
                                                            tmp_path: Path) -> None:
    """The export holds PHI: --out makes a new 0600 file or fails, whatever is at the path."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    planted = tmp_path / "planted.json"
    planted.symlink_to(victim)
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "made-through-the-link")
    for target in (planted, dangling, victim):
        proc = run_pacs_edge("audit", "export", "--out", str(target), "--home", str(edge_home),
                             check=False)
        assert proc.returncode == 2 and "an export never overwrites" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "made-through-the-link").exists()
    fresh = tmp_path / "export.json"
    run_pacs_edge("audit", "export", "--out", str(fresh), "--home", str(edge_home))
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    assert [json.loads(x)["seq"] for x in fresh.read_text().splitlines()] == [1, 2]


WINDOW = 5.0  # [audit] rejection_window_seconds in the test (300 s by default)


def rejected_count(record: dict[str, Any]) -> int | None:
    """RejectedAssociations of a rejection summary record; None for any other record."""
    for obj in record["ParticipantObjectIdentification"]:
        for detail in obj.get("ParticipantObjectDetail", ()):
            if detail["type"] == "RejectedAssociations":
                return int(detail["value"])
    return None


def test_a_rejection_scan_is_counted_per_source_and_the_log_stays_small(
    edge_server_factory: Callable[..., EdgeServer], small_study: list[dicomgen.GeneratedInstance],
) -> None:
    server = edge_server_factory(start=False)
    home = server.home
    # Every connection must reach negotiation, so that each one is a rejection to count.
    server.configure(audit={"flush_seconds": 0.2, "rejection_window_seconds": WINDOW},
                     dicom={"connections_per_address": 1000})
    server.start()
    dcmtk.storescu(server.port, [small_study[0].path]).check()
    wait_for(home, "110104")
    before = audit_log(home).stat().st_size
    # 300 rejected associations: 200 with unknown calling AE titles from one address,
    # 100 calling the wrong AE title from another; a legitimate peer in the middle.
    started = time.monotonic()
    for n in range(300):
        source, calling, called = (("127.0.0.2", f"SCAN{n % 5}", server.ae_title) if n < 200
                                   else ("127.0.0.3", dcmtk.TEST_AE, "WRONG"))
        with rawpdu.connect(server.port, source=source) as sock:
            sock.sendall(rawpdu.associate_rq(calling, called))
            assert rawpdu.read_pdu(sock)[0] == rawpdu.A_ASSOCIATE_RJ
        if n == 150:
            assert server.echo().ok
    windows = (time.monotonic() - started) // WINDOW + 1  # per address, at most

    def accounted(address: str) -> int:
        """Rejections from `address` in the log: full records plus summary counts."""
        found = [r for r in matching(home, "110114", lambda r: outcome(r) == 4)
                 if any(p.get("NetworkAccessPointID") == address
                        for p in r["ActiveParticipant"] if p["UserIsRequestor"])]
        return sum(rejected_count(r) or 1 for r in found)

    deadline = time.monotonic() + DEADLINE
    while accounted("127.0.0.2") < 200 or accounted("127.0.0.3") < 100:
        assert time.monotonic() < deadline, "rejections missing from the audit log"
        time.sleep(0.1)
    assert (accounted("127.0.0.2"), accounted("127.0.0.3")) == (200, 100)  # none lost
    rejections = matching(home, "110114", lambda r: outcome(r) == 4)
    # Per address and window: the first rejection in full, the others as one count.
    assert len(rejections) <= 2 * 2 * windows
    summary = next(r for r in rejections if rejected_count(r) and any(
        p.get("NetworkAccessPointID") == "127.0.0.2" for p in r["ActiveParticipant"]))
    details = {d["type"]: d["value"] for o in summary["ParticipantObjectIdentification"]
               for d in o.get("ParticipantObjectDetail", ())}
    assert set(details["CallingAETitles"].split(",")) <= {f"SCAN{k}" for k in range(5)}
    assert "not in the allowlist" in details["Reasons"]
    assert details["FirstTime"] <= details["LastTime"]
    # 300 full records were ~330 KB; what is written is ~1 KB per record above.
    assert audit_log(home).stat().st_size - before < len(rejections) * 2048
    verified = run_pacs_edge("audit", "verify", "--local-only", "--home", str(home))
    assert "audit log intact" in verified.stdout
    assert server.echo().ok
    assert matching(home, "110104"), "the record of the instance stored before is kept"


# --- tamper detection -------------------------------------------------------------------

@pytest.fixture(scope="module")
def anchored_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with six audit records from real admin actions, its head anchored."""
    home = init_home(tmp_path_factory.mktemp("anchored") / "edge-home")
    for n in range(4):
        run_pacs_edge("peers", "add", f"ws{n}", "--home", str(home), "--ae-title", f"WS{n}",
                      "--host", "127.0.0.1", "--port", "104", "--allow", "find")
    run_pacs_edge("peers", "remove", "ws0", "--home", str(home))
    assert len(records(home)) == 6
    assert "anchored record 6" in run_pacs_edge("audit", "anchor", "--home", str(home)).stdout
    return home


@pytest.fixture
def anchored_home(anchored_template: Path, tmp_path: Path) -> Path:
    """A private copy of the anchored home (its cloud folder, anchors included)."""
    home = tmp_path / "edge-home"
    shutil.copytree(anchored_template, home, symlinks=True)
    return home


def _lines(home: Path) -> list[bytes]:
    return audit_log(home).read_bytes().splitlines(keepends=True)


def _recomputed(lines: list[bytes]) -> list[bytes]:
    """What someone holding the file could do: re-chain every line from scratch."""
    prev, out = "0" * 64, []
    for raw in lines:
        entry = json.loads(raw)
        entry["prev_hash"] = prev
        entry["hash"] = prev = chain_hash(prev, entry["seq"], entry["time"], entry["record"])
        out.append(canonical(entry) + b"\n")
    return out


def _edit(lines: list[bytes]) -> list[bytes]:
    return [lines[0], lines[1].replace(b'"WS0"', b'"WSX"'), *lines[2:]]


def _shadowed(lines: list[bytes]) -> list[bytes]:
    """A forged record put in front of the real one under the same key: a JSON parser
    keeps the last, a reader of the file sees the first."""
    forged = json.dumps(json.loads(_edit(lines)[1])["record"]).encode()
    return [lines[0], lines[1].replace(b'{"hash"', b'{"record":' + forged + b',"hash"', 1),
            *lines[2:]]


@pytest.mark.parametrize(("damage", "record", "why"), [
    (_edit, 2, "edited"),
    (lambda ls: [*ls[:2], *ls[3:]], 3, "removed"),
    (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], 2, "reordered"),
    (lambda ls: ls[:-1], 6, "cut off"),
    (lambda ls: ls[:-2], 5, "cut off"),
    (lambda ls: _recomputed(_edit(ls)), 6, "rewritten"),  # the anchor knows record 6
    (lambda ls: [*ls[:3], b'{"seq": 4, "oops"\n', *ls[4:]], 4, "unreadable"),
    (_shadowed, 2, "edited"),
], ids=["edited", "deleted", "reordered", "tail-cut", "tail-cut-2", "recomputed", "garbage",
        "repeated-key"])
def test_verify_names_the_first_bad_record(
    anchored_home: Path, damage: Callable[[list[bytes]], list[bytes]], record: int, why: str,
) -> None:
    assert run_pacs_edge("audit", "verify", "--home", str(anchored_home)).returncode == 0
    audit_log(anchored_home).write_bytes(b"".join(damage(_lines(anchored_home))))
    result = run_pacs_edge("audit", "verify", "--home", str(anchored_home), check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"record {record}:" in result.stderr and why in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_without_anchors_a_cut_tail_goes_unnoticed(anchored_home: Path) -> None:
    """Why anchors exist: the chain alone cannot see records missing at the end."""
    audit_log(anchored_home).write_bytes(b"".join(_lines(anchored_home)[:-1]))
    local = run_pacs_edge("audit", "verify", "--local-only", "--home", str(anchored_home))
    assert "intact: 5 record(s)" in local.stdout


def test_appends_after_an_anchor_keep_the_log_verifiable(anchored_home: Path) -> None:
    run_pacs_edge("peers", "remove", "ws1", "--home", str(anchored_home))
    run_pacs_edge("audit", "anchor", "--home", str(anchored_home))
    result = run_pacs_edge("audit", "verify", "--home", str(anchored_home))
    assert "7 record(s)" in result.stdout and "2 checked" in result.stdout


# --- syslog over TLS with an outage --------------------------------------------------------

def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a collector certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "audit test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "collector")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.pem", folder / "collector.pem", folder / "collector.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class TlsSyslogCollector:
    """A syslog-over-TLS collector (RFC 5425 octet counting) on 127.0.0.1, stoppable."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.messages: list[bytes] = []
        self.port = 0
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server: socketserver.ThreadingTCPServer | None = None

    def start(self) -> TlsSyslogCollector:
        collector = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                try:
                    conn = collector.context.wrap_socket(self.request, server_side=True)
                except (OSError, ssl.SSLError):
                    return
                with collector._lock:
                    collector._connections.add(conn)
                try:
                    collector._read(conn)
                finally:
                    with collector._lock:
                        collector._connections.discard(conn)
                    conn.close()

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def _read(self, conn: ssl.SSLSocket) -> None:
        buffer = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except (OSError, ssl.SSLError):
                return
            if not chunk:
                return
            buffer += chunk
            while b" " in buffer:
                length, rest = buffer.split(b" ", 1)
                if len(rest) < int(length):
                    break
                with self._lock:
                    self.messages.append(rest[:int(length)])
                buffer = rest[int(length):]

    def stop(self) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for conn in self._connections:
                with _suppress():
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._connections.clear()

    def seqs(self) -> list[int]:
        with self._lock:
            return [int(re.search(rb'seq="(\d+)"', m).group(1))  # type: ignore[union-attr]
                    for m in self.messages]


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def _head(home: Path) -> int:
    return len(audit_log(home).read_text().splitlines())


def _wait_delivered(collector: TlsSyslogCollector, home: Path, quiet: float = 0.5
                    ) -> list[int]:
    """What the collector received once it has caught up with the log and the log has
    been quiet for `quiet` seconds (an association's records are written at its end)."""
    deadline = time.monotonic() + DEADLINE
    caught_up_at: float | None = None
    while True:
        seqs, head = collector.seqs(), _head(home)
        if seqs and seqs[-1] >= head:
            caught_up_at = caught_up_at or time.monotonic()
            if time.monotonic() - caught_up_at >= quiet:
                return seqs
        else:
            caught_up_at = None
        assert time.monotonic() < deadline, (seqs, head)
        time.sleep(0.05)


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[tuple[TlsSyslogCollector, Path]]:
    ca, cert, key = _certificates(tmp_path)
    running = TlsSyslogCollector(cert, key).start()
    yield running, ca
    with _suppress():
        running.stop()


def test_syslog_delivers_every_record_once_in_order_across_a_collector_outage(
    edge_server_factory: Callable[..., EdgeServer],
    collector: tuple[TlsSyslogCollector, Path],
) -> None:
    syslog, ca = collector
    server = edge_server_factory(start=False)
    server.configure(audit={"syslog_host": "127.0.0.1", "syslog_port": syslog.port,
                            "syslog_ca_file": str(ca), "flush_seconds": 0.1,
                            "syslog_retry_seconds": 0.2})
    server.start()
    assert server.echo().ok
    before = _wait_delivered(syslog, server.home)
    assert before == list(range(1, len(before) + 1))
    first = syslog.messages[0]
    assert re.match(rb'<\d+>1 \S+ \S+ pacs-edge \d+ DICOM\+RFC3881 \[audit@32473 seq="1" '
                    rb'hash="[0-9a-f]{64}"\] \xef\xbb\xbf<AuditMessage>', first), first[:200]
    assert ET.fromstring(first.split(b"\xef\xbb\xbf", 1)[1]).tag == "AuditMessage"

    syslog.stop()  # with nothing in flight: an unread record would die with the collector
    at_stop = len(syslog.seqs())
    for _ in range(3):
        assert server.echo().ok
    assert not dcmtk.echoscu(server.port, aet="INTRUDER").ok
    server.add_peer("ws", "WS", 104, allow="find")
    deadline = time.monotonic() + DEADLINE
    while _head(server.home) < at_stop + 5:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert len(syslog.seqs()) == at_stop  # nothing arrived while it was down

    syslog.start()  # same port
    assert server.echo().ok
    after = _wait_delivered(syslog, server.home)
    assert after == list(range(1, len(after) + 1)), after  # each once, in order
    assert len(after) >= at_stop + 6
    assert "collector unreachable" in server.log()
