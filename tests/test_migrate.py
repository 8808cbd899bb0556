"""`pacs-edge migrate` end to end: dcmqrscp as the legacy PACS, a real `pacs-edge serve`.

The legacy archive (tests/legacypacs.py) holds generated studies over a few days:
multi-series and mixed CT/MR studies, one transfer syntax per SOP class (explicit
and implicit VR, deflated, JPEG lossless, JPEG-LS, RLE: the box stores each as
received), two studies that share a SOP Instance UID, and studies without a
StudyDate (some without a StudyTime either), which no day's C-FIND matches. A
proxy gives the archive a C-FIND result limit that one day exceeds, within one
hour, so the walk must split the day by hour and the hour down to minutes.

What is proven: the migration process is SIGKILLed three times mid-run and
resumed each time; in the end every instance of the legacy archive is in the box
exactly once (as a current instance or, for the shared UID, a prior version) and
byte-identical to the legacy file, and `migrate status` says done. C-GET does the
same with no server running. A peer without the permissions, and an archive that
does not answer, give clear errors and listed failures.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dcmtk
import dicomgen
import pydicom
import pydicom.config
import pytest
from conftest import HOST, EdgeServer, _env, pacs_edge_command
from legacypacs import FindLimitProxy, LegacyPacs
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from tcpproxy import TcpProxy
from test_clock_steps import new_york_box_at
from tlsproxy import TlsProxy

from appliance.store import migration_rows
from appliance.store.leases import Holder

SYNTAX_BY_CLASS = {
    dicomgen.SOP_CLASSES["CT"]: str(ExplicitVRLittleEndian),
    dicomgen.SOP_CLASSES["MR"]: str(JPEGLSLossless),
    dicomgen.SOP_CLASSES["US"]: str(RLELossless),
    dicomgen.SOP_CLASSES["CR"]: str(JPEGLosslessSV1),
    dicomgen.SOP_CLASSES["DX"]: str(ImplicitVRLittleEndian),
    dicomgen.SOP_CLASSES["OT"]: str(DeflatedExplicitVRLittleEndian),
}
KINDS = (("CT", "CT"), ("CT", "MR"), ("US",), ("CR",), ("DX",), ("OT",), ("MR",))
DAYS = ("20240301", "20240302", "20240303")
QUERY_LIMIT = 4
RUN_TIMEOUT = 600.0


def make_archive(folder: Path, studies: int, *, busy_day_studies: int, undated: int = 0,
                 untimed: int = 0) -> list[Path]:
    """`studies` studies over DAYS (the first `busy_day_studies` on DAYS[0], within one
    hour), kinds cycling through KINDS; the second study's first instance reuses the
    SOP Instance UID of the first study's first instance. The last `undated` studies
    have an empty StudyDate, the last `untimed` of them an empty StudyTime too."""
    files: list[Path] = []
    shared_uid = ""
    for n in range(studies):
        kind = KINDS[n % len(KINDS)]
        made = dicomgen.make_study(folder / f"study{n:04d}", seed=5000 + n,
                                   series_per_study=len(kind) if len(kind) > 1 else 2,
                                   instances_per_series=2, modalities=kind, size=16)
        if n < busy_day_studies:
            # One study in the last second of its minute, with a fraction: a range
            # ending at ...59 leaves it out (dcmqrscp compares times as times).
            seconds = "59.5" if n == 2 else f"{n % 60:02d}"
            day, at = DAYS[0], f"10{(n * 7) % 60:02d}{seconds}"
        else:
            day = "" if n >= studies - undated else DAYS[1 + n % (len(DAYS) - 1)]
            at = "" if n >= studies - untimed else f"{8 + n % 10:02d}{(n * 13) % 60:02d}00"
        for k, inst in enumerate(made):
            ds = pydicom.dcmread(inst.path)
            ds.StudyDate, ds.StudyTime = day, at
            if k == 0 and n == 0:
                shared_uid = str(ds.SOPInstanceUID)
            if k == 0 and n == 1:
                ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = dicomgen.SOP_CLASSES["CT"]
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = shared_uid
            dicomgen.write_instance(ds, inst.path, SYNTAX_BY_CLASS[str(ds.SOPClassUID)])
            files.append(inst.path)
    return files


def dataset_digest(data: bytes) -> str:
    """SHA-256 of a Part 10 file's data set: the bytes after the File Meta group."""
    group_length = struct.unpack_from("<I", data, 132 + 8)[0]
    return hashlib.sha256(data[132 + 12 + group_length:]).hexdigest()


def box_digests(home: Path) -> Counter[str]:
    """Data set digests of every file the box holds: current instances and prior versions."""
    with closing(sqlite3.connect(home / "index.sqlite3")) as conn:
        paths = [r[0] for r in conn.execute(
            "SELECT path FROM instances UNION ALL SELECT path FROM instance_versions")]
    return Counter(dataset_digest((home / "store" / p).read_bytes()) for p in paths)


def done_studies(home: Path) -> int:
    with closing(sqlite3.connect(home / "index.sqlite3")) as conn:
        try:
            row = conn.execute("SELECT COUNT(*) FROM migration_studies WHERE state = 'done'"
                               ).fetchone()
        except sqlite3.OperationalError:  # the first process has not created the index yet
            return 0
    return int(row[0])


