"""C-FIND: answer a query identifier from the SQLite index alone.

Contract for the edges::

    matches = await find(index, QueryModel.STUDY_ROOT, identifier,
                         retrieve_ae_title="EDGE")

returns one complete response identifier per match, or raises QueryError
whose `.kind` the edge maps to the C-FIND failure status. `answer()` returns
the same matches as index rows, which the DIMSE edge encodes without building
a Dataset per match (`Answer.encoded`, see identifiers.py). Without paging, an
Answer holds the first matches' rows and only the row ids of the others; the
edge reads those a batch at a time as it sends (`Answer.batches`), so a query
matching a million instances holds ~8 MB, not ~600 MB (store.cfind.search). No file is opened:
evicted studies answer like any other, with InstanceAvailability NEARLINE.

Each response holds QueryRetrieveLevel, every key of the request (values
from the index, empty when unknown), RetrieveAETitle when asked for, and
SpecificCharacterSet when a value is not ASCII: the request's own single-byte
set when it holds every value, else "ISO_IR 192" (the index keeps decoded text,
so UTF-8 can say everything; identifiers.py says why the request's set first).

Levels and models (PS3.4 C.6): Patient Root answers PATIENT, STUDY, SERIES
and IMAGE; Study Root has no PATIENT level and refuses it (0xA900), as it
refuses a missing or unknown level. Keys of the query level and the levels
above match relationally in both models: unique keys of upper levels are not
required, and when given they restrict (a Patient Root STUDY query with
PatientID answers that patient's studies). Keys the appliance does not know,
keys of levels below the query level, sequences and private attributes are
returned empty and do not restrict; `Answer.unmatched_keys` counts those sent with a
value, so that the edge can say the matches were not narrowed by them. Matching rules
are in matching.py; the key table, the SQL and its execution are the store's
(appliance.store.cfind).

Logging: counts only, at debug level; never a value of the identifier.
"""

from __future__ import annotations

import enum
import logging
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from pydicom import config
from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

from appliance.base.errors import QueryError, QueryRefusal
from appliance.services.query import matching
from appliance.services.query.identifiers import (
    CHARACTER_SET,
    Template,
    asked_character_set,
    response_character_set,
)
from appliance.store.cfind import attributes
from appliance.store.cfind.attributes import Key, Level
from appliance.store.cfind.search import (
    FETCH_BATCH,
    Criterion,
    PeriodCriterion,
    Row,
    Window,
    rows_by_id,
    search,
    search_ids,
)
from appliance.store.index import Index

__all__ = ["Answer", "QueryError", "QueryModel", "QueryRefusal", "Row", "answer", "find"]

log = logging.getLogger(__name__)


class QueryModel(enum.Enum):
    PATIENT_ROOT = "patient"
    STUDY_ROOT = "study"


_LEVELS = {
    QueryModel.PATIENT_ROOT: frozenset(Level),
    QueryModel.STUDY_ROOT: frozenset({Level.STUDY, Level.SERIES, Level.IMAGE}),
}
_QUERY_LEVEL = Tag(0x0008, 0x0052)
_RETRIEVE_AE = Tag(0x0008, 0x0054)
# Not a key: it says in which time zone the query's dates and times are, which only
# matters with timezone query adjustment (an extended negotiation the box does not
# accept); its value restricts nothing in any query.
_TIMEZONE = Tag(0x0008, 0x0201)

# Date and time keys that combined date-time matching reads as one moment.
DATETIME_PAIRS = {"StudyDate": "StudyTime", "SeriesDate": "SeriesTime"}


async def find(
    index: Index,
    model: QueryModel,
    identifier: Dataset,
    *,
    retrieve_ae_title: str = "",
    combined_datetime: bool = False,
) -> list[Dataset]:
    """The response identifiers matching `identifier`, in no particular order.

    `combined_datetime` is the C-FIND extended negotiation option of that
    name: when the SCU asked for it, a date range and a time range of the
    same pair bound one period instead of matching separately.
    """
    found = await answer(index, model, identifier, retrieve_ae_title=retrieve_ae_title,
                         combined_datetime=combined_datetime)
    rows = list(found.rows)
    for ids in found.batches():
        rows += await found.read(index, ids)
    return found.datasets(rows)


@dataclass(frozen=True)
class Paging:
    """One page of the matches, in the order the index recorded them (pages asked for
    one after another answer each match once, and one recorded meanwhile on a later
    page): those whose value of the key `scope[0]` (returned or not) passes
    `scope[1]` (all when None), `offset` of them passed over, at most `count` after."""

    offset: int = 0
    count: int | None = None
    scope: tuple[BaseTag, Callable[[object], bool]] | None = None


