"""Remote readers end to end: real `pacs-edge serve`, `sync --once`, reader commands, storescp.

An edge with three readers (one scoped to a referring physician, one with
scope all, one never granted) replicates to a local-folder cloud and to a
real Azurite; each reader lists and pulls exactly what it may, byte for byte
what the modality sent, and the ungranted one gets nothing and a clear
message. Adding readers after replication uploads no pack.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import dcmtk
import dicomgen
import pytest
from azurite import unanswered_credentials
from conftest import EdgeServer, pacs_edge_command, run_pacs_edge
from smalldisk import NEEDS_ROOT, tmpfs
from syncagent import sync_once

from sync import reader_client
from sync.blobstore.factory import open_blob_store
from sync.pack.manifest import InstanceAttributes, ManifestEntry, SeriesAttributes


@dataclass(frozen=True)
class Cloud:
    url: str
    credentials_file: Path | None = None

    def blob_names(self, suffix: str = "") -> list[str]:
        store = open_blob_store(self.url, credentials_file=self.credentials_file)
        try:
            return [b.name for b in store.list("studies/") if b.name.endswith(suffix)]
        finally:
            store.close()


@pytest.fixture(params=["local", "azure"])
def cloud(request: pytest.FixtureRequest, tmp_path: Path) -> Cloud:
    if request.param == "local":
        return Cloud(f"file://{tmp_path / 'cloud'}")
    connection_string = request.getfixturevalue("azurite")
    secret = tmp_path / "azure.secret"
    secret.write_text(connection_string)
    secret.chmod(0o600)
    return Cloud(f"azure://readers-{uuid.uuid4().hex[:12]}", secret)


@pytest.fixture
def edge(edge_server: EdgeServer, cloud: Cloud) -> Iterator[EdgeServer]:
    edge_server.stop()
    settings: dict[str, object] = {"url": cloud.url}
    if cloud.credentials_file is not None:
        settings["credentials_file"] = cloud.credentials_file
    edge_server.configure(cloud=settings, sync={"stable_after_seconds": 3600.0})
    edge_server.start()
    yield edge_server


def reader_init(home: Path, cloud: Cloud) -> str:
    args = ["reader", "init", "--home", str(home), "--cloud", cloud.url]
    if cloud.credentials_file is not None:
        args += ["--credentials-file", str(cloud.credentials_file)]
    result = run_pacs_edge(*args)
    assert (home / "secrets" / "reader.key").stat().st_mode & 0o777 == 0o600
    return result.stdout.strip().splitlines()[-1]


def reader(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_pacs_edge("reader", *args, "--home", str(home), check=check)


def listed(home: Path, *filters: str) -> set[str]:
    rows = json.loads(reader(home, "list", "--json", *filters).stdout)
    return {row["study_uid"] for row in rows}


def sent_bytes(instances: list[dicomgen.GeneratedInstance]) -> set[bytes]:
    return {dicomgen.dataset_bytes(i.path) for i in instances}


def pulled_bytes(folder: Path) -> set[bytes]:
    return {dicomgen.dataset_bytes(p) for p in folder.rglob("*.dcm")}


def test_each_reader_lists_and_pulls_exactly_its_grants_byte_identical(
    edge: EdgeServer, cloud: Cloud, tmp_path: Path, storescp: dcmtk.StoreSCP,
) -> None:
    instances = dicomgen.make_studies(tmp_path / "sent", seed=7, patients=4,
                                      series_per_study=2, instances_per_series=2)
    studies = dicomgen.group_by(instances, "StudyInstanceUID")
    referring = {uid: str(items[0].header.ReferringPhysicianName)
                 for uid, items in studies.items()}
    doctor = referring[instances[0].study_uid]
    in_scope = {uid for uid, name in referring.items() if name == doctor}
    assert 0 < len(in_scope) < len(studies), "the seed must give a scope that splits studies"

    dcmtk.storescu(edge.port, [i.path for i in instances]).check()
    sync_once(edge.home)
    packs_before = cloud.blob_names(".pack")
    assert len(packs_before) == len(studies)

    keys = {name: reader_init(tmp_path / name, cloud) for name in ("scoped", "everything",
                                                                     "stranger")}
    added = edge.cli("readers", "add", "scoped", keys["scoped"], "--scope",
                     f"referring:{doctor.split('^')[0]}^*")
    assert f"granted {len(in_scope)} pack version(s)" in added.stdout
    edge.cli("readers", "add", "everything", keys["everything"])
    # Granting is key objects only: no pack (or manifest) was uploaded again.
    assert cloud.blob_names(".pack") == packs_before
    assert len(cloud.blob_names(".manifest")) == len(studies)
    registered = json.loads(edge.cli("readers", "list", "--json").stdout)
    assert {(r["name"], r["scope"]) for r in registered} == {
        ("scoped", f"referring:{doctor.split('^')[0]}^*"), ("everything", "all")}

    assert listed(tmp_path / "scoped") == in_scope
    assert listed(tmp_path / "everything") == set(studies)
    assert listed(tmp_path / "stranger") == set()
    nothing = reader(tmp_path / "stranger", "list")
    assert "no studies are granted to this reader" in nothing.stderr

    # Search filters work on the decrypted manifests.
    first = instances[0].header
    assert listed(tmp_path / "everything", "--patient", str(first.PatientName)[:4].lower()) \
        >= {first.StudyInstanceUID}
    assert listed(tmp_path / "everything", "--date",
                  f"{first.StudyDate}-{first.StudyDate}") >= {first.StudyInstanceUID}
    assert listed(tmp_path / "everything", "--modality", "MR") == set(studies)
    assert listed(tmp_path / "everything", "--modality", "US") == set()

    for name, allowed in (("scoped", in_scope), ("everything", set(studies))):
        for uid in sorted(allowed):
            target = tmp_path / f"{name}-{uid}"
            out = reader(tmp_path / name, "pull", uid, "--to", str(target)).stdout
            assert f"{len(studies[uid])} downloaded and verified" in out
            assert pulled_bytes(target) == sent_bytes(studies[uid])
    outside = sorted(set(studies) - in_scope)[0]
    for name in ("scoped", "stranger"):
        refused = reader(tmp_path / name, "pull", outside, "--to", str(tmp_path / "x"),
                         check=False)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "no grant for this study" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert not list((tmp_path / "x").rglob("*.dcm"))

    # Resume: whole verified files are kept, a missing and a damaged one fetched again.
    uid = instances[0].study_uid
    target = tmp_path / f"everything-{uid}"
    files = sorted(target.rglob("*.dcm"))
    files[0].unlink()
    files[1].write_bytes(files[1].read_bytes()[:-10])
    again = reader(tmp_path / "everything", "pull", uid, "--to", str(target)).stdout
    assert f"2 downloaded and verified, {len(studies[uid]) - 2} already there" in again
    assert pulled_bytes(target) == sent_bytes(studies[uid])

    # Pull and send to the reader's workstation.
    sent = reader(tmp_path / "everything", "pull", uid, "--to", str(target), "--send",
                  f"{storescp.ae_title}@127.0.0.1:{storescp.port}").stdout
    assert f"sent {len(studies[uid])} instance(s)" in sent
    assert {dicomgen.dataset_bytes(p) for p in storescp.files()} == sent_bytes(studies[uid])

    # A study replicated after the readers were added is granted by the agent's pass.
    later = dicomgen.make_studies(tmp_path / "later", seed=8, patients=1)
    dcmtk.storescu(edge.port, [i.path for i in later]).check()
    sync_once(edge.home)
    assert later[0].study_uid in listed(tmp_path / "everything")

    # Removal deletes the reader's key objects; the others keep theirs.
    removed = edge.cli("readers", "remove", "everything").stdout
    assert f"deleted {len(studies) + 1} key object(s)" in removed
    assert listed(tmp_path / "everything") == set()
    assert listed(tmp_path / "scoped") == in_scope
    refused = reader(tmp_path / "everything", "pull", uid, "--to", str(tmp_path / "y"),
                     check=False)
    assert "no grant for this study" in refused.stderr


def test_tampered_manifest_or_pack_fails_verification_with_a_hint(
    edge: EdgeServer, cloud: Cloud, tmp_path: Path, small_study: list[dicomgen.GeneratedInstance],
) -> None:
    if not cloud.url.startswith("file://"):
        pytest.skip("blobs are edited on disk: the local-folder cloud")
    root = Path(cloud.url.removeprefix("file://"))
    dcmtk.storescu(edge.port, [i.path for i in small_study]).check()
    sync_once(edge.home)
    key = reader_init(tmp_path / "r", cloud)
    edge.cli("readers", "add", "r", key)
    uid = small_study[0].study_uid

    def flip(name: str, at: int) -> bytes:
        path = root / name
        original = path.read_bytes()
        os.chmod(path, 0o644)
        path.write_bytes(original[:at] + bytes([original[at] ^ 1]) + original[at + 1:])
        return original

    pack, = cloud.blob_names(".pack")
    original = flip(pack, 200)
    failed = reader(tmp_path / "r", "pull", uid, "--to", str(tmp_path / "p"), check=False)
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert "error:" in failed.stderr and "hint: the cloud copy was modified" in failed.stderr
    assert "Traceback" not in failed.stderr
    (root / pack).write_bytes(original)

    manifest, = cloud.blob_names(".manifest")
    original = flip(manifest, 60)
    for args in (("list",), ("pull", uid, "--to", str(tmp_path / "p"))):
        failed = reader(tmp_path / "r", *args, check=False)
        assert failed.returncode == 2, failed.stdout + failed.stderr
        assert "failed verification" in failed.stderr
        assert "hint: the cloud copy was modified" in failed.stderr
    (root / manifest).write_bytes(original)
    reader(tmp_path / "r", "pull", uid, "--to", str(tmp_path / "p"))
    assert pulled_bytes(tmp_path / "p") == sent_bytes(small_study)


def test_readers_add_refuses_a_mistyped_key_and_a_bad_scope(edge: EdgeServer,
                                                           tmp_path: Path,
                                                           cloud: Cloud) -> None:
    if not cloud.url.startswith("file://"):
        pytest.skip("no cloud access needed")
    key = reader_init(tmp_path / "r", cloud)
    typo = key[:-3] + ("A" if key[-3] != "A" else "B") + key[-2:]
    bad = edge.cli("readers", "add", "r", typo, check=False)
    assert bad.returncode == 2 and "check digits" in bad.stderr
    bad = edge.cli("readers", "add", "r", key, "--scope", "physician:X", check=False)
    assert bad.returncode == 2 and "invalid reader scope" in bad.stderr
    assert "no readers" in edge.cli("readers", "list").stdout


def _granted_study(edge_home: Path, tmp_path: Path, *, seed: int, instances: int
                   ) -> list[dicomgen.GeneratedInstance]:
    """One study imported, replicated to a local-folder cloud and granted to a reader
    initialised in tmp_path/reader."""
    cloud = Cloud(f"file://{tmp_path / 'cloud'}")
    EdgeServer(edge_home).configure(cloud={"url": cloud.url})
    sent = dicomgen.make_studies(tmp_path / "sent", seed=seed, patients=1, series_per_study=1,
                                 instances_per_series=instances)
    run_pacs_edge("import", "--home", str(edge_home), str(tmp_path / "sent"))
    sync_once(edge_home)
    run_pacs_edge("readers", "add", "home", reader_init(tmp_path / "reader", cloud),
                  "--home", str(edge_home))
    return sent


@pytest.mark.parametrize("columns", [80, 250])
def test_reader_list_shows_each_study_uid_whole_at_any_terminal_width(
        edge_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, columns: int) -> None:
    """`reader pull` takes the study UID from the listing: at 80 columns the table cut it
    to a few characters. A terminal too narrow for the table gets one block per study."""
    sent = _granted_study(edge_home, tmp_path, seed=12, instances=1)
    monkeypatch.setenv("COLUMNS", str(columns))
    listing = reader(tmp_path / "reader", "list").stdout
    lines = listing.splitlines()
    assert any(sent[0].study_uid in line for line in lines), listing
    assert all(len(line) <= columns for line in lines if sent[0].study_uid not in line)
    assert ("study uid" in lines[1]) is (columns == 250), listing


def test_pull_removes_only_its_own_temp_files(edge_home: Path, tmp_path: Path) -> None:
    sent = _granted_study(edge_home, tmp_path, seed=9, instances=2)
    target = tmp_path / "Downloads"
    series = target / sent[0].header.SeriesInstanceUID
    series.mkdir(parents=True)
    foreign = [target / "film.mkv.part", series / "notes.part",
               series / f".{sent[0].header.SOPInstanceUID}.dcm.abc123.part"]
    for path in foreign:
        path.write_bytes(b"not the puller's")
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid whose process has exited: a pull killed earlier
    leftover = series / f".{sent[0].header.SOPInstanceUID}.dcm.{gone.pid}.x1y2z3.pull-part"
    leftover.write_bytes(b"half an instance")

    out = reader(tmp_path / "reader", "pull", sent[0].study_uid, "--to", str(target)).stdout
    assert "2 downloaded and verified" in out
    assert pulled_bytes(target) == sent_bytes(sent)
    assert all(path.read_bytes() == b"not the puller's" for path in foreign)
    assert not leftover.exists()
    assert not list(target.rglob("*.pull-part"))


@NEEDS_ROOT
def test_a_pull_into_a_full_disk_says_so_leaves_only_whole_files_and_resumes(
        edge_home: Path, tmp_path: Path) -> None:
    """A write that found the disk full (ENOSPC names no file) escaped the command as a
    traceback, exit 1."""
    sent = _granted_study(edge_home, tmp_path, seed=10, instances=6)
    with tmpfs(tmp_path / "disk", 1) as disk:
        target = disk / "Downloads"
        target.mkdir()
        filler = disk / "filler.bin"  # the disk's last 25 KB left: two of the six fit
        subprocess.run(["fallocate", "-l", str(_free(disk) - 25_000), str(filler)], check=True)
        failed = reader(tmp_path / "reader", "pull", sent[0].study_uid, "--to", str(target),
                        check=False)
        assert failed.returncode == 2, failed.stdout + failed.stderr
        assert f"error: No space left on device in {target}" in failed.stderr
        assert "pull again" in failed.stderr and "Traceback" not in failed.stderr
        assert not list(target.rglob("*.pull-part"))
        assert pulled_bytes(target) < sent_bytes(sent)

        filler.unlink()
        out = reader(tmp_path / "reader", "pull", sent[0].study_uid, "--to", str(target)).stdout
        assert "0 already there" not in out, out
        assert pulled_bytes(target) == sent_bytes(sent)


def _free(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def test_pull_checks_the_ae_titles_and_destination_before_downloading(
        edge_home: Path, tmp_path: Path) -> None:
    """A bad --calling-ae or --send is a usage error before any download (it was a
    pynetdicom traceback once the study was pulled)."""
    sent = _granted_study(edge_home, tmp_path, seed=11, instances=1)
    target = tmp_path / "Downloads"
    good = "WORKSTATION@127.0.0.1:1"
    for option, send, calling_ae in (
            ("--calling-ae", good, ""), ("--calling-ae", good, "   "),
            ("--calling-ae", good, "A" * 19), ("--calling-ae", good, "BACK\\SLASH"),
            ("--calling-ae", good, "PÉREADER"), ("--send", "A" * 17 + "@127.0.0.1:1", "PE"),
            ("--send", "WS\\1@127.0.0.1:1", "PE"), ("--send", "WSÉ@127.0.0.1:1", "PE"),
            ("--send", "WORKSTATION@127.0.0.1:0", "PE"), ("--send", "WORKSTATION", "PE")):
        proc = reader(tmp_path / "reader", "pull", sent[0].study_uid, "--to", str(target),
                      "--send", send, "--calling-ae", calling_ae, check=False)
        assert proc.returncode == 2, (send, calling_ae, proc.stdout + proc.stderr)
        assert f"Invalid value for '{option}'" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        assert not target.exists()


def test_a_reader_pointed_at_an_empty_cloud_is_told_to_check_its_url(tmp_path: Path) -> None:
    """A mistyped cloud URL lists nothing: "not granted (yet)" would send the reader to
    the site's admin for grants that exist, so the reader is told to check the URL."""
    home = tmp_path / "reader"
    reader_init(home, Cloud(f"file://{tmp_path / 'mistyped'}"))
    listing = reader(home, "list")
    assert "the cloud holds no studies at all" in listing.stderr, listing.stderr
    assert "check cloud_url" in listing.stderr and "[cloud] url" in listing.stderr
    pull = reader(home, "pull", "1.2.3", check=False)
    assert pull.returncode == 2 and "check cloud_url" in pull.stderr, pull.stderr