class MigrateProcess:
    """`pacs-edge migrate ARGS` in its own process group, killable like a power cut;
    `terminal`: as on an operator's terminal (rich draws its progress bar)."""

    def __init__(self, home: Path, *args: str, terminal: bool = False,
                 env_extra: dict[str, str] | None = None) -> None:
        self.log = home.parent / "migrate.log"
        env = {**_env(), **(env_extra or {})}
        if terminal:
            env.update(TTY_COMPATIBLE="1", TTY_INTERACTIVE="1", COLUMNS="400")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*pacs_edge_command(), "migrate", *args, "--home", str(home)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def wait(self) -> int:
        try:
            return self.proc.wait(RUN_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            self.kill()
            raise AssertionError(
                f"migrate still running:\n{self.log.read_text()[-4000:]}") from exc


def wait_until(check: Callable[[], bool], what: str, proc: MigrateProcess) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT
    while not check():
        if proc.proc.poll() is not None:
            raise AssertionError(f"migrate exited before {what}:\n{proc.log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {RUN_TIMEOUT}s")
        time.sleep(0.05)


@pytest.fixture
def legacy_factory(tmp_path: Path) -> Iterator[Callable[..., LegacyPacs]]:
    started: list[LegacyPacs] = []

    def make(files: list[Path], *, box: EdgeServer | None = None,
             syntax_by_class: dict[str, str] = SYNTAX_BY_CLASS, nagle: bool = False
             ) -> LegacyPacs:
        pacs = LegacyPacs(tmp_path / f"legacy{len(started)}", syntax_by_class, nagle=nagle)
        if box is not None:
            pacs.know(box.ae_title, box.port)
        pacs.load(files)
        started.append(pacs)
        return pacs.start()

    yield make
    for pacs in started:
        pacs.stop()


def migrate_status(box: EdgeServer) -> dict[str, object]:
    return json.loads(box.cli("migrate", "status", "--json").stdout)  # type: ignore[no-any-return]


def run_with_kills(box: EdgeServer, start_args: list[str], kills_after: list[int]) -> None:
    """Start the migration, SIGKILL it once `kills_after[i]` studies are done, resume."""
    proc = MigrateProcess(box.home, "start", *start_args)
    for threshold in kills_after:
        wait_until(lambda t=threshold: done_studies(box.home) >= t, f"{threshold} studies", proc)
        proc.kill()
        proc = MigrateProcess(box.home, "resume")
    assert proc.wait() == 0, proc.log.read_text()[-4000:]


def test_migration_killed_three_times_ends_with_every_instance_once_and_byte_identical(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer],
        legacy_factory: Callable[..., LegacyPacs]) -> None:
    files = make_archive(tmp_path / "archive", 17, busy_day_studies=8, undated=1)
    box = edge_server_factory()
    box.configure(migrate={"retry_base_seconds": 0.2})
    legacy = legacy_factory(files, box=box)
    with FindLimitProxy(legacy.port, QUERY_LIMIT) as proxy:
        box.add_peer("legacy", legacy.ae_title, proxy.port, allow="find,move,store")
        run_with_kills(box, ["--from", "legacy", "--since", "2024-03-01", "--until",
                             "2024-03-03", "--associations", "2", "--rate", "7200",
                             "--query-limit", str(QUERY_LIMIT)], [3, 7, 11])
        assert proxy.truncated > 0  # the busy day hit the limit and was split

    assert box_digests(box.home) == Counter(dataset_digest(f.read_bytes()) for f in files)
    report = migrate_status(box)
    assert report["state"] == "done"
    assert report["studies"] == {"found": 17, "done": 17, "failed": 0, "remaining": 0}
    assert report["days"] == {"total": 3, "listed": 3, "failed": 0, "pending": 0}
    # The undated study was found by time ranges over all dates, which the limit split;
    # one without a StudyTime could not have been, and the summary says so.
    assert report["undated"] == {"listing": "done", "found": 1}
    warnings = report["warnings"]
    assert isinstance(warnings, list) and len(warnings) == 1, warnings
    assert "neither a StudyDate nor a StudyTime" in warnings[0], warnings
    assert "no failures" in box.cli("migrate", "failures").stdout


def test_a_study_the_box_holds_in_part_is_checked_by_uid_not_by_count(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer],
        legacy_factory: Callable[..., LegacyPacs]) -> None:
    """The box holds all but one instance of a legacy study (a partial prefetch) and one
    the legacy PACS never had (a viewer's note): together they reach the legacy count,
    yet the instance the box lacks is migrated, byte-identical."""
    files = make_archive(tmp_path / "archive", 3, busy_day_studies=0)
    box = edge_server_factory()
    legacy = legacy_factory(files, box=box)
    last = pydicom.dcmread(files[-1]).StudyInstanceUID
    study = [f for f in files if pydicom.dcmread(f).StudyInstanceUID == last]
    dcmtk.storescu(box.port, study[:-1], aec=box.ae_title).check()
    note = pydicom.dcmread(study[0])
    note.SOPInstanceUID = note.file_meta.MediaStorageSOPInstanceUID = dicomgen.make_uid(1, "note")
    note.save_as(tmp_path / "note.dcm")
    dcmtk.storescu(box.port, [tmp_path / "note.dcm"], aec=box.ae_title).check()
    box.add_peer("legacy", legacy.ae_title, legacy.port, allow="find,move,store")
    result = box.cli("migrate", "start", "--from", "legacy", "--since", "20240301", "--until",
                     "20240303", timeout=RUN_TIMEOUT)
    assert "3 studies done, 0 failed" in result.stdout
    expected = Counter(dataset_digest(f.read_bytes()) for f in files)
    expected[dataset_digest((tmp_path / "note.dcm").read_bytes())] += 1
    assert box_digests(box.home) == expected


def test_a_move_with_failed_suboperations_fails_the_study_and_counts_its_instances(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer],
        legacy_factory: Callable[..., LegacyPacs]) -> None:
    """dcmqrscp cannot send MR (no outgoing context for it): the CT+MR study's C-MOVE ends
    0xB000 with failed sub-operations, the MR study's 0xA702. Both are retried, then
    failed, each with the instances it holds in the legacy PACS, so that the summary
    lists every legacy instance and says how many the box lacks."""
    files = make_archive(tmp_path / "archive", 7, busy_day_studies=0)
    box = edge_server_factory()
    box.configure(migrate={"retry_base_seconds": 0.05, "max_attempts": 2})
    no_mr = {k: v for k, v in SYNTAX_BY_CLASS.items() if k != dicomgen.SOP_CLASSES["MR"]}
    legacy = legacy_factory(files, box=box, syntax_by_class=no_mr)
    box.add_peer("legacy", legacy.ae_title, legacy.port, allow="find,move,store")
    result = box.cli("migrate", "start", "--from", "legacy", "--since", "20240301", "--until",
                     "20240303", check=False, timeout=RUN_TIMEOUT)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "5 studies done, 2 failed" in result.stdout
    failures = json.loads(box.cli("migrate", "failures", "--json").stdout)
    assert sorted((f["error_kind"], f["attempts"], f["expected_instances"],
                   f["received_instances"]) for f in failures) == [
        ("incomplete", 2, 4, 2), ("retrieve_failed", 2, 4, 0)]
    assert "status 0xB000" in " ".join(f["last_error"] for f in failures)
    report = migrate_status(box)
    assert report["instances"]["listed"] == len(files)


