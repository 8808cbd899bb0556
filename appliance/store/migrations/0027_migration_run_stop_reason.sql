-- Why a migration run was paused by the run itself (store/migration_rows.py:
-- change_run with a reason): a status of the legacy PACS that every study would
-- get (e.g. 0xA801, this box unknown as a move destination), with what to fix.
-- '' for a pause an operator asked for, and once the run is resumed.
ALTER TABLE migration_runs ADD COLUMN stop_reason TEXT NOT NULL DEFAULT '';
