"""What a keyed reference in a log line can name, read from the index (`pacs-edge logref`).

Log lines name studies, instances, web users and orders by `logsafe.ref` of
their UID, name or accession number, never by the value (appliance/base/logsafe.py).
The operator maps one back by hashing each candidate with the home's log key;
this lists the candidates. A plain read-only connection: the command runs
beside serve and the agent and must not take the writer's lock.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from appliance.store.index import unusable_index

LOOKUP_TIMEOUT = 5.0  # seconds to wait for a lock held by the writer
_NAMED = (  # (what a reference names, the column that holds it)
    ("study", "SELECT study_uid FROM studies"),
    ("instance", "SELECT sop_uid FROM instances"),
    ("user", "SELECT name FROM users"),
    ("order", "SELECT accession_number FROM orders"),
)


def named_values(index_path: Path) -> Iterator[tuple[str, str]]:
    """(what, value) for every value a log line may name by reference; nothing without
    an index. IndexUnavailable when SQLite cannot read it (the cause chained)."""
    if not index_path.exists():
        return
    try:
        db = sqlite3.connect(f"file:{index_path}?mode=ro", uri=True, timeout=LOOKUP_TIMEOUT)
        try:
            for what, query in _NAMED:
                for (value,) in db.execute(query):
                    yield what, str(value)
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:  # named as every other command names it
        raise unusable_index(index_path, exc) from exc
