-- The random pack id an upload writes into its pack, manifest and site key
-- object (hex; docs/cloud-format.md), recorded before the first put. Clean-up
-- of an unverified version deletes a blob only when it carries this id: a
-- blob by the same name that another upload wrote (an index rebuilt without
-- `restore`, a second box writing to the container) is never deleted.
-- NULL: a row from before this migration, cleaned up by name as before.
ALTER TABLE packs ADD COLUMN upload_id TEXT;
