-- An instance that leaves a study the cloud may hold for another study (sent again under
-- another Study Instance UID) is still in that study's earlier pack versions, and a
-- remote reader, who sees one study's versions only, would go on showing it there. The
-- study's next version lists it as withdrawn (docs/cloud-format.md); a row waits here
-- until that version is verified (store/withdrawals.py).
CREATE TABLE withdrawals (
    study_fk INTEGER NOT NULL REFERENCES studies(id),
    sop_uid TEXT NOT NULL,
    withdrawn_at REAL NOT NULL,
    PRIMARY KEY (study_fk, sop_uid)
) WITHOUT ROWID;