def test_a_legacy_pacs_that_does_not_know_the_box_pauses_the_run_at_once_naming_the_ae_title(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer],
        legacy_factory: Callable[..., LegacyPacs]) -> None:
    """0xA801 (move destination unknown) is the same for every study: the run pauses at
    the first one, saying which AE title to add on the legacy PACS, and counts no
    study; once the legacy PACS knows the box, `resume` migrates everything."""
    files = make_archive(tmp_path / "archive", 3, busy_day_studies=0)
    box = edge_server_factory()
    box.configure(migrate={"retry_base_seconds": 5.0, "max_attempts": 3})
    legacy = legacy_factory(files)  # the box is not one of its move destinations
    box.add_peer("legacy", legacy.ae_title, legacy.port, allow="find,move,store")
    result = box.cli("migrate", "start", "--from", "legacy", "--since", "20240301", "--until",
                     "20240303", "--associations", "1", check=False, timeout=RUN_TIMEOUT)
    assert result.returncode == 2, result.stdout + result.stderr
    stderr = " ".join(result.stderr.split())
    assert "status 0xA801 (Refused: Move Destination unknown)" in stderr, stderr
    assert f"add this box as a move destination: AE title '{box.ae_title}'" in stderr, stderr
    report = migrate_status(box)
    assert report["state"] == "paused", report
    assert "0xA801" in str(report["stop_reason"]), report
    assert report["studies"] == {"found": 3, "done": 0, "failed": 0, "remaining": 3}
    assert json.loads(box.cli("migrate", "failures", "--json").stdout) == []

    legacy.stop()
    legacy.know(box.ae_title, box.port)
    legacy.start()
    resumed = box.cli("migrate", "resume", check=False, timeout=RUN_TIMEOUT)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "3 studies done, 0 failed" in resumed.stdout
    assert migrate_status(box)["stop_reason"] is None


def test_an_association_rejected_for_the_box_s_ae_title_pauses_the_run_at_any_time(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer],
        legacy_factory: Callable[..., LegacyPacs]) -> None:
    """dcmqrscp rejects a calling AE title it does not know for good (A-ASSOCIATE-RJ,
    rejected-permanent, "called AE title not recognized"): every study and every retry
    would get the same answer. The run pauses at once, naming the box's AE title, and
    counts nothing, whether the rejection comes at the start (it failed every day
    before) or after studies came over (it waited for ever for the PACS to be back)."""
    files = make_archive(tmp_path / "archive", 6, busy_day_studies=0)
    box = edge_server_factory(start=False)
    legacy = legacy_factory(files)
    legacy.stop()
    legacy.callers = ("SOMEONE",)
    legacy.start()
    box.add_peer("legacy", legacy.ae_title, legacy.port, allow="find,get")
    start = ["--from", "legacy", "--via", "get", "--since", "20240301", "--until", "20240303",
             "--associations", "1", "--rate", "1200"]
    result = box.cli("migrate", "start", *start, check=False, timeout=RUN_TIMEOUT)
    assert result.returncode == 2, result.stdout + result.stderr
    stderr = " ".join(result.stderr.split())
    assert "rejected the association for good (called AE title not recognized)" in stderr, stderr
    assert f"allow this box's AE title '{box.ae_title}'" in stderr, stderr
    assert migrate_status(box)["state"] == "paused"
    assert json.loads(box.cli("migrate", "failures", "--json").stdout) == []

    legacy.stop()
    legacy.callers = None
    legacy.start()
    proc = MigrateProcess(box.home, "resume")
    wait_until(lambda: done_studies(box.home) >= 1, "a study", proc)
    legacy.stop()
    legacy.callers = ("SOMEONE",)
    legacy.start()
    try:
        assert proc.proc.wait(120) == 2, proc.log.read_text()[-4000:]
    finally:
        if proc.proc.poll() is None:
            proc.kill()
    report = migrate_status(box)
    assert report["state"] == "paused", report
    assert "rejected the association for good" in str(report["stop_reason"]), report
    assert 1 <= done_studies(box.home) < 6
    assert json.loads(box.cli("migrate", "failures", "--json").stdout) == []

    legacy.stop()
    legacy.callers = None
    legacy.start()
    resumed = box.cli("migrate", "resume", check=False, timeout=RUN_TIMEOUT)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert box_digests(box.home) == Counter(dataset_digest(f.read_bytes()) for f in files)


@pytest.mark.parametrize("status", [0x0124, 0xA900])
def test_a_legacy_pacs_that_refuses_the_box_s_queries_pauses_the_run_at_once(
        status: int, edge_server_factory: Callable[..., EdgeServer]) -> None:
    """A C-FIND refused with 0x0124 (this box may not query) or 0xA900 (a query it does
    not take) is what every day's listing would get: the run pauses at the first, saying
    what to allow, and counts no day as failed. Before, each day was retried until its
    attempts ran out, and the run ended with every day failed."""
    legacy = AE("REFUSING")
    legacy.add_supported_context(Verification)
    legacy.add_supported_context(StudyRootQueryRetrieveInformationModelFind)

    def refuse(event: evt.Event) -> Iterator[tuple[int, None]]:
        yield status, None

    server = legacy.start_server((HOST, 0), block=False,
                                 evt_handlers=[(evt.EVT_C_FIND, refuse)])
    try:
        box = edge_server_factory()
        box.configure(migrate={"retry_base_seconds": 1.0, "max_attempts": 2})
        box.add_peer("legacy", "REFUSING", server.server_address[1], allow="find,move,store")
        result = box.cli("migrate", "start", "--from", "legacy", "--since", "20240301",
                         "--until", "20240303", "--associations", "1", check=False,
                         timeout=RUN_TIMEOUT)
    finally:
        legacy.shutdown()
    assert result.returncode == 2, result.stdout + result.stderr
    stderr = " ".join(result.stderr.split())
    assert f"refused a C-FIND with status 0x{status:04X}" in stderr, stderr
    assert f"allow this box's AE title '{box.ae_title}' to query" in stderr, stderr
    report = migrate_status(box)
    assert report["state"] == "paused", report
    assert f"0x{status:04X}" in str(report["stop_reason"]), report
    assert report["days"] == {"total": 3, "listed": 0, "failed": 0, "pending": 3}, report


def dated_study(uid: str, count: str) -> Dataset:
    """A study-level C-FIND answer for 2024-03-01 with NumberOfStudyRelatedInstances."""
    answer = Dataset()
    answer.QueryRetrieveLevel = "STUDY"
    answer.StudyInstanceUID = uid
    answer.StudyDate, answer.StudyTime = "20240301", "101010"
    answer.NumberOfStudyRelatedInstances = count
    return answer


def one_study(uid: str) -> Callable[[evt.Event], Iterator[tuple[int, Dataset]]]:
    """A C-FIND handler answering the listing of 2024-03-01 with study `uid` (1 instance)."""
    def find(event: evt.Event) -> Iterator[tuple[int, Dataset]]:
        if event.identifier.get("StudyDate", "") == "20240301":
            yield 0xFF00, dated_study(uid, "1")
    return find


