"""Scrub and the cloud checks before eviction, against the local folder and a real Azurite.

Real processes throughout (`pacs-edge import/sync/scrub/evict/recall/status`,
the agent); the cloud copy is damaged behind the agent's back as bit rot or
an intruder would: a flipped byte in the local folder's blob file, or a
block of the Azure blob overwritten through the SDK.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import dicomgen
import pydicom
import pytest
from conftest import EdgeServer, init_home, pacs_edge_command, run_pacs_edge
from syncagent import SyncAgent, sync_once

CRASH_ENV = "PACS_EDGE_CRASH_AT"
TIMEOUT = 60.0


class Cloud:
    """The box's blob store as an outsider with write access sees it."""

    def __init__(self, home: Path, connection_string: str = "", container: str = "") -> None:
        self.home = home
        self.connection_string = connection_string
        self.container = container

    @property
    def kind(self) -> str:
        return "azurite" if self.container else "local"

    def read(self, name: str) -> bytes:
        if self.kind == "local":
            return (self.home / "cloud" / name).read_bytes()
        return bytes(self._blob(name).download_blob().readall())

    def etag(self, name: str) -> str:
        """The blob's etag as the product's own blob store reports it."""
        from sync.blobstore.azure import AzureBlobStore
        from sync.blobstore.base import BlobStore
        from sync.blobstore.local import LocalFolderStore

        store: BlobStore = (LocalFolderStore(self.home / "cloud") if self.kind == "local"
                            else AzureBlobStore(self.container, self.connection_string))
        try:
            return store.stat(name).etag
        finally:
            store.close()

    def flip_byte(self, name: str, offset: int) -> None:
        """Local: one bit flipped in the blob file, in place. Azure: the block holding
        `offset` replaced by a copy with that bit flipped (Put Block + Put Block List)."""
        if self.kind == "local":
            path = self.home / "cloud" / name
            path.chmod(0o644)
            with open(path, "r+b") as fh:
                fh.seek(offset)
                byte = fh.read(1)
                fh.seek(offset)
                fh.write(bytes([byte[0] ^ 0x01]))
            return
        from azure.storage.blob import BlobBlock

        blob = self._blob(name)
        committed, _ = blob.get_block_list("committed")
        start = 0
        blocks = []
        for block in committed:
            if start <= offset < start + block.size:
                data = bytearray(blob.download_blob(offset=start, length=block.size).readall())
                data[offset - start] ^= 0x01
                new_id = "f" * (len(block.id) - 7) + "-999999"
                blob.stage_block(new_id, bytes(data))
                blocks.append(BlobBlock(new_id))
            else:
                blocks.append(BlobBlock(block.id))
            start += block.size
        blob.commit_block_list(blocks)

    def write(self, name: str, data: bytes) -> None:
        """Put `data` back under `name` (a restore from soft delete or versioning)."""
        if self.kind == "local":
            (self.home / "cloud" / name).write_bytes(data)
            return
        self._blob(name).upload_blob(data, overwrite=True)

    def delete(self, name: str) -> None:
        if self.kind == "local":
            (self.home / "cloud" / name).unlink()
            return
        self._blob(name).delete_blob()

    def _blob(self, name: str) -> Any:
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient.from_connection_string(self.connection_string)
        return service.get_blob_client(self.container, name)


@pytest.fixture(params=["local", "azurite"])
def box(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Cloud, Any]:
    """A home holding one imported study (2 series of 4), its cloud local or on Azurite."""
    home = init_home(tmp_path / "home")
    study = dicomgen.make_studies(tmp_path / "study", seed=83, series_per_study=2,
                                  instances_per_series=4, size=96)
    run_pacs_edge("import", "--home", str(home), str(tmp_path / "study"))
    settings: dict[str, Any] = {"segment_size": 8192}
    cloud = Cloud(home)
    if request.param == "azurite":
        connection_string = request.getfixturevalue("azurite")
        container = f"scrub-{uuid.uuid4().hex[:12]}"
        credentials = home / "secrets" / "azure.conn"
        credentials.write_text(connection_string)
        credentials.chmod(0o600)
        EdgeServer(home).configure(cloud={"url": f"azure://{container}",
                                          "credentials_file": str(credentials)})
        cloud = Cloud(home, connection_string, container)
    EdgeServer(home).configure(sync=settings)
    return home, cloud, study


