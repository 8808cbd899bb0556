-- Prefetch of prior studies (docs/workflow.md, "Prefetch of priors"): before a
-- patient arrives, the box makes sure the patient's relevant prior studies are
-- on local disk. The state table of a prior is in appliance/store/prefetch_rows.py;
-- every state change of a prior is one row in prefetch_transitions, committed
-- with the change.

-- One row per prefetch: a new order (trigger 'order'), tomorrow's worklist
-- ('nightly') or `pacs-edge prefetch --patient-id` ('manual'). The rules
-- (appliance/services/prefetch_rules.py) read the order's modality and
-- procedure text; needed_at is the order's scheduled start (NULL: as soon as
-- possible); the chosen priors stay local until hold_until.
-- state: pending (priors not chosen yet) | planned | failed (choosing failed:
-- error_kind, error; `pacs-edge prefetch retry` plans it again).
CREATE TABLE prefetch_requests (
    id            INTEGER PRIMARY KEY,
    patient_id    TEXT NOT NULL,                 -- (0010,0020)
    issuer        TEXT NOT NULL DEFAULT '',      -- (0010,0021)
    trigger       TEXT NOT NULL CHECK (trigger IN ('order', 'nightly', 'manual')),
    order_fk      INTEGER REFERENCES orders(id),
    exclude_study_uid TEXT NOT NULL DEFAULT '',  -- the ordered study itself is no prior
    modality      TEXT NOT NULL DEFAULT '',      -- the order's (0008,0060)
    procedure     TEXT NOT NULL DEFAULT '',      -- the order's procedure text (body part)
    needed_at     REAL,
    hold_until    REAL NOT NULL,
    state         TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'planned', 'failed')),
    error_kind    TEXT NOT NULL DEFAULT '',
    error         TEXT NOT NULL DEFAULT '',      -- PHI-free: shown and logged
    created_at    REAL NOT NULL,
    planned_at    REAL
);
-- One prefetch per order, whichever trigger saw it first.
CREATE UNIQUE INDEX prefetch_requests_order ON prefetch_requests(order_fk)
    WHERE order_fk IS NOT NULL;
CREATE INDEX prefetch_requests_state ON prefetch_requests(state);

-- The priors a request chose. source: where the study is when chosen:
-- local (on disk: only held), cloud (evicted: the sync agent recalls it,
-- rehydrating archived packs first), remote (not in the box: the serving
-- process C-MOVEs it from [prefetch] remote_archive).
CREATE TABLE prefetch_priors (
    id            INTEGER PRIMARY KEY,
    request_fk    INTEGER NOT NULL REFERENCES prefetch_requests(id),
    study_uid     TEXT NOT NULL,
    study_date    TEXT NOT NULL DEFAULT '',      -- YYYYMMDD
    modalities    TEXT NOT NULL DEFAULT '',      -- comma-separated
    source        TEXT NOT NULL CHECK (source IN ('local', 'cloud', 'remote')),
    state         TEXT NOT NULL DEFAULT 'pending' CHECK (state IN
        ('pending', 'recalling', 'rehydrating', 'moving', 'done', 'failed')),
    failure_kind  TEXT NOT NULL DEFAULT '',      -- appliance.base.errors.PrefetchFailure
    error         TEXT NOT NULL DEFAULT '',      -- PHI-free
    rehydrate_requested_at REAL,                 -- early (High priority) rehydration asked
    changed_at    REAL NOT NULL,
    done_at       REAL,
    UNIQUE (request_fk, study_uid)
);
CREATE INDEX prefetch_priors_work ON prefetch_priors(source, state);
CREATE INDEX prefetch_priors_study ON prefetch_priors(study_uid);

CREATE TABLE prefetch_transitions (
    id          INTEGER PRIMARY KEY,
    prior_fk    INTEGER NOT NULL REFERENCES prefetch_priors(id),
    from_state  TEXT NOT NULL,
    to_state    TEXT NOT NULL,
    trigger     TEXT NOT NULL,
    at          REAL NOT NULL
);

-- The nightly run for tomorrow's worklist: one row per local day it ran.
CREATE TABLE prefetch_nightly_runs (
    day         TEXT PRIMARY KEY,                -- YYYYMMDD, local time
    at          REAL NOT NULL,
    requests    INTEGER NOT NULL
);
