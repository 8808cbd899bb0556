"""The expiry of the certificate each TLS peer last presented (migration 0024).

One row per allowlist name, replaced when the peer presents a certificate with
another expiry (services/presented_certs.py writes it, at most once per change
and process); the health report reads them all (services/box_health.py).
"""

from __future__ import annotations

import sqlite3

from appliance.store import database
from appliance.store.index import Index


def record_presented(conn: sqlite3.Connection, peer: str, not_after: float) -> None:
    """For `Writer.submit_sync`: `peer` presented a certificate valid until `not_after`."""
    conn.execute(
        "INSERT INTO presented_certificates (peer, not_after) VALUES (?, ?)"
        " ON CONFLICT (peer) DO UPDATE SET not_after = excluded.not_after", (peer, not_after))


def _presented(conn: sqlite3.Connection) -> dict[str, float]:
    return dict(conn.execute("SELECT peer, not_after FROM presented_certificates").fetchall())


async def presented_expiries(index: Index) -> dict[str, float]:
    """Every peer's last presented certificate expiry (epoch seconds), by allowlist name."""
    return await database.run_sync(index.reader, _presented)
