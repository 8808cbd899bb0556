"""Replicate, evict, find NEARLINE, retrieve by recall on demand: end to end, real processes.

Runs against the embedded local-folder cloud and against a real Azurite
(the `cloud` fixture), with a real `pacs-edge serve`, a real `pacs-edge
sync` agent and dcmtk peers.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dcmtk
import dicomgen
import pytest
from conftest import EdgeServer, run_pacs_edge
from syncagent import SyncAgent, evict, security_alerts, sync_once, tier_state


def pack_rows(home: Path) -> list[tuple[int, str]]:
    db = sqlite3.connect(f"file:{home / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT version, pack_name FROM packs ORDER BY id").fetchall()
    finally:
        db.close()


class Cloud:
    """The edge's blob store as an outsider sees it: names, metadata, raw bytes."""

    def __init__(self, kind: str, home: Path, connection_string: str = "",
                 container: str = "") -> None:
        self.kind = kind
        self.home = home
        self.connection_string = connection_string
        self.container = container

    def blobs(self) -> dict[str, dict[str, str]]:
        """Every blob name with its metadata (local: the store's sidecar files too)."""
        if self.kind == "local":
            root = self.home / "cloud"
            return {str(p.relative_to(root)): ({"sidecar": p.read_text(errors="replace")}
                                               if p.name.startswith(".") else {})
                    for p in root.rglob("*") if p.is_file()}
        client = self._container()
        return {b.name: {**dict(b.metadata or {}), "tags": str(b.tags or "")}
                for b in client.list_blobs(include=["metadata", "tags"])}

    def overwrite(self, name: str, change: Callable[[bytes], bytes]) -> bytes:
        """Change a blob behind the agent's back, as someone with write access to the
        container could; returns the original bytes."""
        if self.kind == "local":
            path = self.home / "cloud" / name
            original = path.read_bytes()
            path.chmod(0o644)
            path.write_bytes(change(original))
            return original
        blob = self._container().get_blob_client(name)
        original = blob.download_blob().readall()
        blob.upload_blob(change(original), overwrite=True)
        return original

    def _container(self) -> Any:
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient.from_connection_string(self.connection_string)
        return service.get_container_client(self.container)


@pytest.fixture(params=["local", "azurite"])
def cloud(request: pytest.FixtureRequest, edge_server: EdgeServer) -> Cloud:
    """The edge serving with its cloud in a local folder, or in a real Azurite."""
    if request.param == "local":
        return Cloud("local", edge_server.home)
    connection_string = request.getfixturevalue("azurite")
    container = f"edge-{uuid.uuid4().hex[:12]}"
    credentials = edge_server.home / "secrets" / "azure.conn"
    credentials.write_text(connection_string)
    credentials.chmod(0o600)
    edge_server.stop()
    edge_server.configure(cloud={"url": f"azure://{container}",
                                 "credentials_file": str(credentials)})
    edge_server.start()
    return Cloud("azurite", edge_server.home, connection_string, container)


@pytest.fixture
def synced_edge(edge_server: EdgeServer, cloud: Cloud
                ) -> Iterator[tuple[EdgeServer, SyncAgent, Cloud]]:
    """A serving edge whose agent serves recall requests (and replicates nothing by itself:
    the tests drive replication with `sync --once`)."""
    edge_server.stop()
    edge_server.configure(sync={"stable_after_seconds": 3600.0, "recall_poll_seconds": 0.2,
                                "evict_after_days": 0.0, "recall_timeout_seconds": 60.0})
    edge_server.start()
    agent = SyncAgent(edge_server.home).start()
    yield edge_server, agent, cloud
    assert agent.stop() == 0, agent.log()


def test_replicate_evict_find_nearline_and_retrieve_by_recall(
    synced_edge: tuple[EdgeServer, SyncAgent, Cloud],
    small_study: list[dicomgen.GeneratedInstance], tmp_path: Path, storescp: dcmtk.StoreSCP,
) -> None:
    server, agent, cloud = synced_edge
    study_uid = small_study[0].study_uid
    dcmtk.storescu(server.port, [i.path for i in small_study]).check()
    assert "replicated 1 study version" in sync_once(server.home).stdout
    assert tier_state(server, study_uid) == "replicated"

    evict(server.home, study_uid)
    assert tier_state(server, study_uid) == "evicted"
    assert not list((server.home / "store").rglob("*.dcm"))
    found = dcmtk.findscu(server.port, {"StudyInstanceUID": study_uid,
                                        "InstanceAvailability": None}).check()
    assert found.values("InstanceAvailability") == ["NEARLINE"]

    got = dcmtk.getscu(server.port, {"StudyInstanceUID": study_uid}, tmp_path / "got").check()
    assert got.output.count("Sending C-STORE Response (Success)") == len(small_study)
    received = {dicomgen.dataset_bytes(p) for p in (tmp_path / "got").iterdir()}
    assert received == {dicomgen.dataset_bytes(i.path) for i in small_study}
    assert tier_state(server, study_uid) == "replicated"
    assert "recalled study=" in agent.log()

    # A second eviction needs no upload: the verified packs are still in the cloud.
    packs_before = pack_rows(server.home)
    assert "replicated 0 study version" in sync_once(server.home).stdout
    evict(server.home, study_uid)
    assert pack_rows(server.home) == packs_before

    server.add_peer("dest", storescp.ae_title, storescp.port, allow="store")
    moved = dcmtk.movescu(server.port, {"StudyInstanceUID": study_uid}, storescp.ae_title)
    moved.check()
    assert {dicomgen.dataset_bytes(p) for p in storescp.files()} == {
        dicomgen.dataset_bytes(i.path) for i in small_study}
    assert run_pacs_edge("fsck", "--home", str(server.home)).returncode == 0
    assert_no_phi_in_the_cloud(cloud, small_study)


