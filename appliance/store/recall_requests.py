"""Recall requests: how the appliance asks the sync agent for an evicted study.

The appliance never talks to the cloud. For a C-MOVE/C-GET of an evicted
study it inserts (or joins) a row here; the agent (sync.recall) picks
pending rows up, recalls the study and finishes the row `done` or `failed`.
One row per study, so concurrent requests share one recall. This module is
the only writer of the table: the appliance's request, the agent's verdict,
and the recall's own commit (appliance.store.tier_steps.mark_recalled).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

from appliance.store import database
from appliance.store.index import Index


async def request_recall(index: Index, study_uids: Sequence[str], requested_by: str) -> None:
    """Ask the sync agent to recall these studies; joins a pending request if any
    (one recall per study however many retrieves wait for it)."""
    if not study_uids:
        return
    assert index.writer is not None
    now = time.time()
    marks = ",".join("?" * len(study_uids))

    def insert(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO recall_requests (study_fk, requested_at, requested_by)"
            f" SELECT id, ?, ? FROM studies WHERE study_uid IN ({marks})"
            " ON CONFLICT (study_fk) DO UPDATE SET state = 'pending', error = '',"
            " requested_at = excluded.requested_at, finished_at = NULL"
            " WHERE recall_requests.state != 'pending'",
            (now, requested_by, *study_uids),
        )

    await index.writer.submit_sync(insert)


def _progress(conn: sqlite3.Connection, study_uids: Sequence[str]) -> list[tuple[str, str, str]]:
    marks = ",".join("?" * len(study_uids))
    return [(row[0], row[1], row[2]) for row in conn.execute(
        "SELECT st.tier_state, r.state, r.error FROM studies st"
        " LEFT JOIN recall_requests r ON r.study_fk = st.id"
        f" WHERE st.study_uid IN ({marks})", tuple(study_uids),
    ).fetchall()]


async def recall_progress(index: Index, study_uids: Sequence[str]) -> tuple[int, list[str]]:
    """(studies still not local, errors of failed recall requests) for these studies."""
    rows = await database.run_sync(index.reader, _progress, study_uids)
    waiting = sum(1 for state, _, _ in rows if state in ("evicted", "recalling"))
    errors = [error or "recall failed" for state, request, error in rows
              if request == "failed" and state == "evicted"]
    return waiting, errors


def _pending(conn: sqlite3.Connection) -> list[int]:
    return [int(row[0]) for row in conn.execute(
        "SELECT study_fk FROM recall_requests WHERE state = 'pending' ORDER BY requested_at"
    ).fetchall()]


async def pending_recalls(index: Index) -> list[int]:
    """Study ids with a pending request, oldest request first."""
    return await database.run_sync(index.reader, _pending)


def finish_request(conn: sqlite3.Connection, study_id: int, state: str, error: str, *,
                   at: float) -> None:
    """Close the study's pending request as `done` or `failed` (with the error to show
    the waiting retrieve); a request that is not pending is left as it is."""
    conn.execute(
        "UPDATE recall_requests SET state = ?, error = ?, finished_at = ?"
        " WHERE study_fk = ? AND state = 'pending'", (state, error, at, study_id))
