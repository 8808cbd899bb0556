"""Which C-FIND key maps to which index column, at which level.

A key belongs to the level that owns the attribute (PS3.4 C.6.1.1 and
C.6.2.1) and can be matched and returned at that level and every level below
it: a SERIES query may carry PatientID or StudyDate, which restricts it to the
series of those patients or studies. Keys of a level below the query level
are not answered (see appliance/services/query/find.py).

The query service reads a key's keyword, level, kind of matching and VR; the
SQL expressions (`column`, `match_column`, `exists`) are the store's alone
(conditions.py and search.py turn them into statements).

Column expressions use fixed aliases: p (patients), st (studies), se (series),
i (instances). Counts come from the columns the index maintains on every
insert, never from COUNT() over instances.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.tag import BaseTag, Tag


class Level(enum.IntEnum):
    """Query/Retrieve levels, top down; a key is defined at its level and below."""

    PATIENT = 0
    STUDY = 1
    SERIES = 2
    IMAGE = 3


class Match(enum.Enum):
    """How a key's request values select entities (the rules: services/query/matching.py)."""

    TEXT = "text"
    PERSON_NAME = "person_name"
    DATE = "date"
    TIME = "time"
    UID = "uid"
    INTEGER = "integer"
    RETURN_ONLY = "return_only"  # counts, availability: returned, never matched


# The rows a query at each level returns, joined up to the patient.
SOURCES = {
    Level.PATIENT: "patients p",
    Level.STUDY: "studies st JOIN patients p ON p.id = st.patient_fk",
    Level.SERIES: "series se JOIN studies st ON st.id = se.study_fk"
    " JOIN patients p ON p.id = st.patient_fk",
    Level.IMAGE: "instances i JOIN series se ON se.id = i.series_fk"
    " JOIN studies st ON st.id = se.study_fk JOIN patients p ON p.id = st.patient_fk",
}
ROW_ID = {Level.PATIENT: "p.id", Level.STUDY: "st.id", Level.SERIES: "se.id", Level.IMAGE: "i.id"}
# What every answer at a level holds whatever the keys. A study whose every instance
# was sent again into another study keeps its row (its packs and prior versions name
# it) but holds nothing to retrieve; a series goes when its last instance does.
_HOLDS_INSTANCES = "x.instance_count > 0"
_PATIENT_STUDIES = f"FROM studies x WHERE x.patient_fk = p.id AND {_HOLDS_INSTANCES}"
ALWAYS = {Level.PATIENT: f"EXISTS (SELECT 1 {_PATIENT_STUDIES})",
          Level.STUDY: "st.instance_count > 0", Level.SERIES: "1", Level.IMAGE: "1"}


@dataclass(frozen=True)
class Key:
    keyword: str
    level: Level
    match: Match
    column: str  # SQL expression of the value returned
    match_column: str = ""  # what matching compares, when not `column`
    exists: str = ""  # match through a subquery: SQL with {} for the condition
    multi: bool = False  # `column` is a backslash-joined list of values
    folded: str = ""  # the value case-folded, indexed (person names: see conditions.py)
    tag: BaseTag = field(init=False)
    vr: str = field(init=False)

    def __post_init__(self) -> None:
        tag = tag_for_keyword(self.keyword)
        if tag is None:
            raise ValueError(f"unknown DICOM keyword {self.keyword}")
        object.__setattr__(self, "tag", Tag(tag))
        object.__setattr__(self, "vr", dictionary_VR(tag))

    @property
    def compared(self) -> str:
        return self.match_column or self.column


_L, _M = Level, Match

