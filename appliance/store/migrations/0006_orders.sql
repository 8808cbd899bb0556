-- Orders from the RIS (HL7 ORM^O01 / OMI^O23) and the Modality Worklist items
-- they become; the HL7 messages applied (duplicate control IDs answered, not
-- re-applied); every order state change; patient merges (ADT^A40).
-- The contract of these tables (columns <-> DICOM attributes, formats, who
-- writes what) is in appliance/store/orders.py's docstring.

-- One row per order: one requested procedure with one scheduled procedure step.
-- Text is stored decoded (Python str); names are DICOM PN (family^given^middle
-- ^prefix^suffix); dates YYYYMMDD; times as sent plus *_time_key (HHMMSS.FFFFFF,
-- appliance/store/times.py) for range matching.
CREATE TABLE orders (
    id                        INTEGER PRIMARY KEY,
    accession_number          TEXT NOT NULL UNIQUE,            -- (0008,0050)
    placer_order_number       TEXT NOT NULL DEFAULT '',        -- ORC-2 (RIS's order id)
    filler_order_number       TEXT NOT NULL DEFAULT '',        -- ORC-3
    study_uid                 TEXT NOT NULL UNIQUE,            -- (0020,000D), fixed at order time
    requested_procedure_id    TEXT NOT NULL DEFAULT '',        -- (0040,1001)
    requested_procedure_desc  TEXT NOT NULL DEFAULT '',        -- (0032,1060)
    procedure_code_value      TEXT NOT NULL DEFAULT '',        -- (0032,1064) item (0008,0100)
    procedure_code_scheme     TEXT NOT NULL DEFAULT '',        -- (0008,0102)
    procedure_code_meaning    TEXT NOT NULL DEFAULT '',        -- (0008,0104)
    priority                  TEXT NOT NULL DEFAULT '',        -- (0040,1003) STAT|HIGH|ROUTINE|MEDIUM|LOW|''
    sps_id                    TEXT NOT NULL DEFAULT '',        -- (0040,0009)
    sps_description           TEXT NOT NULL DEFAULT '',        -- (0040,0007)
    modality                  TEXT NOT NULL DEFAULT '',        -- (0008,0060)
    station_ae_title          TEXT NOT NULL DEFAULT '',        -- (0040,0001)
    station_name              TEXT NOT NULL DEFAULT '',        -- (0040,0010)
    sps_location              TEXT NOT NULL DEFAULT '',        -- (0040,0011)
    sps_start_date            TEXT NOT NULL DEFAULT '',        -- (0040,0002) YYYYMMDD
    sps_start_time            TEXT NOT NULL DEFAULT '',        -- (0040,0003) HHMMSS[.F]
    sps_start_time_key        TEXT NOT NULL DEFAULT '',
    performing_physician      TEXT NOT NULL DEFAULT '',        -- (0040,0006) PN
    referring_physician       TEXT NOT NULL DEFAULT '',        -- (0008,0090) PN
    requesting_physician      TEXT NOT NULL DEFAULT '',        -- (0032,1032) PN
    -- The patient, copied from PID and kept current by ADT^A08 / ADT^A40.
    patient_id                TEXT NOT NULL,                   -- (0010,0020)
    issuer                    TEXT NOT NULL DEFAULT '',        -- (0010,0021)
    patient_name              TEXT NOT NULL DEFAULT '',        -- (0010,0010) PN
    birth_date                TEXT NOT NULL DEFAULT '',        -- (0010,0030) YYYYMMDD
    sex                       TEXT NOT NULL DEFAULT '',        -- (0010,0040) M|F|O|''
    status                    TEXT NOT NULL DEFAULT 'SCHEDULED'
        CHECK (status IN ('SCHEDULED', 'IN PROGRESS', 'COMPLETED', 'DISCONTINUED')),
    status_changed_at         REAL NOT NULL,
    created_at                REAL NOT NULL,
    updated_at                REAL NOT NULL
);
CREATE INDEX orders_patient ON orders(patient_id, issuer);
CREATE INDEX orders_placer ON orders(placer_order_number);
CREATE INDEX orders_status_start ON orders(status, sps_start_date, sps_start_time_key);
CREATE INDEX orders_station ON orders(station_ae_title);

-- Every applied change of an order's status, in the transaction of the change.
CREATE TABLE order_transitions (
    id          INTEGER PRIMARY KEY,
    order_fk    INTEGER NOT NULL REFERENCES orders(id),
    from_state  TEXT NOT NULL,
    to_state    TEXT NOT NULL,
    trigger     TEXT NOT NULL,      -- services/order_states.py OrderTrigger
    source      TEXT NOT NULL,      -- 'hl7' | 'mpps' | 'cli' ...
    at          REAL NOT NULL
);
CREATE INDEX order_transitions_order ON order_transitions(order_fk);

-- HL7 messages whose outcome was decided (AA, or AE for a content error), keyed
-- by sender and MSH-10, so a resent message gets the same answer and is not
-- applied twice. No message text is kept: only its type and a SHA-256.
CREATE TABLE hl7_messages (
    id                   INTEGER PRIMARY KEY,
    sending_application  TEXT NOT NULL,   -- MSH-3
    sending_facility     TEXT NOT NULL,   -- MSH-4
    control_id           TEXT NOT NULL,   -- MSH-10
    message_type         TEXT NOT NULL,   -- MSH-9, e.g. ORM^O01
    content_sha256       TEXT NOT NULL,
    ack_code             TEXT NOT NULL,   -- AA | AE
    ack_text             TEXT NOT NULL DEFAULT '',  -- PHI-free
    error_location       TEXT NOT NULL DEFAULT '',  -- e.g. ORC-1
    received_at          REAL NOT NULL,
    UNIQUE (sending_application, sending_facility, control_id)
);

-- ADT^A40: the prior patient identifier now means the surviving one.
CREATE TABLE patient_merges (
    id                INTEGER PRIMARY KEY,
    prior_patient_id  TEXT NOT NULL,
    prior_issuer      TEXT NOT NULL DEFAULT '',
    patient_id        TEXT NOT NULL,
    issuer            TEXT NOT NULL DEFAULT '',
    merged_at         REAL NOT NULL
);
CREATE INDEX patient_merges_prior ON patient_merges(prior_patient_id, prior_issuer);
