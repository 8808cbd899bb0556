"""Restore a lost box: escrow the keys, destroy the home, recover, restore, compare.

Real processes throughout: `pacs-edge serve`, `sync --once`, `keys escrow`,
`keys recover`, `init`, `restore`, a `pacs-edge sync` agent serving the
recalls that C-GET triggers, and dcmtk findscu/getscu. The cloud is a local
folder outside the data home (the default one inside it would die with it).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import shlex
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import dcmtk
import dicomgen
import pytest
from conftest import CLI_TIMEOUT, EdgeServer, init_home, pacs_edge_command, run_pacs_edge
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from syncagent import (
    SyncAgent,
    evict,
    import_files,
    index_rows,
    sent_hashes,
    stored_hashes,
    sync_once,
)

from appliance.store import database
from appliance.store.index import Index
from provisioning.keyring import key_id, load_keyring
from provisioning.site_secrets import load_name_secret
from sync.blobstore.base import BlobInfo, Tier
from sync.pack import naming
from sync.pack.manifest import (
    InstanceAttributes,
    Manifest,
    ManifestEntry,
    SeriesAttributes,
    StudyAttributes,
)
from sync.restore import _insert_version, _Listing, _packs_without_manifest, _Version

SOP_MOVED = "1.2.826.0.1.3680043.10.4716.9.9.9"
ROOT_MOVED = "1.2.826.0.1.3680043.10.4716"
PATIENT_KEYS = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                "NumberOfPatientRelatedInstances"]
STUDY_KEYS = [*PATIENT_KEYS[:4], "StudyInstanceUID", "StudyDate", "StudyTime",
              "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName",
              "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances", "InstanceAvailability"]
SERIES_KEYS = ["SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
               "BodyPartExamined", "NumberOfSeriesRelatedInstances", "InstanceAvailability"]
IMAGE_KEYS = ["SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "InstanceNumber",
              "InstanceAvailability"]
PASSPHRASE = "correct horse battery staple"


def passphrase_file(path: Path, text: str) -> Path:
    """A passphrase file as `keys escrow` and `keys recover` take it: 0600."""
    path.write_text(text)
    path.chmod(0o600)
    return path


def answers(result: dcmtk.FindResult) -> set[frozenset[tuple[str, str]]]:
    """Every response as a set of (attribute, value): comparable across boxes."""
    return {frozenset((e.keyword or str(e.tag), str(e.value)) for e in ds)
            for ds in result.responses}


Answers = set[frozenset[tuple[str, str]]]


def find(port: int, keys: dict[str, str | None], *, level: str = "STUDY",
         model: str = "study") -> Answers:
    result = dcmtk.findscu(port, keys, level=level, model=model)
    result.check()
    return answers(result)


def find_everything(port: int, study_uids: list[str]) -> dict[str, Answers]:
    """C-FIND at every level: patients, studies, series of each study, images of each."""
    found = {"patients": find(port, dict.fromkeys(PATIENT_KEYS), level="PATIENT",
                              model="patient"),
             "studies": find(port, dict.fromkeys(STUDY_KEYS))}
    for uid in study_uids:
        found[f"series {uid}"] = find(port, {"StudyInstanceUID": uid,
                                             **dict.fromkeys(SERIES_KEYS)}, level="SERIES")
        found[f"images {uid}"] = find(port, {"StudyInstanceUID": uid,
                                             **dict.fromkeys(IMAGE_KEYS)}, level="IMAGE")
    return found


def index_dump(home: Path) -> list[str]:
    db = sqlite3.connect(f"file:{home / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        return list(db.iterdump())
    finally:
        db.close()


def test_lost_box_is_restored_from_escrow_and_cloud(
    edge_server_factory: Callable[..., EdgeServer], tmp_path: Path,
) -> None:
    cloud = f"file://{tmp_path / 'cloud'}"
    old = edge_server_factory(start=False)
    old.configure(cloud={"url": cloud}, sync={"stable_after_seconds": 3600.0})
    old.start()
    instances = dicomgen.make_studies(tmp_path / "sent", seed=31, patients=3,
                                      studies_per_patient=2, series_per_study=2,
                                      instances_per_series=2)
    late = dicomgen.make_studies(tmp_path / "late", seed=32, patients=1,
                                 series_per_study=1, instances_per_series=2)
    first, later = late[:1], late[1:]
    dcmtk.storescu(old.port, [i.path for i in [*instances, *first]]).check()
    sync_once(old.home)
    dcmtk.storescu(old.port, [i.path for i in later]).check()  # a second pack version
    sync_once(old.home)
    everything = [*instances, *late]
    studies = dicomgen.group_by(everything, "StudyInstanceUID")
    for uid in studies:
        evict(old.home, uid)
    before = find_everything(old.port, sorted(studies))
    assert len(before["studies"]) == len(studies) and len(before["patients"]) == 4
    assert ("InstanceAvailability", "NEARLINE") in next(iter(before["studies"]))

    passphrase = passphrase_file(tmp_path / "passphrase", PASSPHRASE + "\n")
    escrow = tmp_path / "offline" / "site.escrow"
    escrow.parent.mkdir()
    old.cli("keys", "escrow", "--out", str(escrow), "--passphrase-file", str(passphrase))
    assert escrow.stat().st_mode & 0o777 == 0o600
    assert PASSPHRASE.encode() not in escrow.read_bytes()

    old.stop()
    shutil.rmtree(old.home)  # the box is lost; the cloud and the escrow file are not

    new_home = tmp_path / "new-home"
    wrong = passphrase_file(tmp_path / "wrong", "not the passphrase at all")
    refused = run_pacs_edge("keys", "recover", "--home", str(new_home), "--from", str(escrow),
                            "--passphrase-file", str(wrong), check=False)
    assert refused.returncode == 2 and "passphrase is wrong" in refused.stderr
    run_pacs_edge("keys", "recover", "--home", str(new_home), "--from", str(escrow),
                  "--passphrase-file", str(passphrase))
    for name in ("site.key", "names.key", "log.key"):
        assert (new_home / "secrets" / name).stat().st_mode & 0o777 == 0o600
    again = run_pacs_edge("keys", "recover", "--home", str(new_home), "--from", str(escrow),
                          "--passphrase-file", str(passphrase), check=False)
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr

    init_home(new_home)
    restored = run_pacs_edge("restore", "--home", str(new_home), "--cloud", cloud).stdout
    assert f"restored {len(studies) + 1} pack version(s) of {len(studies)} study(ies)" in restored
    dump = index_dump(new_home)
    second = run_pacs_edge("restore", "--home", str(new_home), "--cloud", cloud).stdout
    assert f"restored 0 pack version(s) of 0 study(ies), 0 instance(s); {len(studies) + 1} " \
           "already in the index" in second
    assert index_dump(new_home) == dump

    new = edge_server_factory(new_home, start=False)
    new.configure(sync={"stable_after_seconds": 3600.0, "recall_poll_seconds": 0.2,
                        "evict_after_days": 0.0, "recall_timeout_seconds": 60.0})
    new.start()
    assert find_everything(new.port, sorted(studies)) == before

    agent = SyncAgent(new_home).start()
    try:
        for uid, items in studies.items():
            got = tmp_path / f"got-{uid}"
            dcmtk.getscu(new.port, {"StudyInstanceUID": uid}, got).check()
            assert {dicomgen.dataset_bytes(p) for p in got.iterdir()} == {
                dicomgen.dataset_bytes(i.path) for i in items}
    finally:
        assert agent.stop() == 0, agent.log()
    assert run_pacs_edge("fsck", "--home", str(new_home)).returncode == 0
    # Nothing was uploaded again: recalled studies are replicated, not local.
    assert "replicated 0 study version" in sync_once(new_home).stdout


def test_restore_refuses_a_home_that_is_not_initialised(tmp_path: Path) -> None:
    result = run_pacs_edge("restore", "--home", str(tmp_path / "nothing"), "--cloud",
                           f"file://{tmp_path / 'cloud'}", check=False)
    assert result.returncode == 2
    assert "not an initialised data home" in result.stderr and "keys recover" in result.stderr


def test_restore_from_an_empty_cloud_is_refused_and_records_nothing(tmp_path: Path) -> None:
    """A mistyped file:// URL names an empty folder: recording it in the config would
    make restore refuse the right URL afterwards ("already names another cloud")."""
    home = init_home(tmp_path / "home")
    before = (home / "pacs-edge.toml").read_text()
    result = run_pacs_edge("restore", "--home", str(home), "--cloud",
                           f"file://{tmp_path / 'typo'}", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "is empty: nothing to restore from" in result.stderr
    assert (home / "pacs-edge.toml").read_text() == before


def failed_restore_record(home: Path) -> str:
    """The description of the home's last audit record, a failed restore's."""
    line = (home / "audit" / "audit.log").read_text().splitlines()[-1]
    record = json.loads(line)["record"]
    event = record["EventIdentification"]
    assert (event["EventID"]["csd-code"], event["EventOutcomeIndicator"]) == ("110113", 4)
    assert [t["csd-code"] for t in event["EventTypeCode"]] == ["110129"]
    assert [o["ParticipantObjectID"] for o in record["ParticipantObjectIdentification"]] == [
        "index restore from the cloud"]
    return str(event["EventOutcomeDescription"])


def test_a_failed_restore_is_a_failed_security_record_with_why(tmp_path: Path) -> None:
    """Only a restore that succeeded was in the audit trail: one stopped by its cloud
    (here an empty folder) left no record of the attempt."""
    home = init_home(tmp_path / "home")
    result = run_pacs_edge("restore", "--home", str(home), "--cloud",
                           f"file://{tmp_path / 'typo'}", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "is empty: nothing to restore from" in failed_restore_record(home)


@pytest.mark.parametrize("passphrase", ["short"])
def test_escrow_refuses_a_short_passphrase(edge_home: Path, tmp_path: Path,
                                           passphrase: str) -> None:
    file = passphrase_file(tmp_path / "p", passphrase)
    result = run_pacs_edge("keys", "escrow", "--home", str(edge_home), "--out",
                           str(tmp_path / "e"), "--passphrase-file", str(file), check=False)
    assert result.returncode == 2 and "at least 12" in result.stderr
    assert not (tmp_path / "e").exists()


def test_escrow_and_recover_refuse_a_passphrase_file_others_can_read(
        edge_home: Path, tmp_path: Path) -> None:
    """As users' --password-file: a passphrase in a 0644 file is a passphrase shared."""
    file = passphrase_file(tmp_path / "p", PASSPHRASE + "\n")
    file.chmod(0o644)
    result = run_pacs_edge("keys", "escrow", "--home", str(edge_home), "--out",
                           str(tmp_path / "e"), "--passphrase-file", str(file), check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "can read it" in result.stderr and f"chmod 600 {file}" in result.stderr
    assert not (tmp_path / "e").exists()
    file.chmod(0o600)
    run_pacs_edge("keys", "escrow", "--home", str(edge_home), "--out", str(tmp_path / "e"),
                  "--passphrase-file", str(file))
    file.chmod(0o640)
    result = run_pacs_edge("keys", "recover", "--home", str(tmp_path / "new"), "--from",
                           str(tmp_path / "e"), "--passphrase-file", str(file), check=False)
    assert result.returncode == 2 and "can read it" in result.stderr, result.stderr
    assert not (tmp_path / "new" / "secrets").exists()


@pytest.mark.parametrize("field, value", [
    ("n", "1e400"), ("n", "-1e400"), ("n", "131072.0"), ("n", '"131072"'), ("n", "true"),
    ("n", "null"), ("n", "[131072]"), ("n", "131071"), ("n", str(1 << 80)), ("r", "8.5"),
    ("r", "1e400"), ("p", '"1"'), ("p", "0"),
])
def test_recover_refuses_absurd_key_derivation_parameters(tmp_path: Path, field: str,
                                                          value: str) -> None:
    """Checked before scrypt runs: an integer of the right range, n a power of two."""
    _refuses_key_derivation(tmp_path, {field: value})


@pytest.mark.parametrize("n, r, p", [(1 << 20, 32, 1), (1 << 19, 8, 16)])
def test_recover_refuses_key_derivation_that_needs_gigabytes_or_minutes(
        tmp_path: Path, n: int, r: int, p: int) -> None:
    """Each within its own bound, together 4 GiB of memory and about a minute, or 16 times
    the work of 512 MiB: scrypt ran them. At most 512 MiB and 8 times the work of what
    `keys escrow` writes (128 MiB) are asked now."""
    _refuses_key_derivation(tmp_path, {"n": str(n), "r": str(r), "p": str(p)})


def _refuses_key_derivation(tmp_path: Path, edits: dict[str, str]) -> None:
    kdf = {"name": '"scrypt"', "n": "131072", "r": "8", "p": "1",
           "salt": f'"{base64.b64encode(os.urandom(16)).decode()}"', **edits}
    (tmp_path / "edited.escrow").write_text(
        '{"format": "pacs-edge-escrow", "version": 2, "site_key_id": "0123456789abcdef",'
        ' "kdf": {' + ", ".join(f'"{k}": {v}' for k, v in kdf.items()) + '},'
        f' "nonce": "{base64.b64encode(os.urandom(12)).decode()}", "ciphertext": "AAAA"}}')
    passphrase = passphrase_file(tmp_path / "passphrase", PASSPHRASE)
    result = run_pacs_edge("keys", "recover", "--home", str(tmp_path / "new"), "--from",
                           str(tmp_path / "edited.escrow"), "--passphrase-file",
                           str(passphrase), check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "unsupported or oversized key derivation parameters" in result.stderr
    assert "hint: the file was not written by pacs-edge, or was edited" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "new" / "secrets").exists()


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000,
                                  '{"format": "pacs-edge-escrow", "version": ' + "9" * 5000
                                  + "}", "[1, 2]", '{"format": "pacs-edge-escrow", "version":'
                                  ' true}'])
