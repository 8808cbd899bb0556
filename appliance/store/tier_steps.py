"""The committed steps of the tiering operations: replicate, evict, recall, roll back, scrub.

Each step is one transaction (a plain function of the sqlite3 connection, run
through `Writer.submit_sync`): the state change of appliance.store.tiering
together with the rows it concerns. The steps that belong to an operation on
a study take its StudyLease (appliance.store.leases): the first step takes
it, every later one fences first, so a holder that lost its lease changes
nothing. The orchestration around the steps (cloud and file I/O between
them, crash points, logging, audit) is the sync agent's (sync/); the order
of steps, and why it is safe, is written there, in each operation's module.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from appliance.base.errors import PacsEdgeError
from appliance.store import amendments, database
from appliance.store.index import needed_locally
from appliance.store.leases import StudyLease
from appliance.store.packs import UnverifiedPack, uploading_packs
from appliance.store.recall_requests import finish_request
from appliance.store.study_rows import (
    InstanceRow,
    StudyRow,
    evicted_instances,
    has_unpacked,
    instances_to_pack,
    study_row,
)
from appliance.store.tiering import TierState, Trigger, apply_sync, state_of


class NotEvictable(PacsEdgeError):
    pass


# --- replicate --------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadPlan:
    """What `begin_upload` committed: the pack row to fill and the instances to put in it."""

    pack_id: int
    version: int
    evicted: bool
    instances: list[InstanceRow]
    upload_id: bytes  # the pack id the upload writes into its blobs
    study: StudyRow  # as the version states it, read when it began
    withdrawn: tuple[str, ...]  # SOP Instance UIDs the version withdraws
    restated: int  # the restatement generation it states (store/amendments.py); 0: none


class UploadResult(Protocol):
    """What a verified upload reports (sync.cloud.UploadedPack)."""

    @property
    def pack_size(self) -> int: ...
    @property
    def pack_sha256(self) -> str: ...
    @property
    def offsets(self) -> dict[int, tuple[int, int]]: ...  # instance id -> (offset, length)
    @property
    def pack_etag(self) -> str: ...
    @property
    def manifest_etag(self) -> str: ...
    @property
    def manifest_size(self) -> int: ...


def begin_upload(conn: sqlite3.Connection, lease: StudyLease, study_id: int,
                 names: Callable[[int], tuple[str, str]], upload_id: bytes, *,
                 lowest_version: int = 1) -> UploadPlan | None:
    """Take the lease, move `local -> replicating` (an evicted study stays `evicted`: only
    its late instances are uploaded), insert the `uploading` pack row a crash leaves for
    the roll-back, and read the instances to upload; None when there is nothing to do.

    `names(version)` gives the pack's and the manifest's blob names; `upload_id` is the
    pack id the upload will write into its blobs, recorded so that a clean-up deletes
    only blobs that carry it. The version is the next after the index's last one, and at
    least `lowest_version` (above versions the cloud holds and the index does not)."""
    lease.take(conn)
    instances = instances_to_pack(conn, study_id)
    withdrawn = amendments.pending_withdrawals(conn, study_id)
    restated = amendments.restatement(conn, study_id)
    if not instances and not withdrawn and not restated:
        lease.release(conn)
        return None
    state = state_of(conn, study_id)
    if state is TierState.REPLICATED:
        state = apply_sync(conn, study_id, Trigger.NEW_INSTANCE)
    evicted = state is TierState.EVICTED
    if not evicted:
        apply_sync(conn, study_id, Trigger.REPLICATE, expect=TierState.LOCAL)
    version = int(database.query_one(
        conn, "SELECT MAX(COALESCE(MAX(version), 0) + 1, ?) FROM packs WHERE study_fk = ?",
        (lowest_version, study_id))[0])
    pack_name, manifest_name = names(version)
    pack_id = database.query_one(
        conn,
        "INSERT INTO packs (study_fk, version, pack_name, manifest_name, created_at, upload_id)"
        " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
        (study_id, version, pack_name, manifest_name, time.time(), upload_id.hex()))[0]
    return UploadPlan(int(pack_id), version, evicted, instances, upload_id,
                      study_row(conn, study_id), withdrawn, restated)


def abandon_upload(conn: sqlite3.Connection, lease: StudyLease, study_id: int) -> None:
    """After a failed upload: `replicating -> local` at once (the pack row stays
    `uploading` until its blobs are gone)."""
    lease.fence(conn)
    apply_sync(conn, study_id, Trigger.FAILED, expect=TierState.REPLICATING)


def forget_pack(conn: sqlite3.Connection, pack_id: int) -> None:
    """Drop an unverified pack's row (its blobs are gone); no instance points at it."""
    conn.execute("DELETE FROM packs WHERE id = ? AND state = 'uploading'", (pack_id,))