async def answer(
    index: Index,
    model: QueryModel,
    identifier: Dataset,
    *,
    retrieve_ae_title: str = "",
    combined_datetime: bool = False,
    paging: Paging | None = None,
) -> Answer:
    """The matches of `identifier` as index rows (a page of them with `paging`, read
    without holding the others; else the first rows and the others' ids, see
    `Answer.batches`); `find` with the encoding left to the caller."""
    level = _level(model, identifier)
    plan = _plan(level, identifier, retrieve_ae_title, combined_datetime)
    if paging is None:
        matches = await search_ids(index, level, plan.columns, plan.criteria)
        found = Answer(level, plan, matches.rows, matches.later)
    else:
        window = Window(paging.offset, paging.count, _keep(level, paging.scope))
        found = Answer(level, plan,
                       await search(index, level, plan.columns, plan.criteria, window=window))
    log.debug("find answered level=%s keys=%d unmatched_keys=%d matches=%d", level.name,
              len(plan.columns), plan.unmatched, len(found))
    return found


def _keep(level: Level, scope: tuple[BaseTag, Callable[[object], bool]] | None
          ) -> tuple[Key, Callable[[object], bool]] | None:
    if scope is None:
        return None
    tag, accepts = scope
    key = attributes.lookup(tag, level)
    if key is None:
        raise KeyError(tag)  # a caller's mistake: the index has no such key
    return key, accepts


@dataclass
class _Plan:
    criteria: list[Criterion | PeriodCriterion] = field(default_factory=list)
    columns: list[Key] = field(default_factory=list)  # one per returned value
    fixed: list[tuple[BaseTag, str, str]] = field(default_factory=list)  # (tag, VR, value)
    asked: str = ""  # the request's single-byte character set, if any (identifiers.py)
    unmatched: int = 0  # keys sent with a value that no match applies (`_restricts`)


@dataclass(frozen=True)
class Answer:
    """The matches of one query, as the index rows they are read from: `rows`, then
    those of the row ids in `later`, read by `read` one of `batches()` at a time."""

    level: Level
    plan: _Plan
    rows: list[Row]
    later: array[int] = field(default_factory=lambda: array("q"))

    def __len__(self) -> int:
        return len(self.rows) + len(self.later)

    @property
    def unmatched_keys(self) -> int:
        """How many keys of the request carried a value that no match applied (a key the
        index does not know, of a level below the query's, a sequence): the matches are
        not narrowed by them, which C-FIND says with Pending status 0xFF01."""
        return self.plan.unmatched

    def batches(self) -> Iterator[array[int]]:
        """The row ids of `later`, FETCH_BATCH at a time."""
        for start in range(0, len(self.later), FETCH_BATCH):
            yield self.later[start:start + FETCH_BATCH]

    async def read(self, index: Index, ids: Sequence[int]) -> list[Row]:
        """The rows of one of `batches()` (matches deleted since are left out)."""
        return await rows_by_id(index, self.level, self.plan.columns, ids)

    def dataset(self, row: Row) -> Dataset:
        """The response identifier of one row read from this answer."""
        return _response(self.level, self.plan, row)

    def datasets(self, rows: Sequence[Row] | None = None) -> list[Dataset]:
        """The response identifiers of `rows` (read from this answer), or of `self.rows`."""
        return [self.dataset(row) for row in (self.rows if rows is None else rows)]

    def encoded(self, rows: Sequence[Row] | None = None, *,
                implicit_vr: bool) -> Iterator[bytes]:
        """Each identifier of `rows` (or `self.rows`) encoded in Implicit or Explicit VR
        Little Endian, byte for byte what pydicom makes of the Dataset `datasets()` holds."""
        constant = Dataset()
        constant[_QUERY_LEVEL] = _element(_QUERY_LEVEL, "CS", self.level.name)
        for tag, vr, text in self.plan.fixed:
            constant[tag] = _element(tag, vr, text or empty_value_for_VR(vr))
        template = Template(constant, [(key.tag, key.vr) for key in self.plan.columns],
                            implicit=implicit_vr,
                            fallback=lambda row: _response(self.level, self.plan, row),
                            asked=self.plan.asked)
        for row in self.rows if rows is None else rows:
            yield template.encode(row)


