"""The record of the agent's passes stays bounded and keeps what `status` reads."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from appliance.store import sync_passes
from appliance.store.index import Index
from appliance.store.sync_passes import record_pass


def record(conn: sqlite3.Connection, count: int, *, ok: bool) -> None:
    for _ in range(count):
        record_pass(conn, started_at=1.0, finished_at=2.0, ok=ok,
                    summary='{"failures": ["replicate: the cloud does not answer"]}')


async def test_the_pass_record_keeps_its_last_passes_and_the_last_successful_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass a minute grew the table by 525,000 rows a year, though `status` reads two
    of them: the latest pass, and the latest successful one, which a week of failed
    passes (an outage) must not push out."""
    monkeypatch.setattr(sync_passes, "PASSES_KEPT", 5)
    async with Index(tmp_path / "index.sqlite3") as index:
        writer = index.writer
        assert writer is not None
        await writer.submit_sync(lambda c: record(c, 3, ok=True))
        await writer.submit_sync(lambda c: record(c, 20, ok=False))
        rows = await writer.submit_sync(lambda c: [tuple(row) for row in c.execute(
            "SELECT id, ok FROM sync_passes ORDER BY id")])
        assert rows == [(3, 1), *[(i, 0) for i in range(19, 24)]]
        summary = await index.sync_summary()
        assert summary["last_successful_pass_at"] == 2.0
        assert summary["last_pass_error"] == "replicate: the cloud does not answer"