def test_a_reader_whose_cloud_does_not_answer_is_told_to_run_again_not_to_wait(
        tmp_path: Path) -> None:
    """The hint was 'the agent retries': a reader's machine has no sync agent, so it
    waited for nothing."""
    home = tmp_path / "reader"
    with unanswered_credentials(tmp_path) as credentials:
        run_pacs_edge("reader", "init", "--home", str(home), "--cloud", "azure://site-packs",
                      "--credentials-file", str(credentials))
        listing = run_pacs_edge("reader", "list", "--home", str(home), check=False)
    assert listing.returncode == 2, listing.stdout + listing.stderr
    assert "Azure did not answer" in listing.stderr, listing.stderr
    assert "a command can be run again" in listing.stderr
    assert "the agent retries" not in listing.stderr


def test_a_reader_without_azure_credentials_is_told_where_its_own_file_names_them(
        tmp_path: Path) -> None:
    """The hint named the box's `[cloud] credentials_file`; reader.toml has no [cloud]."""
    home = tmp_path / "reader"
    env = {k: v for k, v in os.environ.items() if k != "AZURE_STORAGE_CONNECTION_STRING"}
    command = [*pacs_edge_command(), "reader", "init", "--home", str(home), "--cloud",
               "azure://site-packs"]
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=120)
    listing = subprocess.run([*command[:-5], "list", "--home", str(home)], env=env,
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 2, listing.stdout + listing.stderr
    assert "no Azure connection string" in listing.stderr
    assert f'add credentials_file = "FILE" to {home / "reader.toml"}' in listing.stderr
    assert "[cloud]" not in listing.stderr


def test_pull_of_a_study_whose_pack_is_gone_says_so_with_a_hint(edge_home: Path,
                                                                tmp_path: Path) -> None:
    sent = _granted_study(edge_home, tmp_path, seed=11, instances=1)
    pack, = (tmp_path / "cloud").rglob("*.pack")
    pack.unlink()
    result = reader(tmp_path / "reader", "pull", sent[0].study_uid, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "study version 1: its pack is missing from the cloud" in result.stderr
    assert "Tell the site's administrator" in result.stderr


def test_readers_add_stops_at_a_store_that_stopped_answering(edge_home: Path,
                                                            tmp_path: Path) -> None:
    """Each further pack would wait out the same retries (hours over Azure for a large
    container): the first unavailable answer ends the walk; running it again resumes."""
    cloud = tmp_path / "cloud"
    EdgeServer(edge_home).configure(cloud={"url": f"file://{cloud}"})
    dicomgen.make_studies(tmp_path / "sent", seed=13, patients=3, series_per_study=1,
                          instances_per_series=1)
    run_pacs_edge("import", "--home", str(edge_home), str(tmp_path / "sent"))
    sync_once(edge_home)
    public = reader_init(tmp_path / "reader", Cloud(f"file://{cloud}"))
    studies = cloud / "studies"
    studies.rename(tmp_path / "studies.away")
    studies.symlink_to(studies)  # a link loop: every call fails (ELOOP), as if unreachable
    add = ["readers", "add", "home", public, "--home", str(edge_home)]
    result = run_pacs_edge(*add, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.count("grant failed:") == 1 and "2 pack version(s) not tried" \
        in result.stderr, result.stderr
    studies.unlink()
    (tmp_path / "studies.away").rename(studies)
    assert "granted 3 pack version(s)" in run_pacs_edge(*add).stdout


def test_a_file_already_pulled_is_checked_again_in_chunks(tmp_path: Path) -> None:
    """A resumed pull checks each file already there against the manifest before it
    skips it. It read the whole file into memory: one file of a multi-frame study may be
    GBs. The check's memory is bounded by its chunk (a 48 MB file here)."""
    path = tmp_path / "big.dcm"
    block = os.urandom(1 << 20)
    with path.open("wb") as fh:
        for _ in range(48):
            fh.write(block)
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        fh.seek(132)
        digest.update(fh.read())
    entry = ManifestEntry(instance=cast(Any, None), offset=0, length=48 << 20,
                          dataset_offset=132, sha256=digest.hexdigest())
    tracemalloc.start()
    try:
        assert reader_client._verified(path, entry)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    assert not reader_client._verified(path, ManifestEntry(
        instance=cast(Any, None), offset=0, length=48 << 20, dataset_offset=132,
        sha256="0" * 64))


# A study sent to a workstation, one C-STORE at a time: with Nagle's algorithm on, the
# C-STORE-RQ's second write (its dataset) waited for the workstation's delayed ACK of the
# first (40 ms on Linux), ~45 ms an instance. Compared with dcmtk's storescu sending the
# same files with Nagle off, measured in the same test (a slow machine slows both), not
# with a fixed time.
SEND_INSTANCES = 200
STALL_FACTOR, STALL_SLACK_SECONDS = 4.0, 1.0


@pytest.mark.parametrize("workstation_nagle", ["off", "on"])
def test_send_to_the_workstation_does_not_wait_for_delayed_acks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workstation_nagle: str) -> None:
    """`reader pull --send` of a 5,000-instance study took 236 s, 7.7 s of it the pull.
    With Nagle off on the workstation's side (dcmtk does with TCP_NODELAY=1) only the
    sender's Nagle stalled the exchange; with it on (dcmtk's default) the workstation
    also held each response's rest until our delayed ACK of its first piece."""
    instances = dicomgen.make_studies(tmp_path / "study", seed=31, series_per_study=1,
                                      instances_per_series=SEND_INSTANCES,
                                      modalities=("CT",), size=8)
    files = [(i.path, _entry(i)) for i in instances]
    monkeypatch.setenv("TCP_NODELAY", "1")
    with dcmtk.StoreSCP(tmp_path / "reference") as reference:
        plain = dcmtk.storescu(reference.port, [i.path for i in instances],
                               aec=reference.ae_title).check()
    if workstation_nagle == "on":
        monkeypatch.delenv("TCP_NODELAY")
    with dcmtk.StoreSCP(tmp_path / "workstation") as workstation:
        started = time.monotonic()
        report = reader_client.send_files(
            files, f"{workstation.ae_title}@127.0.0.1:{workstation.port}", calling_ae="PEREADER")
        seconds = time.monotonic() - started
        received = {dicomgen.dataset_bytes(p) for p in workstation.files()}
    assert report == reader_client.SendReport(SEND_INSTANCES, [])
    assert received == {dicomgen.dataset_bytes(i.path) for i in instances}
    assert seconds < STALL_FACTOR * plain.seconds + STALL_SLACK_SECONDS, (seconds, plain.seconds)


def _entry(instance: dicomgen.GeneratedInstance) -> ManifestEntry:
    """What send_files reads of a manifest entry: the instance's SOP class and syntax."""
    h = instance.header
    series = SeriesAttributes(h.SeriesInstanceUID, h.Modality, None, "", "", "", "")
    attributes = InstanceAttributes(series, str(h.SOPInstanceUID), instance.sop_class_uid,
                                    None, instance.transfer_syntax)
    return ManifestEntry(attributes, offset=0, length=instance.path.stat().st_size,
                         dataset_offset=0, sha256="")


def test_a_reader_removed_while_the_agent_grants_it_keeps_no_key_object(
        edge_server: EdgeServer, tmp_path: Path) -> None:
    """`readers remove` revokes before and after the registry entry goes; the agent's
    grant read the registry once, so a key object it wrote after both sweeps stayed in
    the cloud for ever, and the removed reader (a stolen key, say) went on pulling the
    study. The grant looks at the registry again after each write. The admin's removal
    runs (the real CLI) from the moment the agent writes its first key object."""
    import asyncio

    from appliance.store.index import Index
    from sync.pack import naming
    from sync.readers import add_reader, grant_study, load_readers

    cloud = tmp_path / "cloud"
    edge_server.stop()
    edge_server.configure(cloud={"url": f"file://{cloud}"})
    edge_server.start()
    study = dicomgen.make_studies(tmp_path / "sent", seed=7, patients=1, series_per_study=1,
                                  instances_per_series=2)
    dcmtk.storescu(edge_server.port, [i.path for i in study]).check()
    sync_once(edge_server.home)
    edge_server.stop()
    key = run_pacs_edge("reader", "init", "--home", str(tmp_path / "r"), "--cloud",
                        f"file://{cloud}").stdout.strip().splitlines()[-1]
    add_reader(edge_server.home, "dr-x", key, "all")  # registered, not granted yet
    reader_id = load_readers(edge_server.home)["dr-x"].reader_id
    store = open_blob_store(f"file://{cloud}")
    put, removed = store.put, []

    def put_while_removed(name: str, chunks: Any, **kw: Any) -> Any:
        if "/reader-" in name and not removed:
            removed.append(run_pacs_edge("readers", "remove", "dr-x", "--home",
                                         str(edge_server.home)).returncode)
        return put(name, chunks, **kw)

    store.put = put_while_removed  # type: ignore[method-assign]

    async def grant() -> int:
        async with Index(edge_server.home / "index.sqlite3") as index:
            return await grant_study(edge_server.home, index, store, 1)

    assert asyncio.run(grant()) == 0 and removed == [0]
    assert [b.name for b in store.list(naming.STUDIES_PREFIX)
            if b.name.endswith(f"reader-{reader_id}")] == []
    listed = run_pacs_edge("reader", "list", "--json", "--home", str(tmp_path / "r")).stdout
    assert study[0].study_uid not in listed



def test_pull_of_a_study_with_a_version_not_granted_says_it_may_be_incomplete(
        edge_home: Path, tmp_path: Path) -> None:
    """A grant the agent could not write (logged, repaired by `readers add` again) left
    the reader without the study's newer version: `reader pull` delivered the older
    versions as the whole study, exit 0. It still writes what it may read, verified,
    but names the versions it cannot and fails (exit 1) until they are granted."""
    cloud = tmp_path / "cloud"
    EdgeServer(edge_home).configure(cloud={"url": f"file://{cloud}"})
    sent = dicomgen.make_studies(tmp_path / "sent", seed=17, patients=1, series_per_study=1,
                                 instances_per_series=4)
    run_pacs_edge("import", "--home", str(edge_home), *(str(i.path) for i in sent[:2]))
    sync_once(edge_home)
    public = reader_init(tmp_path / "reader", Cloud(f"file://{cloud}"))
    add = ["readers", "add", "home", public, "--home", str(edge_home)]
    run_pacs_edge(*add)
    run_pacs_edge("import", "--home", str(edge_home), *(str(i.path) for i in sent[2:]))
    sync_once(edge_home)
    granted = sorted(cloud.rglob("reader-*"))
    assert [p.parent.name for p in granted] == ["v000001.keys", "v000002.keys"]
    granted[1].unlink()  # as a grant that failed after the upload leaves the study
    uid = sent[0].study_uid

    result = reader(tmp_path / "reader", "pull", uid, "--to", str(tmp_path / "p"),
                    check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "version 2 of this study is in the cloud but not granted to this reader" \
        in " ".join(result.stderr.split()), result.stderr
    assert pulled_bytes(tmp_path / "p") == sent_bytes(sent[:2])

    run_pacs_edge(*add)  # repairs the grant
    reader(tmp_path / "reader", "pull", uid, "--to", str(tmp_path / "p"))
    assert pulled_bytes(tmp_path / "p") == sent_bytes(sent)


def test_a_pack_cut_short_under_a_range_read_is_reported_as_tampering(
        edge_home: Path, tmp_path: Path) -> None:
    """A pull that wants few of a pack's instances range-reads their segments. A pack cut
    short made the store refuse the range ("outside the blob", hint "re-verify the pack")
    instead of the reader's tamper message, the one a whole-pack read gives."""
    sent = _granted_study(edge_home, tmp_path, seed=19, instances=4)
    target = tmp_path / "p"
    reader(tmp_path / "reader", "pull", sent[0].study_uid, "--to", str(target))
    last = max(target.rglob("*.dcm"), key=lambda p: p.stat().st_mtime_ns)
    last.unlink()  # one instance of four wanted: a range read, of the pack's end
    pack, = (tmp_path / "cloud").rglob("*.pack")
    pack.chmod(0o644)
    with pack.open("r+b") as fh:
        fh.truncate(pack.stat().st_size - 100)
    result = reader(tmp_path / "reader", "pull", sent[0].study_uid, "--to", str(target),
                    check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "hint: the cloud copy was modified" in result.stderr, result.stderr
    assert not last.exists()
