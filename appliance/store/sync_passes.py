"""Sync passes: one row per replicate-then-evict pass of the agent, for `status`.

`status` shows when the last successful pass ended and, when the latest pass
failed, why (Index.sync_summary); the summary is the pass report as JSON
(study refs and blob names are keyed hashes, no PHI).
"""

from __future__ import annotations

import json
import sqlite3


def record_pass(conn: sqlite3.Connection, *, started_at: float, finished_at: float, ok: bool,
                summary: str) -> None:
    conn.execute(
        "INSERT INTO sync_passes (started_at, finished_at, ok, summary) VALUES (?, ?, ?, ?)",
        (started_at, finished_at, int(ok), summary))


def first_failure(summary: str | None) -> str:
    """The first failure a pass recorded ("" for none, or a summary that is not a report)."""
    try:
        failures = json.loads(summary or "{}").get("failures") or []
    except (ValueError, AttributeError):
        return ""
    return str(failures[0]) if failures else ""
