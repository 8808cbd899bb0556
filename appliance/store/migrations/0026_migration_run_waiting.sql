-- What the process driving a migration run waits for, since when and why
-- (store/migration_rows.py: set_waiting): 'serve' (this box's DICOM port, where a
-- C-MOVE delivers, takes no connection) or 'legacy' (the legacy PACS does not
-- answer), '' when it waits for nothing. `migrate status` shows it, from another
-- process: a run that only waits looks stalled otherwise. No PHI: the reason names
-- the peer's address or this box's port.
ALTER TABLE migration_runs ADD COLUMN waiting_for TEXT NOT NULL DEFAULT '';
ALTER TABLE migration_runs ADD COLUMN waiting_since REAL;
ALTER TABLE migration_runs ADD COLUMN waiting_reason TEXT NOT NULL DEFAULT '';
