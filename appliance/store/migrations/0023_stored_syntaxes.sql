-- How many current instances each (SOP class, transfer syntax) pair has, for C-GET
-- negotiation (Index.syntax_counts, appliance/dimse/negotiation.py). It was a GROUP
-- BY over the instance table's index of those columns: 2.1 s at 3 million rows
-- (minutes at tens of millions), at most every 30 s a C-GET arrived, on the reader
-- connection every C-FIND, QIDO and status waits for. The triggers keep the counts
-- (a handful of rows) as instances come, change and go, and the index goes: one less
-- index written per C-STORE.
CREATE TABLE stored_syntaxes (
    sop_class_uid   TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    instance_count  INTEGER NOT NULL,
    PRIMARY KEY (sop_class_uid, transfer_syntax)
) WITHOUT ROWID;
INSERT INTO stored_syntaxes (sop_class_uid, transfer_syntax, instance_count)
    SELECT sop_class_uid, transfer_syntax, COUNT(*) FROM instances GROUP BY 1, 2;
CREATE TRIGGER stored_syntaxes_insert AFTER INSERT ON instances BEGIN
    INSERT INTO stored_syntaxes (sop_class_uid, transfer_syntax, instance_count)
    VALUES (NEW.sop_class_uid, NEW.transfer_syntax, 1)
    ON CONFLICT (sop_class_uid, transfer_syntax) DO UPDATE SET instance_count = instance_count + 1;
END;
CREATE TRIGGER stored_syntaxes_delete AFTER DELETE ON instances BEGIN
    UPDATE stored_syntaxes SET instance_count = instance_count - 1
    WHERE sop_class_uid = OLD.sop_class_uid AND transfer_syntax = OLD.transfer_syntax;
END;
CREATE TRIGGER stored_syntaxes_update AFTER UPDATE OF sop_class_uid, transfer_syntax ON instances
WHEN OLD.sop_class_uid IS NOT NEW.sop_class_uid OR OLD.transfer_syntax IS NOT NEW.transfer_syntax
BEGIN
    UPDATE stored_syntaxes SET instance_count = instance_count - 1
    WHERE sop_class_uid = OLD.sop_class_uid AND transfer_syntax = OLD.transfer_syntax;
    INSERT INTO stored_syntaxes (sop_class_uid, transfer_syntax, instance_count)
    VALUES (NEW.sop_class_uid, NEW.transfer_syntax, 1)
    ON CONFLICT (sop_class_uid, transfer_syntax) DO UPDATE SET instance_count = instance_count + 1;
END;
DROP INDEX instances_class_syntax;
