"""Modality Worklist decisions (PS3.4 K.6): who may ask, which items match, what is returned.

Matching keys (PS3.4 K.6.1.2, Table K.6-1), at the top level and in the one
item of the Scheduled Procedure Step Sequence (sequence matching, K.6.1.2.1
and C.2.2.2.6), follow the rules of appliance/services/query/matching.py, the same
code C-FIND uses: Scheduled Station AE Title, Modality, Scheduled Procedure
Step Start Date and Time (single values and ranges), Patient Name
(wildcards, case-insensitive), Patient ID, Accession Number, Requested
Procedure ID, Study Instance UID (UID lists) and the other keys of the table
below. An item is one order (one requested procedure, one scheduled step).

Start Date and Start Time: when both are ranges they bound one period
(combined date-time range matching, PS3.4 C.2.2.2.5): `20240105-20240106`
with `1000-1300` is 5 Jan 10:00 to 6 Jan 13:00, so a step on 6 Jan at 09:00
matches. Modalities ask "from now until tonight" this way, and dcmtk's
wlmscpfs answers so, without extended negotiation (C-FIND's own option of
that name is for Query/Retrieve). Any other pair (a single date with a time
range, say) matches each key on its own.

Scheduled Procedure Step Status: without a value in the request, only
SCHEDULED orders are returned (what a modality may start); with one,
SCHEDULED, STARTED (the order is IN PROGRESS), COMPLETED or DISCONTINUED
match the order's status.

Return keys are filled from the order; a key the box does not keep is
returned empty (zero length), a sequence it does not keep empty. Specific
Character Set: none when every value is ASCII; else the request's own single-byte
set (ISO_IR 100, 144, ...) when it holds every value of the item, since many
modalities read no UTF-8 and show "MÃ¼ller" for it; else ISO_IR 192 (PS3.4
C.4.1.1.3.2 lets the SCP answer in another set than the request's).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, timedelta

from pydicom import config
from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from appliance.base.errors import PacsEdgeError, QueryError, QueryRefusal
from appliance.services.peers import Allowlist
from appliance.services.query import matching
from appliance.services.query.identifiers import asked_character_set, response_character_set
from appliance.store import database
from appliance.store import worklist_rows as worklist_store
from appliance.store.cfind.attributes import Match
from appliance.store.cfind.conditions import Period, Term
from appliance.store.index import Index
from appliance.store.worklist_rows import WorklistItem

log = logging.getLogger(__name__)

PERMISSION = "worklist"
MAX_ITEMS = 10_000  # more matches than this are refused (0xC000: narrow the query)

_KINDS: dict[str, Match] = {
    "PatientName": Match.PERSON_NAME,
    "ReferringPhysicianName": Match.PERSON_NAME,
    "RequestingPhysician": Match.PERSON_NAME,
    "ScheduledPerformingPhysicianName": Match.PERSON_NAME,
    "PatientBirthDate": Match.DATE,
    "ScheduledProcedureStepStartDate": Match.DATE,
    "ScheduledProcedureStepStartTime": Match.TIME,
    "StudyInstanceUID": Match.UID,
}
_START_DATE, _START_TIME = "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime"
# SPS status values (0040,0020) <-> order status.
_SPS_STATUS = {"SCHEDULED": "SCHEDULED", "STARTED": "IN PROGRESS",
               "COMPLETED": "COMPLETED", "DISCONTINUED": "DISCONTINUED"}
_ORDER_STATUS = {order: sps for sps, order in _SPS_STATUS.items()}

_VALUES: dict[str, Callable[[WorklistItem], str]] = {
    "PatientName": lambda i: i.patient_name,
    "PatientID": lambda i: i.patient_id,
    "IssuerOfPatientID": lambda i: i.issuer,
    "PatientBirthDate": lambda i: i.birth_date,
    "PatientSex": lambda i: i.sex,
    "AccessionNumber": lambda i: i.accession_number,
    "RequestedProcedureID": lambda i: i.requested_procedure_id,
    "RequestedProcedureDescription": lambda i: i.requested_procedure_desc,
    "RequestedProcedurePriority": lambda i: i.priority,
    "StudyInstanceUID": lambda i: i.study_uid,
    "ReferringPhysicianName": lambda i: i.referring_physician,
    "RequestingPhysician": lambda i: i.requesting_physician,
    "ScheduledStationAETitle": lambda i: i.station_ae_title,
    "ScheduledStationName": lambda i: i.station_name,
    "ScheduledProcedureStepLocation": lambda i: i.sps_location,
    "ScheduledProcedureStepStartDate": lambda i: i.sps_start_date,
    "ScheduledProcedureStepStartTime": lambda i: i.sps_start_time,
    "Modality": lambda i: i.modality,
    "ScheduledPerformingPhysicianName": lambda i: i.performing_physician,
    "ScheduledProcedureStepDescription": lambda i: i.sps_description,
    "ScheduledProcedureStepID": lambda i: i.sps_id,
    "ScheduledProcedureStepStatus": lambda i: _ORDER_STATUS.get(i.status, ""),
}
# The attributes of a Scheduled Procedure Step item (PS3.4 Table K.6-1) the box answers.
_STEP_KEYWORDS = ("ScheduledStationAETitle", "ScheduledProcedureStepStartDate",
                  "ScheduledProcedureStepStartTime", "Modality",
                  "ScheduledPerformingPhysicianName", "ScheduledProcedureStepDescription",
                  "ScheduledStationName", "ScheduledProcedureStepLocation",
                  "ScheduledProcedureStepID", "ScheduledProcedureStepStatus")


class WorklistRefused(PacsEdgeError):
    """The peer may not query the worklist."""


@dataclass(frozen=True)
class Answer:
    """The items a query matched; iterating makes each one's response identifier then.

    An item's row is about 1.5 KB, its identifier (pydicom elements) several times
    that: made one at a time, as they are sent, a universal query of MAX_ITEMS items
    holds the rows only, not every response at once."""

    request: Dataset
    items: list[WorklistItem]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Dataset]:
        return (_response(self.request, item) for item in self.items)


class WorklistService:
    """Worklist queries; one naming no scheduled start date reaches back `past_days` (0:
    no bound), so that orders never performed (a no-show the RIS did not cancel) leave
    the modalities' lists instead of filling them until MAX_ITEMS refuses the query."""

    def __init__(self, index: Index, allowlist: Allowlist, *, past_days: int) -> None:
        self.index = index
        self.allowlist = allowlist
        self.past_days = past_days

    def permitted(self, calling_ae: str) -> None:
        peer = self.allowlist.by_ae_title(calling_ae)
        if peer is None or not peer.may(PERMISSION):
            raise WorklistRefused(f"peer lacks permission {PERMISSION!r}")

    async def find(self, calling_ae: str, identifier: Dataset) -> Answer:
        """The matches of a worklist query, in order; QueryError for a bad one."""
        self.permitted(calling_ae)
        keys = _matching_keys(identifier)
        statuses = _statuses(keys.pop("ScheduledProcedureStepStatus", []))
        period = _combined_start(keys)
        terms: list[tuple[str, Term]] = []
        for keyword, values in keys.items():
            found = matching.term(_KINDS.get(keyword, Match.TEXT), values)
            if found is not None:
                terms.append((keyword, found))
        scheduled_from = ""
        if self.past_days and period is None and all(k != _START_DATE for k, _ in terms):
            scheduled_from = (date.today() - timedelta(days=self.past_days)).strftime("%Y%m%d")
        items = await database.run_sync(self.index.reader, worklist_store.find_items, terms,
                                        statuses, MAX_ITEMS, period, scheduled_from)
        if len(items) > MAX_ITEMS:
            raise QueryError(QueryRefusal.MALFORMED_KEY,
                             f"more than {MAX_ITEMS} worklist items match")
        log.debug("worklist answered keys=%d matches=%d", len(keys), len(items))
        return Answer(identifier, items)


