-- Which process drives a migration run (store/migration_rows.py: claim_run): a lease
-- holder (store/leases.py, "boot/pid/start time/token"), '' when none. A run that is
-- 'running' with no live driver was interrupted (the process was killed, the box
-- rebooted): `migrate status` says so, and `migrate resume` takes it over. A second
-- `migrate resume` beside a live driver is refused.
ALTER TABLE migration_runs ADD COLUMN driver TEXT NOT NULL DEFAULT '';