def migrate_from(legacy: AE, handlers: Callable[[EdgeServer], list[tuple[Any, Any]]],
                 edge_server_factory: Callable[..., EdgeServer], *, migrate: dict[str, Any],
                 timeout: float = RUN_TIMEOUT) -> tuple[EdgeServer, Any]:
    """`migrate start` of 2024-03-01 from the pynetdicom `legacy` (its handlers made for
    the box, which the C-MOVE sends to): (the box, the command's result)."""
    box = edge_server_factory()
    box.configure(migrate=migrate)
    server = legacy.start_server((HOST, 0), block=False, evt_handlers=handlers(box))
    try:
        box.add_peer("legacy", str(legacy.ae_title), server.server_address[1],
                     allow="find,move,store")
        result = box.cli("migrate", "start", "--from", "legacy", "--since", "20240301",
                         "--until", "20240301", check=False, timeout=timeout)
    finally:
        legacy.shutdown()
    return box, result


def test_a_legacy_pacs_that_serves_no_c_move_pauses_the_run_naming_via_get(
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    """A C-GET-only archive (or one that serves this box queries only) accepts the
    association and C-FIND but no C-MOVE context: pynetdicom raised ValueError at the
    first C-MOVE, the migrate process died with a traceback and `resume` did the same.
    Every study would fail alike, so the run pauses, naming --via get."""
    legacy = AE("FINDONLY")
    legacy.add_supported_context(Verification)
    legacy.add_supported_context(StudyRootQueryRetrieveInformationModelFind)

    find = one_study(dicomgen.UID_ROOT + "77.1")
    box, result = migrate_from(legacy, lambda _box: [(evt.EVT_C_FIND, find)],
                               edge_server_factory,
                               migrate={"retry_base_seconds": 0.05, "max_attempts": 2})
    assert result.returncode == 2, result.stdout + result.stderr
    stderr = " ".join(result.stderr.split())
    assert "Traceback" not in stderr, stderr
    assert "accepted no Study Root C-MOVE context" in stderr, stderr
    # A paused run resumes with its own --via: C-GET takes a new run (the hint said
    # "or migrate --via get", a command that does not exist).
    assert "`pacs-edge migrate cancel`, then `migrate start --via get`" in stderr, stderr
    report = migrate_status(box)
    assert report["state"] == "paused", report
    assert "C-MOVE" in str(report["stop_reason"]), report


@pytest.mark.parametrize("count", ["0", "-1"])
def test_a_study_the_legacy_pacs_counts_as_empty_is_not_done_by_a_move_that_failed(
        count: str, edge_server_factory: Callable[..., EdgeServer]) -> None:
    """Some archives answer NumberOfStudyRelatedInstances (and the series' counts) 0
    where they keep no count. A study expected to hold 0 instances was done whatever
    its C-MOVE brought: here the C-MOVE sends nothing and the box holds nothing, and the
    study was reported migrated. A count of 0 is no count: the instances are listed.
    So is a negative one (an IS value may be "-1", an archive's "unknown"): the study
    was expected to hold -1 instances and was done, with nothing, as 0 was."""
    uid = dicomgen.UID_ROOT + "77.3"
    legacy = AE("ZEROCOUNT")
    legacy.add_supported_context(Verification)
    legacy.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    legacy.add_supported_context(StudyRootQueryRetrieveInformationModelMove)

    def counted_zero(event: evt.Event) -> Iterator[tuple[int, Dataset]]:
        query, answer = event.identifier, Dataset()
        answer.QueryRetrieveLevel = query.QueryRetrieveLevel
        answer.StudyInstanceUID = uid
        if query.QueryRetrieveLevel == "STUDY" and query.get("StudyDate", "") == "20240301":
            answer = dated_study(uid, count)
        elif query.QueryRetrieveLevel == "SERIES":
            answer.SeriesInstanceUID, answer.Modality = uid + ".1", "CT"
            answer.NumberOfSeriesRelatedInstances = count
        elif query.QueryRetrieveLevel == "IMAGE":
            answer.SOPInstanceUID = uid + ".1.1"
            answer.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        else:
            return
        yield 0xFF00, answer

    def handlers(box: EdgeServer) -> list[tuple[Any, Any]]:
        def empty_move(event: evt.Event) -> Iterator[Any]:
            yield HOST, box.port
            yield 0  # no sub-operation: nothing sent

        return [(evt.EVT_C_FIND, counted_zero), (evt.EVT_C_MOVE, empty_move)]

    box, result = migrate_from(legacy, handlers, edge_server_factory,
                               migrate={"retry_base_seconds": 0.05, "max_attempts": 1})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "0 studies done, 1 failed" in result.stdout, result.stdout
    [failure] = json.loads(box.cli("migrate", "failures", "--json").stdout)
    assert "1 of 1 instances not in the box after the C-MOVE" in failure["last_error"], failure


def test_a_study_whose_every_instance_the_box_refuses_fails_at_once_with_the_reason(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer],
        legacy_factory: Callable[..., LegacyPacs]) -> None:
    """C-GET: each instance of one study has a SOP Instance UID with letters, which the box
    refuses (0xC000) and would refuse at every attempt: the study fails at its first
    attempt with the reason, not after max_attempts; the other study is migrated."""
    files = make_archive(tmp_path / "archive", 3, busy_day_studies=0)
    bad_study = [f for f in files if f.relative_to(tmp_path / "archive").parts[0] == "study0002"]
    for n, path in enumerate(bad_study):
        bad = pydicom.dcmread(path)
        with pydicom.config.disable_value_validation():
            del bad["SOPInstanceUID"]
            bad.SOPInstanceUID = dicomgen.UID_ROOT + f"abc.{n}"
            del bad.file_meta.MediaStorageSOPInstanceUID
            bad.file_meta.MediaStorageSOPInstanceUID = bad.SOPInstanceUID
            dicomgen.write_instance(bad, path, SYNTAX_BY_CLASS[str(bad.SOPClassUID)])
    box = edge_server_factory(start=False)
    box.configure(migrate={"retry_base_seconds": 0.05, "max_attempts": 5})
    legacy = legacy_factory(files)
    box.add_peer("legacy", legacy.ae_title, legacy.port, allow="find,get")
    result = box.cli("migrate", "start", "--from", "legacy", "--via", "get", "--since",
                     "20240301", "--until", "20240303", check=False, timeout=RUN_TIMEOUT)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 studies done, 1 failed" in result.stdout
    [failure] = json.loads(box.cli("migrate", "failures", "--json").stdout)
    assert (failure["attempts"], failure["error_kind"]) == (1, "retrieve_failed"), failure
    assert "not retried, the same instances would be refused again" in failure["last_error"]


