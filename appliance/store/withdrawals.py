"""Instances withdrawn from a study the cloud holds: its next pack version says so.

A study in the cloud is the union of its versions. When an instance leaves a study
for another one (sent again under another Study Instance UID, the earlier study
being a mistake), the box stops answering it in the study it left, but that study's
earlier versions still hold it, and a remote reader sees only the versions of the
study it pulls. So the study it left gets a new version, with no instance of its own
when nothing else arrived, whose manifest lists the instance as withdrawn (see
docs/cloud-format.md): readers and restore drop it from the versions below. A row
here waits for that version to be verified.
"""

from __future__ import annotations

import sqlite3

from appliance.store import database
from appliance.store.tiering import Trigger, apply_sync


def withdraw(conn: sqlite3.Connection, study_fk: int, sop_uid: str, at: float) -> None:
    """`sop_uid` left study `study_fk`: when a pack version of the study was made (or is
    being made), its next version withdraws the instance. A study never packed has
    nothing in the cloud to withdraw from."""
    if database.query_one(conn, "SELECT 1 FROM packs WHERE study_fk = ? LIMIT 1",
                          (study_fk,)) is None:
        return
    conn.execute("INSERT OR IGNORE INTO withdrawals (study_fk, sop_uid, withdrawn_at)"
                 " VALUES (?, ?, ?)", (study_fk, sop_uid, at))
    apply_sync(conn, study_fk, Trigger.WITHDRAWN)


def pending(conn: sqlite3.Connection, study_fk: int) -> tuple[str, ...]:
    """The SOP Instance UIDs the study's next version withdraws. One that came back to
    the study meanwhile is current in it again (that version lists it): no longer
    withdrawn."""
    conn.execute(
        "DELETE FROM withdrawals WHERE study_fk = ? AND sop_uid IN (SELECT i.sop_uid"
        " FROM instances i JOIN series se ON se.id = i.series_fk WHERE se.study_fk = ?)",
        (study_fk, study_fk))
    return tuple(row[0] for row in conn.execute(
        "SELECT sop_uid FROM withdrawals WHERE study_fk = ? ORDER BY sop_uid", (study_fk,)))


def has_pending(conn: sqlite3.Connection, study_fk: int) -> bool:
    return database.query_one(conn, "SELECT 1 FROM withdrawals WHERE study_fk = ? LIMIT 1",
                              (study_fk,)) is not None


def uploaded(conn: sqlite3.Connection, study_fk: int, sop_uids: tuple[str, ...]) -> None:
    """A verified version of the study withdrew these."""
    conn.executemany("DELETE FROM withdrawals WHERE study_fk = ? AND sop_uid = ?",
                     [(study_fk, uid) for uid in sop_uids])


STUDIES_WITH_PENDING = "st.id IN (SELECT study_fk FROM withdrawals)"
