"""The SQLite index: what is stored, where, and in which tiering state.

All writes go through the group-committing Writer (see database.py); reads
use a separate connection so a C-FIND never waits behind a commit. Counts
(instances per series and study, series per study, bytes) are maintained in
the same transaction as the instance row, so completeness survives restarts.
"""

from __future__ import annotations

import contextlib
import enum
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from appliance.base.errors import IndexUnavailable
from appliance.store import amendments, database, hierarchy, tiering
from appliance.store.instance_header import InstanceHeader
from appliance.store.sync_passes import first_failure


class RecordOutcome(enum.Enum):
    NEW = "new"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same dataset bytes: nothing changed
    NEW_VERSION = "new_version"  # same SOP Instance UID, different bytes: old kept as version


@dataclass(frozen=True)
class Recorded:
    """What recording an instance did. `other_patient`: the instance names another
    patient than the one its study is filed under; `study_moved`: every current
    instance of the study now names that patient, so the study was filed under it.
    `left_study_moved`: the UID of the study its earlier content was in (it was sent
    again under another Study Instance UID), when every instance left there names
    one other patient, so that study was filed under it; else ""."""

    outcome: RecordOutcome
    other_patient: bool = False
    study_moved: bool = False
    left_study_moved: str = ""


@dataclass(frozen=True)
class MadeWay:
    """What make_way did: the outcome, and the study of the row it superseded (None
    when there was none)."""

    outcome: RecordOutcome
    left_study_fk: int | None = None


@dataclass(frozen=True)
class StoredFile:
    """Where and what an instance file is (path relative to the store root)."""

    path: str
    size: int
    dataset_offset: int
    sha256: str
    received_at: float
    source_ae: str = ""


