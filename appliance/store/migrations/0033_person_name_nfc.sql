-- C-FIND: the patient's folded name (0019) is also in Unicode NFC, so that a name sent
-- with 'ü' composed (U+00FC) and one sent decomposed ('u' and U+0308, as macOS and some
-- RIS and modalities write it) are one name, and match a query typed in either form
-- (store/person_names.py). A new SQL function, pacs_fold_pn_nfc, as 0019 did it: rows
-- are rewritten here, and a program from before this migration fails on the triggers
-- instead of writing names in the old form beside the new ones.
DROP TRIGGER patients_name_folded_insert;
DROP TRIGGER patients_name_folded_update;
UPDATE patients SET patient_name_folded = pacs_fold_pn_nfc(patient_name);
CREATE TRIGGER patients_name_folded_insert AFTER INSERT ON patients BEGIN
    UPDATE patients SET patient_name_folded = pacs_fold_pn_nfc(NEW.patient_name)
    WHERE id = NEW.id;
END;
CREATE TRIGGER patients_name_folded_update AFTER UPDATE OF patient_name ON patients BEGIN
    UPDATE patients SET patient_name_folded = pacs_fold_pn_nfc(NEW.patient_name)
    WHERE id = NEW.id;
END;
