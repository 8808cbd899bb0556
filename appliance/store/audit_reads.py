"""What the audit log reads from the index: who the patient of a retrieved study is.

The auditor runs in pynetdicom's threads and its own flush thread, away from
the event loop that owns `Index`, and must never write to the index nor wait
long for it. So this is a plain function on its own short-lived connection:
read-only (`mode=ro`), with a lock timeout of LOOKUP_TIMEOUT seconds.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.base.errors import IndexUnavailable

LOOKUP_TIMEOUT = 5.0  # seconds to wait for a lock held by the writer


@dataclass(frozen=True)
class StudySubject:
    """The patient and accession number a study's audit record names."""

    study_uid: str
    patient_id: str
    patient_name: str
    accession_number: str


def study_subjects(index_path: Path, study_uids: Sequence[str]) -> dict[str, StudySubject]:
    """The subject of each of `study_uids` that the index knows, by study UID.

    Empty when there is nothing to ask or no index file yet (a box that has
    stored nothing). Raises IndexUnavailable when SQLite cannot answer (locked
    beyond the timeout, damaged, unreadable); the cause is chained.
    """
    if not study_uids or not index_path.exists():
        return {}
    marks = ",".join("?" * len(study_uids))
    try:
        db = sqlite3.connect(f"file:{index_path}?mode=ro", uri=True, timeout=LOOKUP_TIMEOUT)
        try:
            rows = db.execute(
                "SELECT st.study_uid, p.patient_id, p.patient_name, st.accession_number"
                " FROM studies st JOIN patients p ON st.patient_fk = p.id"
                f" WHERE st.study_uid IN ({marks})", tuple(study_uids)).fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise IndexUnavailable(f"index not readable for the audit: {type(exc).__name__}",
                               hint="check the data home's disk and permissions") from exc
    return {uid: StudySubject(uid, pid, name, accession) for uid, pid, name, accession in rows}
