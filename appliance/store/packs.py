"""Pack rows: one per uploaded (or uploading) study version, as the sync agent reads them.

A pack row is written by the tiering steps (appliance.store.tier_steps:
inserted `uploading`, made `verified`, forgotten when abandoned), by restore
(inserted `verified`) and by the lifecycle (its access tier). The reads here
serve recall, scrub, lifecycle, key rotation, restore and the readers'
grants; each is a plain function of a sqlite3 connection with an `Index`
form that runs it on the reader connection.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from appliance.store import database
from appliance.store.clock_steps import due_condition
from appliance.store.index import Index


@dataclass(frozen=True)
class PackRow:
    id: int
    study_fk: int
    version: int
    pack_name: str
    manifest_name: str
    pack_size: int
    pack_sha256: str
    state: str
    access_tier: str
    created_at: float
    pack_etag: str = ""       # as committed and verified at upload ('' before migration 5)
    manifest_etag: str = ""
    manifest_size: int = 0
    scrubbed_at: float | None = None
    scrub_state: str = ""     # '' never scrubbed | ok | damaged
    verified_at: float | None = None  # None: restore recorded it, this box never read it
    rehydrated_at: float | None = None  # a recall brought it back from Archive then

    @property
    def read_by_this_box(self) -> bool:
        """Verified at its upload here, or read back whole by a scrub."""
        return self.verified_at is not None or self.scrubbed_at is not None

    @property
    def tier_age_from(self) -> float:
        """Where the lifecycle counts the pack's age from: its last rehydration, else its
        creation."""
        return self.rehydrated_at if self.rehydrated_at is not None else self.created_at


@dataclass(frozen=True)
class PackGrant:
    """What a reader grant decides on: a verified pack and its study's scope attributes."""

    pack_name: str
    manifest_name: str
    referring_physician: str
    modalities: frozenset[str]  # of every series of the study


_PACK_SQL = (
    "SELECT p.id, p.study_fk, p.version, p.pack_name, p.manifest_name, p.pack_size,"
    " p.pack_sha256, p.state, p.access_tier, p.created_at, p.pack_etag, p.manifest_etag,"
    " p.manifest_size, p.scrubbed_at, p.scrub_state, p.verified_at, p.rehydrated_at"
    " FROM packs p"
)
# A pack the index still needs: some instance row points at it (a version whose
# instances all moved to a later one is history, and not scrubbed).
_IN_USE = "EXISTS (SELECT 1 FROM instances i WHERE i.pack_fk = p.id)"
# What a scrub reads: packs current instances use, and packs that hold the only copy of a
# prior version (content superseded after its study was evicted has no file:
# docs/storage.md, "Re-sent instances"), though no current instance uses them.
_SCRUBBED = (f"({_IN_USE} OR EXISTS (SELECT 1 FROM instance_versions v"
             " WHERE v.pack_fk = p.id AND v.is_local = 0))")
# When a pack's bytes were last checked: by a scrub, else at upload.
_CHECKED_AT = "COALESCE(p.scrubbed_at, p.verified_at, p.created_at)"


def _packs(conn: sqlite3.Connection, sql: str, params: tuple[object, ...] = ()
           ) -> list[PackRow]:
    return [PackRow(*row) for row in conn.execute(sql, params).fetchall()]


async def packs_of(index: Index, study_id: int, *, verified_only: bool = True) -> list[PackRow]:
    state = "AND p.state = 'verified'" if verified_only else ""
    return await database.run_sync(
        index.reader, _packs, f"{_PACK_SQL} WHERE p.study_fk = ? {state} ORDER BY p.version",
        (study_id,))


async def all_packs(index: Index) -> list[PackRow]:
    """Every pack row, `uploading` ones too, in id order."""
    return await database.run_sync(index.reader, _packs, f"{_PACK_SQL} ORDER BY p.id")


