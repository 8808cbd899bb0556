-- Whether a migrated study was transferred (1) or found complete in the box before
-- any transfer (0: a study the box held already, or one whose transfer a killed
-- process had finished). Only transfers make the pace of `migrate status`
-- (store/migration_rows.py: pace): studies done in no time would inflate it.
ALTER TABLE migration_studies ADD COLUMN fetched INTEGER NOT NULL DEFAULT 1;