def commit_pack(conn: sqlite3.Connection, lease: StudyLease, study_id: int, plan: UploadPlan,
                uploaded: UploadResult, *, keep_local: bool = False) -> list[str]:
    """Pack `verified`, instances point at it, the amendments it made are done,
    `replicating -> replicated`; returns the paths of files that are no longer needed
    locally (evicted study; none with `keep_local`: the instances stay local, the
    study evicted, as a restore leaves the files it found intact)."""
    lease.fence(conn)
    amendments.uploaded(conn, study_id, plan.withdrawn, plan.restated)
    conn.execute(
        "UPDATE packs SET state = 'verified', verified_at = ?, pack_size = ?, pack_sha256 = ?,"
        " instance_count = ?, pack_etag = ?, manifest_etag = ?, manifest_size = ? WHERE id = ?",
        (time.time(), uploaded.pack_size, uploaded.pack_sha256, len(uploaded.offsets),
         uploaded.pack_etag, uploaded.manifest_etag, uploaded.manifest_size,
         plan.pack_id),
    )
    # An evicted study's late instances leave local disk in this same transaction. A row
    # superseded during the upload (new content, same SOP Instance UID) is not updated, so
    # its file, now a prior version, is kept, and the new content waits for the next
    # version. The row is matched by its content too: the superseding row is a new row,
    # but SQLite may give it the id the superseded one had (the highest id, deleted).
    packed = {row.id: row for row in plan.instances}
    drop = plan.evicted and not keep_local
    gone = []
    for instance_id, (offset, length) in uploaded.offsets.items():
        row = database.query_one(
            conn, "UPDATE instances SET pack_fk = ?, pack_offset = ?, pack_length = ?,"
            " is_local = ? WHERE id = ? AND sha256 = ? AND path = ? RETURNING path",
            (plan.pack_id, offset, length, 0 if drop else 1, instance_id,
             packed[instance_id].sha256, packed[instance_id].path))
        if row is not None and drop:
            gone.append(row[0])
    if plan.evicted:
        return gone
    apply_sync(conn, study_id, Trigger.VERIFIED, expect=TierState.REPLICATING)
    if has_unpacked(conn, study_id):  # instances arrived during the upload: not done yet
        apply_sync(conn, study_id, Trigger.NEW_INSTANCE)
    elif amendments.has_pending(conn, study_id):  # or the study changed meanwhile
        apply_sync(conn, study_id, Trigger.AMENDED)
    return []


# --- evict ------------------------------------------------------------------------------


def mark_evicted(conn: sqlite3.Connection, lease: StudyLease, study_id: int) -> list[str]:
    """Take the lease, refuse (NotEvictable) unless every instance is in a verified pack
    that no scrub found damaged, commit `replicated -> evicted` and `is_local = 0`;
    returns the files to delete."""
    lease.take(conn)
    row = database.query_one(
        conn,
        "SELECT COUNT(*) FROM instances i JOIN series se ON i.series_fk = se.id"
        " LEFT JOIN packs p ON i.pack_fk = p.id"
        " WHERE se.study_fk = ? AND (p.id IS NULL OR p.state != 'verified')", (study_id,))
    if row and row[0]:
        raise NotEvictable(f"{row[0]} instance(s) are not in a verified pack yet",
                           hint="wait for the next replication pass")
    # sync.scrub.refuse_if_at_risk checks this before; here it holds in the transaction.
    # Local instances are left in a damaged pack only when a recall read it before the
    # scrub's verdict: the next scrub takes them out and they are uploaded again.
    damaged = database.query_one(
        conn,
        "SELECT p.pack_name FROM instances i JOIN series se ON i.series_fk = se.id"
        " JOIN packs p ON i.pack_fk = p.id"
        " WHERE se.study_fk = ? AND p.scrub_state = 'damaged' LIMIT 1", (study_id,))
    if damaged:
        raise NotEvictable(
            f"a scrub found the pack {damaged[0]} damaged; nothing is deleted",
            hint="run `pacs-edge scrub --all`: the local instances leave the damaged pack"
                 " and the next sync pass uploads them again; evict after that")
    apply_sync(conn, study_id, Trigger.EVICT, expect=TierState.REPLICATED)
    cur = conn.execute(
        "UPDATE instances SET is_local = 0 WHERE series_fk IN"
        " (SELECT id FROM series WHERE study_fk = ?) RETURNING path", (study_id,))
    return [r[0] for r in cur.fetchall()]


