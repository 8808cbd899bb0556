-- Patient / Study / Series / Instance with the attributes C-FIND matches on.
-- Text values are stored decoded (Python str, any character set); the study's
-- original Specific Character Set is kept for reference.
-- *_time_key columns hold times normalised to HHMMSS.FFFFFF for range matching.

CREATE TABLE patients (
    id            INTEGER PRIMARY KEY,
    patient_id    TEXT NOT NULL,
    issuer        TEXT NOT NULL DEFAULT '',
    patient_name  TEXT NOT NULL DEFAULT '',
    birth_date    TEXT NOT NULL DEFAULT '',
    sex           TEXT NOT NULL DEFAULT '',
    UNIQUE (patient_id, issuer)
);

CREATE TABLE studies (
    id                   INTEGER PRIMARY KEY,
    patient_fk           INTEGER NOT NULL REFERENCES patients(id),
    study_uid            TEXT NOT NULL UNIQUE,
    study_date           TEXT NOT NULL DEFAULT '',
    study_time           TEXT NOT NULL DEFAULT '',
    study_time_key       TEXT NOT NULL DEFAULT '',
    accession_number     TEXT NOT NULL DEFAULT '',
    study_id             TEXT NOT NULL DEFAULT '',
    study_description    TEXT NOT NULL DEFAULT '',
    referring_physician  TEXT NOT NULL DEFAULT '',
    character_set        TEXT NOT NULL DEFAULT '',
    -- completeness: drives the sync agent's "stable" decision
    series_count         INTEGER NOT NULL DEFAULT 0,
    instance_count       INTEGER NOT NULL DEFAULT 0,
    total_bytes          INTEGER NOT NULL DEFAULT 0,
    first_received_at    REAL NOT NULL,
    last_received_at     REAL NOT NULL,
    last_access_at       REAL NOT NULL,
    -- tiering: local -> replicating -> replicated -> evicted -> recalling
    tier_state           TEXT NOT NULL DEFAULT 'local',
    tier_changed_at      REAL NOT NULL
);
CREATE INDEX studies_patient ON studies(patient_fk);
CREATE INDEX studies_date ON studies(study_date);
CREATE INDEX studies_accession ON studies(accession_number);
CREATE INDEX studies_tier ON studies(tier_state);

CREATE TABLE series (
    id                 INTEGER PRIMARY KEY,
    study_fk           INTEGER NOT NULL REFERENCES studies(id),
    series_uid         TEXT NOT NULL UNIQUE,
    modality           TEXT NOT NULL DEFAULT '',
    series_number      INTEGER,
    series_description TEXT NOT NULL DEFAULT '',
    body_part          TEXT NOT NULL DEFAULT '',
    series_date        TEXT NOT NULL DEFAULT '',
    series_time        TEXT NOT NULL DEFAULT '',
    instance_count     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX series_study ON series(study_fk);

CREATE TABLE instances (
    id               INTEGER PRIMARY KEY,
    series_fk        INTEGER NOT NULL REFERENCES series(id),
    sop_uid          TEXT NOT NULL UNIQUE,
    sop_class_uid    TEXT NOT NULL,
    instance_number  INTEGER,
    transfer_syntax  TEXT NOT NULL,
    path             TEXT NOT NULL UNIQUE,  -- relative to the store root
    size             INTEGER NOT NULL,      -- bytes of the whole Part 10 file
    dataset_offset   INTEGER NOT NULL,      -- first byte after the File Meta group
    sha256           TEXT NOT NULL,         -- of the dataset bytes (after File Meta)
    received_at      REAL NOT NULL,
    source_ae        TEXT NOT NULL DEFAULT ''
);
CREATE INDEX instances_series ON instances(series_fk);

-- Earlier content of a re-sent SOP Instance UID: kept, never overwritten.
CREATE TABLE instance_versions (
    id               INTEGER PRIMARY KEY,
    sop_uid          TEXT NOT NULL,
    path             TEXT NOT NULL UNIQUE,
    size             INTEGER NOT NULL,
    sha256           TEXT NOT NULL,
    transfer_syntax  TEXT NOT NULL,
    received_at      REAL NOT NULL,
    superseded_at    REAL NOT NULL
);
CREATE INDEX instance_versions_sop ON instance_versions(sop_uid);
