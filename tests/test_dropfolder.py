"""Drop-folder ingest: real `pacs-edge serve`, real watchdog, real files; checked in the index.

Every scenario ends with the same three questions: did each file end where it
should (index, rejected/ with a reason, done/), was anything ingested twice
(the server's own tally of duplicates, instance versions in the index), and
was anything lost (incoming/ empty, counts match)?
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO, cast

import dicomgen
import pydicom
import pytest
from conftest import CLI_TIMEOUT, NO_CAPABILITIES, EdgeServer, pacs_edge_command

from appliance.base.errors import InvalidInstance, UnsafePath
from appliance.dropfolder import confine
from appliance.dropfolder.layout import Root
from appliance.dropfolder.outcomes import Outcomes
from appliance.dropfolder.processor import CLAIM_PREFIX, Job, Processor, Tally, Verdict
from appliance.dropfolder.sources import (
    MAX_DICOMDIR_BYTES,
    Unit,
    UnitKind,
    ZipSource,
    read_media_index,
    sanitise_member_name,
)
from appliance.dropfolder.stability import StabilityTracker
from appliance.store.index import RecordOutcome

STABLE_SECONDS = 0.5
WAIT_SECONDS = 60.0


# --- helpers -------------------------------------------------------------------------


@pytest.fixture
def drop_server(edge_server_factory: Callable[..., EdgeServer]) -> Callable[..., EdgeServer]:
    """A server whose drop folder reacts fast: stable after 0.5 s, rescans every 2 s."""

    def make(*, start: bool = True, **dropfolder: Any) -> EdgeServer:
        server = edge_server_factory(start=False)
        server.configure(dropfolder={"stable_seconds": STABLE_SECONDS, "rescan_seconds": 2.0,
                                     **dropfolder})
        return server.start() if start else server

    return make


def incoming(server: EdgeServer) -> Path:
    return server.home / "incoming"


def status(server: EdgeServer) -> dict[str, int]:
    report: dict[str, int] = json.loads(server.cli("status", "--json").stdout)["dropfolder"]
    return report


def wait_until(what: str, check: Callable[[], bool], timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting until {what}", pytrace=False)
        time.sleep(0.1)


def wait_settled(server: EdgeServer, *, ingested: int, rejected: int = 0) -> dict[str, int]:
    """Poll `pacs-edge status` until the drop folder reached the expected counts."""
    expected = {"ingested": ingested, "rejected": rejected, "pending": 0, "unreadable": 0}
    seen: dict[str, int] = {}

    def settled() -> bool:
        nonlocal seen
        seen = status(server)
        return seen == expected

    try:
        wait_until(f"status shows {expected}", settled)
    except pytest.fail.Exception:
        pytest.fail(f"drop folder status {seen}, expected {expected}\n{server.log()[-3000:]}",
                    pytrace=False)
    return seen


def instances(server: EdgeServer) -> dict[str, tuple[str, str]]:
    """sop_uid -> (path relative to the store, source) from the index, read-only."""
    with sqlite3.connect(f"file:{server.home / 'index.sqlite3'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT sop_uid, path, source_ae FROM instances").fetchall()
        versions = db.execute("SELECT COUNT(*) FROM instance_versions").fetchone()[0]
    assert versions == 0, "an instance was stored twice with different content"
    return {sop: (path, source) for sop, path, source in rows}


def assert_stored_exactly(server: EdgeServer, generated: list[dicomgen.GeneratedInstance],
                          *, sources: tuple[str, ...] = ("dropfolder",)) -> None:
    rows = instances(server)
    assert sorted(rows) == sorted(g.sop_instance_uid for g in generated)
    for g in generated:
        path, source = rows[g.sop_instance_uid]
        assert source in sources
        stored = server.home / "store" / path
        assert dicomgen.dataset_bytes(stored) == dicomgen.dataset_bytes(g.path)


def duplicates_logged(server: EdgeServer) -> int:
    """Identical content handed to ingest again, as the server tallied it."""
    total = 0
    for line in server.log().splitlines():
        if "drop folder ingested " in line:
            total += int(line.split("duplicates=")[1].split()[0])
    return total


def files_under(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def make_cd(cd: Path, study: list[dicomgen.GeneratedInstance]
            ) -> list[dicomgen.GeneratedInstance]:
    """A CD layout: ISO 9660 file names under DICOM/, a DICOMDIR by dcmtk's dcmmkdir."""
    folder = cd / "DICOM" / "ST000001"
    folder.mkdir(parents=True)
    copied = []
    for n, g in enumerate(study):
        target = folder / f"IM{n:06d}"
        shutil.copy(g.path, target)
        copied.append(dicomgen.GeneratedInstance(target, g.header))
    subprocess.run(["dcmmkdir", "+r", "-Pgp", "+I", "DICOM"], cwd=cd, check=True,
                   capture_output=True, timeout=60)
    return copied


def reason_of(server: EdgeServer, relative: str) -> str:
    rejected = server.home / "incoming.rejected"
    assert (rejected / relative).is_file(), files_under(rejected)
    return (rejected / f"{relative}.reason").read_text().splitlines()[0]


