-- A patient row is one Patient ID (and issuer), except for instances that carry no
-- Patient ID at all (an unregistered trauma patient, a phantom, an old modality): those
-- are not one patient. Before this, every one of them joined the single row with an
-- empty ID, so C-FIND and QIDO-RS answered each such study with the name, birth date
-- and sex of the first one ever stored. Now such a patient is its demographics: a row
-- with an empty ID per (issuer, name, birth date, sex) (store/hierarchy.py:
-- upsert_patient). Rows already merged stay as they were (their files hold the names;
-- the index never kept them per study).
-- SQLite cannot drop a UNIQUE table constraint, so the table is rebuilt (SQLite's own
-- recipe: foreign keys are off while migrations run, and checked before each commit:
-- database.migrate). Its indexes and triggers go with it and are made again.
CREATE TABLE patients_rebuilt (
    id                  INTEGER PRIMARY KEY,
    patient_id          TEXT NOT NULL,
    issuer              TEXT NOT NULL DEFAULT '',
    patient_name        TEXT NOT NULL DEFAULT '',
    birth_date          TEXT NOT NULL DEFAULT '',
    sex                 TEXT NOT NULL DEFAULT '',
    patient_name_folded TEXT NOT NULL DEFAULT ''
);
INSERT INTO patients_rebuilt (id, patient_id, issuer, patient_name, birth_date, sex,
                              patient_name_folded)
    SELECT id, patient_id, issuer, patient_name, birth_date, sex, patient_name_folded
    FROM patients;
DROP TABLE patients;
ALTER TABLE patients_rebuilt RENAME TO patients;
-- Lookups by ID (every instance stored, C-FIND, merges) and by demographics for the
-- patients without one use the full index; a partial index cannot serve `patient_id = ?`
-- (SQLite does not know the bound value is not empty), so uniqueness has its own.
CREATE INDEX patients_key ON patients(patient_id, issuer, patient_name, birth_date, sex);
CREATE UNIQUE INDEX patients_identity ON patients(patient_id, issuer) WHERE patient_id <> '';
CREATE INDEX patients_name_folded ON patients(patient_name_folded);
CREATE TRIGGER patients_name_folded_insert AFTER INSERT ON patients BEGIN
    UPDATE patients SET patient_name_folded = pacs_fold_pn(NEW.patient_name) WHERE id = NEW.id;
END;
CREATE TRIGGER patients_name_folded_update AFTER UPDATE OF patient_name ON patients BEGIN
    UPDATE patients SET patient_name_folded = pacs_fold_pn(NEW.patient_name) WHERE id = NEW.id;
END;
