-- One tiering operation at a time per study, across processes (appliance/store/leases.py).
-- A row exists while an operation holds the study; `holder` names the process
-- (boot id, pid, start time) and the operation instance that took it.

CREATE TABLE study_leases (
    study_fk     INTEGER PRIMARY KEY REFERENCES studies(id),
    operation    TEXT NOT NULL,
    holder       TEXT NOT NULL,
    acquired_at  REAL NOT NULL,
    expires_at   REAL NOT NULL
);