@dataclass(frozen=True)
class InstanceLocation:
    """What a retrieve needs to send one instance."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str
    size: int
    sha256: str
    tier_state: str


@dataclass(frozen=True)
class IndexTotals:
    patients: int
    studies: int
    series: int
    instances: int
    bytes: int  # of every indexed instance, evicted ones included
    versions: int
    local_bytes: int  # of the files on local disk: current instances' and prior versions'
    tier_states: dict[str, int]


@dataclass(frozen=True)
class HeldCopy:
    """The current row of an instance sent again with the same content."""

    is_local: bool  # its file is on local disk (else its copy is a pack in the cloud)
    path: str
    size: int
    dataset_offset: int


# Paths per lookup by path: SQLite's default limit of bound parameters is 32,766.
PATHS_PER_QUERY = 500
# The same content of an instance is stored already, unless the only copy of it is a
# pack a scrub found damaged: sent again, it is stored and uploaded anew (make_way).
_IDENTICAL_SQL = (
    "SELECT i.is_local, i.path, i.size, i.dataset_offset FROM instances i"
    " WHERE i.sop_uid = ? AND i.sha256 = ?"
    " AND NOT (i.is_local = 0 AND EXISTS (SELECT 1 FROM packs p"
    " WHERE p.id = i.pack_fk AND p.scrub_state = 'damaged'))")


def unusable_index(path: Path, exc: sqlite3.DatabaseError) -> IndexUnavailable:
    """The operator's error for an index SQLite cannot open or read: its disk full,
    locked or unopenable (permissions), or damaged (not a database, malformed)."""
    if isinstance(exc, sqlite3.OperationalError) and database.is_no_space(exc):
        return IndexUnavailable(
            f"the index {path} cannot be opened: no space left on its disk",
            hint="free space on the data home's disk; serve and the sync agent"
            " open the index once there is room")
    if isinstance(exc, sqlite3.OperationalError):
        return IndexUnavailable(f"the index {path} cannot be opened: {exc}",
                                hint="check the data home's disk and permissions")
    return IndexUnavailable(
        f"the index {path} is damaged: {exc}",
        hint="stop serve and sync and move the file away; `pacs-edge restore`,"
        " then `pacs-edge fsck --repair`, rebuild it from the cloud copies and the"
        " store (docs/operator-guide.md, \"A lost or damaged index\")")


class Index:
    """Async facade over the index database of one data home."""

    def __init__(self, path: Path, *, commit_window_ms: float = 0.0) -> None:
        self.path = path
        self._window = commit_window_ms
        self._writer_conn: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self.writer: database.Writer | None = None
        self._thread_readers: _ThreadReaders | None = None

    async def open(self) -> None:
        """Connect and migrate. IndexUnavailable when SQLite cannot open the file as an
        index (damaged, not a database); whatever was opened is closed again, so a
        failed open leaves no connection thread behind to keep the process alive."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._writer_conn = await database.connect(self.path)
            await database.migrate(self._writer_conn, self.path)
            self._reader = await database.connect(self.path)
        except BaseException as exc:
            await self.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise unusable_index(self.path, exc) from exc
            raise
        self.writer = database.Writer(self._writer_conn, window_ms=self._window)
        self.writer.start()
        self._thread_readers = _ThreadReaders(self.path)

    async def close(self) -> None:
        if self.writer is not None:
            await self.writer.stop()
        if self._thread_readers is not None:
            self._thread_readers.close()
            self._thread_readers = None
        for conn in (self._reader, self._writer_conn):
            if conn is not None:
                await conn.close()
        self._reader = self._writer_conn = None

    async def __aenter__(self) -> Index:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise RuntimeError("index is not open")
        return self._reader

    # --- ingest -----------------------------------------------------------------


    async def record_instance(self, header: InstanceHeader, stored: StoredFile) -> Recorded:
        """Commit the instance row (and its patient/study/series); durable on return."""
        assert self.writer is not None
        return await self.writer.submit_sync(lambda conn: _record(conn, header, stored))

    # Blocking calls for a thread that is not the event loop's (a DIMSE association's):
    # no hop through the loop on the C-STORE critical path.

    def held_copy_blocking(self, sop_uid: str, sha256: str) -> HeldCopy | None:
        """The current row of `sop_uid` if it holds content `sha256` (see _IDENTICAL_SQL)."""
        readers = self._thread_readers
        if readers is None:
            raise RuntimeError("index is not open")
        with readers.borrow() as conn:
            row = database.query_one(
                conn, _IDENTICAL_SQL, (sop_uid, sha256))
        return None if row is None else HeldCopy(bool(row[0]), row[1], row[2], row[3])

    def restored_file_blocking(self, sop_uid: str, path: str, size: int,
                               dataset_offset: int) -> None:
        """The file at `path` of the current row of `sop_uid` was written again (lost or
        damaged, its content sent again): record its size and dataset offset, which a
        File Meta written by another path (C-STORE, drop folder) may have changed."""
        if self.writer is None:
            raise RuntimeError("index is not open")
        self.writer.commit_blocking(lambda conn: conn.execute(
            "UPDATE instances SET size = ?, dataset_offset = ? WHERE sop_uid = ? AND path = ?",
            (size, dataset_offset, sop_uid, path)))

    def record_instance_blocking(self, header: InstanceHeader, stored: StoredFile, *,
                                 placed_at: str) -> Recorded | None:
        """`record_instance` in the calling thread's group commit (Writer.commit_blocking),
        for the file the caller placed at `placed_at` (absolute); None, recording
        nothing, when that file is no longer there.

        Ingest takes no lease, and the name it placed may be one the sync agent is
        deleting: a file it kept (content sent again: X, Y, X), or one it made where a
        deletion had been decided. So the file is looked for inside the write
        transaction, as the agent decides and deletes inside one
        (tier_steps.drop_unneeded_files): a deletion ordered before this commit took
        the file, and the caller places it again; one ordered after sees this row,
        which marks the file local, and keeps it."""
        if self.writer is None:
            raise RuntimeError("index is not open")
        recorded: Recorded | None = self.writer.commit_blocking(
            lambda conn: _record(conn, header, stored) if os.path.lexists(placed_at)
            else None)
        return recorded

    # --- retrieve ---------------------------------------------------------------

    async def locate(
        self,
        *,
        study_uids: Sequence[str] = (),
        series_uids: Sequence[str] = (),
        sop_uids: Sequence[str] = (),
        patient_ids: Sequence[str] = (),
        issuers: Sequence[str] = (),
    ) -> list[InstanceLocation]:
        """Instances matching every non-empty UID/ID list (a C-MOVE/C-GET identifier)."""
        where, params = [], []
        for column, values in (
            ("p.patient_id", patient_ids),
            ("p.issuer", issuers),
            ("st.study_uid", study_uids),
            ("se.series_uid", series_uids),
            ("i.sop_uid", sop_uids),
        ):
            if values:
                where.append(f"{column} IN ({','.join('?' * len(values))})")
                params.extend(values)
        if not where:
            return []
        rows = await self._rows(
            "SELECT st.study_uid, se.series_uid, i.sop_uid, i.sop_class_uid, i.transfer_syntax,"
            " i.path, i.size, i.sha256, st.tier_state"
            " FROM instances i JOIN series se ON i.series_fk = se.id"
            " JOIN studies st ON se.study_fk = st.id JOIN patients p ON st.patient_fk = p.id"
            f" WHERE {' AND '.join(where)}"
            " ORDER BY st.study_uid, se.series_number, se.series_uid, i.instance_number, i.sop_uid",
            params,
        )
        return [InstanceLocation(*row) for row in rows]

    async def syntax_counts(self) -> dict[tuple[str, str], int]:
        """(SOP class, transfer syntax) -> number of current instances stored so (kept by
        triggers: migration 0023)."""
        rows = await self._rows("SELECT sop_class_uid, transfer_syntax, instance_count"
                                " FROM stored_syntaxes WHERE instance_count > 0")
        return {(sop_class, syntax): count for sop_class, syntax, count in rows}

    async def touch_studies(self, study_uids: Sequence[str]) -> None:
        """Record an access (retrieve) for eviction's least-recently-used order."""
        if not study_uids:
            return
        assert self.writer is not None
        now = time.time()
        marks = ",".join("?" * len(study_uids))

        async def touch(conn: aiosqlite.Connection) -> None:
            await conn.execute(
                f"UPDATE studies SET last_access_at = ? WHERE study_uid IN ({marks})",
                (now, *study_uids),
            )

        await self.writer.submit(touch)

    # --- status and fsck --------------------------------------------------------

    async def totals(self) -> IndexTotals:
        """What the index holds, counted as C-FIND answers it: studies that hold an
        instance (one whose every instance was sent again into another study keeps
        its row), and patients with such a study."""
        row = await self._row(
            "SELECT (SELECT COUNT(*) FROM patients p WHERE EXISTS (SELECT 1 FROM studies x"
            " WHERE x.patient_fk = p.id AND x.instance_count > 0)),"
            " (SELECT COUNT(*) FROM studies WHERE instance_count > 0),"
            " (SELECT COUNT(*) FROM series), (SELECT COUNT(*) FROM instances),"
            " (SELECT COALESCE(SUM(size), 0) FROM instances),"
            " (SELECT COUNT(*) FROM instance_versions),"
            " (SELECT COALESCE(SUM(size), 0) FROM instances WHERE is_local = 1)"
            " + (SELECT COALESCE(SUM(size), 0) FROM instance_versions WHERE is_local = 1)"
        )
        assert row is not None
        states = await self._rows(
            "SELECT tier_state, COUNT(*) FROM studies WHERE instance_count > 0"
            " GROUP BY tier_state ORDER BY tier_state"
        )
        return IndexTotals(*row, tier_states={state: count for state, count in states})

    async def sync_summary(self) -> dict[str, Any]:
        """Bytes not yet in any pack, when the last successful sync pass ended, why the
        latest pass failed ("" when it did not), the last scrub, and the packs a scrub
        found damaged that are the only copy of some instances (by blob name: a keyed
        hash, no PHI), i.e. the studies at risk."""
        row = await self._row(
            "SELECT (SELECT COALESCE(SUM(size), 0) FROM instances"
            "        WHERE pack_fk IS NULL AND is_local = 1),"
            # The latest pass, not the greatest time: one stamped before the clock
            # stepped back would hide a silent agent for as long as the step.
            " (SELECT finished_at FROM sync_passes WHERE ok = 1 ORDER BY id DESC LIMIT 1),"
            " (SELECT MAX(scrubbed_at) FROM packs),"
            " (SELECT summary FROM sync_passes WHERE ok = 0"
            "        AND id = (SELECT MAX(id) FROM sync_passes))"
        )
        assert row is not None
        at_risk = await self._rows(
            "SELECT p.pack_name, p.study_fk FROM packs p WHERE p.scrub_state = 'damaged'"
            " AND EXISTS (SELECT 1 FROM instances i WHERE i.pack_fk = p.id AND i.is_local = 0)"
            " ORDER BY p.pack_name")
        return {"bytes_waiting_to_replicate": row[0], "last_successful_pass_at": row[1],
                "last_pass_error": first_failure(row[3]), "last_scrub_at": row[2],
                "studies_at_risk": len({r[1] for r in at_risk}),
                "at_risk_packs": [r[0] for r in at_risk]}

    async def local_paths(self) -> set[str]:
        """Every file path a row says must be on local disk (current instances and prior
        versions marked local): as many as the store holds files, however many evicted
        rows (only in the cloud) the index has gathered."""
        rows = await self._rows(
            "SELECT path FROM instances WHERE is_local = 1"
            " UNION ALL SELECT path FROM instance_versions WHERE is_local = 1")
        return {str(row[0]) for row in rows}

    async def local_contents(self, *, versions: bool, after: int = 0, limit: int = 1000
                             ) -> list[tuple[int, str, str]]:
        """A page of the files rows say are on local disk, current instances' or (with
        `versions`) prior versions': (row id, path, dataset SHA-256) in id order after
        `after`. Pages, not all at once: the content check reads a store of millions
        of files."""
        table = "instance_versions" if versions else "instances"
        rows = await self._rows(
            f"SELECT id, path, sha256 FROM {table} WHERE is_local = 1 AND id > ?"
            " ORDER BY id LIMIT ?", (after, limit))
        return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]

    async def unknown_paths(self, paths: Sequence[str]) -> list[str]:
        """Those of `paths` that no row names, local or not, current or prior version:
        files without an index row, looked up by path."""
        known = await self._paths_among(
            paths, "SELECT path FROM instances WHERE path IN ({marks})"
                   " UNION ALL SELECT path FROM instance_versions WHERE path IN ({marks})")
        return [path for path in paths if path not in known]

    async def _paths_among(self, paths: Sequence[str], sql: str) -> set[str]:
        """The paths `sql` returns for `paths`, asked PATHS_PER_QUERY at a time: `sql`
        names the chunk twice, as {marks} (the current and the prior versions)."""
        found: set[str] = set()
        for start in range(0, len(paths), PATHS_PER_QUERY):
            chunk = list(paths[start:start + PATHS_PER_QUERY])
            rows = await self._rows(sql.format(marks=",".join("?" * len(chunk))),
                                    (*chunk, *chunk))
            found.update(str(row[0]) for row in rows)
        return found

    async def record_version(self, sop_uid: str, stored: StoredFile, transfer_syntax: str) -> None:
        """Adopt a file as a prior version of `sop_uid` (fsck of a superseded file)."""
        assert self.writer is not None

        async def insert(conn: aiosqlite.Connection) -> None:
            await conn.execute(
                "INSERT OR IGNORE INTO instance_versions (sop_uid, path, size, sha256,"
                " transfer_syntax, received_at, superseded_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (sop_uid, stored.path, stored.size, stored.sha256, transfer_syntax,
                 stored.received_at, time.time()),
            )

        await self.writer.submit(insert)

    # --- named reads for fsck, status and commands -----------------------------------

    async def current_content(self, sop_uid: str) -> tuple[str, float] | None:
        """The dataset hash and receipt time of the current version of `sop_uid`; None
        when it is not indexed (fsck adopts a file as the instance, or as a prior version
        when the hash differs and the file is older)."""
        row = await self._row("SELECT sha256, received_at FROM instances WHERE sop_uid = ?",
                              (sop_uid,))
        return None if row is None else (str(row[0]), float(row[1]))

    async def instance_count_from(self, source_ae: str) -> int:
        """Current instances whose recorded source is `source_ae` (e.g. the drop folder)."""
        count = await self._value("SELECT COUNT(*) FROM instances WHERE source_ae = ?",
                                  (source_ae,))
        return int(count or 0)

    async def pack_count(self) -> int:
        """Packs the index records, in any state: cloud objects wrapped with the site key."""
        return int(await self._value("SELECT COUNT(*) FROM packs") or 0)

    async def _value(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first column of the first row of `sql` on the reader, or None; one hop."""
        return await database.run_sync(self.reader, _scalar, sql, params)

    async def _row(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        """The first row of `sql` on the reader, or None; one hop."""
        return await database.run_sync(self.reader, database.query_one, sql, params)

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Every row of `sql` on the reader; one hop."""
        return await database.run_sync(self.reader, _all, sql, params)


class _ThreadReaders:
    """Read-only connections lent to threads that are not the event loop's, one at a
    time each; opened on first need, closed with the index."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._closed = False

    @contextlib.contextmanager
    def borrow(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise RuntimeError("index is not open")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True,
                                   isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {database.BUSY_TIMEOUT_MS}")
        try:
            yield conn
        finally:
            with self._lock:
                keep = not self._closed
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _all(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
    cur = conn.execute(sql, params)
    try:
        return cur.fetchall()
    finally:
        cur.close()


def _scalar(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> Any:
    row = database.query_one(conn, sql, params)
    return row[0] if row else None


def needed_locally(conn: sqlite3.Connection, paths: Sequence[str]) -> set[str]:
    """Which of `paths` (at most PATHS_PER_QUERY) a row marked local names, current or
    prior version: files that a deletion of non-local files (evict, a failed recall)
    must leave alone."""
    marks = ",".join("?" * len(paths))
    return {str(row[0]) for row in conn.execute(
        f"SELECT path FROM instances WHERE is_local = 1 AND path IN ({marks})"
        f" UNION SELECT path FROM instance_versions WHERE is_local = 1 AND path IN ({marks})",
        (*paths, *paths))}


def _record(conn: sqlite3.Connection, h: InstanceHeader, stored: StoredFile) -> Recorded:
    """Insert one instance and its patient/study/series, in the writer's thread
    (Writer.submit_sync: the whole transaction is one hop from the event loop).

    A study is filed under the patient of its first instance. An instance of it that
    names another patient joins the study there, its row keeping the patient it
    names (migration 0030), and the caller is told (Recorded.other_patient): a
    Patient ID corrected at the modality, or an instance put into the wrong study,
    is never silent. Once every current instance of the study names that patient
    (the corrected study sent again whole), the study moves to it
    (_follow_instances). So does the study that earlier content of the instance
    left, when it was sent again under another Study Instance UID (_follow_the_rest)."""
    way = make_way(conn, h.sop_uid, stored.sha256, stored.path, stored.received_at)
    outcome = way.outcome
    if outcome is RecordOutcome.DUPLICATE:
        return Recorded(outcome)

    # Upserts return the row id (and the series' count, which says whether the
    # series is new), so the common case is five statements.
    now = stored.received_at
    # An ID that a patient merge (ADT^A40) made obsolete joins the surviving patient.
    patient = hierarchy.current_patient(conn, h)
    filed = hierarchy.study_patient(conn, h.study_uid)
    other_fk = None
    if filed is None:
        patient_fk = hierarchy.upsert_patient(conn, patient)
    else:
        patient_fk = filed[0]
        if not hierarchy.same_patient(patient, filed[1]):
            other_fk = hierarchy.upsert_patient(conn, patient)
    study_fk = hierarchy.upsert_study(
        conn, patient_fk, h, instances=1, size=stored.size, first_received_at=now,
        last_received_at=now, last_access_at=now, tier_state=tiering.TierState.LOCAL,
        tier_changed_at=now)
    # New content for a study the cloud already holds: it needs a new pack version.
    tiering.apply_sync(conn, study_fk, tiering.Trigger.NEW_INSTANCE)
    series_fk, series_instances = hierarchy.upsert_series(conn, study_fk, h, instances=1)
    if series_instances == 1:
        conn.execute(
            "UPDATE studies SET series_count = series_count + 1 WHERE id = ?", (study_fk,)
        )
    hierarchy.put_instance(conn, series_fk, h, stored, other_patient_fk=other_fk)
    hierarchy.count_sop_class(conn, study_fk, h.sop_class_uid, +1)
    left_moved = ""
    if way.left_study_fk not in (None, study_fk):
        amendments.withdraw(conn, way.left_study_fk, h.sop_uid, now)
        left_moved = _follow_the_rest(conn, way.left_study_fk)
    if other_fk is None:
        return Recorded(outcome, left_study_moved=left_moved)
    return Recorded(outcome, other_patient=True,
                    study_moved=_follow_instances(conn, study_fk, other_fk),
                    left_study_moved=left_moved)


def _follow_the_rest(conn: sqlite3.Connection, study_fk: int) -> str:
    """An instance left the study for another one: if each instance still in it names
    one and the same patient other than the study's, the study follows them
    (_follow_instances), as it would have had the one that left been corrected too.
    Returns the study's UID when it moved, else ""."""
    row = database.query_one(
        conn, "SELECT st.study_uid, st.instance_count, COUNT(i.patient_fk),"
        " MIN(i.patient_fk), MAX(i.patient_fk) FROM studies st"
        " JOIN series se ON se.study_fk = st.id JOIN instances i ON i.series_fk = se.id"
        " WHERE st.id = ? GROUP BY st.id", (study_fk,))
    if row is None or row[2] < row[1] or row[3] != row[4]:
        return ""  # empty, or some instance names its patient, or two others are named
    _move_study(conn, study_fk, row[3])
    return str(row[0])


def _follow_instances(conn: sqlite3.Connection, study_fk: int, other_fk: int) -> bool:
    """File the study under `other_fk` if every current instance of it names that
    patient; True when it did."""
    naming = _scalar(
        conn, "SELECT COUNT(*) FROM instances i JOIN series se ON se.id = i.series_fk"
        " WHERE i.patient_fk = ? AND se.study_fk = ?", (other_fk, study_fk))
    if naming < _scalar(conn, "SELECT instance_count FROM studies WHERE id = ?", (study_fk,)):
        return False
    _move_study(conn, study_fk, other_fk)
    return True


def _move_study(conn: sqlite3.Connection, study_fk: int, patient_fk: int) -> None:
    """File the study under `patient_fk`, which its instances name: they name their
    study's patient now. The patient it leaves goes if nothing else is theirs."""
    conn.execute("UPDATE instances SET patient_fk = NULL WHERE patient_fk = ? AND series_fk IN"
                 " (SELECT id FROM series WHERE study_fk = ?)", (patient_fk, study_fk))
    hierarchy.refile_study(conn, study_fk, patient_fk)


# What _supersede reads of the current row it moves to instance_versions.
_SUPERSEDED_COLUMNS = (
    "i.id, i.series_fk, i.sop_class_uid, i.path, i.size, i.sha256, i.transfer_syntax,"
    " i.received_at, i.pack_fk, i.pack_offset, i.pack_length, i.is_local, i.patient_fk")


def make_way(conn: sqlite3.Connection, sop_uid: str, sha256: str, path: str,
             now: float) -> MadeWay:
    """Prepare for content `sha256` of `sop_uid`, whose file is `path`, to become the
    current instance (the caller inserts its row unless DUPLICATE is returned).

    DUPLICATE: that content is current already (and has a copy that is not a damaged
    pack's: see _only_copy_damaged). Otherwise the current row, if any,
    moves to instance_versions (NEW_VERSION), where it keeps its pack location and
    locality; and a prior version of this same content (sent again after a
    correction: X, Y, X) leaves instance_versions, since the new current row names
    its file. So a path is named by one row at most, in either table: eviction,
    which deletes the files of current rows, never deletes a prior version's."""
    existing = database.query_one(
        conn, f"SELECT {_SUPERSEDED_COLUMNS} FROM instances i WHERE i.sop_uid = ?", (sop_uid,))
    outcome, left_study_fk = RecordOutcome.NEW, None
    if existing is not None:
        if existing["sha256"] == sha256 and not _only_copy_damaged(conn, existing):
            return MadeWay(RecordOutcome.DUPLICATE)
        left_study_fk = _supersede(conn, existing, sop_uid, now)
        if existing["sha256"] != sha256:
            outcome = RecordOutcome.NEW_VERSION
    conn.execute("DELETE FROM instance_versions WHERE path = ?", (path,))
    return MadeWay(outcome, left_study_fk)


def _only_copy_damaged(conn: sqlite3.Connection, row: sqlite3.Row) -> bool:
    """Whether the instance's only copy is a pack a scrub found damaged: the same content
    sent again then replaces the row (local, in no pack: uploaded anew), which ends the
    study's risk, instead of being taken for a duplicate."""
    return not row["is_local"] and row["pack_fk"] is not None and database.query_one(
        conn, "SELECT 1 FROM packs WHERE id = ? AND scrub_state = 'damaged'",
        (row["pack_fk"],)) is not None


def newer_in_another_study(conn: sqlite3.Connection, sop_uid: str, study_fk: int,
                           received_at: float) -> bool:
    """Whether the current row of `sop_uid` is in another study than `study_fk` and was
    received after `received_at`: content restore must keep as a prior version, since
    versions of different studies are restored in no particular order."""
    row = database.query_one(
        conn, "SELECT se.study_fk, i.received_at FROM instances i"
        " JOIN series se ON se.id = i.series_fk WHERE i.sop_uid = ?", (sop_uid,))
    return row is not None and row[0] != study_fk and row[1] > received_at


def withdraw_current(conn: sqlite3.Connection, sop_uid: str, study_fk: int, now: float) -> None:
    """Restore of a version that withdraws `sop_uid` from study `study_fk`: its current
    row there, if it is there, becomes a prior version (store/amendments.py)."""
    existing = database.query_one(
        conn, f"SELECT {_SUPERSEDED_COLUMNS} FROM instances i JOIN series se"
        " ON se.id = i.series_fk WHERE i.sop_uid = ? AND se.study_fk = ?", (sop_uid, study_fk))
    if existing is not None:
        _supersede(conn, existing, sop_uid, now)


def add_prior_version(conn: sqlite3.Connection, sop_uid: str, *, path: str, size: int,
                      sha256: str, transfer_syntax: str, received_at: float,
                      superseded_at: float, pack_fk: int | None, pack_offset: int | None,
                      pack_length: int | None, is_local: bool) -> None:
    """A row of instance_versions: content of `sop_uid` that is not (or no longer) current,
    at `path` when `is_local`, in its pack when it has one."""
    conn.execute(
        "INSERT INTO instance_versions (sop_uid, path, size, sha256, transfer_syntax,"
        " received_at, superseded_at, pack_fk, pack_offset, pack_length, is_local)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (sop_uid, path, size, sha256, transfer_syntax, received_at, superseded_at, pack_fk,
         pack_offset, pack_length, int(is_local)),
    )