def test_migration_via_get_needs_no_server_and_is_byte_identical(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer],
        legacy_factory: Callable[..., LegacyPacs]) -> None:
    """Two of the seven studies have no StudyDate (one no StudyTime either): no day
    matches them, yet they are found and migrated. The days before DAYS hold no study
    and are not logged at INFO (thousands of lines on a long run)."""
    files = make_archive(tmp_path / "archive", 7, busy_day_studies=0, undated=2, untimed=1)
    box = edge_server_factory(start=False)
    box.configure(migrate={"retry_base_seconds": 0.2, "max_attempts": 2})
    legacy = legacy_factory(files)
    box.add_peer("legacy", legacy.ae_title, legacy.port, allow="find,get")
    result = box.cli("migrate", "start", "--from", "legacy", "--via", "get", "--since",
                     "20240227", "--until", "20240303", timeout=RUN_TIMEOUT)
    assert "7 studies done, 0 failed" in result.stdout
    assert box_digests(box.home) == Counter(dataset_digest(f.read_bytes()) for f in files)
    report = migrate_status(box)
    assert report["state"] == "done"
    assert report["studies"] == {"found": 7, "done": 7, "failed": 0, "remaining": 0}
    assert report["undated"] == {"listing": "done", "found": 2}
    assert report["warnings"] == []
    assert "2 studies found" in box.cli("migrate", "status").stdout
    assert "day=20240302 studies=" in result.stderr, result.stderr
    assert "studies=0" not in result.stderr, result.stderr


# A legacy PACS with Nagle's algorithm on (dcmtk's default) sends each C-STORE of a C-GET
# in pieces and holds the later ones until the box acknowledges the first, which the
# box's kernel delayed by 40 ms: ~45 ms an instance, ~4 min for a 5,000-instance study.
# Compared with the same migration from the same archive with Nagle off, measured in the
# same test (a slow machine slows both), not with a fixed time.
NAGLE_INSTANCES = 300
STALL_FACTOR, STALL_SLACK_SECONDS = 2.0, 2.0


def test_migration_via_get_from_an_archive_with_nagle_on_does_not_wait_for_delayed_acks(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer],
        legacy_factory: Callable[..., LegacyPacs]) -> None:
    study = dicomgen.make_studies(tmp_path / "study", seed=74, series_per_study=1,
                                  instances_per_series=NAGLE_INSTANCES, modalities=("CT",),
                                  size=8)
    day = str(study[0].header.StudyDate)
    seconds = {}
    for nagle in (False, True):
        box = edge_server_factory(start=False)
        legacy = legacy_factory([i.path for i in study], nagle=nagle)
        box.add_peer("legacy", legacy.ae_title, legacy.port, allow="find,get")
        started = time.monotonic()
        result = box.cli("migrate", "start", "--from", "legacy", "--via", "get", "--since",
                         day, "--until", day, timeout=RUN_TIMEOUT)
        seconds[nagle] = time.monotonic() - started
        assert "1 studies done, 0 failed" in result.stdout, result.stdout + result.stderr
    assert seconds[True] < STALL_FACTOR * seconds[False] + STALL_SLACK_SECONDS, seconds


def test_migration_from_an_archive_that_requires_tls_goes_over_tls(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer],
        legacy_factory: Callable[..., LegacyPacs], free_port: Callable[[], int]) -> None:
    """A legacy peer marked --tls is asked over TLS with the box's node certificate
    (C-GET: the queries and the instances on the box's own associations), and what
    arrives is what the archive holds."""
    files = make_archive(tmp_path / "archive", 3, busy_day_studies=0)
    box = edge_server_factory(start=False)
    box.configure(dicom={"tls_port": free_port()},
                  migrate={"retry_base_seconds": 0.2, "max_attempts": 2})
    legacy = legacy_factory(files)
    certs = tmp_path / "legacy"
    box.cli("certs", "issue", "legacy", "--server", "--san", "127.0.0.1", "--out", str(certs))
    with TlsProxy(legacy.port, cert=certs / "legacy.pem", key=certs / "legacy.key",
                  ca=certs / "ca.pem") as proxy:
        box.cli("peers", "add", "legacy", "--ae-title", legacy.ae_title, "--host", HOST,
                "--port", str(proxy.port), "--allow", "find,get", "--tls")
        result = box.cli("migrate", "start", "--from", "legacy", "--via", "get", "--since",
                         "20240301", "--until", "20240303", timeout=RUN_TIMEOUT)
        assert proxy.handshakes > 0
    assert "3 studies done, 0 failed" in result.stdout
    assert box_digests(box.home) == Counter(dataset_digest(f.read_bytes()) for f in files)


def test_a_window_that_reopens_after_the_hour_skipped_in_spring_reopens_on_time(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer],
        legacy_factory: Callable[..., LegacyPacs]) -> None:
    """A New York box on 14 Mar 2027, 01:58:45 EST, `--window 03:00-01:59`: it closes at
    01:59 with studies left, and 03:00 EDT comes one minute later (02:00 EST is 03:00
    EDT). The workers waiting for it counted down the 61 minutes of clock they had
    worked out at 01:59 and went on at 04:00 EDT, an hour late."""
    files = make_archive(tmp_path / "archive", 12, busy_day_studies=0)
    box = edge_server_factory(start=False)
    legacy = legacy_factory(files)
    box.add_peer("legacy", legacy.ae_title, legacy.port, allow="find,get")
    # --rate 1800: a study every 2 s, so 12 take longer than the 15 s left at the start.
    proc = MigrateProcess(box.home, "start", "--from", "legacy", "--via", "get", "--since",
                          "20240301", "--until", "20240303", "--rate", "1800",
                          "--window", "03:00-01:59",
                          env_extra=new_york_box_at(datetime(2027, 3, 14, 6, 58, 45,
                                                             tzinfo=UTC)))
    try:
        wait_until(lambda: done_studies(box.home) >= 1, "a study before 01:59", proc)
        # Closed from 01:59:00 EST to 03:00:00 EDT, one minute: all done well within 3.
        assert proc.proc.wait(180) == 0, proc.log.read_text()[-4000:]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the window reopened late: {done_studies(box.home)} of 12 studies"
                    f" done 3 minutes after it closed for one:\n{proc.log.read_text()[-4000:]}")
    finally:
        if proc.proc.poll() is None:
            proc.kill()
    assert done_studies(box.home) == 12
    log = proc.log.read_text()
    # dcmqrscp closes an association after 60 s of silence, as 03:00 comes: none was held.
    assert "migration study failed" not in log, log[-4000:]
    assert "2027-03-14T03:0" in log and "-04:00" in log, log[-4000:]  # it went on in EDT


