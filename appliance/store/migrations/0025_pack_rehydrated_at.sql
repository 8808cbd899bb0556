-- When a recall last brought the pack back online from the Archive tier
-- (sync/recall.py). The lifecycle counts a pack's age from then, not from its
-- creation: a rehydrated pack is moved to colder tiers again as a new one would
-- be, instead of staying Hot for ever (the index kept saying Archive, so the
-- lifecycle never looked at it again) or going back to Archive at the next pass.
ALTER TABLE packs ADD COLUMN rehydrated_at REAL;