# --- scenarios with a server ----------------------------------------------------------


def test_study_tree_copied_in_while_serving_is_ingested_once(
    drop_server: Callable[..., EdgeServer], tmp_path: Path
) -> None:
    server = drop_server()
    study = dicomgen.make_study(tmp_path / "study", seed=11, instances_per_series=5)
    shutil.copytree(tmp_path / "study", incoming(server) / "study")

    wait_settled(server, ingested=len(study))
    assert_stored_exactly(server, study)
    assert files_under(incoming(server)) == []
    assert not (server.home / "incoming.rejected").exists()
    assert duplicates_logged(server) == 0


def test_file_written_slowly_in_chunks_is_ingested_once_whole(
    drop_server: Callable[..., EdgeServer], tmp_path: Path
) -> None:
    server = drop_server()
    [instance] = dicomgen.make_study(tmp_path / "src", seed=12, series_per_study=1,
                                     instances_per_series=1, modalities=("CT",), size=128)
    data = instance.path.read_bytes()
    target = incoming(server) / "slow.dcm"
    chunks = 10
    step = -(-len(data) // chunks)
    # Reopen for every chunk: each close is an inotify IN_CLOSE_WRITE, so a watcher
    # trusting "closed after write" would ingest a prefix. Pauses stay below
    # stable_seconds, as the configuration promises the writer does.
    for n in range(chunks):
        with target.open("ab") as fh:
            fh.write(data[n * step:(n + 1) * step])
        time.sleep(0.3)

    wait_settled(server, ingested=1)
    assert_stored_exactly(server, [instance])  # byte-identical, no prior (partial) version
    assert not (server.home / "incoming.rejected").exists()
    assert duplicates_logged(server) == 0


def test_writer_pausing_longer_than_stable_seconds_is_not_rejected_half_way(
    drop_server: Callable[..., EdgeServer], tmp_path: Path
) -> None:
    server = drop_server()
    [instance] = dicomgen.make_study(tmp_path / "src", seed=20, series_per_study=1,
                                     instances_per_series=1, modalities=("CT",), size=128)
    data = instance.path.read_bytes()
    step = -(-len(data) // 4)
    # Pauses of twice stable_seconds: each prefix is read and refused as truncated,
    # but a refusal stands only after 5 x stable_seconds of quiet; so the file waits.
    with (incoming(server) / "paused.dcm").open("wb") as fh:
        for n in range(4):
            fh.write(data[n * step:(n + 1) * step])
            fh.flush()
            time.sleep(2 * STABLE_SECONDS)

    wait_settled(server, ingested=1)
    assert_stored_exactly(server, [instance])
    assert not (server.home / "incoming.rejected").exists()


def test_unusable_files_are_moved_to_rejected_with_a_reason(
    drop_server: Callable[..., EdgeServer], tmp_path: Path
) -> None:
    server = drop_server()
    staging = tmp_path / "bad"
    dicomgen.make_non_dicom_file(staging, "notes.txt")
    (staging / "empty.dcm").write_bytes(b"")
    dicomgen.make_truncated_instance(staging)
    bad_uid = dicomgen.make_bad_uid_instance(staging, kind="letters")
    (instance,) = dicomgen.make_study(tmp_path / "study", seed=9, series_per_study=1,
                                      instances_per_series=1)
    dicomgen.relabelled_copy(instance.path, staging / "unlisted.dcm", "1.2.840.10008.1.2.1.98")
    (incoming(server) / "sub").mkdir()
    for path in sorted(staging.iterdir()):
        shutil.copy(path, incoming(server) / "sub" / path.name)

    wait_settled(server, ingested=0, rejected=5)
    assert reason_of(server, "sub/notes.txt") == "not a DICOM Part 10 file"
    assert reason_of(server, "sub/empty.dcm") == "file is empty"
    assert reason_of(server, "sub/truncated.dcm") == "dataset is truncated"
    assert "not a valid UID" in reason_of(server, f"sub/{bad_uid.name}")
    assert reason_of(server, "sub/unlisted.dcm") == (
        "File Meta Transfer Syntax UID is transfer syntax 'Encapsulated Uncompressed Explicit"
        " VR Little Endian': not one the box takes")
    reason_file = server.home / "incoming.rejected" / "sub" / "unlisted.dcm.reason"
    assert "hint: the File Meta must name the transfer syntax" in reason_file.read_text()
    assert instances(server) == {}
    assert files_under(incoming(server)) == []


def test_dicomdir_media_is_ingested_through_its_records(
    drop_server: Callable[..., EdgeServer], tmp_path: Path
) -> None:
    server = drop_server(after_ingest="move")
    cd = tmp_path / "cd"
    study = make_cd(cd, dicomgen.make_study(tmp_path / "src", seed=13))
    (cd / "README.TXT").write_text("viewer instructions\n")

    shutil.copytree(cd, incoming(server) / "CD1")

    wait_settled(server, ingested=len(study), rejected=1)
    assert_stored_exactly(server, study)  # and nothing else: the DICOMDIR is no instance
    done = server.home / "incoming.done" / "CD1"
    assert (done / "DICOMDIR").is_file()
    assert len(files_under(done / "DICOM")) == len(study)
    assert reason_of(server, "CD1/README.TXT") == "not a DICOM Part 10 file"
    assert files_under(incoming(server)) == []


def test_media_in_a_folder_whose_name_is_not_utf8_is_cleared_away(
    drop_server: Callable[..., EdgeServer], tmp_path: Path
) -> None:
    server = drop_server()
    cd = tmp_path / "cd"
    study = make_cd(cd, dicomgen.make_study(tmp_path / "src", seed=22))
    study[-1].path.unlink()  # a record whose file is missing: its warning names the folder
    # A CD burned on Windows, copied byte for byte: a Latin-1 name, not UTF-8. Its log
    # reference raised UnicodeEncodeError, so the DICOMDIR was retried for ever.
    shutil.copytree(cd, os.fsdecode(os.fsencode(incoming(server)) + b"/M\xfcller CD"))

    wait_settled(server, ingested=len(study) - 1)
    assert_stored_exactly(server, study[:-1])
    assert files_under(incoming(server)) == []
    assert "drop folder unit failed" not in server.log()


def test_a_drop_folder_removed_and_made_again_gets_events_again(
    drop_server: Callable[..., EdgeServer], tmp_path: Path
) -> None:
    rescan = 5.0
    server = drop_server(rescan_seconds=rescan)
    study = dicomgen.make_study(tmp_path / "study", seed=23, series_per_study=1)
    incoming(server).rmdir()  # its inotify watch stops with it
    incoming(server).mkdir()
    wait_until("the watch is renewed", lambda: "watch is renewed" in server.log(),
               timeout=3 * rescan)

    copied = time.monotonic()
    shutil.copytree(tmp_path / "study", incoming(server) / "study")
    wait_until("the study is ingested", lambda: len(instances(server)) == len(study))
    # Found through events, not by the next rescan (`rescan` seconds after the renewal).
    assert time.monotonic() - copied < rescan / 2
    assert_stored_exactly(server, study)


def test_zip_archive_is_ingested_member_by_member(
    drop_server: Callable[..., EdgeServer], tmp_path: Path
) -> None:
    server = drop_server()
    study = dicomgen.make_study(tmp_path / "src", seed=14)
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, g in enumerate(study):
            # Names that would escape a naive extraction: never used as paths.
            name = f"../../escape-{n}.dcm" if n % 2 else f"/abs/IM{n}.dcm"
            zf.write(g.path, name)
        zf.writestr("DICOMDIR", b"an index, not an instance")
        zf.writestr("../../notes.txt", "not DICOM\n")
    shutil.copy(archive, incoming(server) / "study.zip")

    wait_settled(server, ingested=len(study), rejected=1)
    assert_stored_exactly(server, study)
    assert reason_of(server, "study.zip.contents/notes.txt") == "not a DICOM Part 10 file"
    assert not list(server.home.parent.rglob("escape-*"))
    assert files_under(incoming(server)) == []


def test_a_zip_read_again_keeps_its_refused_members_once(
    drop_server: Callable[..., EdgeServer], tmp_path: Path
) -> None:
    server = drop_server()
    study = dicomgen.make_study(tmp_path / "src", seed=24, series_per_study=1)
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("README.TXT", "viewer instructions\n")
        for g in study:
            zf.write(g.path, f"{g.sop_instance_uid}.dcm")
        zf.writestr("last.bin", b"X" * 1000)
    data = bytearray(archive.read_bytes())
    data[data.rfind(b"X" * 1000)] ^= 0xFF  # the last member's CRC fails: a damaged archive
    # Its refusal waits out 5 x stable_seconds of quiet, then the archive is read again.
    (incoming(server) / "study.zip").write_bytes(bytes(data))

    wait_settled(server, ingested=len(study), rejected=2)
    assert files_under(server.home / "incoming.rejected") == [
        Path("study.zip"), Path("study.zip.contents/README.TXT"),
        Path("study.zip.contents/README.TXT.reason"), Path("study.zip.reason")]
    assert reason_of(server, "study.zip") == "ZIP member is corrupt (BadZipFile)"
    assert_stored_exactly(server, study)


def test_a_file_left_alone_is_taken_again_once_the_operator_fixes_it(
    drop_server: Callable[..., EdgeServer], tmp_path: Path
) -> None:
    server = drop_server()
    [instance] = dicomgen.make_study(tmp_path / "src", seed=25, series_per_study=1,
                                     instances_per_series=1, modalities=("CT",))
    dropped = incoming(server) / "locked.dcm"
    shutil.copy(instance.path, dropped)
    # Immutable: ingested, but it cannot be removed (as root, the stand-in for a file
    # the service user may not read or delete); it is left alone while unchanged.
    if subprocess.run(["chattr", "+i", str(dropped)], capture_output=True).returncode:
        dropped.unlink()
        pytest.skip("chattr +i is not supported here")
    try:
        wait_until("the file is given up on", lambda: "cannot be removed" in server.log())
        assert status(server) == {"ingested": 1, "rejected": 0, "pending": 1, "unreadable": 0}
    finally:
        subprocess.run(["chattr", "-i", str(dropped)], check=True)  # the operator's fix

    wait_settled(server, ingested=1)
    assert_stored_exactly(server, [instance])
    assert files_under(incoming(server)) == []


def test_a_folder_the_service_may_not_list_is_named_and_the_rest_goes_on(
    drop_server: Callable[..., EdgeServer], tmp_path: Path
) -> None:
    """A folder unpacked with mode 0700 by another user (a ZIP's folder entry, root's
    copy): the lookup of a DICOMDIR in it raised PermissionError, the drop folder's
    scheduler died, and nothing more was ingested until a restart, with no log line.
    serve runs as root without capabilities here, so modes apply as to the service
    user; the folder belongs to nobody."""
    server = drop_server(start=False)
    server.start(prefix=NO_CAPABILITIES)
    first, later = dicomgen.make_study(tmp_path / "src", seed=26, series_per_study=1,
                                       instances_per_series=2, modalities=("CT",))
    private = incoming(server) / "private"
    private.mkdir()
    shutil.copy(first.path, private / "IM0001")
    os.chown(private / "IM0001", 65534, 65534)
    os.chown(private, 65534, 65534)
    private.chmod(0o700)
    wait_until("the folder is named in the log",
               lambda: "drop folder cannot list a folder" in server.log())
    shutil.copy(later.path, incoming(server) / "later.dcm")
    wait_until("the other file is ingested", lambda: len(instances(server)) == 1)
    seen = subprocess.run([*NO_CAPABILITIES, *pacs_edge_command(), "status", "--json",
                           "--home", str(server.home)], capture_output=True, text=True,
                          check=True, timeout=CLI_TIMEOUT)
    assert json.loads(seen.stdout)["dropfolder"] == {
        "ingested": 1, "rejected": 0, "pending": 0, "unreadable": 1}
    assert "warning: 1 folder(s) in the drop folder cannot be listed" in seen.stderr
    assert "private" not in server.log()  # a keyed reference, never the name
    os.chown(private, 0, 0)  # the operator's fix
    wait_settled(server, ingested=2)
    assert_stored_exactly(server, [first, later])
    assert "a folder it could not list is readable or gone" in server.log()
    assert "drop folder scan failed" not in server.log()


def test_files_waiting_before_a_restart_are_ingested_after_it(
    drop_server: Callable[..., EdgeServer], tmp_path: Path
) -> None:
    server = drop_server()
    first = dicomgen.make_study(tmp_path / "first", seed=15)
    shutil.copytree(tmp_path / "first", incoming(server) / "first")
    wait_settled(server, ingested=len(first))
    server.stop()

    second = dicomgen.make_study(tmp_path / "second", seed=16)
    shutil.copytree(tmp_path / "second", incoming(server) / "second")
    shutil.copy(first[0].path, incoming(server) / "again.dcm")  # identical: a no-op
    dicomgen.make_non_dicom_file(incoming(server), "notes.txt")
    server.start()

    wait_settled(server, ingested=len(first) + len(second), rejected=1)
    assert_stored_exactly(server, first + second)
    assert duplicates_logged(server) == 1
    assert files_under(incoming(server)) == []


def test_a_server_killed_mid_drop_loses_nothing_and_stores_nothing_twice(
    drop_server: Callable[..., EdgeServer], tmp_path: Path
) -> None:
    server = drop_server()
    study = dicomgen.make_study(tmp_path / "study", seed=19, series_per_study=2,
                                instances_per_series=40)
    shutil.copytree(tmp_path / "study", incoming(server) / "study")
    wait_until("some instances are stored", lambda: len(instances(server)) >= 5)
    server.kill()  # SIGKILL: between any two steps of any ingest
    server.start()

    wait_until("every instance is stored and incoming/ is empty",
               lambda: len(instances(server)) == len(study)
               and not files_under(incoming(server)))
    # An instance renamed into the store but not yet committed when the server died
    # is adopted at start-up (source "fsck"); its dropped file is then a no-op.
    assert_stored_exactly(server, study, sources=("dropfolder", "fsck"))
    counts = status(server)
    assert counts["rejected"] == counts["pending"] == 0
    assert len(study) - 4 <= counts["ingested"] <= len(study)
    assert "store and index are consistent" in server.cli("fsck").stdout


def test_only_one_worker_watches_the_drop_folder(
    drop_server: Callable[..., EdgeServer], tmp_path: Path
) -> None:
    server = drop_server(start=False)
    server.configure(dicom={"workers": 2})
    server.start()
    study = dicomgen.make_study(tmp_path / "study", seed=17)
    shutil.copytree(tmp_path / "study", incoming(server) / "study")

    wait_settled(server, ingested=len(study))
    assert_stored_exactly(server, study)
    assert server.log().count("drop folder watching") == 1
    assert duplicates_logged(server) == 0


# --- units without a server ------------------------------------------------------------


def test_tracker_wants_two_observations_stable_seconds_apart() -> None:
    tracker: StabilityTracker[str] = StabilityTracker(2.0)
    tracker.observe("a", (10, 1), now=0.0)
    assert tracker.pop_ready() == []
    assert tracker.due(1.9) == [] and tracker.next_due() == 2.0
    assert tracker.due(2.0) == ["a"]
    tracker.observe("a", (10, 1), now=2.0)
    assert tracker.pop_ready() == ["a"]
    assert len(tracker) == 0


def test_tracker_restarts_the_clock_on_every_change() -> None:
    tracker: StabilityTracker[str] = StabilityTracker(2.0)
    tracker.observe("a", (10, 1), now=0.0)
    tracker.observe("a", (20, 2), now=1.5)  # still growing
    tracker.observe("a", (20, 2), now=3.0)
    assert tracker.pop_ready() == []
    tracker.observe("a", (20, 2), now=3.5)
    assert tracker.pop_ready() == ["a"]


def test_zip_member_names_cannot_leave_their_folder() -> None:
    assert sanitise_member_name("../../etc/passwd", 0) == ("etc", "passwd")
    assert sanitise_member_name("/abs/x.dcm", 1) == ("abs", "x.dcm")
    assert sanitise_member_name("..\\..\\C:\\win.ini", 2) == ("C_", "win.ini")
    assert sanitise_member_name("../..", 3) == ("member-3",)


def test_zip_member_larger_than_its_header_says_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "lying.zip"
    payload = b"\0" * 100_000
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("IM1", payload)
    # Make the central directory claim 1000 bytes: a bomb hiding its real size.
    data = bytearray(archive.read_bytes())
    central = data.rindex(b"PK\x01\x02")
    data[central + 24:central + 28] = (1000).to_bytes(4, "little")
    archive.write_bytes(bytes(data))

    with ZipSource(tmp_path, archive) as source:
        [member] = source.members
        assert member.info.file_size == 1000
        with pytest.raises(InvalidInstance):
            source.extract(member, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lying.zip"]


def _damaged_zip(path: Path, method: int, damage: Callable[[bytearray], None]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("IM1", bytes(range(256)) * 64, compress_type=method)
    data = bytearray(path.read_bytes())
    damage(data)
    path.write_bytes(bytes(data))
    return path


def _flip_member_data(data: bytearray) -> None:
    data[30 + len("IM1") + 40] ^= 0xFF  # inside the member's compressed bytes


def _ask_newer_zip_version(data: bytearray) -> None:
    data[data.rindex(b"PK\x01\x02") + 6] = 99  # "version needed to extract": 9.9


def _clear_member_name(data: bytearray) -> None:
    central = data.rindex(b"PK\x01\x02")  # in the central directory only: length, name
    data[central + 28:central + 30] = b"\0\0"
    del data[central + 46:central + 46 + len("IM1")]
    end = data.rindex(b"PK\x05\x06") + 12  # the central directory's size
    data[end:end + 4] = (int.from_bytes(data[end:end + 4], "little") - 3).to_bytes(4, "little")


def _move_central_directory_on(data: bytearray) -> None:
    end = data.rindex(b"PK\x05\x06") + 16  # its offset: the member now starts before 0
    data[end:end + 4] = (int.from_bytes(data[end:end + 4], "little") + 1000).to_bytes(4, "little")


@pytest.mark.parametrize(("method", "damage"), [
    (zipfile.ZIP_BZIP2, _flip_member_data), (zipfile.ZIP_LZMA, _flip_member_data),
    (zipfile.ZIP_STORED, _ask_newer_zip_version), (zipfile.ZIP_STORED, _move_central_directory_on),
    (zipfile.ZIP_STORED, _clear_member_name),  # zipfile's ZipInfo.is_dir() raised IndexError
])
def test_every_damaged_zip_is_refused_not_retried(
    tmp_path: Path, method: int, damage: Callable[[bytearray], None]
) -> None:
    # Anything else than a refusal escapes as a bug: the watcher retried it for ever.
    archive = _damaged_zip(tmp_path / "damaged.zip", method, damage)
    with pytest.raises(InvalidInstance), ZipSource(tmp_path, archive) as source:
        for member in source.members:
            source.extract(member, tmp_path).unlink()


def test_media_index_resolves_records_and_refuses_escapes(tmp_path: Path) -> None:
    cd = tmp_path / "cd"
    study = make_cd(cd, dicomgen.make_study(tmp_path / "src", seed=18))
    ds = pydicom.dcmread(cd / "DICOMDIR")
    images = [r for r in ds.DirectoryRecordSequence if "ReferencedFileID" in r]
    images[0].ReferencedFileID = ["..", "..", "etc", "passwd"]
    images[1].ReferencedFileID = ["dicom", "st000001", "im000001;1"]  # case, ISO version
    ds.save_as(cd / "DICOMDIR")

    media = read_media_index(cd / "DICOMDIR", cd)
    assert media.invalid == 1 and media.missing == 0
    assert sorted(media.files) == sorted(g.path for g in study[1:])
    assert all(Root(cd).contains(p) for p in media.files)


def test_a_damaged_dicomdir_is_refused_and_a_damaged_record_is_invalid(tmp_path: Path) -> None:
    """pydicom raises an OSError without an errno for a cut-off file, NotImplementedError
    for a value of an unknown VR: both are a refused DICOMDIR (its files are then taken
    one by one), not a stuck folder or an unexpected error. A Referenced File ID that a
    damaged VR made a number is an invalid record."""
    cd = tmp_path / "cd"
    study = make_cd(cd, dicomgen.make_study(tmp_path / "src", seed=19))
    encoded = (cd / "DICOMDIR").read_bytes()
    file_id = encoded.index(b"\x04\x00\x00\x15CS")
    cut_in_an_item_tag = encoded[:encoded.rindex(b"\xfe\xff\x00\xe0") + 2]
    for damaged in (cut_in_an_item_tag,
                    encoded[:file_id + 4] + b"CQ" + encoded[file_id + 6:]):
        (cd / "DICOMDIR").write_bytes(damaged)
        with pytest.raises(InvalidInstance, match="DICOMDIR cannot be parsed"):
            read_media_index(cd / "DICOMDIR", cd)
    (cd / "DICOMDIR").write_bytes(encoded[:file_id + 4] + b"US" + encoded[file_id + 6:])
    media = read_media_index(cd / "DICOMDIR", cd)
    assert media.invalid == 1
    assert sorted(media.files) == sorted(g.path for g in study[1:])


def test_a_dicomdir_pydicom_would_read_without_bound_is_refused_unread(tmp_path: Path) -> None:
    """pydicom reads a DICOMDIR whole into memory, and inflates a deflated one whole: a
    deflate bomb named DICOMDIR (0.4 MB inflating to 400 MB), and a DICOMDIR larger than
    any media set's, are refused before it reads them."""
    cd = tmp_path / "cd"
    make_cd(cd, dicomgen.make_study(tmp_path / "src", seed=20))
    bomb = dicomgen.make_deflate_bomb(tmp_path, bulk="private", inflated_bytes=400 << 20)
    shutil.copy(bomb, cd / "DICOMDIR")
    with pytest.raises(InvalidInstance, match="not in Explicit VR Little Endian"):
        read_media_index(cd / "DICOMDIR", cd)
    dvd = tmp_path / "dvd"
    make_cd(dvd, dicomgen.make_study(tmp_path / "src2", seed=21))
    with (dvd / "DICOMDIR").open("r+b") as fh:
        fh.truncate(MAX_DICOMDIR_BYTES + 1)
    with pytest.raises(InvalidInstance, match="larger than 64 MB"):
        read_media_index(dvd / "DICOMDIR", dvd)


# --- symlinks and archive names: nothing outside the drop folder is touched -----------


def fingerprint(paths: list[Path]) -> dict[Path, tuple[bytes, int, int]]:
    """Bytes, inode and mtime of each file: what "untouched" means."""
    out = {}
    for path in paths:
        st = path.lstat()
        out[path] = (path.read_bytes(), st.st_ino, st.st_mtime_ns)
    return out


def assert_untouched(before: dict[Path, tuple[bytes, int, int]]) -> None:
    assert fingerprint(list(before)) == before


def drop_atomically(built: Path, target: Path) -> None:
    """Move a tree built elsewhere into the drop folder in one rename (symlinks kept)."""
    built.rename(target)


@pytest.mark.parametrize("linked", ["DICOM/ST000001", "DICOM", "DICOM/ST000001/IM000001"],
                         ids=["referenced-folder", "folder-mid-path", "referenced-file"])
def test_dicomdir_reference_through_a_symlink_never_touches_the_outside_file(
    drop_server: Callable[..., EdgeServer], tmp_path: Path, linked: str
) -> None:
    server = drop_server(after_ingest="move")
    acknowledged = dicomgen.make_study(tmp_path / "first", seed=31)
    shutil.copytree(tmp_path / "first", incoming(server) / "first")
    wait_settled(server, ingested=len(acknowledged))

    # The attack: a CD whose DICOMDIR references files through a symlink to a folder
    # outside the drop folder; a legitimate CD arrives beside it.
    cd = tmp_path / "evil-cd"
    evil = dicomgen.make_study(tmp_path / "evil-src", seed=32)
    on_cd = make_cd(cd, evil)
    # Files of the evil CD not behind the link are ordinary dropped files.
    inside = [g for g, c in zip(evil, on_cd, strict=True) if not c.path.is_relative_to(cd / linked)]
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(cd / linked, outside / Path(linked).name)
    (cd / linked).symlink_to(outside / Path(linked).name)
    victims = fingerprint(sorted(p for p in outside.rglob("*") if p.is_file()))
    assert victims
    legit_cd = tmp_path / "legit-cd"
    legit = dicomgen.make_study(tmp_path / "legit-src", seed=33)
    make_cd(legit_cd, legit)
    legit += inside
    drop_atomically(cd, incoming(server) / "CD1")
    drop_atomically(legit_cd, incoming(server) / "CD2")

    wait_settled(server, ingested=len(acknowledged) + len(legit))
    wait_until("the evil DICOMDIR is dealt with",
               lambda: not (incoming(server) / "CD1" / "DICOMDIR").exists())
    assert_untouched(victims)
    assert (incoming(server) / "CD1" / linked).is_symlink()  # the link itself is left alone
    assert_stored_exactly(server, acknowledged + legit)
    assert "invalid=" in server.log()

    after = dicomgen.make_study(tmp_path / "after", seed=34)
    shutil.copytree(tmp_path / "after", incoming(server) / "after")
    wait_settled(server, ingested=len(acknowledged) + len(legit) + len(after))
    assert_stored_exactly(server, acknowledged + legit + after)
    assert_untouched(victims)


def test_symlinks_and_escaping_zip_names_never_touch_outside_files(
    drop_server: Callable[..., EdgeServer], tmp_path: Path
) -> None:
    server = drop_server()
    acknowledged = dicomgen.make_study(tmp_path / "first", seed=35)
    shutil.copytree(tmp_path / "first", incoming(server) / "first")
    wait_settled(server, ingested=len(acknowledged))

    outside = tmp_path / "outside"
    outside_study = dicomgen.make_study(outside / "study", seed=36)
    victim = outside / "victim.dcm"
    shutil.copy(outside_study[0].path, victim)
    victims = fingerprint(sorted(p for p in outside.rglob("*") if p.is_file()))
    (incoming(server) / "linked-folder").symlink_to(outside / "study")
    (incoming(server) / "linked-file.dcm").symlink_to(victim)
    zipped = dicomgen.make_study(tmp_path / "zipped", seed=37)
    escape = os.path.relpath(victim, incoming(server))
    with zipfile.ZipFile(tmp_path / "slip.zip", "w") as zf:
        # ZipInfo keeps names as given (ZipFile.write would strip a leading /).
        zf.writestr(zipfile.ZipInfo(escape), zipped[0].path.read_bytes())  # ../../outside/..
        zf.writestr(zipfile.ZipInfo(str(victim)), zipped[1].path.read_bytes())  # absolute
        zf.writestr(zipfile.ZipInfo("../" * 12 + "tmp/pacs-edge-slip.dcm"),
                    zipped[2].path.read_bytes())
    with zipfile.ZipFile(tmp_path / "linked.zip", "w") as zf:
        link = zipfile.ZipInfo("IM-LINK")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, str(victim))
        zf.write(zipped[3].path, "IM3")
    shutil.copy(tmp_path / "slip.zip", incoming(server) / "slip.zip")
    shutil.copy(tmp_path / "linked.zip", incoming(server) / "linked.zip")

    wait_settled(server, ingested=len(acknowledged) + 4, rejected=1)
    assert_untouched(victims)
    assert (incoming(server) / "linked-folder").is_symlink()
    assert (incoming(server) / "linked-file.dcm").is_symlink()
    assert not Path("/tmp/pacs-edge-slip.dcm").exists()
    assert reason_of(server, "linked.zip") == "ZIP member is a symbolic link"
    assert_stored_exactly(server, acknowledged + zipped[:4])

    after = dicomgen.make_study(tmp_path / "after", seed=38)
    shutil.copytree(tmp_path / "after", incoming(server) / "after")
    wait_settled(server, ingested=len(acknowledged) + 4 + len(after), rejected=1)
    assert_stored_exactly(server, acknowledged + zipped[:4] + after)
    assert_untouched(victims)


@pytest.mark.parametrize("after_ingest", ["delete", "move"])
def test_folder_swapped_for_a_symlink_after_the_check_is_refused_at_use(
    tmp_path: Path, after_ingest: str
) -> None:
    """The processor checks nothing first and trusts nothing after: every open, move
    and delete walks the path again without following links (a writer may swap a
    folder for a link between a listing and the operation)."""
    root = Root(tmp_path / "incoming")
    outside = tmp_path / "outside"
    (outside / "SE1").mkdir(parents=True)
    victim = outside / "SE1" / "IM1"
    victim.write_bytes(b"an instance outside the drop folder")
    (root.path / "SE1").mkdir(parents=True)
    (root.path / "SE1" / "IM1").write_bytes(b"dropped")
    shutil.rmtree(root.path / "SE1")
    (root.path / "SE1").symlink_to(outside / "SE1")  # the swap
    victims = fingerprint([victim])

    path = root.path / "SE1" / "IM1"
    outcomes = Outcomes(after_ingest)
    with pytest.raises(UnsafePath):
        confine.open_file(root.path, path)
    with pytest.raises(UnsafePath):
        outcomes.ingested(path, root)
    with pytest.raises(UnsafePath):
        outcomes.rejected(path, root, "not a DICOM Part 10 file")
    with pytest.raises(UnsafePath):
        ZipSource(root.path, path)
    assert_untouched(victims)
    assert not root.done.exists() or not any(root.done.rglob("IM1"))
    assert not root.rejected.exists() or not any(root.rejected.rglob("IM1"))


def test_link_planted_in_rejected_is_not_written_through(tmp_path: Path) -> None:
    root = Root(tmp_path / "incoming")
    root.path.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "passwd"
    victim.write_text("root:x:0:0\n")
    root.rejected.mkdir()
    (root.rejected / "CD1").symlink_to(outside)  # a folder of the target path
    (root.rejected / "notes.txt.reason").symlink_to(victim)  # the reason file itself
    victims = fingerprint([victim])
    (root.path / "CD1").mkdir()
    (root.path / "CD1" / "passwd").write_text("dropped\n")
    (root.path / "notes.txt").write_text("dropped\n")

    outcomes = Outcomes("delete")
    with pytest.raises(UnsafePath):
        outcomes.rejected(root.path / "CD1" / "passwd", root, "not a DICOM Part 10 file")
    moved = outcomes.rejected(root.path / "notes.txt", root, "not a DICOM Part 10 file")
    assert moved == root.rejected / "notes~1.txt"
    assert (root.rejected / "notes~1.txt.reason").read_text().startswith("not a DICOM")
    assert_untouched(victims)
    assert sorted(p.name for p in outside.iterdir()) == ["passwd"]


# --- a writer racing the clear-away (in process) ---------------------------------------


class RecordingIngest:
    """Stands in for IngestService: keeps what it was given to read, stores nothing."""

    def __init__(self) -> None:
        self.read: list[bytes] = []

    async def ingest_file(self, source: Path | BinaryIO, *, source_ae: str = "") -> Any:
        self.read.append(source.read_bytes() if isinstance(source, Path) else source.read())
        return SimpleNamespace(outcome=RecordOutcome.NEW)


def _dropped_bytes(kind: str, content: bytes, tmp: Path) -> bytes:
    if kind == "file":
        return content
    archive = tmp / "build.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("IM1", content)
    data = archive.read_bytes()
    archive.unlink()
    return data


def _write_over(path: Path, data: bytes, how: str) -> None:
    """What a writer does to a dropped file: a new file renamed over it, or the same
    file truncated and written again."""
    if how == "replaced":
        fresh = path.with_name("fresh.part")
        fresh.write_bytes(data)
        os.replace(fresh, path)
    else:
        with path.open("wb") as fh:
            fh.write(data)


@pytest.mark.parametrize("kind", ["file", "zip"])
@pytest.mark.parametrize("how", ["replaced", "rewritten"])
@pytest.mark.parametrize(("when", "after_ingest"), [
    ("after-the-last-look", "delete"), ("after-the-last-look", "move"),
    ("at-the-delete", "delete")])
async def test_a_file_written_over_after_ingest_is_never_cleared_away_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, how: str, when: str,
    after_ingest: str,
) -> None:
    # The processor checked a dropped file's size, mtime and inode after ingest, then
    # deleted it by name: a writer that replaced or rewrote it in between lost the new
    # content, deleted unread. Made deterministic here by acting in that window.
    root = Root(tmp_path / "incoming")
    root.path.mkdir()
    (tmp_path / "tmp").mkdir()
    path = root.path / ("study.zip" if kind == "zip" else "IM1")
    path.write_bytes(_dropped_bytes(kind, b"first content", tmp_path))
    second = _dropped_bytes(kind, b"second content, longer", tmp_path)
    ingest = RecordingIngest()
    processor = Processor(cast(Any, ingest), Outcomes(after_ingest), tmp_path / "tmp",
                          lambda: False)

    if when == "after-the-last-look":
        looked = Processor._changed

        async def look_then_write(checked: Path, before: Any) -> bool:
            changed = await looked(checked, before)
            _write_over(path, second, how)
            return changed

        monkeypatch.setattr(Processor, "_changed", staticmethod(look_then_write))
    else:
        unlink = confine.unlink

        def write_then_unlink(base: Path, target: Path) -> None:
            _write_over(path, second, how)
            unlink(base, target)

        monkeypatch.setattr(confine, "unlink", write_then_unlink)

    verdict = await processor.process(Unit(UnitKind.FILE, path, root), Job(root, Tally()))

    assert ingest.read == [b"first content"]
    assert sorted(p.name for p in root.path.iterdir()) == [path.name]
    assert path.read_bytes() == second, "the new content was cleared away unread"
    assert not root.done.exists() or not any(root.done.iterdir())
    # Written over before it was claimed: watched again. After: a new file, left alone.
    assert verdict is (Verdict.CHANGED if when == "after-the-last-look" else Verdict.DONE)


async def test_an_unchanged_file_is_cleared_away_through_its_claim(tmp_path: Path) -> None:
    root = Root(tmp_path / "incoming")
    (root.path / "CD1").mkdir(parents=True)
    path = root.path / "CD1" / "IM1"
    path.write_bytes(b"content")
    ingest = RecordingIngest()
    processor = Processor(cast(Any, ingest), Outcomes("delete"), tmp_path, lambda: False)
    verdict = await processor.process(Unit(UnitKind.FILE, path, root), Job(root, Tally()))
    assert verdict is Verdict.DONE
    assert ingest.read == [b"content"]
    assert list((root.path / "CD1").iterdir()) == []
    assert not any(p.name.startswith(CLAIM_PREFIX) for p in root.path.rglob("*"))