def _matching_keys(identifier: Dataset) -> dict[str, list[str]]:
    """keyword -> request values of every key the box can match on."""
    found: dict[str, list[str]] = {}
    elements = list(identifier)
    sps = identifier.get("ScheduledProcedureStepSequence")
    if sps:
        elements += list(sps[0])
    for element in elements:
        keyword = element.keyword
        if keyword in worklist_store.COLUMNS and element.VR != "SQ":
            found[keyword] = _values(element)
    return found


def _combined_start(keys: dict[str, list[str]]) -> Period | None:
    """The period a Start Date range and a Start Time range bound together; both keys are
    taken out of `keys` then. None (keys left as they are) for any other pair."""
    dates, times = keys.get(_START_DATE, []), keys.get(_START_TIME, [])
    if len(dates) != 1 or len(times) != 1:
        return None
    period = matching.combined_datetime(dates[0], times[0])
    if period is not None:
        del keys[_START_DATE], keys[_START_TIME]
    return period


def _statuses(values: list[str]) -> list[str]:
    """The order statuses a request's SPS Status values select: SCHEDULED when it gives
    none, or only `*` (equivalent to no value, PS3.4 C.2.2.2.4; modalities that send
    `*` in every key would otherwise get an empty worklist); else the statuses any
    value matches, wildcards included; none (nothing matches) when no value does."""
    wanted = [v.strip() for v in values if v.strip()]
    if not wanted or any(set(v) == {"*"} for v in wanted):
        return ["SCHEDULED"]
    patterns = [_wildcard(v) for v in wanted]
    return [order for sps, order in _SPS_STATUS.items()
            if any(p.fullmatch(sps) for p in patterns)]


