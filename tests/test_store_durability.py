"""A SIGKILL mid-transfer loses nothing that was acknowledged, and leaves a clean store."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import dcmtk
import dicomgen
import pytest
from conftest import EdgeServer, init_home, run_pacs_edge

ACK_BEFORE_KILL = 40
DEADLINE = 120.0


def acknowledged_files(storescu_output: str) -> list[Path]:
    """Files storescu saw Success for: `Sending file: X` followed by a Success response."""
    acked: list[Path] = []
    current: Path | None = None
    for line in storescu_output.splitlines():
        sending = re.search(r"Sending file: (.+)$", line)
        if sending:
            current = Path(sending.group(1).strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acked.append(current)
            current = None
    return acked


def stored_path(home: Path, sop_uid: str) -> Path | None:
    db = sqlite3.connect(f"file:{home / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT path FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone()
    finally:
        db.close()
    return home / "store" / row[0] if row else None


@pytest.mark.slow
def test_sigkill_mid_storescu_keeps_every_acknowledged_instance(
    edge_server: EdgeServer, tmp_path: Path
) -> None:
    instances = dicomgen.make_studies(tmp_path / "study", seed=7, series_per_study=4,
                                      instances_per_series=60, size=128)
    by_path = {i.path: i for i in instances}
    log_path = tmp_path / "storescu.log"
    with log_path.open("w") as log:
        sender = subprocess.Popen(
            [dcmtk.dcmtk_tool("storescu"), "-v", "-aet", dcmtk.TEST_AE,
             "-aec", edge_server.ae_title,
             *dcmtk.NET_TIMEOUTS, "+sd", "+r", edge_server.host, str(edge_server.port),
             str(tmp_path / "study")],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + DEADLINE
            while len(acknowledged_files(log_path.read_text())) < ACK_BEFORE_KILL:
                assert sender.poll() is None, "storescu finished before the kill"
                assert time.monotonic() < deadline, "storescu made no progress"
                time.sleep(0.02)
            edge_server.kill()
            sender.wait(60)
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.wait()
    acked = acknowledged_files(log_path.read_text())
    assert ACK_BEFORE_KILL <= len(acked) < len(instances), "the kill did not land mid-transfer"

    edge_server.start()
    for path in acked:
        inst = by_path[path]
        stored = stored_path(edge_server.home, inst.sop_instance_uid)
        assert stored is not None, f"acknowledged {path.name} is missing after the crash"
        assert dicomgen.dataset_bytes(stored) == dicomgen.dataset_bytes(path)
    found = dcmtk.findscu(edge_server.port, {"StudyInstanceUID": instances[0].study_uid,
                                              "SOPInstanceUID": None}, level="IMAGE")
    found_uids = set(found.check().values("SOPInstanceUID"))
    assert {by_path[p].sop_instance_uid for p in acked} <= found_uids

    fsck = edge_server.cli("fsck", check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert "consistent" in fsck.stdout


def test_sigkill_while_idle_then_restart_recovers_without_loss(
    edge_server_factory: Callable[..., EdgeServer], small_study: list[dicomgen.GeneratedInstance]
) -> None:
    server = edge_server_factory()
    dcmtk.storescu(server.port, [i.path for i in small_study]).check()
    server.kill()
    server.start()
    assert "did not stop cleanly" in server.log()
    assert '"instances": 6' in server.cli("status", "--json").stdout


def test_files_adopted_at_a_restart_after_a_crash_are_audited_as_an_import(
        edge_server_factory: Callable[..., EdgeServer],
        small_study: list[dicomgen.GeneratedInstance], tmp_path: Path) -> None:
    """Start-up recovery adopts files without index rows, as `fsck --repair` does, and
    audits them as it does: one Import record per study, source fsck."""
    server = edge_server_factory()
    server.kill()
    other = init_home(tmp_path / "other")  # files renamed into place, rows never committed
    run_pacs_edge("import", "--home", str(other), *(str(i.path) for i in small_study))
    for path in (other / "store").rglob("*.dcm"):
        target = server.home / "store" / path.relative_to(other / "store")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    server.start()
    assert "recovered after an unclean stop adopted=6" in server.log()
    log = (server.home / "audit" / "audit.log").read_text().splitlines()
    adopted = [r for r in (json.loads(line)["record"] for line in log)
               if r["EventIdentification"]["EventID"]["csd-code"] == "110107"]
    assert [any(p.get("UserName") == "fsck" for p in r["ActiveParticipant"])
            for r in adopted] == [True]
    assert small_study[0].study_uid in {
        o["ParticipantObjectID"] for o in adopted[0]["ParticipantObjectIdentification"]}


def test_content_sent_again_writes_a_lost_or_damaged_stored_file_again(
        edge_server: EdgeServer, small_study: list[dicomgen.GeneratedInstance],
        tmp_path: Path) -> None:
    """The index held the content, so the box answered "duplicate" and kept nothing, while
    its file was gone or damaged: a drop folder then deleted the only good copy. The copy
    sent again (over C-STORE, or by `import`, whose File Meta differs) is written again."""
    lost, damaged = small_study[0], small_study[1]
    dcmtk.storescu(edge_server.port, [lost.path, damaged.path]).check()
    lost_path, damaged_path = (stored_path(edge_server.home, i.sop_instance_uid)
                               for i in (lost, damaged))
    assert lost_path is not None and damaged_path is not None
    lost_path.unlink()
    with damaged_path.open("r+b") as fh:
        fh.seek(-16, 2)
        fh.write(b"\xff" * 16)
    dcmtk.storescu(edge_server.port, [lost.path]).check()
    imported = edge_server.cli("import", str(damaged.path))
    got = dcmtk.getscu(edge_server.port, {"StudyInstanceUID": lost.study_uid},
                       tmp_path / "got").check()
    received = {str(dicomgen.read_header(p).SOPInstanceUID): dicomgen.dataset_bytes(p)
                for p in (tmp_path / "got").iterdir()}
    for instance in (lost, damaged):
        assert received[instance.sop_instance_uid] == dicomgen.dataset_bytes(instance.path), \
            got.output
    db = sqlite3.connect(f"file:{edge_server.home / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT path, size, dataset_offset FROM instances").fetchall()
    finally:
        db.close()
    for path, size, offset in rows:  # the row describes the file written again
        stored = edge_server.home / "store" / path
        assert stored.stat().st_size == size
        assert stored.read_bytes()[offset:] == dicomgen.dataset_bytes(stored)
    assert "stored file of an instance was missing or damaged" in edge_server.log()
    assert "already present 1" in imported.stdout
