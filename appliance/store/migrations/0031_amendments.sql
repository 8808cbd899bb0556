-- What the cloud's copy of a study must be told by its next pack version, though no
-- new instance may come (store/amendments.py): a row waits here until a version that
-- says it is verified.
--
-- An instance that left the study for another (sent again under another Study
-- Instance UID) is still in the study's earlier versions, and a remote reader, who
-- sees one study's versions only, would go on showing it there: the next version
-- lists it as withdrawn (docs/cloud-format.md).
CREATE TABLE withdrawals (
    study_fk INTEGER NOT NULL REFERENCES studies(id),
    sop_uid TEXT NOT NULL,
    withdrawn_at REAL NOT NULL,
    PRIMARY KEY (study_fk, sop_uid)
) WITHOUT ROWID;
-- The study's patient changed (ADT^A40 merged them into another, ADT^A08 changed the
-- name, birth date or sex): readers and restore take the patient from the newest
-- version's manifest, so the next version states the study as the index has it now.
-- `generation` counts the changes: a version states those it read when it began, and a
-- change during its upload leaves the row for the next.
CREATE TABLE restatements (
    study_fk INTEGER PRIMARY KEY REFERENCES studies(id),
    changed_at REAL NOT NULL,
    generation INTEGER NOT NULL DEFAULT 1
);
