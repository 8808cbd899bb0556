-- C-FIND: each patient's name case-folded (Python's str.casefold, the SQL function
-- pacs_fold that every index connection registers, appliance/store/database.py), indexed.
-- Person names match case-insensitively (services/query/matching.py); comparing this
-- column with a GLOB pattern is that match exactly, and SQLite turns a pattern with a
-- literal prefix (`smith^j*`) into a range of this index instead of calling a Python
-- function on every patient. Triggers keep the column right whoever writes the name.
ALTER TABLE patients ADD COLUMN patient_name_folded TEXT NOT NULL DEFAULT '';
UPDATE patients SET patient_name_folded = pacs_fold(patient_name);
CREATE INDEX patients_name_folded ON patients(patient_name_folded);
CREATE TRIGGER patients_name_folded_insert AFTER INSERT ON patients BEGIN
    UPDATE patients SET patient_name_folded = pacs_fold(NEW.patient_name) WHERE id = NEW.id;
END;
CREATE TRIGGER patients_name_folded_update AFTER UPDATE OF patient_name ON patients BEGIN
    UPDATE patients SET patient_name_folded = pacs_fold(NEW.patient_name) WHERE id = NEW.id;
END;