def query(home: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{home / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def packs(home: Path) -> list[tuple[Any, ...]]:
    """(version, pack_name, manifest_name, pack_etag, scrub_state) of every pack row."""
    return query(home, "SELECT version, pack_name, manifest_name, pack_etag, scrub_state"
                       " FROM packs ORDER BY version")


def tier_state(home: Path) -> str:
    return str(query(home, "SELECT tier_state FROM studies")[0][0])


def local_hashes(home: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(dicomgen.dataset_bytes(p)).hexdigest()
            for p in (home / "store").rglob("*.dcm")}


def scrub(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_pacs_edge("scrub", "--home", str(home), *args, check=False)


def assert_no_phi(text: str, study: list[dicomgen.GeneratedInstance]) -> None:
    header = study[0].header
    for phi in (header.StudyInstanceUID, str(header.PatientName), header.PatientID):
        assert phi not in text
    for instance in study:
        assert instance.header.SOPInstanceUID not in text


def assert_recall_is_byte_identical(home: Path, study_uid: str,
                                    hashes: dict[str, str]) -> None:
    run_pacs_edge("evict", study_uid, "--home", str(home))
    assert not list((home / "store").rglob("*.dcm"))
    run_pacs_edge("recall", study_uid, "--home", str(home))
    assert local_hashes(home) == hashes
    fsck = run_pacs_edge("fsck", "--home", str(home), check=False)
    assert fsck.returncode == 0, fsck.stdout


def test_scrub_of_intact_packs_exits_0_and_records_each_result(
        box: tuple[Path, Cloud, Any]) -> None:
    home, cloud, _ = box
    sync_once(home)
    [(_, pack, manifest, etag, state)] = packs(home)
    assert (etag, state) == (cloud.etag(pack), "")  # the committed blob's, at upload
    result = scrub(home, "--all")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok 1, damaged 0" in result.stdout
    [(checked_at, scrub_state, manifest_etag)] = query(
        home, "SELECT scrubbed_at, scrub_state, manifest_etag FROM packs")
    assert checked_at and scrub_state == "ok" and manifest_etag == cloud.etag(manifest)


def test_a_site_key_that_opens_no_pack_marks_nothing_damaged(
        box: tuple[Path, Cloud, Any]) -> None:
    """A wrong secrets/site.key (a restore mix-up) made every pack "damaged", to be
    uploaded again: it is the box's key that does not match, not the packs."""
    home, _, _ = box
    sync_once(home)
    site_key = home / "secrets" / "site.key"
    kept = site_key.read_bytes()
    site_key.write_bytes(os.urandom(len(kept)))
    result = scrub(home, "--all")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 pack(s) are wrapped for a site key this box does not hold" in result.stderr
    assert "ok 0, damaged 0" in result.stdout
    assert [state for *_, state in packs(home)] == [""]
    assert tier_state(home) == "replicated"
    site_key.write_bytes(kept)
    assert "ok 1, damaged 0" in scrub(home, "--all").stdout


def test_scrub_refuses_a_fraction_that_is_not_between_0_and_1(tmp_path: Path) -> None:
    home = init_home(tmp_path / "home", default_peer=False)
    for value in ("nan", "NaN", "inf", "-inf", "0", "1.5", "-0.5"):
        result = scrub(home, "--fraction", value)
        assert result.returncode == 2, (value, result.stdout + result.stderr)
        assert "Invalid value for '--fraction'" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert "scrubbed 0 pack(s)" in scrub(home, "--fraction", "1").stdout


def test_scrub_finds_a_damaged_pack_of_a_local_study_and_it_is_uploaded_again(
        box: tuple[Path, Cloud, Any]) -> None:
    home, cloud, study = box
    hashes = local_hashes(home)
    sync_once(home)
    [(_, pack, *_)] = packs(home)
    cloud.flip_byte(pack, len(cloud.read(pack)) // 2)
    result = scrub(home, "--fraction", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"damaged {pack}:" in result.stdout
    assert "uploaded again from local disk" in result.stdout
    assert_no_phi(result.stdout + result.stderr, study)
    assert tier_state(home) == "local"
    assert [row[4] for row in packs(home)] == ["damaged"]
    sync_once(home)  # the replication path uploads version 2 with every instance
    assert [(v, s) for v, _, _, _, s in packs(home)] == [(1, "damaged"), (2, "")]
    assert tier_state(home) == "replicated"
    again = scrub(home, "--all")  # version 1 holds nothing the index needs any more
    assert again.returncode == 0 and "ok 1, damaged 0" in again.stdout, again.stdout
    assert_recall_is_byte_identical(home, study[0].study_uid, hashes)


def test_a_study_whose_only_copy_is_damaged_is_at_risk_and_evict_refuses_it(
        box: tuple[Path, Cloud, Any]) -> None:
    home, cloud, study = box
    hashes = local_hashes(home)
    study_uid = study[0].study_uid
    sync_once(home)
    run_pacs_edge("evict", study_uid, "--home", str(home))
    [(_, pack, *_)] = packs(home)
    original = cloud.read(pack)
    cloud.flip_byte(pack, 40)  # inside segment 0
    result = scrub(home)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"damaged {pack}:" in result.stdout and "AT RISK" in result.stdout
    assert_no_phi(result.stdout + result.stderr, study)
    report = json.loads(run_pacs_edge("status", "--json", "--home", str(home)).stdout)
    assert report["sync"]["studies_at_risk"] == 1
    assert report["sync"]["at_risk_packs"] == [pack]
    audit = (home / "audit" / "audit.log").read_text()
    assert "scrub: pack version 1 is damaged" in audit and "study AT RISK" in audit
    refused = run_pacs_edge("evict", study_uid, "--home", str(home), check=False)
    assert refused.returncode == 2
    assert "damaged" in refused.stderr and "hint:" in refused.stderr
    assert scrub(home).returncode == 1  # still damaged: still reported
    cloud.write(pack, original)  # restored from the account's soft delete
    healed = scrub(home)
    assert healed.returncode == 0, healed.stdout
    report = json.loads(run_pacs_edge("status", "--json", "--home", str(home)).stdout)
    assert report["sync"]["studies_at_risk"] == 0
    run_pacs_edge("recall", study_uid, "--home", str(home))
    assert local_hashes(home) == hashes


def test_a_pack_only_a_prior_version_needs_is_scrubbed_and_its_damage_reported(
        tmp_path: Path) -> None:
    """A correction re-sent after its study was evicted leaves the earlier content in
    version 1's pack only (no file, no newer pack holds it). Scrub reads that pack too,
    and damage to it is reported and audited; eviction of the current content (in
    version 2) goes on."""
    home = init_home(tmp_path / "home")
    [instance] = dicomgen.make_studies(tmp_path / "study", seed=85, series_per_study=1,
                                       instances_per_series=1, size=96)
    run_pacs_edge("import", "--home", str(home), str(instance.path))
    sync_once(home)
    run_pacs_edge("evict", instance.study_uid, "--home", str(home))
    ds = pydicom.dcmread(instance.path)
    ds.ImageComments = "corrected"
    ds.save_as(tmp_path / "corrected.dcm", enforce_file_format=True)
    run_pacs_edge("import", "--home", str(home), str(tmp_path / "corrected.dcm"))
    sync_once(home)
    assert query(home, "SELECT p.version FROM instance_versions v JOIN packs p"
                       " ON p.id = v.pack_fk WHERE v.is_local = 0") == [(1,)]
    first = scrub(home, "--all")
    assert first.returncode == 0 and "scrubbed 2 pack(s)" in first.stdout, first.stdout
    [(_, old, *_), _] = packs(home)
    Cloud(home).flip_byte(old, 40)
    result = scrub(home, "--all")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"damaged {old}:" in result.stdout
    assert "1 prior version(s) of re-sent instances have no other copy" in result.stdout
    audit = (home / "audit" / "audit.log").read_text()
    assert "1 prior version(s) of re-sent instances have no other copy" in audit
    if tier_state(home) != "evicted":
        run_pacs_edge("evict", instance.study_uid, "--home", str(home))
    run_pacs_edge("recall", instance.study_uid, "--home", str(home))
    [path] = (home / "store").rglob("*.dcm")
    assert pydicom.dcmread(path).ImageComments == "corrected"


def test_a_study_at_risk_is_repaired_by_sending_it_again(
        box: tuple[Path, Cloud, Any]) -> None:
    """The natural repair, the modality or a CD sending the study again, was taken for a
    duplicate ("already present") of content whose only copy is the damaged pack."""
    home, cloud, study = box
    hashes = local_hashes(home)
    study_uid = study[0].study_uid
    sync_once(home)
    run_pacs_edge("evict", study_uid, "--home", str(home))
    [(_, pack, *_)] = packs(home)
    cloud.flip_byte(pack, 40)
    assert scrub(home).returncode == 1
    sent = run_pacs_edge("import", "--home", str(home), *(str(i.path) for i in study)).stdout
    assert f"stored {len(study)} " in sent and "already present 0" in sent, sent
    report = json.loads(run_pacs_edge("status", "--json", "--home", str(home)).stdout)
    assert report["sync"]["studies_at_risk"] == 0
    again = run_pacs_edge("import", "--home", str(home), *(str(i.path) for i in study)).stdout
    assert f"already present {len(study)}" in again, again
    assert "replicated 1 study version" in sync_once(home).stdout
    assert local_hashes(home) == {}  # evicted: the new version holds them
    run_pacs_edge("recall", study_uid, "--home", str(home))
    assert local_hashes(home) == hashes
    assert run_pacs_edge("fsck", "--home", str(home)).returncode == 0


def test_files_a_killed_eviction_left_are_kept_local_when_their_pack_is_found_damaged(
        box: tuple[Path, Cloud, Any]) -> None:
    """The eviction was killed after its commit, so its files are still there; then a
    scrub found the pack damaged. The start-up sweep kept the files but left their rows
    non-local: the study stayed at risk beside its only good copy, never uploaded."""
    home, cloud, study = box
    hashes = local_hashes(home)
    study_uid = study[0].study_uid
    sync_once(home)
    crash(home, "evict:after-commit", "evict", study_uid)
    [(_, pack, *_)] = packs(home)
    cloud.flip_byte(pack, 40)
    assert scrub(home).returncode == 1
    report = json.loads(run_pacs_edge("status", "--json", "--home", str(home)).stdout)
    assert report["sync"]["studies_at_risk"] == 1
    assert "replicated 1 study version" in sync_once(home).stdout  # the sweep, then a pass
    report = json.loads(run_pacs_edge("status", "--json", "--home", str(home)).stdout)
    assert report["sync"]["studies_at_risk"] == 0
    assert local_hashes(home) == {}  # uploaded anew, then deleted: the study is evicted
    run_pacs_edge("recall", study_uid, "--home", str(home))
    assert local_hashes(home) == hashes
    assert run_pacs_edge("fsck", "--home", str(home)).returncode == 0


async def test_the_evict_commit_refuses_instances_in_a_damaged_pack(tmp_path: Path) -> None:
    """evict checks for damaged packs before its commit (refuse_if_at_risk), and a scrub's
    verdict may land in between; the commit's own transaction refuses too. Local instances
    in a damaged pack: a recall that read the pack before the verdict, then committed."""
    from appliance.store.index import Index
    from appliance.store.leases import StudyLease
    from appliance.store.tier_steps import NotEvictable, mark_evicted

    home = init_home(tmp_path / "home")
    dicomgen.make_studies(tmp_path / "study", seed=84, series_per_study=1,
                          instances_per_series=2, size=32)
    run_pacs_edge("import", "--home", str(home), str(tmp_path / "study"))
    sync_once(home)
    db = sqlite3.connect(home / "index.sqlite3")
    try:
        with db:
            db.execute("UPDATE packs SET scrub_state = 'damaged', scrub_error = 'rotted'")
    finally:
        db.close()
    [(study_id,)] = query(home, "SELECT id FROM studies")
    index = Index(home / "index.sqlite3")
    await index.open()
    try:
        assert index.writer is not None
        lease = StudyLease(index.writer, study_id, "evict")
        with pytest.raises(NotEvictable, match="damaged"):
            await index.writer.submit_sync(lambda c: mark_evicted(c, lease, study_id))
    finally:
        await index.close()
    assert tier_state(home) == "replicated"
    assert query(home, "SELECT DISTINCT is_local FROM instances") == [(1,)]
    assert query(home, "SELECT COUNT(*) FROM study_leases") == [(0,)]


@pytest.mark.parametrize("what", ["pack changed", "manifest missing"])
def test_evict_refuses_when_the_cloud_copy_is_not_the_one_verified(
        box: tuple[Path, Cloud, Any], what: str) -> None:
    home, cloud, study = box
    hashes = local_hashes(home)
    sync_once(home)
    [(_, pack, manifest, *_)] = packs(home)
    if what == "pack changed":
        cloud.flip_byte(pack, 100)
    else:
        cloud.delete(manifest)
    refused = run_pacs_edge("evict", study[0].study_uid, "--home", str(home), check=False)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert ("not the one verified at upload" if what == "pack changed"
            else "missing from the cloud") in refused.stderr
    assert "pacs-edge scrub --all" in refused.stderr
    assert tier_state(home) == "replicated"
    assert local_hashes(home) == hashes  # nothing deleted


def test_an_intact_pack_with_a_new_etag_is_recorded_again_by_scrub(
        box: tuple[Path, Cloud, Any]) -> None:
    """A container copied to new storage: same bytes, new ETags. Eviction refuses until
    a scrub has read the pack back and recorded its new identity."""
    home, cloud, study = box
    sync_once(home)
    [(_, pack, *_)] = packs(home)
    cloud.write(pack, cloud.read(pack))
    refused = run_pacs_edge("evict", study[0].study_uid, "--home", str(home), check=False)
    assert refused.returncode == 2 and "not the one verified" in refused.stderr
    assert scrub(home, "--all").returncode == 0
    assert packs(home)[0][3] == cloud.etag(pack)
    run_pacs_edge("evict", study[0].study_uid, "--home", str(home))
    assert tier_state(home) == "evicted"


def crash(home: Path, point: str, *args: str) -> None:
    proc = subprocess.run([*pacs_edge_command(), *args, "--home", str(home)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, CRASH_ENV: point})
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr)


@pytest.mark.parametrize("point", ["scrub:mid-pack", "scrub:before-commit",
                                   "scrub:after-commit"])
def test_scrub_killed_at_each_step_loses_nothing_and_the_damage_is_still_repaired(
        box: tuple[Path, Cloud, Any], point: str) -> None:
    home, cloud, study = box
    hashes = local_hashes(home)
    sync_once(home)
    [(_, pack, *_)] = packs(home)
    cloud.flip_byte(pack, len(cloud.read(pack)) - 5)  # inside the final segment
    crash(home, point, "scrub", "--all")
    if point != "scrub:mid-pack":  # the verdict was known: its audit record is written
        assert "scrub: pack version 1 is damaged" in (home / "audit" / "audit.log").read_text()
    committed = point == "scrub:after-commit"
    assert tier_state(home) == ("local" if committed else "replicated")
    assert scrub(home, "--all").returncode == (0 if committed else 1)
    assert tier_state(home) == "local"
    sync_once(home)
    assert tier_state(home) == "replicated"
    assert scrub(home, "--all").returncode == 0
    assert local_hashes(home) == hashes
    assert_recall_is_byte_identical(home, study[0].study_uid, hashes)


@pytest.mark.parametrize("uploaded", [
    "verified_at - 2 * 86400",  # two days ago: due again under a fraction of 1 per day
    "verified_at + 365 * 86400",  # while the clock was a year ahead, since corrected
])
def test_the_agent_scrubs_its_daily_share_and_finds_the_damage(
        box: tuple[Path, Cloud, Any], uploaded: str) -> None:
    home, cloud, _ = box
    EdgeServer(home).configure(sync={"scrub_fraction_per_day": 1.0,
                                     "stable_after_seconds": 3600.0})
    sync_once(home)
    [(_, pack, *_)] = packs(home)
    cloud.flip_byte(pack, 60)
    db = sqlite3.connect(home / "index.sqlite3")
    try:
        with db:
            db.execute(f"UPDATE packs SET verified_at = {uploaded}")
    finally:
        db.close()
    agent = SyncAgent(home).start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while packs(home)[0][4] != "damaged":
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.1)
    finally:
        assert agent.stop() == 0, agent.log()
    assert "scrub found a damaged pack" in agent.log()
