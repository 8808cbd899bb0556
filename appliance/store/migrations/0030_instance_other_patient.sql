-- A study is filed under one patient, that of its first instance. An instance of it that
-- names another patient (its Patient ID and issuer, after merges; or, without an ID, its
-- name, birth date and sex) keeps that patient's row here; NULL is the study's own.
-- When every current instance of a study names the same other patient (the study sent
-- again after its Patient ID was corrected at the modality), the study moves to that
-- patient and the column is NULL again (store/index.py: _record, _follow_instances).
ALTER TABLE instances ADD COLUMN patient_fk INTEGER REFERENCES patients(id);
-- Only the few instances that name another patient are in it: counting a study's, and
-- finding those of a patient a merge removes, stay cheap.
CREATE INDEX instances_other_patient ON instances(patient_fk) WHERE patient_fk IS NOT NULL;
