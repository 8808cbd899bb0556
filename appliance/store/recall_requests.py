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

from appliance.store import database
from appliance.store.index import Index


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
