-- The SOP classes of each study's instances, with how many instances have each
-- (store/hierarchy.py: count_sop_class, kept in step as instance rows come and go;
-- recount_study recomputes a study). SOPClassesInStudy is read from here: computed
-- from the instances, a SERIES or IMAGE query visited the whole study once per
-- match (12,000 instances of one study: ~110 s of the index's one reader).
CREATE TABLE study_sop_classes (
    study_fk       INTEGER NOT NULL REFERENCES studies(id),
    sop_class_uid  TEXT NOT NULL,
    instance_count INTEGER NOT NULL,
    PRIMARY KEY (study_fk, sop_class_uid)
) WITHOUT ROWID;

INSERT INTO study_sop_classes (study_fk, sop_class_uid, instance_count)
SELECT se.study_fk, i.sop_class_uid, COUNT(*)
FROM instances i JOIN series se ON se.id = i.series_fk
GROUP BY se.study_fk, i.sop_class_uid;