def _level(model: QueryModel, identifier: Dataset) -> Level:
    element = identifier.get(_QUERY_LEVEL)
    if element is None or not element.value:
        raise QueryError(QueryRefusal.NOT_IN_MODEL,
                         "QueryRetrieveLevel is missing")
    try:
        level = Level[str(element.value).strip()]
    except KeyError:
        raise QueryError(QueryRefusal.NOT_IN_MODEL,
                         "QueryRetrieveLevel is not PATIENT, STUDY, SERIES or IMAGE") from None
    if level not in _LEVELS[model]:
        raise QueryError(QueryRefusal.NOT_IN_MODEL,
                         f"the {model.value} root model has no {level.name} level")
    return level


def _plan(level: Level, identifier: Dataset, retrieve_ae_title: str, combined: bool) -> _Plan:
    plan = _Plan()
    wanted: dict[str, tuple[Key, list[str]]] = {}
    for element in identifier:
        tag = element.tag
        if tag == CHARACTER_SET:
            plan.asked = asked_character_set(element.value)
            continue
        if tag == _QUERY_LEVEL or tag.element == 0:
            continue  # answered separately; group lengths are not keys
        if tag == _RETRIEVE_AE:
            plan.fixed.append((tag, "AE", retrieve_ae_title))
            continue
        key = attributes.lookup(tag, level)
        if key is None:
            plan.fixed.append((tag, element.VR, ""))
            if tag != _TIMEZONE and _restricts(element):
                plan.unmatched += 1
            continue
        plan.columns.append(key)
        wanted[key.keyword] = (key, _values(element))

    if combined:
        for date_keyword, time_keyword in DATETIME_PAIRS.items():
            pair = _single_values(wanted, date_keyword, time_keyword)
            if pair is None:
                continue
            (date_key, date_value), (time_key, time_value) = pair
            period = matching.combined_datetime(date_value, time_value)
            if period is not None:
                plan.criteria.append(PeriodCriterion(date_key, time_key, period))
                del wanted[date_keyword], wanted[time_keyword]
    for key, values in wanted.values():
        found = matching.term(key.match, values)
        if found is not None:
            plan.criteria.append(Criterion(key, found))
    return plan


def _single_values(
    wanted: dict[str, tuple[Key, list[str]]], date_keyword: str, time_keyword: str
) -> tuple[tuple[Key, str], tuple[Key, str]] | None:
    """Both keys of a date-time pair when each carries exactly one value."""
    if date_keyword not in wanted or time_keyword not in wanted:
        return None
    (date_key, dates), (time_key, times) = wanted[date_keyword], wanted[time_keyword]
    if len(dates) != 1 or len(times) != 1:
        return None
    return (date_key, dates[0]), (time_key, times[0])


def _restricts(element: DataElement) -> bool:
    """Whether `element` asks for a match: a value that is neither empty nor universal, or
    a sequence with such a value in an item (sequence matching)."""
    value = element.value
    if element.VR == "SQ":
        return any(_restricts(inner) for item in value or () for inner in item)
    if isinstance(value, bytes | bytearray):  # an unknown tag in Implicit VR: UN
        return matching.restricts(bytes(value).decode("latin-1").strip("\0 ").split("\\"))
    return matching.restricts(_values(element), person_name=element.VR == "PN")


def _values(element: DataElement) -> list[str]:
    """The request values of a key as text; several for a multi-valued key."""
    value = element.value
    if value is None or element.VR == "SQ" or isinstance(value, bytes | bytearray):
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(item) for item in value]
    return [str(value)]


def _element(tag: BaseTag, vr: str, value: object) -> DataElement:
    # Values come from the index as stored; pydicom's value checks would only
    # warn, quoting the value (possibly PHI) in the warning text.
    return DataElement(tag, vr, value, validation_mode=config.IGNORE)


def _response(level: Level, plan: _Plan, row: Sequence[object]) -> Dataset:
    response = Dataset()
    response[_QUERY_LEVEL] = _element(_QUERY_LEVEL, "CS", level.name)
    texts: list[str] = []
    for key, value in zip(plan.columns, row, strict=True):
        if isinstance(value, str):
            texts.append(value)
            if key.multi:
                value = value.split("\\")
        if value is None or value == "":
            value = empty_value_for_VR(key.vr)
        response[key.tag] = _element(key.tag, key.vr, value)
    for tag, vr, text in plan.fixed:
        response[tag] = _element(tag, vr, text or empty_value_for_VR(vr))
    if not all(text.isascii() for text in texts):
        response[CHARACTER_SET] = _element(CHARACTER_SET, "CS",
                                           response_character_set(plan.asked, texts))
    return response
