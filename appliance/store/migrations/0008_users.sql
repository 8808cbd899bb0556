-- Web users, their sessions and the launch links already redeemed (docs/web.md).
-- Owned by appliance/store/user_rows.py; nothing here holds a password or a token
-- in the clear.

-- password_hash: 'scrypt$<n>$<r>$<p>$<salt b64>$<key b64>' (services/passwords.py).
-- failed_logins counts consecutive failures; reaching [auth] max_failed_logins sets
-- locked_until (epoch seconds) and restarts the count. role: admin | radiologist |
-- referring; referring_name is the DICOM PN a referring user's studies must carry.
CREATE TABLE users (
    id                   INTEGER PRIMARY KEY,
    name                 TEXT NOT NULL UNIQUE COLLATE NOCASE,
    role                 TEXT NOT NULL,
    referring_name       TEXT NOT NULL DEFAULT '',
    password_hash        TEXT NOT NULL,
    failed_logins        INTEGER NOT NULL DEFAULT 0,
    locked_until         REAL NOT NULL DEFAULT 0,
    created_at           REAL NOT NULL,
    password_changed_at  REAL NOT NULL,
    last_login_at        REAL
);

-- One row per open web session. token_hash is SHA-256 of the cookie's value: a copy of
-- the database opens no session. Removing a user or changing the password deletes them.
CREATE TABLE user_sessions (
    token_hash    TEXT PRIMARY KEY,
    user_fk       INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at    REAL NOT NULL,
    last_seen_at  REAL NOT NULL
);
CREATE INDEX user_sessions_user ON user_sessions(user_fk);

-- Nonces of launch links already used (a link opens once). Rows whose link has expired
-- anyway are pruned when another link is redeemed.
CREATE TABLE redeemed_links (
    nonce        TEXT PRIMARY KEY,
    expires_at   REAL NOT NULL,
    redeemed_at  REAL NOT NULL
);
CREATE INDEX redeemed_links_expiry ON redeemed_links(expires_at);