async def packs_due_for_colder_tier(index: Index, due: Sequence[tuple[float, Sequence[str]]]
                                    ) -> list[PackRow]:
    """Verified packs that some (created_before, warmer tiers) pair of `due` names: created
    (or last rehydrated, PackRow.tier_age_from) at or before created_before and still in
    one of those tiers (the lifecycle's round),
    in id order. Only the packs to move are read: after a year nearly every pack is
    already where its age puts it, and reading them all took 2 s and 190 MB an hour
    at 97,000 packs."""
    if not due:
        return []
    clauses: list[str] = []
    params: list[object] = []
    for created_before, warmer in due:
        clauses.append(f"(COALESCE(p.rehydrated_at, p.created_at) <= ?"
                       f" AND p.access_tier IN ({','.join('?' * len(warmer))}))")
        params += [created_before, *warmer]
    return await database.run_sync(
        index.reader, _packs,
        f"{_PACK_SQL} WHERE p.state = 'verified' AND ({' OR '.join(clauses)}) ORDER BY p.id",
        tuple(params))


async def newest_sound_packs(index: Index, *, limit: int) -> list[PackRow]:
    """The last `limit` verified packs recorded that no scrub found damaged, newest first."""
    return await database.run_sync(
        index.reader, _packs, f"{_PACK_SQL} WHERE p.state = 'verified'"
        " AND p.scrub_state != 'damaged' ORDER BY p.id DESC LIMIT ?", (limit,))


async def newest_verified_packs(index: Index, *, limit: int) -> list[PackRow]:
    """The last `limit` verified packs recorded, damaged ones too, newest first."""
    return await database.run_sync(
        index.reader, _packs, f"{_PACK_SQL} WHERE p.state = 'verified'"
        " ORDER BY p.id DESC LIMIT ?", (limit,))


@dataclass(frozen=True)
class UnverifiedPack:
    """A pack row still `uploading`: a version whose blobs may exist in part."""

    id: int
    version: int
    upload_id: bytes | None  # the pack id its blobs carry (None: a row from before migration 13)


def uploading_packs(conn: sqlite3.Connection, study_id: int) -> list[UnverifiedPack]:
    """A study's pack rows still `uploading`: unverified versions that a failed or killed
    upload left."""
    rows = conn.execute(
        "SELECT id, version, upload_id FROM packs WHERE study_fk = ? AND state = 'uploading'",
        (study_id,)).fetchall()
    return [UnverifiedPack(int(r[0]), int(r[1]), bytes.fromhex(r[2]) if r[2] else None)
            for r in rows]