@dataclass(frozen=True)
class KeptFiles:
    paths: list[str]        # files the eviction must not delete: now local again
    pack_names: list[str]   # the damaged packs they were in


def keep_damaged_files(conn: sqlite3.Connection, lease: StudyLease, study_id: int,
                       paths: Sequence[str]) -> KeptFiles:
    """Right before an eviction deletes `paths`: fence the lease, and keep the files of
    instances whose pack a scrub found damaged since `mark_evicted` (which refuses a
    damaged pack): a scrub takes no lease, so its verdict can land between the two.

    Such an instance becomes local again and leaves the pack, in this transaction, as
    `record_scrub_damaged` does for local instances; the study takes the `damaged`
    trigger (`evicted` stays `evicted`): the next replication uploads them again as a
    new version, and only when that is verified are their files deleted, as for the
    late instances of an evicted study. The caller deletes the other paths.
    """
    lease.fence(conn)
    wanted = set(paths)
    rows = [(int(r[0]), str(r[1]), str(r[2])) for r in conn.execute(
        "SELECT i.id, i.path, p.pack_name FROM instances i JOIN series se ON i.series_fk = se.id"
        " JOIN packs p ON i.pack_fk = p.id"
        " WHERE se.study_fk = ? AND i.is_local = 0 AND p.scrub_state = 'damaged'",
        (study_id,)).fetchall() if r[1] in wanted]
    if not rows:
        return KeptFiles([], [])
    conn.executemany(
        "UPDATE instances SET is_local = 1, pack_fk = NULL, pack_offset = NULL,"
        " pack_length = NULL WHERE id = ?", [(instance_id,) for instance_id, _, _ in rows])
    apply_sync(conn, study_id, Trigger.DAMAGED)
    return KeptFiles(sorted(path for _, path, _ in rows), sorted({n for _, _, n in rows}))


# --- deleting local files -----------------------------------------------------------------


@dataclass(frozen=True)
class Dropped:
    freed: int  # bytes of the files deleted
    kept: int  # files a row marked local names: left alone


def drop_unneeded_files(conn: sqlite3.Connection, lease: StudyLease, paths: Sequence[str],
                        unlink: Callable[[str], int]) -> Dropped:
    """Fence the lease, then delete with `unlink` (bytes freed) those of `paths` (at most
    PATHS_PER_QUERY) that no row marked local names, inside this transaction.

    The rows said not local when the operation chose `paths`, but ingest takes no lease:
    the same content sent again (X, Y, X) makes a row that names one of those files
    local, the file kept as it was. Deciding before this transaction and deleting
    after it let that row commit in between: the file went, its acknowledged row
    said local, and the study's next versions could not be made. In one write
    transaction, with ingest looking for its file inside its own
    (Index.record_instance_blocking), one of the two comes first, and either this
    sees the row or the ingest sees the file gone and places it again."""
    lease.fence(conn)
    needed = needed_locally(conn, paths)
    return Dropped(sum(unlink(path) for path in paths if path not in needed),
                   sum(path in needed for path in paths))


# --- recall -----------------------------------------------------------------------------


def begin_recall(conn: sqlite3.Connection, lease: StudyLease,
                 study_id: int) -> list[InstanceRow]:
    """Take the lease, `evicted -> recalling`; returns the instances to bring back."""
    lease.take(conn)
    apply_sync(conn, study_id, Trigger.RECALL, expect=TierState.EVICTED)
    return evicted_instances(conn, study_id)


def fail_recall(conn: sqlite3.Connection, lease: StudyLease, study_id: int) -> None:
    """`recalling -> evicted` (the files written are already removed)."""
    lease.fence(conn)
    apply_sync(conn, study_id, Trigger.FAILED, expect=TierState.RECALLING)


