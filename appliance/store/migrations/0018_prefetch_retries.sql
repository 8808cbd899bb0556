-- Automatic retries of a prefetch that failed for a reason that may pass (the remote
-- archive was down, a C-MOVE or a recall failed): `[prefetch] retry_attempts` times,
-- `retry_base_seconds` after the failure, doubled each time, at most an hour
-- (store/prefetch_rows.py). attempts: automatic retries taken so far (`pacs-edge
-- prefetch retry` starts them again from 0); retry_at: when the next one is due, NULL
-- when none will be made.
ALTER TABLE prefetch_requests ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE prefetch_requests ADD COLUMN retry_at REAL;
ALTER TABLE prefetch_priors ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE prefetch_priors ADD COLUMN retry_at REAL;
CREATE INDEX prefetch_priors_retry ON prefetch_priors(retry_at) WHERE retry_at IS NOT NULL;
