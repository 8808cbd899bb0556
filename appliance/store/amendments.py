"""What the cloud's copy of a study must be told though no new instance may come.

A study in the cloud is the union of its pack versions, and readers and restore take
its patient from the newest one. Two changes on the box reach neither without a new
version, so each is kept here until a version that says it is verified:

- *Withdrawals.* An instance that leaves a study for another one (sent again under
  another Study Instance UID, the first study being a mistake) is no longer answered
  in it, but the study's earlier versions still hold it, and a remote reader sees
  only the versions of the study it pulls. The study's next version lists it as
  withdrawn (docs/cloud-format.md): readers and restore drop it from the versions
  below.
- *Restatements.* The study's patient changed (ADT^A40 merged them into another,
  ADT^A08 changed their name, birth date or sex): the next version's manifest states
  the study with its patient as the index has them now.

Either makes the study's next replication pass upload a version, with no instance of
its own when nothing else arrived (tiering trigger `amended`). A study never packed
has nothing in the cloud to amend.
"""

from __future__ import annotations

import sqlite3

from appliance.store import database
from appliance.store.tiering import Trigger, apply_sync

STUDIES_WITH_PENDING = ("(st.id IN (SELECT study_fk FROM withdrawals)"
                        " OR st.id IN (SELECT study_fk FROM restatements))")


def withdraw(conn: sqlite3.Connection, study_fk: int, sop_uid: str, at: float) -> None:
    """`sop_uid` left study `study_fk`: the study's next version withdraws it."""
    if _packed(conn, study_fk):
        conn.execute("INSERT OR IGNORE INTO withdrawals (study_fk, sop_uid, withdrawn_at)"
                     " VALUES (?, ?, ?)", (study_fk, sop_uid, at))
        apply_sync(conn, study_fk, Trigger.AMENDED)


def studies_of(conn: sqlite3.Connection, patient_fk: int) -> list[int]:
    return [row[0] for row in conn.execute("SELECT id FROM studies WHERE patient_fk = ?",
                                           (patient_fk,))]


def restate(conn: sqlite3.Connection, study_fks: list[int], at: float) -> None:
    """The patient these studies are filed under changed, or they moved to another: each
    of them in the cloud gets a version that states it anew."""
    for study_fk in study_fks:
        if _packed(conn, study_fk):
            conn.execute(
                "INSERT INTO restatements (study_fk, changed_at) VALUES (?, ?)"
                " ON CONFLICT (study_fk) DO UPDATE SET changed_at = excluded.changed_at,"
                " generation = generation + 1", (study_fk, at))
            apply_sync(conn, study_fk, Trigger.AMENDED)


def pending_withdrawals(conn: sqlite3.Connection, study_fk: int) -> tuple[str, ...]:
    """The SOP Instance UIDs the study's next version withdraws. One that came back to
    the study meanwhile is current in it again (that version lists it): no longer
    withdrawn."""
    conn.execute(
        "DELETE FROM withdrawals WHERE study_fk = ? AND sop_uid IN (SELECT i.sop_uid"
        " FROM instances i JOIN series se ON se.id = i.series_fk WHERE se.study_fk = ?)",
        (study_fk, study_fk))
    return tuple(row[0] for row in conn.execute(
        "SELECT sop_uid FROM withdrawals WHERE study_fk = ? ORDER BY sop_uid", (study_fk,)))


def restatement(conn: sqlite3.Connection, study_fk: int) -> int:
    """The generation of the study's pending restatement; 0 when there is none."""
    row = database.query_one(conn, "SELECT generation FROM restatements WHERE study_fk = ?",
                             (study_fk,))
    return int(row[0]) if row else 0


def has_pending(conn: sqlite3.Connection, study_fk: int) -> bool:
    return bool(restatement(conn, study_fk)) or database.query_one(
        conn, "SELECT 1 FROM withdrawals WHERE study_fk = ? LIMIT 1",
        (study_fk,)) is not None


def uploaded(conn: sqlite3.Connection, study_fk: int, withdrawn: tuple[str, ...],
             restated: int) -> None:
    """A verified version of the study withdrew `withdrawn` and stated the study as the
    index had it when the version began, restatement generation `restated` included
    (a change since waits for the next version)."""
    conn.executemany("DELETE FROM withdrawals WHERE study_fk = ? AND sop_uid = ?",
                     [(study_fk, uid) for uid in withdrawn])
    conn.execute("DELETE FROM restatements WHERE study_fk = ? AND generation = ?",
                 (study_fk, restated))


def _packed(conn: sqlite3.Connection, study_fk: int) -> bool:
    """Whether a pack version of the study was made, or is being made."""
    return database.query_one(conn, "SELECT 1 FROM packs WHERE study_fk = ? LIMIT 1",
                              (study_fk,)) is not None
