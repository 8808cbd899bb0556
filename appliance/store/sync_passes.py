"""Sync passes: one row per replicate-then-evict pass of the agent, for `status`.

`status` shows when the last successful pass ended (Index.sync_summary); the
summary is the pass report as JSON (study refs are keyed hashes, no PHI).
"""

from __future__ import annotations

import sqlite3


def record_pass(conn: sqlite3.Connection, *, started_at: float, finished_at: float, ok: bool,
                summary: str) -> None:
    conn.execute(
        "INSERT INTO sync_passes (started_at, finished_at, ok, summary) VALUES (?, ?, ?, ?)",
        (started_at, finished_at, int(ok), summary))
