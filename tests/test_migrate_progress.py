"""What `pacs-edge migrate status` tells the operator about speed and time left.

A weekend cut-over is planned by the hour: besides the counts, status says how
many studies (and instances) per hour finished in the last quarter hour and, while
a process drives the run, how long the studies found so far still take at that
pace. The figures come from the rows' finishing times, set here by hand so that
they are exact; the command line reads the same rows.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
from conftest import EdgeServer, run_pacs_edge
from legacypacs import LegacyPacs
from test_migrate import (
    RUN_TIMEOUT,
    legacy_factory,  # noqa: F401  (a fixture)
    make_archive,
)

from appliance.store import migration_rows as rows
from appliance.store.index import Index
from appliance.store.leases import Holder

SETTINGS = rows.RunSettings(peer="old", via="move", since_day="20240301",
                            until_day="20240301", modalities=(), associations=1,
                            rate_per_hour=0, time_window="", query_limit=5)


async def make_run(index_path: Path, finished_ago: list[float], pending: int, *,
                   settings: rows.RunSettings = SETTINGS) -> float:
    """A run driven by this process whose studies finished `finished_ago` seconds before
    the returned time, with `pending` studies left."""
    def write(conn: sqlite3.Connection) -> None:
        run = rows.create_run(conn, settings, ["20240301"], driver=Holder.new())
        rows.list_day(conn, run, rows.UNDATED, [], 1)
        count = len(finished_ago) + pending
        rows.list_day(conn, run, "20240301", [rows.FoundStudy(f"1.2.{n}", 3)
                                              for n in range(count)], 1)
        for task in rows.due_studies(conn, run, time.time(), 100)[:len(finished_ago)]:
            rows.study_done(conn, task.id, expected=3, received=3, shared=0)

    async with Index(index_path) as index:
        assert index.writer is not None
        await index.writer.submit_sync(write)
    now = time.time()
    with closing(sqlite3.connect(index_path)) as conn, conn:
        for n, ago in enumerate(finished_ago):
            conn.execute("UPDATE migration_studies SET updated_at = ? WHERE study_uid = ?",
                         (now - ago, f"1.2.{n}"))
    return now


async def test_status_shows_the_pace_of_the_last_quarter_hour_and_the_time_left(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_pacs_edge("init", "--home", str(home), "--dicom-port", "0", "--tls-port", "0",
                  "--hl7-port", "0", "--http-port", "0", "--metrics-port", "0")
    index_path = home / "index.sqlite3"
    # One finished an hour ago (outside the window); three in the last 10 minutes.
    now = await make_run(index_path, [3600.0, 600.0, 300.0, 0.0], pending=6)

    with closing(sqlite3.connect(index_path)) as conn:
        pace = rows.pace(conn, 1, now)
        assert pace == rows.Pace(studies_per_hour=12.0, instances_per_hour=36.0)
        assert rows.pace(conn, 1, now + rows.PACE_WINDOW_SECONDS) is None  # stalled since

    report = json.loads(run_pacs_edge("migrate", "status", "--json", "--home",
                                      str(home)).stdout)
    assert report["pace"]["studies_per_hour"] == pytest.approx(12.0, rel=0.2)
    assert report["eta_seconds"] == pytest.approx(6 * 300.0, rel=0.2)  # 6 at 12 an hour
    text = run_pacs_edge("migrate", "status", "--home", str(home)).stdout
    assert "studies/hour" in text and "instances/hour" in text, text
    assert "time left" in text and "for the 6 studies found so far" in text, text


def _closed_window() -> str:
    """A --window that is closed now: the hour after the next."""
    hour = (time.localtime().tm_hour + 2) % 24
    return f"{hour:02d}:00-{hour:02d}:30"


@pytest.mark.parametrize(("finished_ago", "rate", "window", "said"), [
    ([60.0], 0, "", "1 study finished in the last 15 minutes: too few to tell"),
    ([1200.0], 2, "", "no studies finished in the last 15 minutes (--rate 2: a study starts"
                      " every 30 min)"),
    ([1200.0], 0, _closed_window(), "no studies finished in the last 15 minutes (outside"
                                    f" --window {_closed_window()} now)"),
])
async def test_status_does_not_call_a_run_stalled_that_finished_a_study_or_waits_to_start_one(
        tmp_path: Path, finished_ago: list[float], rate: int, window: str, said: str) -> None:
    """A run with one study finished a minute ago (a pace needs two) said 'no studies
    finished in the last 15 minutes', which the guide reads as stalled; so did every run
    whose --rate spaces studies further apart than the window, or waiting for --window."""
    home = tmp_path / "home"
    run_pacs_edge("init", "--home", str(home), "--dicom-port", "0", "--tls-port", "0",
                  "--hl7-port", "0", "--http-port", "0", "--metrics-port", "0")
    await make_run(home / "index.sqlite3", finished_ago, pending=3,
                   settings=dataclasses.replace(SETTINGS, rate_per_hour=rate,
                                                time_window=window))
    text = run_pacs_edge("migrate", "status", "--home", str(home)).stdout
    assert said in " ".join(text.split()), text


def test_studies_the_box_held_before_their_transfer_do_not_make_the_pace(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer],
        legacy_factory: Callable[..., LegacyPacs]) -> None:  # noqa: F811
    """A resumed run may find studies complete that the killed process had transferred
    without recording it, and records them done at once, without a transfer; so does a
    run over studies the box already held.
    Counted in the pace, a few such studies finished within a second make thousands of
    studies an hour and a time left of minutes. Here the box holds 4 of the 5 studies
    before the run: one transfer is too few to tell a pace."""
    files = make_archive(tmp_path / "archive", 5, busy_day_studies=0)
    box = edge_server_factory()
    box.configure(migrate={"retry_base_seconds": 0.05, "max_attempts": 1})
    held = [f for f in files if f.relative_to(tmp_path / "archive").parts[0] != "study0000"]
    box.cli("import", *(str(f) for f in held))
    legacy = legacy_factory(files, box=box)
    box.add_peer("legacy", legacy.ae_title, legacy.port, allow="find,move,store")
    result = box.cli("migrate", "start", "--from", "legacy", "--since", "20240301", "--until",
                     "20240303", "--associations", "1", check=False, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 studies done, 0 failed" in result.stdout
    report = json.loads(box.cli("migrate", "status", "--json").stdout)
    assert report["pace"] is None, report
