"""Sync passes: one row per replicate-then-evict pass of the agent, for `status`.

`status` shows when the last successful pass ended and, when the latest pass
failed, why (Index.sync_summary); the summary is the pass report as JSON
(study refs and blob names are keyed hashes, no PHI). Only those two rows are
ever read, and the agent records a pass every minute (525,000 rows a year):
each record keeps the last PASSES_KEPT and the latest successful one.
"""

from __future__ import annotations

import json
import sqlite3

PASSES_KEPT = 10_000  # a week of passes at the default interval


def record_pass(conn: sqlite3.Connection, *, started_at: float, finished_at: float, ok: bool,
                summary: str) -> None:
    cur = conn.execute(
        "INSERT INTO sync_passes (started_at, finished_at, ok, summary) VALUES (?, ?, ?, ?)",
        (started_at, finished_at, int(ok), summary))
    conn.execute(
        "DELETE FROM sync_passes WHERE id <= ?"
        " AND id IS NOT (SELECT MAX(id) FROM sync_passes WHERE ok = 1)",
        (cur.lastrowid - PASSES_KEPT,))


def first_failure(summary: str | None) -> str:
    """The first failure a pass recorded ("" for none, or a summary that is not a report)."""
    try:
        failures = json.loads(summary or "{}").get("failures") or []
    except (ValueError, AttributeError):
        return ""
    return str(failures[0]) if failures else ""
