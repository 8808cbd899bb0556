-- `pacs-edge migrate`: pulling a legacy PACS into the box (docs/operator-guide.md).
-- Owned by appliance/store/migration_rows.py. A run survives any crash: every day
-- listed and every study transferred is one committed row, so `migrate resume`
-- continues where the last process stopped and never fetches a finished study again.

-- One row per `migrate start`, with the options it runs with (resume keeps them).
-- state: running | paused | cancelled | done (store/migration_rows.py: RUN_STATES).
CREATE TABLE migration_runs (
    id             INTEGER PRIMARY KEY,
    peer           TEXT NOT NULL,               -- allowlist name of the legacy PACS
    via            TEXT NOT NULL,               -- move | get
    since_day      TEXT NOT NULL,               -- YYYYMMDD, inclusive
    until_day      TEXT NOT NULL,               -- YYYYMMDD, inclusive
    modalities     TEXT NOT NULL DEFAULT '',    -- 'CT,MR', '' = every modality
    associations   INTEGER NOT NULL,
    rate_per_hour  INTEGER NOT NULL DEFAULT 0,  -- 0 = no limit
    time_window    TEXT NOT NULL DEFAULT '',    -- 'HH:MM-HH:MM', '' = any time
    query_limit    INTEGER NOT NULL,
    state          TEXT NOT NULL DEFAULT 'running',
    created_at     REAL NOT NULL,
    updated_at     REAL NOT NULL,
    finished_at    REAL
);

-- One row per day of the run's range. A day is 'done' once every study the legacy
-- PACS lists for it is a row of migration_studies (all its C-FINDs, split where the
-- peer's result limit was hit, committed together); 'failed' after max_attempts.
CREATE TABLE migration_days (
    run_fk           INTEGER NOT NULL REFERENCES migration_runs(id),
    day              TEXT NOT NULL,
    state            TEXT NOT NULL DEFAULT 'pending',   -- pending | done | failed
    queries          INTEGER NOT NULL DEFAULT 0,        -- C-FINDs the listing took
    studies          INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL NOT NULL DEFAULT 0,
    error_kind       TEXT NOT NULL DEFAULT '',          -- errors.MigrationFailure
    last_error       TEXT NOT NULL DEFAULT '',          -- PHI-free: shown and logged
    PRIMARY KEY (run_fk, day)
);

-- One row per study found. expected_instances: what the legacy PACS's C-FIND said
-- (NumberOfStudyRelatedInstances, else the series-level answers; NULL: unknown until
-- counted at image level); received_instances: what the box held after the last try.
-- shared_instances: instances whose SOP Instance UID another study also uses (the
-- box keeps one current copy per UID and the others as prior versions).
CREATE TABLE migration_studies (
    id                  INTEGER PRIMARY KEY,
    run_fk              INTEGER NOT NULL REFERENCES migration_runs(id),
    day                 TEXT NOT NULL,
    study_uid           TEXT NOT NULL,
    expected_instances  INTEGER,
    received_instances  INTEGER NOT NULL DEFAULT 0,
    shared_instances    INTEGER NOT NULL DEFAULT 0,
    state               TEXT NOT NULL DEFAULT 'pending',   -- pending | done | failed
    attempts            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     REAL NOT NULL DEFAULT 0,
    error_kind          TEXT NOT NULL DEFAULT '',
    last_error          TEXT NOT NULL DEFAULT '',
    updated_at          REAL NOT NULL,
    UNIQUE (run_fk, study_uid)
);
CREATE INDEX migration_studies_due ON migration_studies(run_fk, state, next_attempt_at);