def _manifest_names(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT manifest_name FROM packs").fetchall()}


async def manifest_names(index: Index) -> set[str]:
    """The manifest blob name of every pack row (restore skips the versions it holds)."""
    return await database.run_sync(index.reader, _manifest_names)


def set_access_tier(conn: sqlite3.Connection, pack_id: int, tier: str) -> None:
    """Record the access tier the blob store moved the pack to."""
    conn.execute("UPDATE packs SET access_tier = ? WHERE id = ?", (tier, pack_id))


def record_rehydrated(conn: sqlite3.Connection, pack_id: int, tier: str, at: float) -> None:
    """Record that the pack is back online on `tier` since `at` (a recall found it there
    after the Archive tier): the lifecycle counts its age from `at`."""
    conn.execute("UPDATE packs SET access_tier = ?, rehydrated_at = ? WHERE id = ?",
                 (tier, at, pack_id))


def insert_verified_pack(conn: sqlite3.Connection, study_id: int, version: int, *,
                         pack_name: str, manifest_name: str, pack_size: int,
                         pack_sha256: str, instance_count: int, access_tier: str,
                         created_at: float) -> int:
    """A pack row for a version restore found in the cloud (its manifest authenticated,
    the pack's size as listed); returns its id. No `verified_at`: this box never read
    the pack, so evict reads it back before it deletes a local copy on its word."""
    return int(database.query_one(
        conn,
        "INSERT INTO packs (study_fk, version, pack_name, manifest_name, pack_size, pack_sha256,"
        " instance_count, state, access_tier, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, 'verified', ?, ?) RETURNING id",
        (study_id, version, pack_name, manifest_name, pack_size, pack_sha256,
         instance_count, access_tier, created_at))[0])


# --- reader grants ----------------------------------------------------------------------

_GRANT_SQL = (
    "SELECT p.pack_name, p.manifest_name, st.referring_physician,"
    " (SELECT group_concat(DISTINCT se.modality) FROM series se WHERE se.study_fk = st.id)"
    " FROM packs p JOIN studies st ON p.study_fk = st.id WHERE p.state = 'verified'"
)


def _grants(conn: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> list[PackGrant]:
    return [PackGrant(pack, manifest, referring, frozenset((mods or "").split(",")) - {""})
            for pack, manifest, referring, mods in conn.execute(sql, params).fetchall()]


async def pack_grants(index: Index) -> list[PackGrant]:
    """Every verified pack with its study's scope attributes, in pack id order."""
    return await database.run_sync(index.reader, _grants, f"{_GRANT_SQL} ORDER BY p.id", ())


async def study_pack_grants(index: Index, study_id: int) -> list[PackGrant]:
    """The verified packs of one study with its scope attributes, in version order."""
    return await database.run_sync(index.reader, _grants,
                                   f"{_GRANT_SQL} AND st.id = ? ORDER BY p.version",
                                   (study_id,))


# --- scrub ------------------------------------------------------------------------------


async def packs_to_scrub(index: Index, *, limit: int | None = None,
                         now: float | None = None, period: float = 0.0) -> list[PackRow]:
    """Verified packs in use, or holding the only copy of a prior version, least recently
    checked first; at most `limit`, and with `now` only those not checked in the `period`
    seconds before it. One checked "after now" was checked before the wall clock stepped
    back: it is due (clock_steps), not left unchecked until the clock catches up."""
    where = f"p.state = 'verified' AND {_SCRUBBED}"
    params: list[object] = []
    if now is not None:
        due, args = due_condition(_CHECKED_AT, now - period, period)
        where += f" AND {due}"
        params.extend(args)
    sql = f"{_PACK_SQL} WHERE {where} ORDER BY {_CHECKED_AT}, p.id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return await database.run_sync(index.reader, _packs, sql, tuple(params))


async def packs_to_scrub_count(index: Index) -> int:
    """How many packs `packs_to_scrub` takes with no limit."""
    row = await database.run_sync(
        index.reader, database.query_one,
        f"SELECT COUNT(*) FROM packs p WHERE p.state = 'verified' AND {_SCRUBBED}")
    return int(row[0]) if row else 0


async def versions_only_in_pack(index: Index, pack_id: int) -> int:
    """How many prior versions have no file: their only copy is this pack."""
    row = await database.run_sync(
        index.reader, database.query_one,
        "SELECT COUNT(*) FROM instance_versions WHERE pack_fk = ? AND is_local = 0",
        (pack_id,))
    return int(row[0]) if row else 0


async def damaged_packs_in_use(index: Index, study_id: int) -> list[PackRow]:
    """Packs of a study that a scrub found damaged and that still hold instances."""
    return await database.run_sync(
        index.reader, _packs,
        f"{_PACK_SQL} WHERE p.study_fk = ? AND p.scrub_state = 'damaged' AND {_IN_USE}"
        " ORDER BY p.version", (study_id,))


async def archived_packs_in_use(index: Index, study_uid: str) -> list[PackRow]:
    """Packs of a study on the Archive tier (as the lifecycle recorded it) that still
    hold instances: a recall of the study waits for their rehydration (hours)."""
    return await database.run_sync(
        index.reader, _packs,
        f"{_PACK_SQL} JOIN studies st ON st.id = p.study_fk WHERE st.study_uid = ?"
        f" AND p.access_tier = 'Archive' AND {_IN_USE} ORDER BY p.version", (study_uid,))
