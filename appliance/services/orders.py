"""The order service: apply an HL7 order or patient message, once, durably.

Contract for an edge (the MLLP listener)::

    outcome = await service.apply(header, request, sender="ris@10.0.0.5")

returns an Outcome once the effect is committed (WAL fsynced, as a C-STORE
is): the edge may then answer AA (outcome.accepted) or AE (a refusal, with
the field at fault). Failures of the box itself (index unavailable, disk
full) raise PacsEdgeError: nothing was applied and nothing recorded, so the
edge answers AR and the sender may resend.

Rules:
- Idempotence: a message is known by (MSH-3, MSH-4, MSH-10). Its decided
  outcome (accepted or refused) is recorded in the same transaction as its
  effect; a resent message (the same content but for MSH-7) gets the recorded
  outcome (duplicate=True) and changes nothing. Another message under a known
  control ID (a sender whose counter started again) is applied as a new one.
- Orders (ORC-1): NW creates a SCHEDULED order, refused if the accession
  number or Study Instance UID exists, unless the order with that accession
  number is scheduled or in progress and the NW states it as the box holds it
  (a RIS operator's "send again", under a new control ID): then nothing
  changes and the answer is AA; the Study Instance UID is the
  message's (ZDS-1 / IPC-3) or generated now, so images, MPPS and the order
  share it. CA, DC and XO find the order by accession number (else by the
  placer order number) and move it through order_states.py's table: CA only
  while SCHEDULED, DC while SCHEDULED or IN PROGRESS, XO (new details) only
  while SCHEDULED. A CA or DC (or an SC reporting it) for an order the box has
  not seen overtook its NW (a RIS queue resent the NW after an AR, or feeds
  over two connections): the order is recorded as the message states it and
  discontinued at once (AA, MSA-3 says so), so the NW that arrives after it is
  refused (AE 205, "exists and is discontinued") and no cancelled exam reaches
  a modality's worklist. An XO or another SC for an unknown order is AE 204.
  SC reports the order's status (ORC-5, read by the edge):
  in progress, completed or discontinued moves the order there through the
  same table (completed from SCHEDULED, for a modality that sends no MPPS, is
  a start then a completion); a status the order has already reached, or one
  the box does not act on, changes nothing. A message with several ORC groups
  is applied whole or not at all.
- Patients: A01/A04/A05/A08 set name, birth date and sex (non-empty fields only;
  one sent as HL7's null, ``""``, is deleted) in
  the index's patient row, which future C-FIND answers use, and on the
  patient's orders. A40 moves the prior patient's studies and orders to the
  surviving patient (store/order_rows.py merge_patient); instances that
  arrive later with the prior ID join the surviving patient at ingest
  (store/hierarchy.py current_patient). Stored files are never rewritten.
- Every applied order and patient change is audited (after the commit); a refused
  message, as each change it asked for with the refusal (outcome 4); so is a
  message the box could not apply (the index refused the commit: the sender is
  told AR, to resend it), with ``not_applied`` and the error's type.
- Logs carry message types, control codes and counts, never patient data:
  orders appear as logsafe refs.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pydicom.uid import generate_uid

from appliance.base import logsafe
from appliance.base.errors import PacsEdgeError
from appliance.services.order_states import (
    OrderTransitionError,
    OrderTrigger,
    apply_sync,
    next_state,
    path,
)
from appliance.store import order_rows as store
from appliance.store.index import Index
from appliance.store.order_rows import (
    Demographics,
    MessageRecord,
    Order,
    OrderDetails,
    OrderStatus,
    PatientKey,
)

if TYPE_CHECKING:  # transaction bodies pass the connection on to the store
    import sqlite3

log = logging.getLogger(__name__)


class OrderControl(enum.StrEnum):
    """ORC-1 order control codes the box acts on."""

    NEW = "NW"
    CANCEL = "CA"
    DISCONTINUE = "DC"
    CHANGE = "XO"
    STATUS = "SC"  # status changed: ORC-5 says which (OrderRequest.reported_status)


# What a refused order asked for, named as an applied one's Effect.action.
_ASKED = {OrderControl.NEW: "create", OrderControl.CANCEL: "cancel",
          OrderControl.DISCONTINUE: "discontinue", OrderControl.CHANGE: "change",
          OrderControl.STATUS: "status"}

_TRIGGERS = {OrderControl.CANCEL: OrderTrigger.CANCEL,
             OrderControl.DISCONTINUE: OrderTrigger.DISCONTINUE,
             OrderControl.CHANGE: OrderTrigger.CHANGE}


@dataclass(frozen=True)
class MessageHeader:
    """What MSH says, and the SHA-256 of the message as received but for MSH-7
    (what tells a resend from another message under the same control ID)."""

    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    control_id: str
    message_code: str
    trigger_event: str
    processing_id: str
    version: str
    sha256: str
    # MSH-18's first repetition, upper case ('' when not sent): the edge answers in it.
    charset: str = ""
    # The set the message was read in: `charset`, or [hl7] unnamed_charset when empty.
    read_as: str = ""
    # SHA-256 of the bytes as sent, MSH-7 included: what versions before the content
    # hash left MSH-7 out recorded, so a resend of a message they applied is one still.
    raw_sha256: str = ""
    # MSH-15 and MSH-16, upper case ('' when not sent): which acknowledgements the sender
    # asks for (HL7 table 0155: AL, NE, ER, SU); both empty is original mode.
    accept_ack: str = ""
    application_ack: str = ""

    @property
    def message_type(self) -> str:
        return f"{self.message_code}^{self.trigger_event}"


@dataclass(frozen=True)
class OrderRequest:
    """One ORC group. `key_field` names where the accession number came from."""

    control: OrderControl
    accession_number: str
    placer_order_number: str
    filler_order_number: str
    study_uid: str
    details: OrderDetails
    patient: PatientKey
    demographics: Demographics
    key_field: str = "OBR-18"
    study_field: str = "ZDS-1"  # where the Study Instance UID came from (IPC-3 in OMI)
    # SC: the status ORC-5 reports; None for one the box does not act on (A, SC, HD ...).
    reported_status: OrderStatus | None = None


@dataclass(frozen=True)
class PatientUpdate:
    patient: PatientKey
    demographics: Demographics
    register: bool = False  # A01, A04, A05 (register) rather than A08 (update)
    cleared: frozenset[str] = frozenset()  # Demographics fields sent as HL7's null: deleted


@dataclass(frozen=True)
class PatientMerge:
    prior: PatientKey
    surviving: PatientKey
    demographics: Demographics
    cleared: frozenset[str] = frozenset()


Request = tuple[OrderRequest, ...] | PatientUpdate | PatientMerge


class Refusal(enum.Enum):
    """Why a well-formed message was not applied (the edge maps it to its error code)."""

    UNKNOWN_ORDER = "unknown_order"
    DUPLICATE_ORDER = "duplicate_order"
    NOT_ALLOWED = "not_allowed"  # the order's status forbids it
    OTHER_PATIENT = "other_patient"  # the order is another patient's


@dataclass(frozen=True)
class Effect:
    """One applied change, for the audit trail (holds PHI: never logged)."""

    action: str  # create | cancel | discontinue | change | status | register | update | merge
    patient: PatientKey
    patient_name: str = ""
    accession_number: str = ""
    study_uid: str = ""
    prior: PatientKey | None = None
    # A cancel or discontinue that came before its order: recorded, and discontinued.
    before_order: bool = False


@dataclass(frozen=True)
class Outcome:
    accepted: bool
    duplicate: bool = False
    refusal: Refusal | None = None
    text: str = ""
    location: str = ""
    effects: tuple[Effect, ...] = field(default_factory=tuple)


class OrderAudit(Protocol):
    """The audit methods the service calls (appliance.audit.Auditor)."""

    def order_recorded(self, sender: str, address: str, effect: Effect, *,
                       refusal: str = "") -> None: ...
    def patient_recorded(self, sender: str, address: str, effect: Effect, *,
                         refusal: str = "") -> None: ...


class MessageRefused(Exception):
    def __init__(self, refusal: Refusal, text: str, location: str) -> None:
        super().__init__(text)
        self.refusal = refusal
        self.text = text
        self.location = location


# Called with the accession number of each new, or cancelled, order once that is
# committed (the prefetch of priors: services/prefetch.py). A hook's failure never
# changes the ACK.
OrderHook = Callable[[str], Awaitable[object]]


class OrderService:
    def __init__(self, index: Index, audit: OrderAudit | None = None, *,
                 on_new_order: OrderHook | None = None,
                 on_cancelled_order: OrderHook | None = None) -> None:
        self.index = index
        self.audit = audit
        self._hooks = {"create": on_new_order, "cancel": on_cancelled_order}

    async def apply(self, header: MessageHeader, request: Request, *, sender: str = "",
                    address: str = "") -> Outcome:
        """Apply `request` once; durable when this returns (see the module docstring)."""
        writer = self.index.writer
        assert writer is not None
        try:
            outcome = await writer.submit_sync(lambda conn: _apply(conn, header, request))
        except PacsEdgeError as exc:
            if self.audit is not None:  # in a thread, as below
                await asyncio.to_thread(
                    self._audit_asked, self.audit, request, sender, address,
                    f"not_applied: the box could not apply it now ({type(exc).__name__})")
            raise
        # Logged once committed: a message refused later in its transaction, or a commit
        # the disk refused, applied nothing.
        for effect in () if outcome.duplicate else outcome.effects:
            if effect.accession_number:
                log.info("order %s order=%s", "created" if effect.action == "create"
                         else effect.action, logsafe.ref(effect.accession_number))
        log.info("hl7 message %s type=%s effects=%d%s", "duplicate" if outcome.duplicate else
                 "applied" if outcome.accepted else "refused", header.message_type,
                 len(outcome.effects),
                 f" refusal={outcome.refusal.value} field={outcome.location}"
                 if outcome.refusal else "")
        if self.audit is not None and not outcome.duplicate:
            # In a thread: a refusal's record is fsync'd before the ACK, and the event
            # loop serves every other connection meanwhile.
            await asyncio.to_thread(self._audit, self.audit, outcome, request, sender, address)
        if not outcome.duplicate:
            for effect in outcome.effects:
                hook = self._hooks.get(effect.action)
                if hook is not None:
                    await self._run_hook(hook, effect.action, effect.accession_number)
        return outcome

    @staticmethod
    def _audit(audit: OrderAudit, outcome: Outcome, request: Request, sender: str,
               address: str) -> None:
        """Each applied change; for a refused message, each change it asked for, with
        why (a refused attempt on a patient's data is in the trail too)."""
        if outcome.accepted:
            for effect in outcome.effects:
                if effect.accession_number:
                    audit.order_recorded(sender, address, effect)
                else:
                    audit.patient_recorded(sender, address, effect)
            return
        OrderService._audit_asked(audit, request, sender, address, outcome.text)

    @staticmethod
    def _audit_asked(audit: OrderAudit, request: Request, sender: str, address: str,
                     refusal: str) -> None:
        """Each change `request` asked for, not made, with why (outcome 4)."""
        if isinstance(request, tuple):
            for order in request:
                audit.order_recorded(sender, address, Effect(
                    _ASKED[order.control], order.patient, order.demographics.patient_name,
                    order.accession_number, order.study_uid), refusal=refusal)
        elif isinstance(request, PatientMerge):
            audit.patient_recorded(sender, address, Effect(
                "merge", request.surviving, request.demographics.patient_name,
                prior=request.prior), refusal=refusal)
        else:
            audit.patient_recorded(sender, address, Effect(
                "register" if request.register else "update", request.patient,
                request.demographics.patient_name), refusal=refusal)

    @staticmethod
    async def _run_hook(hook: OrderHook, action: str, accession_number: str) -> None:
        try:
            await hook(accession_number)
        except PacsEdgeError as exc:  # the order stands; the nightly run catches up
            log.error("order hook failed action=%s order=%s error=%s", action,
                      logsafe.ref(accession_number), exc.message)


def _apply(conn: sqlite3.Connection, header: MessageHeader, request: Request) -> Outcome:
    """In the writer's transaction: look the message up, apply it, record its outcome."""
    known = store.find_message(conn, header.sending_application, header.sending_facility,
                               header.control_id)
    if known is not None and known.content_sha256 not in (header.sha256, header.raw_sha256):
        # Not a resend: a sender whose counter started again (a reinstalled RIS, one that
        # numbers per day). Answering the first message's ACK would say AA for an order
        # that was never applied; this message is applied and its outcome replaces the
        # first's under the control ID.
        log.warning("hl7 control id reused for another message, applied as new type=%s",
                    header.message_type)
    elif known is not None:
        return Outcome(accepted=known.ack_code == "AA", duplicate=True, text=known.ack_text,
                       location=known.error_location,
                       refusal=Refusal(known.ack_text.split(":", 1)[0])
                       if known.ack_code != "AA" else None)
    now = time.time()
    try:
        with store.savepoint(conn):
            applied = _effects(conn, request, now)
    except MessageRefused as refused:
        store.record_message(conn, _record(header, "AE", f"{refused.refusal.value}: "
                                           f"{refused.text}", refused.location), now)
        return Outcome(accepted=False, refusal=refused.refusal,
                       text=f"{refused.refusal.value}: {refused.text}",
                       location=refused.location)
    effects = tuple(effect for effect in applied if effect is not None)
    text = "" if len(effects) == len(applied) else (
        "the order exists as sent: nothing changed" if len(applied) == 1 else
        f"{len(applied) - len(effects)} of the orders exist as sent: they did not change")
    if not text and any(effect.before_order for effect in effects):
        text = "no such order yet: recorded as discontinued, a later new order is refused"
    store.record_message(conn, _record(header, "AA", "", ""), now)
    return Outcome(accepted=True, text=text, effects=effects)


def _record(header: MessageHeader, code: str, text: str, location: str) -> MessageRecord:
    return MessageRecord(header.sending_application, header.sending_facility,
                         header.control_id, header.message_type, header.sha256, code, text,
                         location)


def _effects(conn: sqlite3.Connection, request: Request, now: float) -> list[Effect | None]:
    """What `request` changed, one entry per patient change or ORC group: None for a
    new order the box holds as sent already (`_create`)."""
    if isinstance(request, PatientUpdate):
        store.update_demographics(conn, request.patient, request.demographics, now,
                                  cleared=request.cleared)
        return [Effect("register" if request.register else "update", request.patient,
                       request.demographics.patient_name)]
    if isinstance(request, PatientMerge):
        if request.prior == request.surviving:
            raise MessageRefused(Refusal.NOT_ALLOWED, "prior and surviving patient are the same",
                           "MRG-1")
        store.merge_patient(conn, request.prior, request.surviving, now)
        store.update_demographics(conn, request.surviving, request.demographics, now,
                                  cleared=request.cleared)
        return [Effect("merge", request.surviving, request.demographics.patient_name,
                       prior=request.prior)]
    return [_order_effect(conn, order, now) for order in request]


def _order_effect(conn: sqlite3.Connection, request: OrderRequest,
                  now: float) -> Effect | None:
    if request.control is OrderControl.NEW:
        return _create(conn, request, now)
    order = (store.find_order(conn, request.accession_number)
             or store.find_order_by_placer(conn, request.placer_order_number))
    if order is None:
        return _ended_before_order(conn, request, now)
    if not _same_patient(order.patient, request.patient):
        raise MessageRefused(Refusal.OTHER_PATIENT, "the order belongs to another patient",
                             "PID-3")
    if request.control is OrderControl.STATUS:
        _status_change(conn, order, request.reported_status, now)
        return Effect("status", order.patient, order.demographics.patient_name,
                      order.accession_number, order.study_uid)
    trigger = _TRIGGERS[request.control]
    try:
        if trigger is OrderTrigger.CHANGE:
            next_state(order.status, trigger)
            store.update_order_details(conn, order.id, request.details, now)
        else:
            apply_sync(conn, order, trigger, source="hl7", at=now)
    except OrderTransitionError as exc:
        raise MessageRefused(Refusal.NOT_ALLOWED, exc.message, "ORC-1") from None
    return Effect({"cancel": "cancel", "discontinue": "discontinue"}.get(trigger.value,
                                                                          "change"),
                  order.patient, order.demographics.patient_name, order.accession_number,
                  order.study_uid)


def _ended_before_order(conn: sqlite3.Connection, request: OrderRequest,
                        now: float) -> Effect:
    """A CA or DC (or an SC reporting one) for an order the box does not hold: its NW is
    late. Answering AE and forgetting it let that NW schedule an exam the RIS had
    withdrawn. The order is recorded as this message states it, then moved by the same
    trigger an in-order delivery would have applied (one transition row, as ever), so
    the late NW finds it discontinued and is refused. Anything else for an unknown
    order (XO, SC in progress or completed) is refused: it cannot stand without the NW."""
    trigger = {OrderControl.CANCEL: OrderTrigger.CANCEL,
               OrderControl.DISCONTINUE: OrderTrigger.DISCONTINUE}.get(request.control)
    if request.control is OrderControl.STATUS and (
            request.reported_status is OrderStatus.DISCONTINUED):
        trigger = OrderTrigger.DISCONTINUE
    if trigger is None:
        raise MessageRefused(Refusal.UNKNOWN_ORDER, "no order with this accession number",
                             request.key_field)
    created = _create(conn, request, now)
    order = store.find_order(conn, request.accession_number)
    assert created is not None and order is not None  # inserted in this transaction
    apply_sync(conn, order, trigger, source="hl7", at=now)
    return Effect("cancel" if trigger is OrderTrigger.CANCEL else "discontinue",
                  order.patient, order.demographics.patient_name, order.accession_number,
                  order.study_uid, before_order=True)


def _status_change(conn: sqlite3.Connection, order: Order, reported: OrderStatus | None,
                   now: float) -> None:
    """An SC: move `order` to the status the RIS reports, one transition row a move
    (order_states.path). A status it has reached already (an MPPS got there first, or
    the RIS says it twice), in progress for a completed order, and a status the box does
    not act on change nothing; a status the table cannot reach (completed for a
    discontinued order) is refused naming ORC-5."""
    if reported is None or (
            reported is OrderStatus.IN_PROGRESS and order.status is OrderStatus.COMPLETED):
        return
    try:
        for trigger in path(order.status, reported):
            apply_sync(conn, order, trigger, source="hl7", at=now)
            moved = store.find_order(conn, order.accession_number)
            assert moved is not None  # moved in this transaction
            order = moved
    except OrderTransitionError as exc:
        raise MessageRefused(Refusal.NOT_ALLOWED, exc.message, "ORC-5") from None


def _check_sent_again(order: Order, request: OrderRequest) -> None:
    """Accept an NW for an order the box holds only when it is that order sent again:
    a RIS operator's "send to the modality again" comes under a new control ID, and an
    AE for it stops some interface engines' queues. The order must still stand
    (scheduled or in progress: an NW does not bring back a discontinued order, nor
    schedule a completed one again) and the NW must state it as the box holds it; any
    other NW under the accession number is refused (205), naming the order's final
    status (a CA that overtook its NW recorded the order from what the CA held), else
    what differs, since a change is an XO and new demographics an A08."""
    if order.status not in (OrderStatus.SCHEDULED, OrderStatus.IN_PROGRESS):
        raise MessageRefused(Refusal.DUPLICATE_ORDER, "an order with this accession number"
                             f" exists and is {order.status.value.lower()}",
                             request.key_field)
    differs = [name for name, same in (
        ("patient", order.patient == request.patient),
        ("placer order number", order.placer_order_number == request.placer_order_number),
        ("filler order number", order.filler_order_number == request.filler_order_number),
        ("Study Instance UID", request.study_uid in ("", order.study_uid)),
        ("procedure details", order.details == request.details),
        ("patient demographics", order.demographics == request.demographics),
    ) if not same]
    if differs:
        raise MessageRefused(Refusal.DUPLICATE_ORDER, "an order with this accession number"
                             f" exists with another {', '.join(differs)}", request.key_field)


def _same_patient(order: PatientKey, message: PatientKey) -> bool:
    """Whether a cancel, discontinue or change names the order's patient: a message for
    the wrong patient (a mistyped accession number) must not touch another's order. The
    issuers are compared when both are given (senders often leave it out of ORC-only
    messages)."""
    return (order.patient_id == message.patient_id
            and (not order.issuer or not message.issuer or order.issuer == message.issuer))


def _create(conn: sqlite3.Connection, request: OrderRequest, now: float) -> Effect | None:
    """A new order, or None when the order is there as this NW states it."""
    existing = store.find_order(conn, request.accession_number)
    if existing is not None:
        _check_sent_again(existing, request)
        return None
    study_uid = request.study_uid or generate_uid()
    if request.study_uid and store.find_order_by_study(conn, study_uid) is not None:
        raise MessageRefused(Refusal.DUPLICATE_ORDER,
                       "an order with this Study Instance UID exists", request.study_field)
    store.insert_order(conn, accession_number=request.accession_number,
                       placer_order_number=request.placer_order_number,
                       filler_order_number=request.filler_order_number, study_uid=study_uid,
                       details=request.details, patient=request.patient,
                       demographics=request.demographics, at=now)
    return Effect("create", request.patient, request.demographics.patient_name,
                  request.accession_number, study_uid)