def assert_no_phi_in_the_cloud(cloud: Cloud, study: list[dicomgen.GeneratedInstance]) -> None:
    """No patient name, ID, birth date or DICOM UID in any blob name or metadata."""
    blobs = cloud.blobs()
    assert any(name.endswith("pack") for name in blobs), sorted(blobs)
    secrets: set[str] = set()
    for inst in study:
        header = inst.header
        secrets |= {str(header.PatientName), str(header.PatientID),
                    str(header.get("PatientBirthDate", "")), inst.study_uid, inst.series_uid,
                    inst.sop_instance_uid}
        secrets |= {part for part in str(header.PatientName).split("^") if len(part) > 2}
    secrets.discard("")
    visible = " ".join(f"{name} {meta}" for name, meta in blobs.items()).lower()
    leaked = sorted(s for s in secrets if s.lower() in visible)
    assert not leaked, f"PHI or UIDs visible in the cloud: {leaked}"


def test_new_instances_make_a_second_pack_version_and_recall_merges_both(
    synced_edge: tuple[EdgeServer, SyncAgent, Cloud], tmp_path: Path,
) -> None:
    server, _agent, _cloud = synced_edge
    study = dicomgen.make_studies(tmp_path / "study", seed=51, series_per_study=2,
                                  instances_per_series=3)
    first, later = study[:3], study[3:]
    dcmtk.storescu(server.port, [i.path for i in first]).check()
    sync_once(server.home)
    dcmtk.storescu(server.port, [i.path for i in later]).check()
    assert tier_state(server, study[0].study_uid) == "local"
    sync_once(server.home)
    assert [v for v, _ in pack_rows(server.home)] == [1, 2]

    evict(server.home, study[0].study_uid)
    got = dcmtk.getscu(server.port, {"StudyInstanceUID": study[0].study_uid},
                       tmp_path / "got").check()
    assert got.output.count("Sending C-STORE Response (Success)") == len(study)
    assert {dicomgen.dataset_bytes(p) for p in (tmp_path / "got").iterdir()} == {
        dicomgen.dataset_bytes(i.path) for i in study}


def test_tampered_and_truncated_packs_fail_the_recall_and_change_nothing(
    edge_server: EdgeServer, cloud: Cloud, small_study: list[dicomgen.GeneratedInstance],
) -> None:
    study_uid = small_study[0].study_uid
    dcmtk.storescu(edge_server.port, [i.path for i in small_study]).check()
    sync_once(edge_server.home)
    (_, pack_name), = pack_rows(edge_server.home)
    evict(edge_server.home, study_uid)
    for damage in (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:],  # one flipped bit
                   lambda b: b[: len(b) - 7000]):  # truncated
        original = cloud.overwrite(pack_name, damage)
        result = run_pacs_edge("recall", study_uid, "--home", str(edge_server.home),
                               check=False)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "error:" in result.stderr and "Traceback" not in result.stderr
        assert tier_state(edge_server, study_uid) == "evicted"
        assert not list((edge_server.home / "store").rglob("*.dcm"))
        cloud.overwrite(pack_name, lambda _b, o=original: o)
    run_pacs_edge("recall", study_uid, "--home", str(edge_server.home))
    assert tier_state(edge_server, study_uid) == "replicated"


