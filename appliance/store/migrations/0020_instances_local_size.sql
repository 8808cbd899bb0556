-- The totals that `status`, the status page and every /metrics scrape read
-- (Index.totals: instances, their bytes, the bytes on local disk) come from
-- this index alone, not from the table: after a year the table holds millions
-- of rows with their paths and hashes (2.8 GB at 3 million), and the sums
-- scanned it all on every scrape (1.7 s warm at 3 million rows, 11 s cold).
-- size first: with is_local first, SQLite (no ANALYZE statistics) took it for
-- a selective index and read a study's instances through all the local (or
-- evicted) ones instead of through the study's series.
CREATE INDEX instances_local_size ON instances(size, is_local);