def _supersede(conn: sqlite3.Connection, old: sqlite3.Row, sop_uid: str, now: float) -> int:
    """Move the current row of `sop_uid` to instance_versions and undo its counts;
    returns the id of the study it was in."""
    add_prior_version(conn, sop_uid, path=old["path"], size=old["size"], sha256=old["sha256"],
                      transfer_syntax=old["transfer_syntax"], received_at=old["received_at"],
                      superseded_at=now, pack_fk=old["pack_fk"], pack_offset=old["pack_offset"],
                      pack_length=old["pack_length"], is_local=bool(old["is_local"]))
    conn.execute("DELETE FROM instances WHERE id = ?", (old["id"],))
    if old["patient_fk"] is not None:  # it named another patient than its study's
        hierarchy.drop_patient_if_unused(conn, old["patient_fk"])
    series_fk = old["series_fk"]
    study_fk = _scalar(conn, "SELECT study_fk FROM series WHERE id = ?", (series_fk,))
    conn.execute(
        "UPDATE series SET instance_count = instance_count - 1 WHERE id = ?", (series_fk,)
    )
    conn.execute(
        "UPDATE studies SET instance_count = instance_count - 1, total_bytes = total_bytes - ?"
        " WHERE id = ?",
        (old["size"], study_fk),
    )
    hierarchy.count_sop_class(conn, study_fk, old["sop_class_uid"], -1)
    # A series goes with its last row. Its rows, not its count: restore counts only
    # after a whole version (hierarchy.recount_study), so while it puts a version that
    # sends a series again whole, the count says empty with the version's rows in it.
    if database.query_one(conn, "SELECT 1 FROM instances WHERE series_fk = ? LIMIT 1",
                          (series_fk,)) is None:
        conn.execute("DELETE FROM series WHERE id = ?", (series_fk,))
        conn.execute(
            "UPDATE studies SET series_count = series_count - 1 WHERE id = ?", (study_fk,)
        )
    return int(study_fk)
