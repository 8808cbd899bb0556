"""`pacs-edge migrate` while the box's own `pacs-edge serve` is away.

A C-MOVE delivers to serve: while serve is stopped (an upgrade, a crash, a restart
under systemd) every move fails at once with failed sub-operations. Those failures
are the box's, not the studies': counted, they would use up every study's attempts
within minutes and end the run with the whole archive listed as failed. The
migration waits for the box's DICOM port instead and goes on when it answers.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import dcmtk
import dicomgen
import pydicom
import pydicom.config
from conftest import EdgeServer
from legacypacs import LegacyPacs
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)
from test_migrate import (
    RUN_TIMEOUT,
    SYNTAX_BY_CLASS,
    MigrateProcess,
    box_digests,
    dataset_digest,
    done_studies,
    legacy_factory,  # noqa: F401  (a fixture)
    make_archive,
    migrate_from,
    migrate_status,
    one_study,
    wait_until,
)

WAITING = "migration waiting for this box's DICOM port"


def box_not_serving(files: list[Path], edge_server_factory: Callable[..., EdgeServer],
                    make_legacy: Callable[..., LegacyPacs]) -> EdgeServer:
    """A box whose serve is not started (its configured DICOM port, which the migrate
    process probes, closed), and a legacy PACS holding `files` (the factory's: it
    stops it), allowed to each other."""
    box = edge_server_factory(start=False)
    box.port = dcmtk.free_port()
    box.configure(dicom={"port": box.port},
                  migrate={"retry_base_seconds": 0.05, "max_attempts": 2})
    legacy = make_legacy(files, box=box)
    box.add_peer("legacy", legacy.ae_title, legacy.port, allow="find,move,store")
    return box


def test_a_migration_waits_for_a_stopped_serve_instead_of_failing_its_studies(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer],
        legacy_factory: Callable[..., LegacyPacs]) -> None:  # noqa: F811
    files = make_archive(tmp_path / "archive", 4, busy_day_studies=0)
    box = box_not_serving(files, edge_server_factory, legacy_factory)

    proc = MigrateProcess(box.home, "start", "--from", "legacy", "--since", "20240301",
                          "--until", "20240303")
    try:
        wait_until(lambda: WAITING in proc.log.read_text(), "a wait for serve", proc)
        box.start()
        assert proc.wait() == 0, proc.log.read_text()[-4000:]
    finally:
        if proc.proc.poll() is None:
            proc.kill()
    assert box_digests(box.home) == Counter(dataset_digest(f.read_bytes()) for f in files)
    assert json.loads(box.cli("migrate", "failures", "--json").stdout) == []


def test_status_says_the_run_waits_for_serve_and_since_when(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer],
        legacy_factory: Callable[..., LegacyPacs]) -> None:  # noqa: F811
    """While the run waits for serve it finishes nothing: `migrate status`, from
    another terminal, must say it waits and since when, not look stalled."""
    files = make_archive(tmp_path / "archive", 1, busy_day_studies=0)
    box = box_not_serving(files, edge_server_factory, legacy_factory)

    before = time.time()
    proc = MigrateProcess(box.home, "start", "--from", "legacy", "--since", "20240301",
                          "--until", "20240303")
    try:
        wait_until(lambda: WAITING in proc.log.read_text(), "a wait for serve", proc)
        waiting = migrate_status(box)["waiting"]
        assert isinstance(waiting, dict), waiting
        assert waiting["for"] == "serve", waiting
        assert before <= waiting["since"] <= time.time(), waiting
        text = box.cli("migrate", "status").stdout
        assert "for pacs-edge serve (this box's DICOM port) since" in text, text
        box.start()
        assert proc.wait() == 0, proc.log.read_text()[-4000:]
    finally:
        if proc.proc.poll() is None:
            proc.kill()
    assert migrate_status(box)["waiting"] is None


def test_a_migration_waits_out_an_outage_of_the_legacy_pacs_without_counting_it(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer],
        legacy_factory: Callable[..., LegacyPacs]) -> None:  # noqa: F811
    """dcmqrscp is stopped mid-run (a study's C-MOVE may be cut short) and started
    again: the run waits for it, says so in its log and in `migrate status`, and
    ends with every study done at its first counted attempt."""
    files = make_archive(tmp_path / "archive", 6, busy_day_studies=0)
    box = edge_server_factory()
    box.configure(migrate={"retry_base_seconds": 0.05, "max_attempts": 2,
                           "legacy_probe_seconds": 0.2})
    legacy = legacy_factory(files, box=box)
    box.add_peer("legacy", legacy.ae_title, legacy.port, allow="find,move,store")

    proc = MigrateProcess(box.home, "start", "--from", "legacy", "--since", "20240301",
                          "--until", "20240303", "--associations", "1", "--rate", "3600")
    try:
        wait_until(lambda: done_studies(box.home) >= 2, "2 studies done", proc)
        legacy.stop()
        wait_until(lambda: (migrate_status(box).get("waiting") or {}).get("for") == "legacy",
                   "a wait for the legacy PACS", proc)
        text = " ".join(box.cli("migrate", "status").stdout.split())
        assert "waiting for the legacy PACS since" in text, text
        assert f"legacy PACS 'legacy' at 127.0.0.1:{legacy.port}" in text, text
        legacy.start()
        assert proc.wait() == 0, proc.log.read_text()[-4000:]
    finally:
        if proc.proc.poll() is None:
            proc.kill()
    assert "migration waiting for the legacy PACS to accept associations" in (
        proc.log.read_text())
    assert box_digests(box.home) == Counter(dataset_digest(f.read_bytes()) for f in files)
    with closing(sqlite3.connect(box.home / "index.sqlite3")) as conn:
        assert conn.execute("SELECT state, MAX(attempts), COUNT(*) FROM migration_studies"
                            " GROUP BY state").fetchall() == [("done", 1, 6)]


def test_a_legacy_pacs_without_c_echo_is_not_waited_for_for_ever_after_an_abort(
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    """A legacy PACS that serves Study Root C-FIND and C-MOVE but not Verification
    aborts one C-MOVE: the run waits for it and goes on when it answers. The wait asked
    with a Verification association, which this PACS never accepts: it waited for ever."""
    moves: list[float] = []
    legacy = AE("NOECHO")
    legacy.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    legacy.add_supported_context(StudyRootQueryRetrieveInformationModelMove)

    def move(event: evt.Event) -> Iterator[tuple[int | None, Dataset | None]]:
        moves.append(time.monotonic())
        if len(moves) == 1:  # a glitch: the first C-MOVE's association is aborted
            threading.Timer(0.2, event.assoc.abort).start()
            time.sleep(1)
        yield None, None  # the box as an unknown destination: 0xA801

    _, result = migrate_from(
        legacy, lambda _box: [(evt.EVT_C_FIND, one_study(dicomgen.UID_ROOT + "77.2")),
                              (evt.EVT_C_MOVE, move)],
        edge_server_factory, migrate={"retry_base_seconds": 0.05, "max_attempts": 2,
                                      "legacy_probe_seconds": 0.2}, timeout=90)
    # It went on after the wait: the second C-MOVE came, answered 0xA801 (this box is
    # no destination there), which pauses the run for the operator.
    assert len(moves) == 2, result.stdout + result.stderr
    assert result.returncode == 2 and "0xA801" in result.stderr, result.stderr


def test_the_progress_bar_says_the_run_waits_for_serve(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer],
        legacy_factory: Callable[..., LegacyPacs]) -> None:  # noqa: F811
    """On the operator's terminal, `migrate start` draws a progress bar instead of log
    lines: while it waits for serve, the bar must say so, not just stand still."""
    files = make_archive(tmp_path / "archive", 1, busy_day_studies=0)
    box = box_not_serving(files, edge_server_factory, legacy_factory)

    proc = MigrateProcess(box.home, "start", "--from", "legacy", "--since", "20240301",
                          "--until", "20240303", terminal=True)
    try:
        wait_until(lambda: WAITING in proc.log.read_text(), "a wait for serve", proc)
        deadline = time.monotonic() + 10.0  # the bar is redrawn every 0.5 s
        while "waiting for pacs-edge serve (this box's DICOM port) since" not in (
                proc.log.read_text(errors="replace")):
            assert time.monotonic() < deadline, proc.log.read_text()[-2000:]
            time.sleep(0.1)
        box.start()
        assert proc.wait() == 0, proc.log.read_text()[-4000:]
    finally:
        if proc.proc.poll() is None:
            proc.kill()


def test_the_end_of_a_run_is_in_the_audit_trail_with_its_counts(
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    """The archive answers nowhere: the run ends with its day failed, and the audit
    trail says how it ended, next to the record of its start."""
    box = edge_server_factory(start=False)
    box.configure(migrate={"retry_base_seconds": 0.05, "max_attempts": 1})
    box.add_peer("legacy", "LEGACY", 1, allow="find,move,store")
    result = box.cli("migrate", "start", "--from", "legacy", "--since", "20240301",
                     "--until", "20240301", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    trail = (box.home / "audit" / "audit.log").read_text(encoding="utf-8")
    assert "migration run 1 started from peer legacy" in trail
    assert ("migration run 1 done: 0 studies done, 0 failed, 0 remaining of 0 found;"
            " 0 of 0 instances in the box; days failed 1") in trail


def test_a_study_with_an_instance_the_box_refuses_fails_saying_where_the_reason_is(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer],
        legacy_factory: Callable[..., LegacyPacs]) -> None:  # noqa: F811
    """The legacy archive holds an instance whose SOP Instance UID has letters: the box
    refuses it (0xC000); the study fails with failed sub-operations, and the failure
    says where the box's reason is, which is there."""
    files = make_archive(tmp_path / "archive", 1, busy_day_studies=0)
    bad = pydicom.dcmread(files[-1])
    with pydicom.config.disable_value_validation():
        del bad["SOPInstanceUID"]
        bad.SOPInstanceUID = dicomgen.UID_ROOT + "abc.1"
        del bad.file_meta.MediaStorageSOPInstanceUID
        bad.file_meta.MediaStorageSOPInstanceUID = bad.SOPInstanceUID
        dicomgen.write_instance(bad, files[-1], SYNTAX_BY_CLASS[str(bad.SOPClassUID)])
    box = edge_server_factory()
    box.configure(migrate={"retry_base_seconds": 0.05, "max_attempts": 1})
    legacy = legacy_factory(files, box=box)
    box.add_peer("legacy", legacy.ae_title, legacy.port, allow="find,move,store")
    result = box.cli("migrate", "start", "--from", "legacy", "--since", "20240301",
                     "--until", "20240303", check=False, timeout=RUN_TIMEOUT)
    assert result.returncode == 1, result.stdout + result.stderr
    [failure] = json.loads(box.cli("migrate", "failures", "--json").stdout)
    assert failure["last_error"].startswith(f"1 of {len(files)} instances not in the box")
    assert "pacs-edge serve's log (`store refused`" in failure["last_error"], failure
    assert (f"store refused: cannot understand reason=SOPInstanceUID is not a valid UID"
            f" calling={legacy.ae_title}") in box.log()


def test_an_association_that_idled_out_while_waiting_for_the_rate_is_opened_again(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer],
        legacy_factory: Callable[..., LegacyPacs]) -> None:  # noqa: F811
    """With `--rate`, a worker waits for its slot holding its association; silence
    longer than [dicom] network_timeout (1 s here, 60 s by default: any rate under
    240 studies an hour with 4 associations, and every `--window` pause) closes it.
    The next study must go on a new association, not crash the run nor fail."""
    files = make_archive(tmp_path / "archive", 4, busy_day_studies=0)
    box = edge_server_factory()
    box.configure(dicom={"network_timeout": 1.0},  # read by the migrate process
                  migrate={"retry_base_seconds": 0.05, "max_attempts": 1})
    legacy = legacy_factory(files, box=box)
    box.add_peer("legacy", legacy.ae_title, legacy.port, allow="find,move,store")
    result = box.cli("migrate", "start", "--from", "legacy", "--since", "20240301", "--until",
                     "20240303", "--associations", "1", "--rate", "1200", check=False,
                     timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 studies done, 0 failed" in result.stdout
    assert box_digests(box.home) == Counter(dataset_digest(f.read_bytes()) for f in files)
