-- Where a prior version's content is (docs/storage.md, "Re-sent instances"), as
-- for a current instance: a row superseded after its study was evicted has no
-- local file, only its place in a verified pack, and keeps both here.
ALTER TABLE instance_versions ADD COLUMN pack_fk INTEGER REFERENCES packs(id);
ALTER TABLE instance_versions ADD COLUMN pack_offset INTEGER;
ALTER TABLE instance_versions ADD COLUMN pack_length INTEGER;
-- 1 while the version's file is on local disk; 0 when its only copy is the pack.
ALTER TABLE instance_versions ADD COLUMN is_local INTEGER NOT NULL DEFAULT 1;
CREATE INDEX instance_versions_pack ON instance_versions(pack_fk);

-- A path is named by one row at most, in either table: content sent again after
-- a correction (X, Y, X) left a version row naming the current row's file, which
-- an eviction of the current row then deleted. Such a version row holds nothing
-- the current row does not (same path: same SOP Instance UID and content).
DELETE FROM instance_versions WHERE path IN (SELECT path FROM instances);
