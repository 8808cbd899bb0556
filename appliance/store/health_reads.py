"""What the health report reads from the index beyond `Index.totals`/`sync_summary`:
how far behind replication, recall and prefetch are (services/box_health.py)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from appliance.store import database
from appliance.store.index import Index
from appliance.store.prefetch_rows import RETRYABLE_PRIORS


@dataclass(frozen=True)
class Backlog:
    """Replication, recall and prefetch work not done yet (times are epoch seconds)."""

    oldest_unreplicated_at: float | None  # receipt of the oldest instance in no pack
    recalls_pending: int
    oldest_recall_requested_at: float | None
    recalls_failed: int  # requests whose last recall failed and that nobody asked again
    prefetch_waiting: int  # priors chosen and not local yet (pending or under way)
    prefetch_failed: int  # failed priors `pacs-edge prefetch retry` would try again


def _backlog(conn: sqlite3.Connection) -> Backlog:
    row = conn.execute(
        "SELECT (SELECT MIN(received_at) FROM instances WHERE pack_fk IS NULL AND is_local = 1),"
        " (SELECT COUNT(*) FROM recall_requests WHERE state = 'pending'),"
        " (SELECT MIN(requested_at) FROM recall_requests WHERE state = 'pending'),"
        " (SELECT COUNT(*) FROM recall_requests WHERE state = 'failed'),"
        " (SELECT COUNT(*) FROM prefetch_priors WHERE state NOT IN ('done', 'failed')),"
        f" (SELECT COUNT(*) {RETRYABLE_PRIORS})").fetchone()
    return Backlog(row[0], int(row[1]), row[2], int(row[3]), int(row[4]), int(row[5]))


async def backlog(index: Index) -> Backlog:
    return await database.run_sync(index.reader, _backlog)


@dataclass(frozen=True)
class RecentStudy:
    """A received study as the status page lists it: no PHI, no UID."""

    first_received_at: float
    last_received_at: float
    modalities: str
    series: int
    instances: int
    bytes: int
    tier_state: str


def _recent(conn: sqlite3.Connection, limit: int) -> list[RecentStudy]:
    rows = conn.execute(
        "SELECT st.first_received_at, st.last_received_at,"
        " (SELECT GROUP_CONCAT(DISTINCT se.modality) FROM series se WHERE se.study_fk = st.id),"
        " st.series_count, st.instance_count, st.total_bytes, st.tier_state"
        " FROM studies st ORDER BY st.id DESC LIMIT ?", (limit,)).fetchall()
    return [RecentStudy(r[0], r[1], r[2] or "", r[3], r[4], r[5], r[6]) for r in rows]


async def recent_studies(index: Index, limit: int = 50) -> list[RecentStudy]:
    """The `limit` studies first received most recently, newest first."""
    return await database.run_sync(index.reader, _recent, limit)
