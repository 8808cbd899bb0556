-- Workflow state owned by the DIMSE side: Storage Commitment requests and
-- Modality Performed Procedure Steps (docs/workflow.md). State machines are
-- tables in appliance/store/commitments.py and appliance/store/mpps.py; every
-- transition is one row in the *_transitions tables, committed with the change.

-- One row per N-ACTION "Request Storage Commitment" (push model), keyed by the
-- requesting peer's AE title and its Transaction UID: a repeated request is the
-- same commitment, answered again.
-- state: pending (report not delivered yet) | answered | abandoned (gave up).
CREATE TABLE commitments (
    id                INTEGER PRIMARY KEY,
    calling_ae        TEXT NOT NULL,
    transaction_uid   TEXT NOT NULL,
    state             TEXT NOT NULL DEFAULT 'pending',
    requested_at      REAL NOT NULL,
    answered_at       REAL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   REAL NOT NULL,
    last_error        TEXT NOT NULL DEFAULT '',  -- PHI-free: shown and logged
    UNIQUE (calling_ae, transaction_uid)
);
CREATE INDEX commitments_due ON commitments(state, next_attempt_at);

-- The Referenced SOP Sequence of the request, in order; outcome is what the
-- delivered report said ('' before): committed, or why not (unknown,
-- class_mismatch, damaged, not_in_cloud; appliance/services/commitment.py).
CREATE TABLE commitment_items (
    commitment_fk   INTEGER NOT NULL REFERENCES commitments(id),
    position        INTEGER NOT NULL,
    sop_class_uid   TEXT NOT NULL,
    sop_uid         TEXT NOT NULL,
    outcome         TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (commitment_fk, position)
);

CREATE TABLE commitment_transitions (
    id             INTEGER PRIMARY KEY,
    commitment_fk  INTEGER NOT NULL REFERENCES commitments(id),
    from_state     TEXT NOT NULL,
    to_state       TEXT NOT NULL,
    trigger        TEXT NOT NULL,
    at             REAL NOT NULL
);
CREATE INDEX commitment_transitions_fk ON commitment_transitions(commitment_fk);

-- One row per MPPS SOP Instance (N-CREATE), updated by N-SET.
-- state: in_progress | completed | discontinued (PS3.4 F.7.2; no change after a final state).
-- `dataset` is the step's current attribute set (Explicit VR Little Endian), the
-- N-CREATE's with every accepted N-SET applied.
CREATE TABLE mpps_steps (
    id                  INTEGER PRIMARY KEY,
    sop_uid             TEXT NOT NULL UNIQUE,
    calling_ae          TEXT NOT NULL,
    state               TEXT NOT NULL,
    station_ae          TEXT NOT NULL DEFAULT '',   -- Performed Station AE Title
    modality            TEXT NOT NULL DEFAULT '',
    patient_id          TEXT NOT NULL DEFAULT '',
    step_id             TEXT NOT NULL DEFAULT '',   -- Performed Procedure Step ID
    start_date          TEXT NOT NULL DEFAULT '',
    start_time          TEXT NOT NULL DEFAULT '',
    end_date            TEXT NOT NULL DEFAULT '',
    end_time            TEXT NOT NULL DEFAULT '',
    dataset             BLOB NOT NULL,
    created_at          REAL NOT NULL,
    updated_at          REAL NOT NULL
);

-- The keys that link a step to its order(s): one row per item of the Scheduled
-- Step Attributes Sequence (an unscheduled step has one row of what it knows).
CREATE TABLE mpps_step_refs (
    step_fk                 INTEGER NOT NULL REFERENCES mpps_steps(id),
    position                INTEGER NOT NULL,
    study_uid               TEXT NOT NULL DEFAULT '',
    accession_number        TEXT NOT NULL DEFAULT '',
    requested_procedure_id  TEXT NOT NULL DEFAULT '',
    scheduled_step_id       TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (step_fk, position)
);
CREATE INDEX mpps_step_refs_study ON mpps_step_refs(study_uid);
CREATE INDEX mpps_step_refs_accession ON mpps_step_refs(accession_number);

CREATE TABLE mpps_transitions (
    id          INTEGER PRIMARY KEY,
    step_fk     INTEGER NOT NULL REFERENCES mpps_steps(id),
    from_state  TEXT NOT NULL,
    to_state    TEXT NOT NULL,
    trigger     TEXT NOT NULL,
    at          REAL NOT NULL
);
CREATE INDEX mpps_transitions_step ON mpps_transitions(step_fk);