def test_a_recall_that_range_reads_a_truncated_pack_fails_as_tampering(
    edge_server: EdgeServer, cloud: Cloud, tmp_path: Path,
) -> None:
    """A recall wanting fewer than half of a pack's instances range-reads their segments.
    Against a pack cut short the store refused the range past its end: the recall failed
    with the store's "outside the blob" and its hint, and no security alert was audited,
    where a whole pack read says tampering. Here v2 corrects 3 of v1's 4 instances, so
    the recall wants 1 of v1's 4 (range reads) and all of v2 (one streamed read)."""
    study = dicomgen.make_study(tmp_path / "study", seed=57, series_per_study=1,
                                instances_per_series=4)
    study_uid = study[0].study_uid
    dcmtk.storescu(edge_server.port, [i.path for i in study]).check()
    sync_once(edge_server.home)
    corrected = [dicomgen.altered_copy(i, tmp_path / "corrected" / f"{n}.dcm",
                                       StudyDescription="corrected")
                 for n, i in enumerate(study[:3])]
    dcmtk.storescu(edge_server.port, corrected).check()
    sync_once(edge_server.home)
    (_, v1_pack), _v2 = pack_rows(edge_server.home)
    evict(edge_server.home, study_uid)
    on_disk = set((edge_server.home / "store").rglob("*.dcm"))  # prior versions stay
    alerts = security_alerts(edge_server.home)
    original = cloud.overwrite(v1_pack, lambda b: b[:100])  # cut short after its header
    result = run_pacs_edge("recall", study_uid, "--home", str(edge_server.home), check=False)
    said = result.stdout + result.stderr
    assert result.returncode == 2, said
    assert "truncated" in said and "the cloud copy was modified or damaged" in said, said
    assert "outside the blob" not in said and "Traceback" not in said, said
    assert security_alerts(edge_server.home) == alerts + 1
    assert tier_state(edge_server, study_uid) == "evicted"
    assert set((edge_server.home / "store").rglob("*.dcm")) == on_disk
    cloud.overwrite(v1_pack, lambda _b: original)
    run_pacs_edge("recall", study_uid, "--home", str(edge_server.home))
    assert tier_state(edge_server, study_uid) == "replicated"


def test_a_store_that_cannot_take_a_recalled_file_fails_the_recall_with_a_clear_error(
    edge_server: EdgeServer, cloud: Cloud, small_study: list[dicomgen.GeneratedInstance],
) -> None:
    """The store refuses the recalled files (here: a file where the study's folder goes;
    an I/O error, a permission, alike): the OSError escaped, a traceback holding the
    file's path (its UIDs), and the agent left the request pending, retried at every
    poll. Now it is the store's refusal, as for an ingest, and the study stays evicted."""
    study_uid = small_study[0].study_uid
    dcmtk.storescu(edge_server.port, [i.path for i in small_study]).check()
    sync_once(edge_server.home)
    evict(edge_server.home, study_uid)
    folder = edge_server.home / "store" / study_uid
    if folder.exists():
        for path in sorted(folder.rglob("*"), reverse=True):
            path.rmdir()
        folder.rmdir()
    folder.write_bytes(b"not a folder")
    result = run_pacs_edge("recall", study_uid, "--home", str(edge_server.home), check=False)
    said = result.stdout + result.stderr
    assert result.returncode == 2, said
    assert "store write failed: Not a directory" in said and "Traceback" not in said
    assert study_uid not in said.replace(f"recall {study_uid}", "")
    assert tier_state(edge_server, study_uid) == "evicted"
    folder.unlink()
    run_pacs_edge("recall", study_uid, "--home", str(edge_server.home))
    assert tier_state(edge_server, study_uid) == "replicated"


def test_agent_start_removes_temp_files_of_interrupted_local_cloud_writes(
    edge_server_factory: Callable[..., EdgeServer], tmp_path: Path,
) -> None:
    cloud = tmp_path / "cloud"
    server = edge_server_factory(start=False)
    server.configure(cloud={"url": f"file://{cloud}"})
    leftover = cloud / "studies" / "0123abcd" / ".v000001.pack.x1y2.part"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a pack")
    hours_ago = time.time() - 2 * 3600
    os.utime(leftover, (hours_ago, hours_ago))
    running = cloud / "studies" / "0123abcd" / ".v000002.pack.z9.part"
    running.write_bytes(b"a put still running elsewhere")

    agent = SyncAgent(server.home).start()
    try:
        assert not leftover.exists()
        assert running.exists()
    finally:
        assert agent.stop() == 0, agent.log()
    assert "removed temp files of interrupted cloud writes count=1" in agent.log()


def test_sync_refuses_a_stable_after_that_is_not_a_number_of_seconds(
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    """nan made every "quiet for that long?" false: a pass that replicated nothing, exit 0;
    a negative wait replicated studies still arriving."""
    server = edge_server_factory(start=False)
    for value in ("nan", "NaN", "inf", "1e400", "-1", "-inf"):
        result = run_pacs_edge("sync", "--once", "--stable-after", value, "--home",
                               str(server.home), check=False)
        assert result.returncode == 2, (value, result.stdout + result.stderr)
        assert "Invalid value for '--stable-after'" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and "replicated" not in result.stdout
    agent = run_pacs_edge("sync", "--stable-after", "0", "--home", str(server.home),
                          check=False)  # without --once it would be silently ignored
    assert agent.returncode == 2 and "use it with --once" in agent.stderr, agent.stderr
