"""MPPS decisions (PS3.4 Annex F): who may report a procedure step, and which changes it takes.

- N-CREATE makes a step IN PROGRESS. The attributes PS3.4 Table F.7.2-1 makes
  Type 1 for N-CREATE must be present with a value (Scheduled Step Attributes
  Sequence: present), and the status must be IN PROGRESS; a second N-CREATE
  of the same SOP Instance UID is refused (Duplicate SOP Instance).
- N-SET does not change an attribute PS3.4 Table F.7.2-1 marks "Not allowed"
  for N-SET: who the patient is, which order was performed (Scheduled Step
  Attributes Sequence), and the facts of the step's start (ID, station,
  start date and time, modality, Study ID) are the N-CREATE's, and the order
  links were made from them. Such an attribute is left out of the merge and the
  rest of the N-SET is applied: a modality that sends its whole attribute set
  again with COMPLETED still completes its step. One sent with another value
  than the step holds is named in `StepResult.ignored` (the edge answers Warning
  0x0107 Attribute List Error with the tags in Attribute Identifier List); one
  sent with the value held changes nothing and is not named.
- N-SET merges the modification list into the step (a sequence replaces the
  whole sequence, as PS3.4 F.7.2.2 says); the new Performed Procedure Step
  Status picks the transition of the state table (appliance/store/mpps_rows.py).
  COMPLETED and DISCONTINUED need an end date and time. A step that is
  COMPLETED or DISCONTINUED takes no change at all (0x0110 with an Error
  Comment, PS3.4 F.7.2.2.4.2).
- Both are committed (fsync + WAL commit) before the success is returned.

Linking to orders ("the worklist item follows the step's status"): each step
keeps the keys of its Scheduled Step Attributes Sequence items (Study
Instance UID, Accession Number, Requested Procedure ID, Scheduled Procedure
Step ID) in `mpps_step_refs`, and in the same transaction as the step
`link_step_to_orders` moves each order it names (by Study Instance UID, else
Accession Number) through the order state table (services/order_states.py):
N-CREATE starts it, N-SET COMPLETED / DISCONTINUED completes / discontinues
it. An order that cannot take the move (cancelled by the RIS meanwhile, or
already final) keeps its status: the step is still recorded, since it reports
what happened at the modality, and a warning is logged.

N-GET (the Modality Performed Procedure Step Retrieve SOP Class, PS3.4
F.8) reads a step back, for a RIS or a second modality that asks what was
performed: the attributes it names, as the step holds them after its last
N-SET (a sequence whole); a requested attribute the step does not hold comes
back empty; no list means every attribute. SOP Class and SOP Instance UID
are answered too. Reading needs `mpps` like writing; an unknown step is
NO_SUCH_STEP.

Every refusal is an MppsRefused whose `kind` the edge maps to a DICOM status.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from io import BytesIO
from typing import TYPE_CHECKING

from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pynetdicom.dsutils import decode, encode

from appliance.base.errors import PacsEdgeError
from appliance.base.uids import is_valid_uid, normalise_uid
from appliance.services.order_states import OrderTransitionError, OrderTrigger, apply_sync
from appliance.services.peers import Allowlist
from appliance.services.query.identifiers import UTF8
from appliance.store import database
from appliance.store import mpps_rows as mpps
from appliance.store import order_rows as order_store
from appliance.store.index import Index
from appliance.store.mpps_rows import (
    DuplicateStep,
    MppsState,
    MppsTransitionError,
    MppsTrigger,
    NoSuchStep,
    Step,
    StepFields,
    StepRef,
)
from appliance.store.times import date_problem, time_problem

if TYPE_CHECKING:  # transaction bodies pass the connection on to the store
    import sqlite3

log = logging.getLogger(__name__)

PERMISSION = "mpps"
SOP_CLASS_UID = "1.2.840.10008.3.1.2.3.3"  # Modality Performed Procedure Step
_STATUS_TRIGGER = {
    "IN PROGRESS": MppsTrigger.UPDATE,
    "COMPLETED": MppsTrigger.COMPLETE,
    "DISCONTINUED": MppsTrigger.DISCONTINUE,
}
# Type 1 for N-CREATE (PS3.4 Table F.7.2-1), besides the status and the sequence.
_REQUIRED_ON_CREATE = ("PerformedProcedureStepID", "PerformedStationAETitle",
                       "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
                       "Modality")
_REQUIRED_WHEN_FINAL = ("PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime")
_DATES = ("PerformedProcedureStepStartDate", "PerformedProcedureStepEndDate")
_TIMES = ("PerformedProcedureStepStartTime", "PerformedProcedureStepEndTime")
# "Not allowed" in the N-SET column of PS3.4 Table F.7.2-1 (top level: the attributes
# nested in these sequences are not allowed either, and those of the allowed sequences
# are, the sequence being replaced whole). Anything else, known to the table or not
# (Billing, exposure and dose attributes...), an N-SET may set.
_NOT_ALLOWED_IN_SET = frozenset(Tag(keyword) for keyword in (
    "ScheduledStepAttributesSequence", "PatientName", "PatientID", "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence", "OtherPatientIDsSequence", "PatientBirthDate",
    "PatientSex", "ReferencedPatientSequence", "AdmissionID", "IssuerOfAdmissionIDSequence",
    "ServiceEpisodeID", "IssuerOfServiceEpisodeIDSequence", "ServiceEpisodeDescription",
    "PerformedProcedureStepID", "PerformedStationAETitle", "PerformedStationName",
    "PerformedLocation", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "Modality", "StudyID"))
_MERGE_ATTEMPTS = 3  # an N-SET racing another on the same step merges again
_ORDER_TRIGGER = {MppsTrigger.COMPLETE: OrderTrigger.COMPLETE,
                  MppsTrigger.DISCONTINUE: OrderTrigger.DISCONTINUE}


class Kind(enum.Enum):
    NOT_PERMITTED = "peer lacks permission 'mpps'"
    DUPLICATE = "a step with this SOP Instance UID exists"
    NO_SUCH_STEP = "no step with this SOP Instance UID"
    FINAL = "Performed Procedure Step Object may no longer be updated"
    MISSING_ATTRIBUTE = "a required attribute is missing"
    MISSING_VALUE = "a required attribute has no value"
    INVALID_VALUE = "an attribute has an invalid value"


class MppsRefused(PacsEdgeError):
    """The request is refused; `reason` is PHI-free (attribute keywords, states)."""

    def __init__(self, kind: Kind, reason: str = "") -> None:
        super().__init__(reason or kind.value)
        self.kind = kind
        self.reason = reason or kind.value


@dataclass(frozen=True)
class StepResult:
    """A committed create or update: what the audit and the edge need."""

    step: Step
    created: bool
    ignored: tuple[BaseTag, ...] = ()  # N-SET: attributes not taken (Table F.7.2-1)


class MppsService:
    def __init__(self, index: Index, allowlist: Allowlist, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.index = index
        self.allowlist = allowlist
        self.clock = clock

    def permitted(self, calling_ae: str) -> None:
        peer = self.allowlist.by_ae_title(calling_ae)
        if peer is None or not peer.may(PERMISSION):
            raise MppsRefused(Kind.NOT_PERMITTED)

    async def create(self, calling_ae: str, sop_uid: str, attributes: Dataset) -> StepResult:
        self.permitted(calling_ae)
        sop_uid = normalise_uid(sop_uid)
        if not is_valid_uid(sop_uid):
            raise MppsRefused(Kind.INVALID_VALUE, "Affected SOP Instance UID is not a valid UID")
        status = str(attributes.get("PerformedProcedureStepStatus", "") or "").strip()
        if "PerformedProcedureStepStatus" not in attributes:
            raise MppsRefused(Kind.MISSING_ATTRIBUTE, "PerformedProcedureStepStatus is missing")
        if not status:  # Type 1 in N-CREATE (PS3.4 Table F.7.2-1): sent empty
            raise MppsRefused(Kind.MISSING_VALUE, "PerformedProcedureStepStatus has no value")
        if status != "IN PROGRESS":
            raise MppsRefused(Kind.INVALID_VALUE, "N-CREATE must set PerformedProcedureStep"
                              "Status to IN PROGRESS")
        if "ScheduledStepAttributesSequence" not in attributes:
            raise MppsRefused(Kind.MISSING_ATTRIBUTE,
                              "ScheduledStepAttributesSequence is missing")
        _require(attributes, _REQUIRED_ON_CREATE)
        _check_dates_and_times(attributes)
        encoded = _encode(attributes)
        now = self.clock()
        assert self.index.writer is not None
        refs = _refs(attributes)

        def create(conn: sqlite3.Connection) -> None:
            mpps.create(conn, sop_uid=sop_uid, calling_ae=calling_ae,
                        fields=_fields(attributes), dataset=encoded, refs=refs, now=now)
            link_step_to_orders(conn, refs, OrderTrigger.START, now)

        try:
            await self.index.writer.submit_sync(create)
        except DuplicateStep:
            raise MppsRefused(Kind.DUPLICATE) from None
        step = await self._load(sop_uid)
        assert step is not None
        log.info("procedure step created step=%d calling=%s", step.id, calling_ae)
        return StepResult(step, created=True)

    async def update(self, calling_ae: str, sop_uid: str, modification: Dataset) -> StepResult:
        self.permitted(calling_ae)
        sop_uid = normalise_uid(sop_uid)
        for _ in range(_MERGE_ATTEMPTS):
            step = await self._load(sop_uid)
            if step is None:
                raise MppsRefused(Kind.NO_SUCH_STEP)
            if step.state is not MppsState.IN_PROGRESS:
                raise MppsRefused(Kind.FINAL)
            held = _decode(step.dataset)
            allowed, ignored = _allowed_in_set(modification, held)
            merged = _merged(held, allowed)
            status = str(merged.get("PerformedProcedureStepStatus", "") or "").strip()
            if not status:  # an N-SET that empties it
                raise MppsRefused(Kind.MISSING_VALUE,
                                  "PerformedProcedureStepStatus has no value")
            trigger = _STATUS_TRIGGER.get(status)
            if trigger is None:
                raise MppsRefused(Kind.INVALID_VALUE, "PerformedProcedureStepStatus must be"
                                  " IN PROGRESS, COMPLETED or DISCONTINUED")
            if trigger is not MppsTrigger.UPDATE:
                _require(merged, _REQUIRED_WHEN_FINAL)
            _check_dates_and_times(merged)
            encoded = _encode(merged)
            now = self.clock()
            assert self.index.writer is not None
            change = partial(mpps.update, sop_uid=sop_uid, expect_dataset=step.dataset,
                             trigger=trigger, fields=_fields(merged), dataset=encoded, now=now)
            order_trigger = _ORDER_TRIGGER.get(trigger)
            try:
                await self.index.writer.submit_sync(partial(
                    _update_and_link, change, step.refs, order_trigger, now))
            except NoSuchStep:
                raise MppsRefused(Kind.NO_SUCH_STEP) from None
            except MppsTransitionError:
                continue  # changed meanwhile: merge again from what is stored now
            updated = await self._load(sop_uid)
            assert updated is not None
            log.info("procedure step updated step=%d state=%s calling=%s", updated.id,
                     updated.state.value, calling_ae)
            return StepResult(updated, created=False, ignored=ignored)
        raise PacsEdgeError("procedure step kept changing under concurrent N-SETs")

    async def get(self, calling_ae: str, sop_uid: str, tags: Sequence[BaseTag]
                  ) -> tuple[Step, Dataset]:
        """The step and the attributes `tags` name (every attribute when empty)."""
        self.permitted(calling_ae)
        step = await self._load(normalise_uid(sop_uid))
        if step is None:
            raise MppsRefused(Kind.NO_SUCH_STEP)
        return step, _requested(step, tags)

    async def _load(self, sop_uid: str) -> Step | None:
        return await database.run_sync(self.index.reader, mpps.load, sop_uid)


def link_step_to_orders(conn: sqlite3.Connection, refs: Sequence[StepRef],
                        trigger: OrderTrigger, at: float) -> int:
    """Move the orders a step names by `trigger`, in the step's transaction; returns how
    many moved. An order found by neither key, or that cannot take the move, is left."""
    moved = 0
    for ref in refs:
        order = order_store.find_order_by_study(conn, ref.study_uid) if ref.study_uid else None
        if order is None and ref.accession_number:
            order = order_store.find_order(conn, ref.accession_number)
        if order is None:
            continue
        # An order that arrived after the step's N-CREATE was never started: a step that
        # completes it started it (a still SCHEDULED order would stay on the worklist).
        moves = ([OrderTrigger.START, trigger] if trigger is OrderTrigger.COMPLETE
                 and order.status is order_store.OrderStatus.SCHEDULED else [trigger])
        try:
            for move in moves:
                apply_sync(conn, order, move, source="mpps", at=at)
                order = order_store.find_order(conn, order.accession_number) or order
        except OrderTransitionError as exc:
            log.warning("procedure step leaves its order unchanged: %s order=%d", exc.message,
                        order.id)
            continue
        moved += 1
    return moved


def _update_and_link(change: Callable[[sqlite3.Connection], MppsState],
                     refs: Sequence[StepRef], trigger: OrderTrigger | None, at: float,
                     conn: sqlite3.Connection) -> None:
    change(conn)
    if trigger is not None:
        link_step_to_orders(conn, refs, trigger, at)


def _requested(step: Step, tags: Sequence[BaseTag]) -> Dataset:
    held = _decode(step.dataset)
    held.SOPClassUID = SOP_CLASS_UID
    held.SOPInstanceUID = step.sop_uid
    if not tags:
        return held
    out = Dataset()
    if "SpecificCharacterSet" in held:  # how the text values below are encoded
        out.SpecificCharacterSet = held.SpecificCharacterSet
    for tag in tags:
        if tag in held:
            out[tag] = held[tag]
        elif not tag.is_private and tag.element != 0:
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                continue  # not a standard attribute: nothing to answer with
            # Values come from the step as stored; pydicom's checks would only warn.
            out[tag] = DataElement(tag, vr, empty_value_for_VR(vr),
                                   validation_mode=config.IGNORE)
    return out


def _merged(held: Dataset, modification: Dataset) -> Dataset:
    """`held` with the attributes of `modification` (an N-SET) in place of its own.

    Each side's text is read in its own Specific Character Set first; when the N-SET
    names another set than the step holds, the step is kept in UTF-8 (ISO_IR 192),
    which holds both: re-encoding a Cyrillic name of the N-CREATE in the N-SET's
    Latin-1 would make it question marks."""
    held_charset = held.get("SpecificCharacterSet")
    held.decode()
    modification.decode()
    for element in modification:
        if element.tag.group > 0x0002:  # never the command or file meta groups
            held[element.tag] = element
    if held.get("SpecificCharacterSet") != held_charset:
        held.SpecificCharacterSet = UTF8
    return held


def _allowed_in_set(modification: Dataset, held: Dataset
                    ) -> tuple[Dataset, tuple[BaseTag, ...]]:
    """The modification without the attributes PS3.4 Table F.7.2-1 does not allow in
    N-SET, and those of them sent with another value than `held` has (sorted)."""
    allowed = Dataset()
    ignored = []
    for element in modification:
        if element.tag not in _NOT_ALLOWED_IN_SET:
            allowed.add(element)
        elif element.tag not in held or held[element.tag].value != element.value:
            ignored.append(element.tag)
    return allowed, tuple(sorted(ignored))


def _require(ds: Dataset, keywords: tuple[str, ...]) -> None:
    for keyword in keywords:
        if keyword not in ds:
            raise MppsRefused(Kind.MISSING_ATTRIBUTE, f"{keyword} is missing")
        if ds.get(keyword) in (None, ""):
            raise MppsRefused(Kind.MISSING_VALUE, f"{keyword} has no value")


def _check_dates_and_times(ds: Dataset) -> None:
    """The step's start and end, where they have a value, must be a DA and a TM (PS3.5
    6.2): they are the step's columns in the index and what a RIS reads back by N-GET.
    A refusal names the attribute and the fault, never the value."""
    for keywords, problem_of in ((_DATES, date_problem), (_TIMES, time_problem)):
        for keyword in keywords:
            value = _text(ds, keyword)
            problem = problem_of(value) if value else None
            if problem:
                raise MppsRefused(Kind.INVALID_VALUE, f"{keyword} {problem}")


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _fields(ds: Dataset) -> StepFields:
    return StepFields(
        station_ae=_text(ds, "PerformedStationAETitle"), modality=_text(ds, "Modality"),
        patient_id=_text(ds, "PatientID"), step_id=_text(ds, "PerformedProcedureStepID"),
        start_date=_text(ds, "PerformedProcedureStepStartDate"),
        start_time=_text(ds, "PerformedProcedureStepStartTime"),
        end_date=_text(ds, "PerformedProcedureStepEndDate"),
        end_time=_text(ds, "PerformedProcedureStepEndTime"))


def _refs(ds: Dataset) -> list[StepRef]:
    return [StepRef(normalise_uid(item.get("StudyInstanceUID", "")),
                    _text(item, "AccessionNumber"), _text(item, "RequestedProcedureID"),
                    _text(item, "ScheduledProcedureStepID"))
            for item in ds.get("ScheduledStepAttributesSequence", [])]


def _encode(ds: Dataset) -> bytes:
    encoded = encode(ds, False, True)  # Explicit VR Little Endian
    if encoded is None:
        raise MppsRefused(Kind.INVALID_VALUE, "the attribute list cannot be encoded")
    return encoded


def _decode(data: bytes) -> Dataset:
    return decode(BytesIO(data), False, True)