def _wildcard(value: str) -> re.Pattern[str]:
    """A CS value as a case-sensitive pattern: `*` any run, `?` one character.

    A run of `*` is one `*`: each `.*` of a run would be another way to split the
    status name, tried in turn, and 30 of them (`****...X`) held the event loop, so
    the whole box, for hours. Once collapsed, every `.*` but the last is followed by
    a character that must match, and the names matched are at most 12 characters."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c)
                              for c in re.sub(r"\*+", "*", value)), re.DOTALL)


def _values(element: DataElement) -> list[str]:
    value = element.value
    if value is None or isinstance(value, bytes | bytearray):
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    return [str(value)]


def _element(tag: object, vr: str, value: object) -> DataElement:
    # Values come from the index as stored; pydicom's checks would only warn, quoting them.
    return DataElement(tag, vr, value, validation_mode=config.IGNORE)  # type: ignore[arg-type]


def _fill(request: Dataset, item: WorklistItem, texts: list[str]) -> Dataset:
    """A response level: each requested key with the item's value, or empty."""
    out = Dataset()
    for element in request:
        keyword = element.keyword
        if element.tag == 0x00080005 or element.tag.element == 0:
            continue
        if element.VR == "SQ":
            out[element.tag] = _element(element.tag, "SQ", _sequence(keyword, element, item,
                                                                       texts))
            continue
        getter = _VALUES.get(keyword)
        value = getter(item) if getter is not None else ""
        texts.append(value)
        out[element.tag] = _element(element.tag, element.VR,
                                    value if value else empty_value_for_VR(element.VR))
    return out


def _sequence(keyword: str, element: DataElement, item: WorklistItem,
              texts: list[str]) -> list[Dataset]:
    if keyword == "ScheduledProcedureStepSequence":
        template = element.value[0] if element.value else Dataset()
        if len(template) == 0:  # PS3.4 C.2.2.2.6: no item keys asks for the whole step
            template = _whole_step()
        return [_fill(template, item, texts)]
    if keyword == "RequestedProcedureCodeSequence" and item.procedure_code_value:
        code = Dataset()
        # A code of more than 16 characters is a Long Code Value (UC, PS3.3 8.8): Code
        # Value is an SH, which a modality would cut.
        if len(item.procedure_code_value) > 16:
            code.LongCodeValue = item.procedure_code_value
        else:
            code.CodeValue = item.procedure_code_value
        code.CodingSchemeDesignator = item.procedure_code_scheme
        code.CodeMeaning = item.procedure_code_meaning
        # Every value sent picks the response's character set: a local code such as
        # "RÖ1" beside an ASCII meaning went out in Latin-1 bytes under no set at all.
        texts += (item.procedure_code_value, item.procedure_code_scheme,
                  item.procedure_code_meaning)
        return [code]
    return []


def _whole_step() -> Dataset:
    """A Scheduled Procedure Step item asking for every attribute the box keeps."""
    step = Dataset()
    for keyword in _STEP_KEYWORDS:
        setattr(step, keyword, None)
    return step


def _response(identifier: Dataset, item: WorklistItem) -> Dataset:
    texts: list[str] = []
    response = _fill(identifier, item, texts)
    if not all(text.isascii() for text in texts):
        asked = asked_character_set(identifier.get("SpecificCharacterSet"))
        response.SpecificCharacterSet = response_character_set(asked, texts)
    return response