def mark_recalled(conn: sqlite3.Connection, lease: StudyLease, study_id: int,
                  recalled: list[InstanceRow]) -> None:
    """Every recalled instance is on disk, verified: set them local, commit
    `recalling -> replicated`, count it as an access and close a pending request."""
    lease.fence(conn)
    # Matched by content too, as in commit_pack: a row superseded during the recall is
    # not the one whose file was written. That content is a prior version now (new
    # content sent under the same SOP Instance UID, into this study or another), and
    # its file is on disk: local, as for one superseded while its study was local, or
    # the file would be named by no local row and kept by nothing forever.
    conn.executemany("UPDATE instances SET is_local = 1 WHERE id = ? AND sha256 = ? AND path = ?",
                     [(row.id, row.sha256, row.path) for row in recalled])
    conn.executemany("UPDATE instance_versions SET is_local = 1 WHERE path = ? AND sha256 = ?",
                     [(row.path, row.sha256) for row in recalled])
    apply_sync(conn, study_id, Trigger.RECALLED, expect=TierState.RECALLING)
    now = time.time()
    conn.execute("UPDATE studies SET last_access_at = ? WHERE id = ?", (now, study_id))
    finish_request(conn, study_id, "done", "", at=now)


# --- roll back --------------------------------------------------------------------------


@dataclass(frozen=True)
class RolledBack:
    was: str                             # the state found
    packs: list[UnverifiedPack]          # unverified versions whose blobs may exist
    leftovers: list[str]                 # files of non-local instances a killed recall wrote


def take_and_roll_back(conn: sqlite3.Connection, lease: StudyLease,
                       study_id: int) -> RolledBack:
    """Take the lease and undo the state of a dead operation; returns what is left to
    clean up in the cloud and on disk."""
    lease.take(conn)
    state = state_of(conn, study_id)
    leftovers: list[str] = []
    if state in (TierState.REPLICATING, TierState.RECALLING):
        apply_sync(conn, study_id, Trigger.FAILED)
    if state is TierState.RECALLING:
        leftovers = [row.path for row in evicted_instances(conn, study_id)]
    return RolledBack(state.value, uploading_packs(conn, study_id), leftovers)


# --- scrub ------------------------------------------------------------------------------


def record_scrub_ok(conn: sqlite3.Connection, pack_id: int, *, at: float,
                    pack_etag: str, manifest_etag: str, manifest_size: int) -> None:
    """The pack read back whole and authentic: record when, and the blobs' identities
    (which a copy of the container to new storage changes; the content is the same)."""
    conn.execute(
        "UPDATE packs SET scrubbed_at = ?, scrub_state = 'ok', scrub_error = '',"
        " pack_etag = ?, manifest_etag = ?, manifest_size = ? WHERE id = ?",
        (at, pack_etag, manifest_etag, manifest_size, pack_id))


@dataclass(frozen=True)
class DamageMarked:
    requeued: int  # instances with a local file: packed again by the next replication
    at_risk: int   # instances whose only copy is the damaged pack
    versions_at_risk: int  # prior versions whose only copy is the damaged pack


def record_scrub_damaged(conn: sqlite3.Connection, pack_id: int, study_id: int, *,
                         at: float, error: str) -> DamageMarked:
    """Mark a pack damaged, in one transaction with what follows from it.

    Instances still on local disk leave the pack (pack_fk NULL), so the next
    replication pass uploads them again as a new version; the study takes the
    `damaged` trigger (replicated -> local). Instances not on local disk stay:
    the damaged pack is their only copy, and the study is at risk. So is the
    content of prior versions without a file (their only copy is the pack); no
    upload makes it again, but eviction, which leaves prior versions alone, is
    not refused for them.
    """
    conn.execute(
        "UPDATE packs SET scrubbed_at = ?, scrub_state = 'damaged', scrub_error = ?"
        " WHERE id = ?", (at, error, pack_id))
    row = database.query_one(
        conn, "SELECT COUNT(*) FROM instances WHERE pack_fk = ? AND is_local = 0", (pack_id,))
    at_risk = int(row[0]) if row else 0
    requeued = conn.execute(
        "UPDATE instances SET pack_fk = NULL, pack_offset = NULL, pack_length = NULL"
        " WHERE pack_fk = ? AND is_local = 1", (pack_id,)).rowcount
    if requeued:
        apply_sync(conn, study_id, Trigger.DAMAGED)
    versions = database.query_one(
        conn, "SELECT COUNT(*) FROM instance_versions WHERE pack_fk = ? AND is_local = 0",
        (pack_id,))
    return DamageMarked(requeued, at_risk, int(versions[0]) if versions else 0)
