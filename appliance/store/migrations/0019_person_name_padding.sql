-- C-FIND: the patient's folded name (0012) also leaves out PN padding (PS3.5 6.2.1):
-- trailing empty components and groups, so that 'DOE^JOHN^^^' and 'Doe^John==' are
-- kept as 'doe^john' and match a query for 'Doe^John' (services/query/matching.py).
-- The rule is a new SQL function, pacs_fold_pn (appliance/store/person_names.py), not a
-- new meaning of pacs_fold: rows written by pacs_fold are rewritten here, and a program
-- from before this migration fails on the triggers ("no such function") instead of
-- writing names in the old form beside the new ones. The index on the column is kept up
-- to date by the UPDATE.
DROP TRIGGER patients_name_folded_insert;
DROP TRIGGER patients_name_folded_update;
UPDATE patients SET patient_name_folded = pacs_fold_pn(patient_name);
CREATE TRIGGER patients_name_folded_insert AFTER INSERT ON patients BEGIN
    UPDATE patients SET patient_name_folded = pacs_fold_pn(NEW.patient_name) WHERE id = NEW.id;
END;
CREATE TRIGGER patients_name_folded_update AFTER UPDATE OF patient_name ON patients BEGIN
    UPDATE patients SET patient_name_folded = pacs_fold_pn(NEW.patient_name) WHERE id = NEW.id;
END;
