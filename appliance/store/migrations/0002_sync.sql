-- Cloud replication: packs (one per study version), which pack holds each
-- instance, the tiering transition log, and recall requests from the appliance.

CREATE TABLE packs (
    id               INTEGER PRIMARY KEY,
    study_fk         INTEGER NOT NULL REFERENCES studies(id),
    version          INTEGER NOT NULL,
    pack_name        TEXT NOT NULL UNIQUE,
    manifest_name    TEXT NOT NULL UNIQUE,
    pack_size        INTEGER NOT NULL DEFAULT 0,
    pack_sha256      TEXT NOT NULL DEFAULT '',
    instance_count   INTEGER NOT NULL DEFAULT 0,
    state            TEXT NOT NULL DEFAULT 'uploading',  -- uploading | verified
    access_tier      TEXT NOT NULL DEFAULT 'Hot',
    created_at       REAL NOT NULL,
    verified_at      REAL,
    UNIQUE (study_fk, version)
);
CREATE INDEX packs_study ON packs(study_fk);

ALTER TABLE instances ADD COLUMN pack_fk INTEGER REFERENCES packs(id);
ALTER TABLE instances ADD COLUMN pack_offset INTEGER;
ALTER TABLE instances ADD COLUMN pack_length INTEGER;
-- 1 while the instance file is on local disk; 0 once evicted.
ALTER TABLE instances ADD COLUMN is_local INTEGER NOT NULL DEFAULT 1;
CREATE INDEX instances_pack ON instances(pack_fk);

CREATE TABLE tier_transitions (
    id          INTEGER PRIMARY KEY,
    study_fk    INTEGER NOT NULL REFERENCES studies(id),
    from_state  TEXT NOT NULL,
    to_state    TEXT NOT NULL,
    trigger     TEXT NOT NULL,
    at          REAL NOT NULL
);
CREATE INDEX tier_transitions_study ON tier_transitions(study_fk);

-- The appliance asks, the sync agent (which alone holds cloud credentials) acts.
CREATE TABLE recall_requests (
    id            INTEGER PRIMARY KEY,
    study_fk      INTEGER NOT NULL UNIQUE REFERENCES studies(id),
    requested_at  REAL NOT NULL,
    requested_by  TEXT NOT NULL DEFAULT '',
    state         TEXT NOT NULL DEFAULT 'pending',  -- pending | done | failed
    error         TEXT NOT NULL DEFAULT '',
    finished_at   REAL
);

CREATE TABLE sync_passes (
    id           INTEGER PRIMARY KEY,
    started_at   REAL NOT NULL,
    finished_at  REAL,
    ok           INTEGER NOT NULL DEFAULT 0,
    summary      TEXT NOT NULL DEFAULT ''
);
