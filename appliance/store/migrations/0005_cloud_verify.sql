-- What the cloud service stored for each pack version, as verified at upload
-- (evict compares it with a HEAD before deleting anything), and what the last
-- scrub found when it read the pack back (docs/storage.md, "Scrub").

-- ETags and the manifest's size of the committed blobs ('' / 0: uploaded before
-- this migration; the first scrub that verifies the pack records them).
ALTER TABLE packs ADD COLUMN pack_etag TEXT NOT NULL DEFAULT '';
ALTER TABLE packs ADD COLUMN manifest_etag TEXT NOT NULL DEFAULT '';
ALTER TABLE packs ADD COLUMN manifest_size INTEGER NOT NULL DEFAULT 0;

-- Last scrub: when, and its verdict: '' never scrubbed | ok | damaged.
-- scrub_error says what failed, without PHI (it is shown and logged).
ALTER TABLE packs ADD COLUMN scrubbed_at REAL;
ALTER TABLE packs ADD COLUMN scrub_state TEXT NOT NULL DEFAULT '';
ALTER TABLE packs ADD COLUMN scrub_error TEXT NOT NULL DEFAULT '';
CREATE INDEX packs_scrubbed ON packs(scrubbed_at);