class IdleClosingProxy(TcpProxy):
    """A legacy PACS whose idle timer (`idle_seconds`) fires just as the next request
    arrives: a request after that much silence on its association is not forwarded,
    and the connection is closed (`closed` counts them). The worst case of every real
    peer's idle timeout (Orthanc 30 s, dcmtk 60 s)."""

    def __init__(self, upstream_port: int, idle_seconds: float) -> None:
        self.idle_seconds = idle_seconds
        self.closed = 0
        super().__init__(upstream_port)

    def to_server(self, source: socket.socket, sink: socket.socket) -> None:
        last = time.monotonic()
        try:
            while chunk := source.recv(1 << 16):
                if time.monotonic() - last > self.idle_seconds:
                    self.closed += 1
                    return
                last = time.monotonic()
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def test_a_worker_releases_its_association_before_a_long_wait_for_its_slot(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer],
        legacy_factory: Callable[..., LegacyPacs]) -> None:
    """--rate 240 on one association: a study every 15 s, most of it spent waiting. A
    worker that held its association through the wait sent its next request into a
    peer's idle timeout, and the study failed an attempt for no fault of either."""
    files = make_archive(tmp_path / "archive", 3, busy_day_studies=0)
    box = edge_server_factory(start=False)
    legacy = legacy_factory(files)
    with IdleClosingProxy(legacy.port, idle_seconds=8) as proxy:
        box.add_peer("legacy", legacy.ae_title, proxy.port, allow="find,get")
        result = box.cli("migrate", "start", "--from", "legacy", "--via", "get", "--since",
                         "20240301", "--until", "20240303", "--rate", "240",
                         "--associations", "1", timeout=RUN_TIMEOUT)
    assert "3 studies done, 0 failed" in result.stdout
    assert "migration study failed" not in result.stdout + result.stderr
    assert proxy.closed == 0
    assert box_digests(box.home) == Counter(dataset_digest(f.read_bytes()) for f in files)