KEYS: tuple[Key, ...] = (
    Key("PatientName", _L.PATIENT, _M.PERSON_NAME, "p.patient_name",
        folded="p.patient_name_folded"),
    Key("PatientID", _L.PATIENT, _M.TEXT, "p.patient_id"),
    Key("IssuerOfPatientID", _L.PATIENT, _M.TEXT, "p.issuer"),
    Key("PatientBirthDate", _L.PATIENT, _M.DATE, "p.birth_date"),
    Key("PatientSex", _L.PATIENT, _M.TEXT, "p.sex"),
    Key("NumberOfPatientRelatedStudies", _L.PATIENT, _M.RETURN_ONLY,
        f"(SELECT COUNT(*) {_PATIENT_STUDIES})"),
    Key("NumberOfPatientRelatedSeries", _L.PATIENT, _M.RETURN_ONLY,
        f"(SELECT COALESCE(SUM(x.series_count), 0) {_PATIENT_STUDIES})"),
    Key("NumberOfPatientRelatedInstances", _L.PATIENT, _M.RETURN_ONLY,
        f"(SELECT COALESCE(SUM(x.instance_count), 0) {_PATIENT_STUDIES})"),
    # A patient is NEARLINE as soon as one of their studies must be recalled.
    Key("InstanceAvailability", _L.PATIENT, _M.RETURN_ONLY,
        f"CASE WHEN EXISTS (SELECT 1 {_PATIENT_STUDIES} AND x.tier_state = 'evicted')"
        " THEN 'NEARLINE' ELSE 'ONLINE' END"),
    Key("StudyInstanceUID", _L.STUDY, _M.UID, "st.study_uid"),
    Key("StudyDate", _L.STUDY, _M.DATE, "st.study_date"),
    Key("StudyTime", _L.STUDY, _M.TIME, "st.study_time", match_column="st.study_time_key"),
    Key("AccessionNumber", _L.STUDY, _M.TEXT, "st.accession_number"),
    Key("StudyID", _L.STUDY, _M.TEXT, "st.study_id"),
    Key("StudyDescription", _L.STUDY, _M.TEXT, "st.study_description"),
    Key("ReferringPhysicianName", _L.STUDY, _M.PERSON_NAME, "st.referring_physician"),
    Key("ModalitiesInStudy", _L.STUDY, _M.TEXT,
        "(SELECT group_concat(m, '\\') FROM (SELECT DISTINCT cs.modality AS m FROM series cs"
        " WHERE cs.study_fk = st.id AND cs.modality != '' ORDER BY m))",
        match_column="cs.modality", multi=True,
        exists="EXISTS (SELECT 1 FROM series cs WHERE cs.study_fk = st.id AND ({}))"),
    # From the classes the index keeps per study (migration 0017), not the instances:
    # a SERIES or IMAGE query reads it once per match.
    Key("SOPClassesInStudy", _L.STUDY, _M.UID,
        "(SELECT group_concat(c, '\\') FROM (SELECT sc.sop_class_uid AS c"
        " FROM study_sop_classes sc WHERE sc.study_fk = st.id ORDER BY c))",
        match_column="sc.sop_class_uid", multi=True,
        exists="EXISTS (SELECT 1 FROM study_sop_classes sc WHERE sc.study_fk = st.id"
               " AND ({}))"),
    Key("NumberOfStudyRelatedSeries", _L.STUDY, _M.RETURN_ONLY, "st.series_count"),
    Key("NumberOfStudyRelatedInstances", _L.STUDY, _M.RETURN_ONLY, "st.instance_count"),
    # Tiering is per study; 'recalling' studies answer ONLINE (retrieve waits for them).
    Key("InstanceAvailability", _L.STUDY, _M.RETURN_ONLY,
        "CASE st.tier_state WHEN 'evicted' THEN 'NEARLINE' ELSE 'ONLINE' END"),
    Key("SeriesInstanceUID", _L.SERIES, _M.UID, "se.series_uid"),
    Key("Modality", _L.SERIES, _M.TEXT, "se.modality"),
    Key("SeriesNumber", _L.SERIES, _M.INTEGER, "se.series_number"),
    Key("SeriesDescription", _L.SERIES, _M.TEXT, "se.series_description"),
    Key("BodyPartExamined", _L.SERIES, _M.TEXT, "se.body_part"),
    Key("SeriesDate", _L.SERIES, _M.DATE, "se.series_date"),
    # series rows keep the time as sent; the key is computed when matching.
    Key("SeriesTime", _L.SERIES, _M.TIME, "se.series_time",
        match_column="pacs_time_key(se.series_time)"),
    Key("NumberOfSeriesRelatedInstances", _L.SERIES, _M.RETURN_ONLY, "se.instance_count"),
    Key("SOPInstanceUID", _L.IMAGE, _M.UID, "i.sop_uid"),
    Key("SOPClassUID", _L.IMAGE, _M.UID, "i.sop_class_uid"),
    Key("InstanceNumber", _L.IMAGE, _M.INTEGER, "i.instance_number"),
)

_BY_TAG: dict[BaseTag, list[Key]] = {}
for _key in KEYS:
    _BY_TAG.setdefault(_key.tag, []).append(_key)


def lookup(tag: BaseTag, level: Level) -> Key | None:
    """The key answering `tag` at `level`: the definition of the deepest level not below it."""
    usable = [key for key in _BY_TAG.get(tag, ()) if key.level <= level]
    return max(usable, key=lambda key: key.level) if usable else None