def test_recover_refuses_a_file_that_is_not_an_escrow_file(tmp_path: Path, text: str) -> None:
    (tmp_path / "odd.escrow").write_text(text)
    passphrase = passphrase_file(tmp_path / "passphrase", PASSPHRASE)
    result = run_pacs_edge("keys", "recover", "--home", str(tmp_path / "new"), "--from",
                           str(tmp_path / "odd.escrow"), "--passphrase-file", str(passphrase),
                           check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "escrow file" in result.stderr and "Traceback" not in result.stderr


def synced_and_escrowed(tmp_path: Path, *, seed: int, patients: int, instances: int
                        ) -> tuple[Path, Path, Path, list[dicomgen.GeneratedInstance]]:
    """A box (`old`) whose studies (one per patient) went to a folder cloud, its keys
    escrowed to tmp_path/escrow: (cloud, old, passphrase file, what was sent)."""
    cloud = tmp_path / "cloud"
    old = tmp_path / "old"
    run_pacs_edge("init", "--home", str(old), "--dicom-port", "0", "--tls-port", "0",
                  "--cloud", f"file://{cloud}")
    sent = dicomgen.make_studies(tmp_path / "sent", seed=seed, patients=patients,
                                 series_per_study=1, instances_per_series=instances)
    run_pacs_edge("import", "--home", str(old), str(tmp_path / "sent"))
    sync_once(old)
    passphrase = passphrase_file(tmp_path / "passphrase", PASSPHRASE + "\n")
    run_pacs_edge("keys", "escrow", "--home", str(old), "--out", str(tmp_path / "escrow"),
                  "--passphrase-file", str(passphrase))
    return cloud, old, passphrase, sent


def recovered_home(tmp_path: Path, passphrase: Path) -> Path:
    """A new home (tmp_path/new) holding the secrets of tmp_path/escrow, initialised."""
    new = tmp_path / "new"
    run_pacs_edge("keys", "recover", "--home", str(new), "--from", str(tmp_path / "escrow"),
                  "--passphrase-file", str(passphrase))
    return init_home(new)


def test_restore_reports_and_skips_versions_it_cannot_trust(tmp_path: Path) -> None:
    cloud, _, passphrase, sent = synced_and_escrowed(tmp_path, seed=41, patients=4,
                                                     instances=2)
    packs = sorted(cloud.rglob("*.pack"))
    assert len(packs) == 4
    packs[0].unlink()
    with packs[1].open("ab") as fh:
        fh.write(b"\0")
    manifest = packs[2].with_suffix(".manifest")
    sealed = bytearray(manifest.read_bytes())
    sealed[-1] ^= 0x01
    manifest.write_bytes(bytes(sealed))

    new = recovered_home(tmp_path, passphrase)
    result = run_pacs_edge("restore", "--home", str(new), "--cloud", f"file://{cloud}",
                           check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "restored 1 pack version(s) of 1 study(ies), 2 instance(s); 0 already in the " \
           "index; 3 failed" in result.stdout
    assert "the pack of this manifest is missing" in result.stderr
    assert "the pack has" in result.stderr and "its manifest says" in result.stderr
    assert result.stderr.count("  failed: studies/") == 3
    patient_ids = {str(i.header.PatientID) for i in sent}
    assert not any(pid in result.stdout + result.stderr for pid in patient_ids)


def test_restore_from_another_boxs_cloud_fails_and_does_not_record_the_url(
        tmp_path: Path) -> None:
    """Restore into a home with its own keys (not `keys recover`ed from the lost box's
    escrow): every pack fails, so the URL must not be recorded either (the agent would
    write there, and the right URL would be refused afterwards)."""
    cloud, _, _, _ = synced_and_escrowed(tmp_path, seed=44, patients=1, instances=1)
    home = init_home(tmp_path / "home")
    before = (home / "pacs-edge.toml").read_text()
    result = run_pacs_edge("restore", "--home", str(home), "--cloud", f"file://{cloud}",
                           check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "; 1 failed" in result.stdout
    assert f"nothing could be restored from file://{cloud}; the URL was not recorded" \
        in result.stderr
    assert (home / "pacs-edge.toml").read_text() == before
    assert failed_restore_record(home).startswith("nothing could be restored")


def test_restore_reports_a_pack_whose_manifest_is_gone(tmp_path: Path) -> None:
    """Restore lists manifests; a pack left without one (its manifest deleted) must fail
    the run, not vanish from it: "0 failed" would say every acknowledged study came back."""
    cloud, _, passphrase, _ = synced_and_escrowed(tmp_path, seed=43, patients=2, instances=1)
    orphan = sorted(cloud.rglob("*.pack"))[0]
    orphan.with_suffix(".manifest").unlink()

    new = recovered_home(tmp_path, passphrase)
    result = run_pacs_edge("restore", "--home", str(new), "--cloud", f"file://{cloud}",
                           check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "restored 1 pack version(s)" in result.stdout and "; 1 failed" in result.stdout
    assert f"failed: {orphan.relative_to(cloud)}: no manifest for this pack: the newest" \
        " version of its study, most likely an upload the lost box never finished" \
        in result.stderr


def test_a_pack_without_manifest_is_told_apart_by_whether_it_is_its_studys_newest() -> None:
    """The agent uploads a pack before its manifest: a box lost in between leaves its
    study's newest pack alone, while an older pack alone lost a manifest once written."""
    a, b = "a" * 32, "b" * 32
    packs = [naming.pack_name(a, 1), naming.pack_name(a, 2), naming.pack_name(b, 1),
             naming.pack_name(b, 3)]
    listing = _Listing([naming.manifest_name(a, 2), naming.manifest_name(b, 1)],
                       {name: BlobInfo(name, 1, Tier.HOT, True) for name in packs})
    known = {naming.manifest_name(b, 2)}  # in the index already: not listed again
    assert _packs_without_manifest(listing, known) == [
        (naming.pack_name(a, 1), False), (naming.pack_name(b, 3), True)]


def test_restore_stops_at_a_store_that_stopped_answering(tmp_path: Path) -> None:
    """An unavailable store (its retries spent) ends the restore with its error: over
    Azure, every further version would wait out the same retries, hours for a large
    container, and a run again resumes. In process: a store that stopped answering
    after the listing cannot be staged from outside."""
    from appliance.store.files import FileStore
    from sync.blobstore.base import BlobStoreUnavailable
    from sync.blobstore.local import LocalFolderStore
    from sync.restore import READ_CONCURRENCY, restore_index

    versions = READ_CONCURRENCY + 2
    cloud, _, passphrase, _ = synced_and_escrowed(tmp_path, seed=47, patients=versions,
                                                  instances=1)
    new = recovered_home(tmp_path, passphrase)
    reads: list[str] = []

    class Gone(LocalFolderStore):
        def open_range(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
            reads.append(name)
            raise BlobStoreUnavailable("open_range", name, "Azure did not answer")

    async def run() -> None:
        async with Index(new / "index.sqlite3") as index:
            await restore_index(index, Gone(cloud), load_keyring(new),
                                name_secret=load_name_secret(new),
                                files=FileStore(new / "store"))

    with pytest.raises(BlobStoreUnavailable):
        asyncio.run(run())
    assert len(reads) <= READ_CONCURRENCY < versions  # those in flight, no more


def _lose_and_recover(old: Path, new: Path, escrow: Path, passphrase: Path
                      ) -> subprocess.CompletedProcess[str]:
    shutil.rmtree(old)
    recovered = run_pacs_edge("keys", "recover", "--home", str(new), "--from", str(escrow),
                              "--passphrase-file", str(passphrase))
    init_home(new)
    return recovered


def test_audit_anchors_survive_a_restore(tmp_path: Path) -> None:
    cloud = tmp_path / "cloud"
    old = tmp_path / "old"
    run_pacs_edge("init", "--home", str(old), "--dicom-port", "0", "--tls-port", "0",
                  "--cloud", f"file://{cloud}")
    for n in range(3):
        run_pacs_edge("peers", "add", f"ws{n}", "--home", str(old), "--ae-title", f"WS{n}",
                      "--host", "127.0.0.1", "--port", "104", "--allow", "find")
    assert "anchored record 3" in run_pacs_edge("audit", "anchor", "--home", str(old)).stdout
    passphrase = passphrase_file(tmp_path / "passphrase", PASSPHRASE + "\n")
    run_pacs_edge("keys", "escrow", "--home", str(old), "--out", str(tmp_path / "escrow"),
                  "--passphrase-file", str(passphrase))
    assert json.loads((tmp_path / "escrow").read_text())["version"] == 2

    new = tmp_path / "new"
    recovered = _lose_and_recover(old, new, tmp_path / "escrow", passphrase)
    assert (new / "secrets" / "audit.key").stat().st_mode & 0o777 == 0o600
    assert "format version 1" not in recovered.stderr
    run_pacs_edge("restore", "--home", str(new), "--cloud", f"file://{cloud}")
    # The new log starts again at record 1 (the key recovery, init_home's peer, the
    # restore): its head is 3, the seq the lost box anchored.
    assert "anchored record 3" in run_pacs_edge("audit", "anchor", "--home", str(new)).stdout
    assert sorted(p.name for p in (cloud / "audit" / "anchors").iterdir()
                  if not p.name.startswith(".")) == ["000000000003", "000000000006"]
    run_pacs_edge("restore", "--home", str(new))  # again (record 4): the base stays
    verified = run_pacs_edge("audit", "verify", "--home", str(new))
    assert "audit log intact: 4 record(s)" in verified.stdout
    assert "anchors 1 checked, latest at record 3" in verified.stdout
    assert "1 anchor(s) of the lost box's log authenticated" in verified.stdout


def _recovered_home_with_a_linked_config(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A lost box's cloud and a new home recovered from its escrow, whose config is a
    link to a 0640 file in a folder of its own, as docs/deployment.md keeps it in
    /etc/pacs-edge: (cloud, new home, the config file)."""
    cloud = tmp_path / "cloud"
    old = tmp_path / "old"
    run_pacs_edge("init", "--home", str(old), "--dicom-port", "0", "--tls-port", "0",
                  "--cloud", f"file://{cloud}")
    run_pacs_edge("peers", "add", "ws0", "--home", str(old), "--ae-title", "WS0",
                  "--host", "127.0.0.1", "--port", "104", "--allow", "find")
    run_pacs_edge("audit", "anchor", "--home", str(old))  # the cloud is not empty
    passphrase = passphrase_file(tmp_path / "passphrase", PASSPHRASE + "\n")
    run_pacs_edge("keys", "escrow", "--home", str(old), "--out", str(tmp_path / "escrow"),
                  "--passphrase-file", str(passphrase))
    new = tmp_path / "new"
    _lose_and_recover(old, new, tmp_path / "escrow", passphrase)
    etc = tmp_path / "etc"
    etc.mkdir()
    kept = etc / "pacs-edge.toml"
    (new / "pacs-edge.toml").rename(kept)
    kept.chmod(0o640)
    (new / "pacs-edge.toml").symlink_to(kept)
    return cloud, new, kept


def test_restore_writes_the_cloud_url_through_a_linked_config(tmp_path: Path) -> None:
    """The URL goes into the file behind the link, which keeps its mode."""
    cloud, new, kept = _recovered_home_with_a_linked_config(tmp_path)
    run_pacs_edge("restore", "--home", str(new), "--cloud", f"file://{cloud}")
    assert (new / "pacs-edge.toml").is_symlink()
    assert f'url = "file://{cloud}"' in kept.read_text()
    assert kept.stat().st_mode & 0o777 == 0o640
    assert not [p for p in kept.parent.iterdir() if p != kept]


def test_a_restore_that_cannot_write_the_linked_config_says_what_to_write_there(
        tmp_path: Path) -> None:
    """On a box the service user runs restore, and /etc/pacs-edge is root's: the
    restore stands, and the operator is told the line to put in the config (it was an
    error naming a temp file, after a restore that had worked). The folder is made
    read-only for the restore with a bind mount: the tests run as root, whom no
    folder's mode stops."""
    cloud, new, kept = _recovered_home_with_a_linked_config(tmp_path)
    before = kept.read_text()
    etc = shlex.quote(str(kept.parent))
    read_only = f"mount --bind {etc} {etc} && mount -o remount,bind,ro {etc} && exec \"$@\""
    restore = subprocess.run(
        ["unshare", "--mount", "sh", "-c", read_only, "sh", *pacs_edge_command(), "restore",
         "--home", str(new), "--cloud", f"file://{cloud}"],
        capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert restore.returncode == 2, restore
    assert "restored 0 pack version(s)" in restore.stdout, restore.stdout
    assert (f"error: restored, but the cloud URL could not be recorded in {kept}:"
            " Read-only file system") in restore.stderr, restore.stderr
    assert f'hint: set [cloud] url = "file://{cloud}" in {kept}' in restore.stderr
    assert kept.read_text() == before
    run_pacs_edge("restore", "--home", str(new), "--cloud", f"file://{cloud}")
    assert f'url = "file://{cloud}"' in kept.read_text()


def test_recover_reads_a_version_1_escrow_file(tmp_path: Path) -> None:
    """A file written before the anchor key was escrowed, built from docs/cloud-format."""
    secrets = {name: os.urandom(32) for name in ("site.key", "names.key", "log.key")}
    kid = key_id(secrets["site.key"])
    salt, nonce = os.urandom(16), os.urandom(12)
    key = Scrypt(salt=salt, length=32, n=1 << 14, r=8, p=1).derive(PASSPHRASE.encode())
    payload = json.dumps({k: base64.b64encode(v).decode() for k, v in secrets.items()})
    sealed = AESGCM(key).encrypt(nonce, payload.encode(), f"pacs-edge-escrow v1|{kid}".encode())
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    (tmp_path / "v1.escrow").write_text(json.dumps({
        "format": "pacs-edge-escrow", "version": 1, "site_key_id": kid,
        "kdf": {"name": "scrypt", "n": 1 << 14, "r": 8, "p": 1, "salt": b64(salt)},
        "nonce": b64(nonce), "ciphertext": b64(sealed)}))
    passphrase = passphrase_file(tmp_path / "passphrase", PASSPHRASE)

    home = tmp_path / "home"
    result = run_pacs_edge("keys", "recover", "--home", str(home), "--from",
                           str(tmp_path / "v1.escrow"), "--passphrase-file", str(passphrase))
    assert {name: (home / "secrets" / name).read_bytes() for name in secrets} == secrets
    assert not (home / "secrets" / "audit.key").exists()
    assert "format version 1" in result.stderr and "audit anchor key" in result.stderr
    assert json.loads((home / "escrow.json").read_text())["site_key_id"] == kid


def test_restore_refuses_manifests_swapped_between_studies(tmp_path: Path) -> None:
    cloud, old, passphrase, sent = synced_and_escrowed(tmp_path, seed=43, patients=3,
                                                       instances=1)
    # Swap two studies' folders whole (pack, manifest, key objects): each manifest still
    # opens with its own key object, but now sits under the other study's key.
    first, second, _ = sorted((cloud / "studies").iterdir())
    first.rename(cloud / "studies" / "swap")
    second.rename(first)
    (cloud / "studies" / "swap").rename(second)

    new = tmp_path / "new"
    _lose_and_recover(old, new, tmp_path / "escrow", passphrase)
    result = run_pacs_edge("restore", "--home", str(new), "--cloud", f"file://{cloud}",
                           check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "restored 1 pack version(s) of 1 study(ies), 1 instance(s); 0 already in the " \
           "index; 2 failed (2 study folder(s) hold another study's manifest)" in result.stdout
    assert result.stderr.count("does not belong under this study key") == 2
    assert "Traceback" not in result.stderr
    for item in sent:
        for value in (str(item.header.PatientID), item.study_uid, str(item.header.PatientName)):
            assert value not in result.stdout + result.stderr
    restored = index_dump(new)
    assert sum(item.study_uid in line for item in sent for line in restored
               if line.startswith('INSERT INTO "studies"')) == 1


def test_a_restore_over_the_store_keeps_every_versions_intact_files_local(
        tmp_path: Path) -> None:
    """The index is lost, the store is not: each version's files found intact stay local,
    and a study takes the state all its versions' rows say (a later version of a study
    restore made `replicated` is not refused as the box's own)."""
    home = init_home(tmp_path / "home")
    EdgeServer(home).configure(cloud={"url": f"file://{tmp_path / 'cloud'}"})
    whole, partial = (dicomgen.make_studies(tmp_path / name, seed=seed, series_per_study=1,
                                            instances_per_series=3, size=64)
                      for name, seed in (("whole", 44), ("partial", 45)))
    import_files(home, *whole[:2], *partial[:2])
    sync_once(home)
    import_files(home, whole[2], partial[2])
    sync_once(home)  # version 2 of each study: its late instance
    [(lost,)] = index_rows(home, "SELECT path FROM instances WHERE sop_uid ="
                           f" '{partial[0].sop_instance_uid}'")
    (home / "store" / str(lost)).unlink()  # one file of version 1 is gone from disk
    for path in home.glob("index.sqlite3*"):
        path.unlink()

    restored = run_pacs_edge("restore", "--home", str(home)).stdout
    assert "restored 4 pack version(s) of 2 study(ies), 6 instance(s)" in restored
    assert "kept 5 instance(s)" in restored
    assert dict(index_rows(home, "SELECT study_uid, tier_state FROM studies")) == {
        whole[0].study_uid: "replicated", partial[0].study_uid: "evicted"}
    dump = index_dump(home)
    assert "restored 0 pack version(s)" in run_pacs_edge("restore", "--home", str(home)).stdout
    assert index_dump(home) == dump
    run_pacs_edge("fsck", "--repair", "--home", str(home))
    recalled = run_pacs_edge("recall", partial[0].study_uid, "--home", str(home)).stdout
    assert "recalled 1 instance(s)" in recalled
    assert stored_hashes(home) == sent_hashes([*whole, *partial])
    assert "replicated 0 study version" in sync_once(home).stdout
    assert run_pacs_edge("fsck", "--home", str(home)).returncode == 0


def _moved_version(study_uid: str, sha256: str, received_at: float, n: int) -> _Version:
    """A one-instance version of `study_uid` holding SOP_MOVED with content `sha256`."""
    study = StudyAttributes(
        patient_id="P1", issuer_of_patient_id="", patient_name="DOE^JANE", birth_date="",
        sex="", study_uid=study_uid, study_date="20240301", study_time="", accession_number="",
        study_id="", study_description="", referring_physician="", character_set="")
    series = SeriesAttributes(f"{study_uid}.1", "CT", 1, "", "", "", "")
    instance = InstanceAttributes(series, SOP_MOVED, "1.2.840.10008.5.1.4.1.1.2", 1,
                                  "1.2.840.10008.1.2.1", received_at=received_at)
    manifest = Manifest(1, bytes([n]) * 16, 1, received_at, 1 << 20, 100, 148, "0" * 64,
                        study, (ManifestEntry(instance, 0, 100, 10, sha256),))
    key = f"{n:032x}"
    return _Version(naming.pack_name(key, 1), naming.manifest_name(key, 1), manifest, "Hot")


async def test_an_instance_sent_again_into_another_study_is_current_where_it_came_last(
        tmp_path: Path) -> None:
    """Restore takes studies in no particular order. SOP_MOVED was received in study A,
    then sent again (other content) under study B: B's content is current, A's a prior
    version in A's pack, whichever study comes back first (before, the last restored)."""
    older = _moved_version(f"{ROOT_MOVED}.1", "a" * 64, 1000.0, 1)
    newer = _moved_version(f"{ROOT_MOVED}.2", "b" * 64, 2000.0, 2)
    for order in ((older, newer), (newer, older)):
        async with Index(tmp_path / f"{order[0].manifest.study.study_uid}.sqlite3") as index:
            assert index.writer is not None
            for version in order:
                await index.writer.submit_sync(functools.partial(
                    _insert_version, version=version, local=frozenset()))
            rows = await database.run_sync(index.reader, lambda c: (
                c.execute("SELECT sha256 FROM instances").fetchall(),
                c.execute("SELECT sha256, pack_fk IS NOT NULL FROM instance_versions")
                .fetchall(),
                c.execute("SELECT study_uid, instance_count FROM studies ORDER BY 1")
                .fetchall()))
        assert [tuple(r) for r in rows[0]] == [("b" * 64,)]
        assert [tuple(r) for r in rows[1]] == [("a" * 64, 1)]
        assert [tuple(r) for r in rows[2]] == [(f"{ROOT_MOVED}.1", 0), (f"{ROOT_MOVED}.2", 1)]