def test_peer_without_store_permission_is_refused_with_the_fix(
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    box = edge_server_factory(start=False)
    box.add_peer("legacy", "LEGACY", 104, allow="find,move")
    result = box.cli("migrate", "start", "--from", "legacy", check=False)
    assert result.returncode == 2
    assert "lacks permission store" in result.stderr
    assert "--allow find,move,store" in result.stderr


def test_run_options_out_of_range_are_refused_before_a_run_is_made(
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    """The run's options go to SQLite INTEGER columns: a huge number is a usage error
    (exit 2, one line), not an OverflowError traceback."""
    box = edge_server_factory(start=False)
    box.add_peer("legacy", "LEGACY", 1, allow="find,move,store")
    huge = "99999999999999999999"
    for option, value in (("--rate", huge), ("--query-limit", huge), ("--associations", huge),
                          ("--rate", "-1"), ("--query-limit", "1"), ("--associations", "0")):
        result = box.cli("migrate", "start", "--from", "legacy", option, value, check=False)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"Invalid value for '{option}'" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    ancient = box.cli("migrate", "start", "--from", "legacy", "--since", "0001-01-01",
                      check=False)  # one row per day: 740,000 of them
    assert ancient.returncode == 2 and "is before 1900-01-01" in ancient.stderr, ancient.stderr
    for command in ("status", "failures", "pause", "cancel"):
        none = box.cli("migrate", command, check=False)
        assert none.returncode == 2 and none.stderr.splitlines() == [
            "error: no migration run yet", "hint: pacs-edge migrate start --from NAME"], none


def test_unreachable_archive_is_retried_then_listed_as_failed(
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    box = edge_server_factory(start=False)
    box.configure(migrate={"retry_base_seconds": 0.05, "max_attempts": 2})
    box.add_peer("legacy", "LEGACY", 1, host=HOST, allow="find,move,store")
    result = box.cli("migrate", "start", "--from", "legacy", "--since", "20240301", "--until",
                     "20240301", check=False, timeout=RUN_TIMEOUT)
    assert result.returncode == 1
    failures = json.loads(box.cli("migrate", "failures", "--json").stdout)
    assert [(f["what"], f["day"], f["error_kind"], f["attempts"]) for f in failures] == [
        ("day", "20240301", "unreachable", 2), ("day", "", "unreachable", 2)]  # "": undated
    assert "(no date)" in box.cli("migrate", "failures").stdout
    resumed = box.cli("migrate", "resume", check=False)
    assert resumed.returncode == 2 and "is done" in resumed.stderr


def day_attempted(box: EdgeServer) -> bool:
    """The run's day was tried once (the C-FIND failed: the peer listens nowhere)."""
    with closing(sqlite3.connect(box.home / "index.sqlite3")) as conn:
        try:
            row = conn.execute("SELECT attempts FROM migration_days").fetchone()
        except sqlite3.OperationalError:  # not created yet
            return False
    return bool(row and row[0])


def test_pause_stops_a_running_migration_and_cancel_ends_it(
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    box = edge_server_factory(start=False)
    box.configure(migrate={"retry_base_seconds": 600.0})
    box.add_peer("legacy", "LEGACY", 1, host=HOST, allow="find,move,store")
    proc = MigrateProcess(box.home, "start", "--from", "legacy", "--since", "20240301",
                          "--until", "20240301")

    try:
        wait_until(lambda: day_attempted(box), "a first attempt", proc)  # retry in 600 s
        assert "paused" in box.cli("migrate", "pause").stdout
        assert proc.wait() == 0
    finally:
        if proc.proc.poll() is None:
            proc.kill()
    assert migrate_status(box)["state"] == "paused"
    assert "cancelled" in box.cli("migrate", "cancel").stdout
    resumed = box.cli("migrate", "resume", check=False)
    assert resumed.returncode == 2 and "cancelled migration cannot resume" in resumed.stderr


def test_status_says_a_killed_run_is_interrupted_and_a_second_resume_is_refused(
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    """The run's row stays 'running' when its process is SIGKILLed: status asks whether
    the process that drives it lives, and says interrupted when it does not; `resume`
    then takes the run over, and is refused while that process still drives it."""
    box = edge_server_factory(start=False)
    box.configure(migrate={"retry_base_seconds": 600.0})
    box.add_peer("legacy", "LEGACY", 1, host=HOST, allow="find,move,store")

    proc = MigrateProcess(box.home, "start", "--from", "legacy", "--since", "20240301",
                          "--until", "20240301")
    resumed: MigrateProcess | None = None
    try:
        wait_until(lambda: day_attempted(box), "a first attempt", proc)  # retry in 600 s
        report = migrate_status(box)
        assert (report["state"], report["interrupted"], report["process"]) == (
            "running", False, proc.proc.pid)
        second = box.cli("migrate", "resume", check=False)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"is being driven by process {proc.proc.pid}" in second.stderr
        proc.kill()
        report = migrate_status(box)
        assert (report["state"], report["interrupted"], report["process"]) == (
            "running", True, None)
        assert "interrupted" in box.cli("migrate", "status").stdout
        resumed = MigrateProcess(box.home, "resume")
        wait_until(lambda: migrate_status(box)["process"] == resumed.proc.pid,
                   "the resumed process's claim", resumed)
        assert migrate_status(box)["interrupted"] is False
        box.cli("migrate", "pause")
        assert resumed.wait() == 0
    finally:
        for each in (proc, resumed):
            if each is not None and each.proc.poll() is None:
                each.kill()
    report = migrate_status(box)
    assert (report["state"], report["interrupted"], report["process"]) == ("paused", False, None)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_migration_of_a_few_hundred_studies_survives_kills(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer],
        legacy_factory: Callable[..., LegacyPacs]) -> None:
    files = make_archive(tmp_path / "archive", 300, busy_day_studies=60)
    box = edge_server_factory()
    box.configure(migrate={"retry_base_seconds": 0.2})
    legacy = legacy_factory(files, box=box)
    with FindLimitProxy(legacy.port, 20) as proxy:
        box.add_peer("legacy", legacy.ae_title, proxy.port, allow="find,move,store")
        run_with_kills(box, ["--from", "legacy", "--since", "2024-03-01", "--until",
                             "2024-03-03", "--query-limit", "20"], [40, 120, 220])
    assert box_digests(box.home) == Counter(dataset_digest(f.read_bytes()) for f in files)
    report = migrate_status(box)
    assert report["state"] == "done"
    assert report["studies"] == {"found": 300, "done": 300, "failed": 0, "remaining": 0}


# --- the walk's rules, without peers -------------------------------------------------

@pytest.mark.parametrize(("window", "now", "wait"), [
    ("", "12:00:00", 0.0),
    ("20:00-06:00", "21:30:00", 0.0),       # inside, before midnight
    ("20:00-06:00", "05:59:00", 0.0),       # inside, after midnight
    ("20:00-06:00", "06:00:00", 14 * 3600.0),  # closes at 06:00
    ("20:00-06:00", "19:59:30", 30.0),
    ("08:00-17:00", "17:30:00", 14.5 * 3600),
])
def test_window_says_how_long_until_it_opens(window: str, now: str, wait: float) -> None:
    from datetime import datetime

    from appliance.services.legacy_migration import Window

    at = datetime.strptime(f"2024-03-01 {now}", "%Y-%m-%d %H:%M:%S")
    assert Window(window).seconds_until_open(at) == wait


def test_throttle_spaces_study_starts_across_workers() -> None:
    from appliance.services.legacy_migration import Throttle

    clock = [100.0]
    throttle = Throttle(7200, clock=lambda: clock[0])  # one start every 0.5 s
    assert [throttle.slot() for _ in range(3)] == [0.0, 0.5, 1.0]
    clock[0] = 110.0  # idle for a while: no burst of saved-up starts beyond one
    assert [throttle.slot() for _ in range(2)] == [0.0, 0.5]
    assert Throttle(0, clock=lambda: 0.0).slot() == 0.0


def test_date_options_are_checked() -> None:
    from appliance.base.errors import MigrationError
    from appliance.services.legacy_migration import days_between

    assert days_between("2024-02-28", "20240301") == ["20240228", "20240229", "20240301"]
    with pytest.raises(MigrationError, match="after --until"):
        days_between("20240302", "20240301")
    with pytest.raises(MigrationError, match="is not a date"):
        days_between("yesterday", "20240301")


def _run_transitions() -> list[tuple[object, object, object]]:
    from appliance.store.migration_rows import RUN_STATES, RunState, RunTrigger

    return [(state, trigger, RUN_STATES.get((state, trigger)))
            for state in RunState for trigger in RunTrigger]


@pytest.mark.parametrize(("state", "trigger", "allowed"), _run_transitions())
def test_run_state_table_refuses_every_missing_pair(state: object, trigger: object,
                                                    allowed: object) -> None:
    from appliance.base.errors import MigrationError
    from appliance.store.migration_rows import next_run_state

    if allowed is None:
        with pytest.raises(MigrationError, match="cannot"):
            next_run_state(state, trigger)  # type: ignore[arg-type]
    else:
        assert next_run_state(state, trigger) is allowed  # type: ignore[arg-type]


async def test_a_retry_set_while_the_clock_was_ahead_is_due_once_it_is_corrected(
        tmp_path: Path) -> None:
    """A day and a study failed while the wall clock ran a year ahead: once NTP steps it
    back, both are due at once, not a year later; on the clock that set them, they
    still wait their 10 s backoff."""
    from appliance.base.errors import MigrationFailure
    from appliance.store import migration_rows as rows
    from appliance.store.index import Index
    from appliance.store.leases import Holder

    settings = rows.RunSettings(peer="old", via="move", since_day="20240301",
                                until_day="20240302", modalities=(), associations=1,
                                rate_per_hour=0, time_window="", query_limit=5)

    def fail_on_a_clock_ahead(conn: sqlite3.Connection) -> int:
        run = rows.create_run(conn, settings, ["20240301", "20240302"], driver=Holder.new())
        rows.list_day(conn, run, rows.UNDATED, [], 1)
        rows.list_day(conn, run, "20240302", [rows.FoundStudy("1.2", 1)], 1)
        rows.fail_day(conn, run, "20240301", MigrationFailure.UNREACHABLE, "down",
                      max_attempts=3, retry_base_seconds=10.0)
        [study] = rows.due_studies(conn, run, time.time(), 10)
        rows.study_failed(conn, study.id, MigrationFailure.RETRIEVE_FAILED, "down",
                          received=0, max_attempts=3, retry_base_seconds=10.0)
        return run

    async with Index(tmp_path / "index.sqlite3") as index:
        assert index.writer is not None
        run = await index.writer.submit_sync(fail_on_a_clock_ahead)
        with closing(sqlite3.connect(tmp_path / "index.sqlite3")) as conn:
            now = time.time()  # the clock that set them: due in 10 s
            assert rows.due_days(conn, run, now) == []
            assert rows.due_studies(conn, run, now, 10) == []
            corrected = now - 365 * 86400.0  # the clock put right: they were set a year ahead
            assert rows.due_days(conn, run, corrected) == ["20240301"]
            assert [s.study_uid for s in rows.due_studies(conn, run, corrected, 10)] == ["1.2"]


def test_a_split_day_keeps_the_untimed_studies_of_its_first_answers() -> None:
    """A day over the limit is listed by time ranges, which no study without a StudyTime
    matches; those the old PACS returned among the day's first answers are kept."""
    from appliance.services.legacy_migration import FindResult, StudyAnswer, _DayWalk
    from appliance.store.migration_rows import RunSettings

    def answer(uid: str, at: str) -> StudyAnswer:
        return StudyAnswer(uid, at, ("CT",), 1)

    studies = [answer("1.1", ""), answer("1.2", "081500"), answer("1.3", "093000"),
               answer("1.4", "101500"), answer("1.5", "")]

    class Peer:  # the C-FIND side of a LegacySession, with a result limit as PACS have
        def find_studies(self, day: str, *, time_range: str = "", modality: str = "",
                         limit: int = 0) -> FindResult:
            first, _, last = time_range.partition("-")
            found = [s for s in studies if not time_range
                     or (s.study_time and first <= s.study_time <= last)]
            return FindResult(found[:limit], len(found) >= limit)

    settings = RunSettings(peer="old", via="move", since_day="20240301", until_day="20240301",
                           modalities=(), associations=1, rate_per_hour=0, time_window="",
                           query_limit=3)
    listing = _DayWalk(Peer(), "20240301", settings).walk()  # type: ignore[arg-type]
    assert listing.queries == 25  # the day, then its 24 hours
    # 1.5 has no time and came after the limit: no query can find it (documented).
    assert sorted(f.study_uid for f in listing.studies) == ["1.1", "1.2", "1.3", "1.4"]


def _walk_peer(studies: list[tuple[str, str, str]]) -> object:
    """The C-FIND side of a LegacySession over (uid, StudyDate, StudyTime), with a result
    limit and dcmqrscp's matching: an empty key matches all, a range no empty value."""
    from appliance.services.legacy_migration import FindResult, StudyAnswer

    class Peer:
        def __init__(self) -> None:
            self.asked: list[str] = []  # the StudyDate keys, in order

        def find_studies(self, day: str, *, time_range: str = "", modality: str = "",
                         limit: int = 0) -> FindResult:
            self.asked.append(day)

            def matches(value: str, key: str) -> bool:
                first, dash, last = key.partition("-")
                return not key or (bool(value) and (first <= value <= last if dash
                                                    else value == key))

            found = [StudyAnswer(uid, at, ("CT",), 1) for uid, on, at in studies
                     if matches(on, day) and matches(at, time_range)]
            return FindResult(found[:limit], len(found) >= limit)

    return Peer()


def test_studies_without_a_date_are_found_by_what_only_a_query_for_all_dates_lists() -> None:
    """No key asks for an empty StudyDate: the studies that a query for all dates lists
    and one for every comparable date does not are those without one."""
    from appliance.services.legacy_migration import EVERY_DATE, _UndatedWalk
    from appliance.store.migration_rows import RunSettings

    settings = RunSettings(peer="old", via="move", since_day="20240301", until_day="20240301",
                           modalities=(), associations=1, rate_per_hour=0, time_window="",
                           query_limit=5)
    peer = _walk_peer([("1.1", "20240301", "101500"), ("1.2", "", "101500"),
                       ("1.3", "", ""), ("1.4", "19991231", "")])
    listing = _UndatedWalk(peer, settings).walk()  # type: ignore[arg-type]
    assert sorted(f.study_uid for f in listing.studies) == ["1.2", "1.3"]
    assert (listing.queries, listing.warning) == (2, "")
    assert peer.asked == ["", EVERY_DATE]  # type: ignore[attr-defined]


def test_studies_without_a_date_the_limit_hides_are_a_warning_not_a_failure() -> None:
    """Over the limit, all dates are listed by time ranges: an undated study in a minute
    that still reaches the limit, or without a StudyTime, cannot be listed; the listing
    is done with a warning that says so (it may hide none), the others are found."""
    from appliance.services.legacy_migration import _UndatedWalk
    from appliance.store.migration_rows import RunSettings

    settings = RunSettings(peer="old", via="move", since_day="20240301", until_day="20240301",
                           modalities=(), associations=1, rate_per_hour=0, time_window="",
                           query_limit=3)
    crowded = [(f"2.{n}", f"202403{n + 1:02d}", "101500") for n in range(3)]
    peer = _walk_peer([*crowded, ("1.1", "", "101500"), ("1.2", "", "083000"),
                       ("1.3", "", ""), ("1.4", "20240301", "083000")])
    listing = _UndatedWalk(peer, settings).walk()  # type: ignore[arg-type]
    assert [f.study_uid for f in listing.studies] == ["1.2"]
    assert "neither a StudyDate nor a StudyTime" in listing.warning
    assert "in 1 time ranges (first 10:15) were not listed" in listing.warning
    assert "or run with --modality" in listing.warning


def test_retrying_the_failures_of_a_run_done_without_any_says_there_are_none(
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    """`migrate resume --retry-failed` on a run that finished with nothing failed printed
    "0 failed days and studies will be tried again", then "is done" with the hint to run
    `migrate resume --retry-failed`: the command just run. It now says nothing failed and
    points at verify (found by an operator review of the migration procedure)."""
    box = edge_server_factory(start=False)
    box.cli("status", "--json")  # makes the index
    with closing(sqlite3.connect(box.home / "index.sqlite3")) as conn, conn:
        settings = migration_rows.RunSettings(
            peer="legacy", via="move", since_day="20240301", until_day="20240301",
            modalities=(), associations=1, rate_per_hour=0, time_window="", query_limit=500)
        driver = Holder.new()
        run_id = migration_rows.create_run(conn, settings, ["20240301"], driver=driver)
        conn.execute("UPDATE migration_days SET state = 'done' WHERE run_fk = ?", (run_id,))
        migration_rows.change_run(conn, run_id, migration_rows.RunTrigger.FINISH)
        migration_rows.release_run(conn, run_id, driver)
    retried = box.cli("migrate", "resume", "--retry-failed", check=False)
    assert retried.returncode == 2
    assert f"migration run {run_id} is done, with nothing failed" in retried.stderr
    assert "pacs-edge migrate verify" in retried.stderr
    assert "--retry-failed" not in retried.stderr + retried.stdout
