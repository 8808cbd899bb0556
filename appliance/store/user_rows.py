"""Web users, sessions and redeemed launch links as rows (migration 0008_users.sql).

Writes are plain functions of the sqlite3 connection for `Writer.submit_sync`
(one transaction each, durable when the call returns); reads take the index's
reader through `database.run_sync`. Counting a failed login and deciding the
lock-out happen in one statement of one transaction, so parallel guesses cannot
each read "4 failures" and all slip past the limit.

Nothing here sees a password or a session token: callers pass the hash.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field

from appliance.base.errors import UserError
from appliance.store import database

# How long a used launch link's nonce outlives the link (redeem_nonce).
USED_NONCE_KEPT_SECONDS = 86_400

_USER_COLUMNS = ("id, name, role, referring_name, password_hash, failed_logins, locked_until,"
                 " created_at, password_changed_at, last_login_at")


@dataclass(frozen=True)
class UserRow:
    id: int
    name: str
    role: str
    referring_name: str
    password_hash: str = field(repr=False)
    failed_logins: int
    locked_until: float
    created_at: float
    password_changed_at: float
    last_login_at: float | None


@dataclass(frozen=True)
class SessionRow:
    user: UserRow
    created_at: float
    last_seen_at: float


def _user(row: sqlite3.Row | tuple[object, ...]) -> UserRow:
    return UserRow(*row)  # type: ignore[arg-type]


# --- reads -------------------------------------------------------------------------------

def find_user(conn: sqlite3.Connection, name: str) -> UserRow | None:
    row = database.query_one(conn, f"SELECT {_USER_COLUMNS} FROM users WHERE name = ?", (name,))
    return _user(row) if row is not None else None


def list_users(conn: sqlite3.Connection) -> list[UserRow]:
    cur = conn.execute(f"SELECT {_USER_COLUMNS} FROM users ORDER BY name")
    return [_user(row) for row in cur.fetchall()]


def find_session(conn: sqlite3.Connection, token_hash: str) -> SessionRow | None:
    columns = ", ".join(f"u.{c.strip()}" for c in _USER_COLUMNS.split(","))
    row = database.query_one(
        conn, f"SELECT {columns}, s.created_at, s.last_seen_at FROM user_sessions s"
        " JOIN users u ON s.user_fk = u.id WHERE s.token_hash = ?", (token_hash,))
    if row is None:
        return None
    values = tuple(row)
    return SessionRow(_user(values[:-2]), float(values[-2]), float(values[-1]))


# --- writes (Writer.submit_sync) ---------------------------------------------------------

def insert_user(conn: sqlite3.Connection, *, name: str, role: str, referring_name: str,
                password_hash: str, now: float) -> int:
    try:
        cur = conn.execute(
            "INSERT INTO users (name, role, referring_name, password_hash, created_at,"
            " password_changed_at) VALUES (?, ?, ?, ?, ?, ?)",
            (name, role, referring_name, password_hash, now, now))
    except sqlite3.IntegrityError:
        raise taken(name) from None
    return int(cur.lastrowid or 0)


def taken(name: str) -> UserError:
    return UserError(f"user {name!r} exists",
                     hint=f"pick another name, or `pacs-edge users passwd {name}`")


def delete_user(conn: sqlite3.Connection, name: str) -> bool:
    """Remove the user and (by cascade) every session of theirs."""
    return conn.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount > 0


def set_password(conn: sqlite3.Connection, name: str, password_hash: str, now: float) -> bool:
    """Replace the hash, end every session of the user and lift a lock-out."""
    cur = conn.execute(
        "UPDATE users SET password_hash = ?, password_changed_at = ?, failed_logins = 0,"
        " locked_until = 0 WHERE name = ?", (password_hash, now, name))
    if cur.rowcount == 0:
        return False
    conn.execute("DELETE FROM user_sessions WHERE user_fk = (SELECT id FROM users"
                 " WHERE name = ?)", (name,))
    return True


def unlock(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("UPDATE users SET failed_logins = 0, locked_until = 0 WHERE name = ?",
                        (name,)).rowcount > 0


def record_failure(conn: sqlite3.Connection, user_id: int, *, now: float, limit: int,
                   lockout_seconds: float) -> bool:
    """Count one failed login; at `limit` consecutive failures lock the user until
    now + lockout_seconds and restart the count. True when this failure locked."""
    conn.execute(
        "UPDATE users SET failed_logins = failed_logins + 1 WHERE id = ?", (user_id,))
    cur = conn.execute(
        "UPDATE users SET failed_logins = 0, locked_until = ? WHERE id = ?"
        " AND failed_logins >= ?", (now + lockout_seconds, user_id, limit))
    return cur.rowcount > 0


def record_success(conn: sqlite3.Connection, user_id: int, *, now: float) -> None:
    conn.execute("UPDATE users SET failed_logins = 0, last_login_at = ? WHERE id = ?",
                 (now, user_id))


def insert_session(conn: sqlite3.Connection, *, token_hash: str, user_id: int,
                   now: float) -> None:
    conn.execute("INSERT INTO user_sessions (token_hash, user_fk, created_at, last_seen_at)"
                 " VALUES (?, ?, ?, ?)", (token_hash, user_id, now, now))


def touch_session(conn: sqlite3.Connection, token_hash: str, now: float) -> None:
    conn.execute("UPDATE user_sessions SET last_seen_at = ? WHERE token_hash = ?",
                 (now, token_hash))


def delete_session(conn: sqlite3.Connection, token_hash: str) -> None:
    conn.execute("DELETE FROM user_sessions WHERE token_hash = ?", (token_hash,))


def prune_sessions(conn: sqlite3.Connection, *, idle_before: float,
                   created_before: float) -> int:
    """Delete sessions idle since `idle_before` or opened before `created_before`."""
    return conn.execute("DELETE FROM user_sessions WHERE last_seen_at < ? OR created_at < ?",
                        (idle_before, created_before)).rowcount


def redeem_nonce(conn: sqlite3.Connection, nonce: str, *, expires_at: float,
                 now: float) -> bool:
    """Record a launch link's nonce as used; False if it was used before. Nonces of links
    that ended more than USED_NONCE_KEPT_SECONDS ago are pruned: an expired link is
    refused before its nonce is looked at, and the day's margin keeps a used link used
    should the clock be stepped back (a nonce pruned while the clock ran ahead would
    open its link a second time once the clock was corrected)."""
    conn.execute("DELETE FROM redeemed_links WHERE expires_at < ?",
                 (now - USED_NONCE_KEPT_SECONDS,))
    try:
        conn.execute("INSERT INTO redeemed_links (nonce, expires_at, redeemed_at)"
                     " VALUES (?, ?, ?)", (nonce, expires_at, now))
    except sqlite3.IntegrityError:
        return False
    return True
