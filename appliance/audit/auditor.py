"""The one facade the rest of the code calls: one method per audited event.

Call sites pass what they know in their own terms (a pynetdicom association,
an ingested instance's header, a study row); this module turns that into a
PS3.15 record (records.py) and hands it to the log (log.py).

What an audit record guarantees, and when:
- Security alerts, access refusals and admin actions are appended and
  fsync'd before the call returns.
- Everything else is buffered in memory and written, one write and one fsync
  per batch, at the end of the association it belongs to or at the latest
  every `[audit] flush_seconds` (default 1 s), and at shutdown. A C-STORE is
  acknowledged without waiting for its audit record: the hot path costs a
  dict update, never an fsync. A power cut can therefore lose the audit
  records of the last `flush_seconds` and of associations still open; the
  instances themselves are in the index with their source AE and time.
- Instances stored over one association are one record per study (counts per
  SOP class), and the C-STOREs it refused one failed record per status, written
  when the association closes; import and drop-folder
  ingest are one record per study every `[audit] batch_seconds`.
- Rejected associations are recorded in full once per remote address and
  window (`[audit] rejection_window_seconds`), further ones as one count per
  window (rejections.py): a scan cannot flood the log.
- Web accesses (DICOMweb, the viewer) are recorded in full, and fsync'd, at the
  first access per user, role, address, study and kind (query, retrieve,
  store) in a window of `[audit] access_window_seconds`; the rest of the
  window becomes one summary with counts (web_access.py). A viewer opening a
  500-slice series is one record, not 500. Refused web accesses and failed
  web logins are windowed per user (or name typed), address and reason; so are
  C-FINDs, C-MOVEs and C-GETs refused or failed before any study was known, per
  peer, address and reason, DIMSE services a peer is not permitted (Security
  Alert, Use of Restricted Function), per peer, address, service and reason, and
  HL7 messages rejected before they were understood.
- If the log cannot be written (disk full), records stay buffered (up to
  MAX_PENDING, then the oldest are dropped and counted in an error line) and
  are retried at the next flush; each failed try counts in
  pacs_edge_audit_write_failures_total, which the fleet's alerts watch.

Nothing here logs record content: log lines carry counts and error types.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from appliance.audit.log import AuditLog, AuditLogError
from appliance.audit.operators import operators
from appliance.audit.records import (
    Action,
    AuditRecord,
    AuditSource,
    Code,
    EventID,
    EventType,
    ObjectIDType,
    ObjectRole,
    ObjectType,
    Outcome,
    Participant,
    ParticipantObject,
    Role,
    patient_object,
    study_object,
    web_role,
)
from appliance.audit.rejections import OTHER_SOURCES, RejectionTally, Tally
from appliance.audit.web_access import AccessKey, AccessWindows, Window
from appliance.base.errors import IndexUnavailable
from appliance.store.audit_reads import StudySubject, study_subjects

if TYPE_CHECKING:
    from appliance.audit.syslog import SyslogForwarder
    from appliance.base.config import Config

log = logging.getLogger(__name__)

MAX_PENDING = 100_000
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
MAX_SHOWN = 256  # patients and studies named in an operator's Query record


class InstanceFacts(Protocol):
    """What an ingested instance tells the audit (services.dicom_header.InstanceHeader)."""

    @property
    def patient_id(self) -> str: ...
    @property
    def patient_name(self) -> str: ...
    @property
    def study_uid(self) -> str: ...
    @property
    def sop_class_uid(self) -> str: ...
    @property
    def accession_number(self) -> str: ...


class StudyFacts(Protocol):
    """What a study row tells the audit (appliance.store.study_rows.StudyRow)."""

    @property
    def study_uid(self) -> str: ...
    @property
    def patient_id(self) -> str: ...
    @property
    def patient_name(self) -> str: ...
    @property
    def accession_number(self) -> str: ...


class PatientFacts(Protocol):
    @property
    def patient_id(self) -> str: ...


class OrderFacts(Protocol):
    """An applied HL7 change (appliance.services.orders.Effect)."""

    @property
    def action(self) -> str: ...
    @property
    def patient(self) -> PatientFacts: ...
    @property
    def patient_name(self) -> str: ...
    @property
    def accession_number(self) -> str: ...
    @property
    def study_uid(self) -> str: ...
    @property
    def prior(self) -> PatientFacts | None: ...


class Hl7Rejection(Protocol):
    """An HL7 message rejected before any order in it was understood (hl7/listener.py)."""

    @property
    def sender(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def reason(self) -> str: ...  # stable: "AR MSH-11 unsupported_processing_id"
    @property
    def text(self) -> str: ...
    @property
    def message_type(self) -> str: ...


class WebUser(Protocol):
    """A web user as the audit names them (appliance.services.access.Principal)."""

    @property
    def name(self) -> str: ...
    @property
    def role(self) -> str: ...


@dataclass
class _WebEvent:
    """The parts of a web access's first record, kept with its window for the summary."""

    event_id: Code
    action: Action
    description: str
    participants: tuple[Participant, ...]
    lookup: Callable[[], tuple[ParticipantObject, ...]]
    label: str  # what the summary says was repeated: "WADO-RS", a refusal reason...
    event_types: tuple[Code, ...] = ()
    objects: tuple[ParticipantObject, ...] = ()  # lookup()'s answer, once asked


@dataclass(frozen=True)
class Requestor:
    ae_title: str
    address: str
    called_ae: str = ""


def requestor_of(assoc: Any) -> Requestor:
    """The remote AE of a pynetdicom association (duck-typed: no pynetdicom import)."""
    requestor = assoc.requestor
    primitive = getattr(requestor, "primitive", None)
    called = getattr(primitive, "called_ae_title", "") if primitive is not None else ""
    return Requestor(str(requestor.ae_title).strip(), str(requestor.address),
                     str(called or "").strip())


@dataclass
class _Study:
    patient_id: str
    patient_name: str
    accession: str
    sop_classes: Counter[str] = field(default_factory=Counter)


@dataclass
class _Failures:
    """C-STOREs of one association that failed with one status: counted, the first
    reason kept (reasons vary per instance: a size, a field)."""

    first_reason: str
    sop_classes: Counter[str] = field(default_factory=Counter)


@dataclass
class _Batch:
    """Instances received in one association (or one rolling import window), per study;
    an association's failed C-STOREs per status."""

    event_id: Code
    participants: tuple[Participant, ...]
    started: float = field(default_factory=time.monotonic)
    studies: dict[str, _Study] = field(default_factory=dict)
    failures: dict[str, _Failures] = field(default_factory=dict)

    def add(self, instance: InstanceFacts) -> None:
        study = self.studies.get(instance.study_uid)
        if study is None:
            study = self.studies[instance.study_uid] = _Study(
                instance.patient_id, instance.patient_name, instance.accession_number)
        study.sop_classes[instance.sop_class_uid] += 1

    def fail(self, status: str, sop_class_uid: str, reason: str) -> None:
        failures = self.failures.setdefault(status, _Failures(reason))
        failures.sop_classes[sop_class_uid] += 1


class Auditor:
    """Builds records and writes them; thread-safe (pynetdicom calls from many threads)."""

    def __init__(self, audit_log: AuditLog, *, ae_title: str, process: str,
                 site_id: str = "", flush_seconds: float = 1.0, batch_seconds: float = 60.0,
                 rejection_window_seconds: float = 300.0, index_path: Path | None = None,
                 cloud: str = "", access_window_seconds: float = 300.0) -> None:
        self.log = audit_log
        self.process = process
        self.source = AuditSource(ae_title, site_id)
        self.flush_seconds = flush_seconds
        self.batch_seconds = batch_seconds
        self.index_path = index_path
        self.cloud = cloud
        self.box = Participant(ae_title, requestor=False, roles=(Role.APPLICATION,),
                               alternative_user_id=str(os.getpid()),
                               user_name=f"pacs-edge {process}")
        self.on_flush: Callable[[], None] = lambda: None
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # _pending and the batches
        self._write_lock = threading.Lock()  # keeps flushes in order
        self._sessions: dict[int, _Batch] = {}
        self._imports: dict[str, _Batch] = {}
        self._rejections = RejectionTally(rejection_window_seconds)
        self._web_windows = AccessWindows(access_window_seconds)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dropped = 0
        self._last_error = ""  # why the last flush failed (no record content)
        self._application = False
        self.forwarder: SyslogForwarder | None = None

    @classmethod
    def for_home(cls, config: Config, *, process: str) -> Auditor:
        """The auditor of one process on a data home; syslog forwarding as configured."""
        settings = config.audit
        auditor = cls(AuditLog.for_home(config.home), ae_title=config.dicom.ae_title,
                      process=process, site_id=settings.site_id,
                      flush_seconds=settings.flush_seconds,
                      batch_seconds=settings.batch_seconds,
                      rejection_window_seconds=settings.rejection_window_seconds,
                      access_window_seconds=settings.access_window_seconds,
                      index_path=config.index.path,
                      cloud=config.cloud_url.split("?", 1)[0])
        if settings.syslog_host:
            from appliance.audit.syslog import SyslogForwarder, SyslogTarget

            def under_home(path: Path | None) -> Path | None:
                return None if path is None else config.home / path  # absolute stays absolute

            auditor.forwarder = SyslogForwarder(auditor.log, SyslogTarget(
                settings.syslog_host, settings.syslog_port, under_home(settings.syslog_ca_file),
                under_home(settings.syslog_cert_file), under_home(settings.syslog_key_file)),
                retry_seconds=settings.syslog_retry_seconds)
        return auditor

    # --- life cycle -------------------------------------------------------------------

    def start(self, *, application: bool = False) -> Auditor:
        """Start the background flusher (and syslog forwarding, when configured); with
        `application`, record Application Start. Long-running processes call this;
        a one-shot command does not, and then every record is written at once."""
        if application:
            self._application = True
            self.application(started=True)
        self._thread = threading.Thread(target=self._run, name="audit-flush", daemon=True)
        self._thread.start()
        if self.forwarder is not None:
            self.on_flush = self.forwarder.wake
            self.forwarder.start()
        return self

    def close(self) -> None:
        """Write every open batch and everything buffered (Application Stop first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        if self._application:
            self._application = False
            self.application(started=False)
        with self._lock:
            batches = [*self._sessions.values(), *self._imports.values()]
            self._sessions.clear()
            self._imports.clear()
        for batch in batches:
            self._emit_batch(batch)
        for tally in self._rejections.drain():
            self._rejection_summary(tally)
        for window in self._web_windows.drain():
            self._web_summary(window)
        self.flush()
        if self.forwarder is not None:
            self.forwarder.stop()

    def __enter__(self) -> Auditor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        """Close; then, unless the block is already failing, AuditLogError when records
        could not be written: a short-lived process (a CLI command) would otherwise exit
        successfully with them lost."""
        self.close()
        with self._lock:
            unwritten = len(self._pending) + self._dropped
        if unwritten and exc_type is None:
            raise AuditLogError(
                f"{unwritten} audit record(s) of this command could not be written"
                f" ({self._last_error}); they are lost",
                hint="run `pacs-edge audit verify` and keep the audit log as evidence")

    # --- events: the application and its operators ------------------------------------

    def application(self, *, started: bool) -> None:
        launchers = operators(roles=(Role.APPLICATION_LAUNCHER,))
        self._record(EventID.APPLICATION_ACTIVITY, Action.EXECUTE, Outcome.SUCCESS,
                     (self.box, *launchers),
                     event_types=(EventType.APPLICATION_START if started
                                  else EventType.APPLICATION_STOP,),
                     urgent=True)

    def peer_changed(self, change: str, *, name: str, ae_title: str, host: str = "",
                     port: int = 0, allow: Iterable[str] = (),
                     flags: Iterable[str] = ()) -> None:
        """An allowlist entry was added, changed or removed by an operator."""
        details = [("Action", change), ("Name", name)]
        if host:
            details += [("Host", host), ("Port", str(port))]
        if allow:
            details.append(("Allow", ",".join(sorted(allow))))
        if flags:
            details.append(("Flags", ",".join(sorted(flags))))
        subject = ParticipantObject(ae_title, ObjectIDType.USER_IDENTIFIER,
                                    ObjectType.SYSTEM_OBJECT, ObjectRole.SECURITY_USER_ENTITY,
                                    name=name, details=tuple(details))
        self._operator_alert(EventType.USER_SECURITY_ATTRIBUTES_CHANGED, subject)

    def configuration_changed(self, what: str, *, security: bool = True,
                              failure: str = "") -> None:
        """An operator changed configuration, keys or readers (`what` names it, no values);
        with `failure`, tried to and failed, and why (outcome 4)."""
        subject = ParticipantObject(what, ObjectIDType.URI, ObjectType.SYSTEM_OBJECT,
                                    ObjectRole.SECURITY_RESOURCE, name=what)
        self._operator_alert(EventType.SECURITY_CONFIGURATION if security
                             else EventType.SOFTWARE_CONFIGURATION, subject, failure=failure)

    def user_changed(self, change: str, *, name: str, role: str = "",
                     study_uid: str = "") -> None:
        """An operator added, removed, re-passworded or unlocked a web user, or issued a
        launch link for one (`study_uid`: the study it opens)."""
        details = [("Action", change)] + ([("Role", role)] if role else [])
        if study_uid:
            details.append(("StudyInstanceUID", study_uid))
        subject = ParticipantObject(name, ObjectIDType.USER_IDENTIFIER, ObjectType.PERSON,
                                    ObjectRole.SECURITY_USER_ENTITY, name=name,
                                    details=tuple(details))
        self._operator_alert(EventType.USER_SECURITY_ATTRIBUTES_CHANGED, subject)

    def user_authentication(self, name: str, address: str, *, logout: bool = False,
                            failure: str = "", via: str = "password") -> None:
        """A web user logged in or out (PS3.15 A.5.3.8 User Authentication); `failure`
        says why a login was refused (bad credentials, locked out, expired link...).
        `name` is what the user typed, bounded: it is audited even when no such user
        exists, as PS3.15 asks for failed attempts. Failures are windowed per name,
        address, way in and reason (web_access.py): the first is written at once, the
        rest counted, so a password-guessing client costs two records per window."""
        user = Participant(name[:64] or "unknown", requestor=True, address=address,
                           user_name=via)
        event = _WebEvent(EventID.USER_AUTHENTICATION, Action.EXECUTE, failure,
                          (user, self.box), partial(tuple, ()), failure,
                          event_types=(EventType.LOGOUT if logout else EventType.LOGIN,))
        if failure:
            key = AccessKey("login", user.user_id, via, address, refused=failure)
            if not self._web_windows.note(key, context=event):
                return
        self._record(EventID.USER_AUTHENTICATION, Action.EXECUTE,
                     Outcome.MINOR_FAILURE if failure else Outcome.SUCCESS, (user, self.box),
                     event_types=event.event_types, description=failure, urgent=bool(failure))

    def audit_log_used(self, purpose: str) -> None:
        subject = ParticipantObject(str(self.log.path), ObjectIDType.URI,
                                    ObjectType.SYSTEM_OBJECT, ObjectRole.SECURITY_RESOURCE,
                                    name="Security Audit Log", details=(("Purpose", purpose),))
        self._record(EventID.AUDIT_LOG_USED, Action.READ, Outcome.SUCCESS,
                     (*operators(), self.box), objects=(subject,), urgent=True)

    def operator_queried(self, command: str, *, matches: int,
                         patients: Iterable[tuple[str, str]] = (),
                         study_uids: Iterable[str] = ()) -> None:
        """An operator's command showed patient data (`pacs-edge worklist list`,
        `prefetch status`...): a Query record naming the operator (the person logged in
        too, operators.py), the command as the query, the matches, and the patients
        (ID, name) and studies shown, at most MAX_SHOWN of each (the rest counted)."""
        shown = list(dict.fromkeys(patients))
        uids = list(dict.fromkeys(u for u in study_uids if u))
        query = ParticipantObject(
            command, ObjectIDType.URI, ObjectType.SYSTEM_OBJECT, ObjectRole.QUERY,
            query=command.encode("utf-8"),
            details=(("Matches", str(matches)), ("Patients", str(len(shown))),
                     ("Studies", str(len(uids)))))
        objects = (query, *(study_object(uid) for uid in uids[:MAX_SHOWN]),
                   *(patient_object(pid, name) for pid, name in shown[:MAX_SHOWN]))
        box = replace(self.box, roles=(Role.DESTINATION,))
        self._record(EventID.QUERY, Action.EXECUTE, Outcome.SUCCESS,
                     (*operators(roles=(Role.SOURCE,)), box),
                     objects=objects, description=command, urgent=True)

    # --- events: DIMSE ------------------------------------------------------------------

    def association(self, assoc: Any, *, accepted: bool, reason: str = "") -> None:
        """An association was accepted (Login) or rejected (failed Login, with why;
        repeated rejections from one address are counted, see rejections.py)."""
        peer = requestor_of(assoc)
        if not accepted and not self._rejections.note(peer.address, peer.ae_title, reason):
            return
        box = Participant(peer.called_ae or self.source.source_id, requestor=False,
                          roles=(Role.DESTINATION,))
        self._record(EventID.USER_AUTHENTICATION, Action.EXECUTE,
                     Outcome.SUCCESS if accepted else Outcome.MINOR_FAILURE,
                     (self._peer(peer, Role.SOURCE), box), event_types=(EventType.LOGIN,),
                     description=reason)

    def _rejection_summary(self, tally: Tally) -> None:
        """One record for the rejections a source made in a window beyond its first."""
        assert tally.first is not None and tally.last is not None
        first = tally.first.isoformat(timespec="seconds")
        last = tally.last.isoformat(timespec="seconds")
        source = Participant(",".join(tally.ae_titles), requestor=True, roles=(Role.SOURCE,),
                             address="" if tally.address == OTHER_SOURCES else tally.address)
        box = Participant(self.source.source_id, requestor=False, roles=(Role.DESTINATION,))
        node = ParticipantObject(
            tally.address, ObjectIDType.NODE_ID, ObjectType.SYSTEM_OBJECT,
            ObjectRole.SECURITY_USER_ENTITY,
            details=(("RejectedAssociations", str(tally.count)), ("FirstTime", first),
                     ("LastTime", last), ("CallingAETitles", ",".join(tally.ae_titles)),
                     ("Reasons", "; ".join(tally.reasons))))
        self._record(EventID.USER_AUTHENTICATION, Action.EXECUTE, Outcome.MINOR_FAILURE,
                     (source, box), objects=(node,), event_types=(EventType.LOGIN,),
                     description=f"{tally.count} more association(s) rejected from"
                                 f" {tally.address} between {first} and {last}",
                     when=tally.last)

    def refused(self, assoc: Any, service: str, reason: str) -> None:
        """A known peer asked for a service it is not permitted (access control).
        Windowed per peer, address, service and reason, as refused web accesses are: the
        first is written at once, the rest of the window is one summary with the count,
        so a peer repeating a request it may not make cannot flood the log (or hold its
        association on an fsync per request)."""
        peer = requestor_of(assoc)
        subject = ParticipantObject(peer.ae_title, ObjectIDType.USER_IDENTIFIER,
                                    ObjectType.SYSTEM_OBJECT, ObjectRole.SECURITY_USER_ENTITY,
                                    details=(("Service", service),))
        key = AccessKey("refused", peer.ae_title, "", peer.address, search=service,
                        refused=reason)
        self._web_access(key, _WebEvent(
            EventID.SECURITY_ALERT, Action.EXECUTE, reason, (self._peer(peer), self.box),
            partial(tuple, (subject,)), reason,
            event_types=(EventType.USE_OF_RESTRICTED_FUNCTION,)))

    def stored(self, assoc: Any, instance: InstanceFacts) -> None:
        """One instance stored over `assoc`; recorded per study when the association ends."""
        with self._lock:
            self._session(assoc).add(instance)

    def store_failed(self, assoc: Any, *, status: str, sop_class_uid: str,
                     reason: str) -> None:
        """A C-STORE over `assoc` answered with a failure `status` (0xA700 out of
        resources, 0xC000 cannot understand...): counted, and recorded when the
        association ends as one failed record per status, whatever the count."""
        with self._lock:
            self._session(assoc).fail(status, sop_class_uid, reason)

    def _session(self, assoc: Any) -> _Batch:
        """The batch of `assoc`, opened at its first C-STORE (call with the lock held)."""
        batch = self._sessions.get(id(assoc))
        if batch is None:
            peer = requestor_of(assoc)
            box = Participant(self.source.source_id, requestor=False,
                              roles=(Role.DESTINATION,))
            batch = self._sessions[id(assoc)] = _Batch(
                EventID.INSTANCES_TRANSFERRED, (self._peer(peer, Role.SOURCE), box))
        return batch

    def association_closed(self, assoc: Any) -> None:
        """The association ended (released, aborted or dropped): write what it stored."""
        with self._lock:
            batch = self._sessions.pop(id(assoc), None)
        if batch is not None:
            self._emit_batch(batch)
            self.flush()

    def queried(self, assoc: Any, *, sop_class_uid: str, identifier: bytes,
                transfer_syntax: str, matches: int | None, reason: str = "") -> None:
        """A C-FIND: the query itself is the participant object (base64 in exports).
        One refused or failed (`reason`) is windowed per peer, address, SOP class and
        reason, as refused web accesses are: the first is written at once, the rest of
        the window is one summary with the count, so a peer repeating a bad C-FIND
        cannot flood the log (or stall the box on an fsync per request)."""
        peer = requestor_of(assoc)
        query = ParticipantObject(
            sop_class_uid, ObjectIDType.SOP_CLASS_UID, ObjectType.SYSTEM_OBJECT,
            ObjectRole.REPORT, query=identifier,
            details=(("TransferSyntax", transfer_syntax),
                     *((("Matches", str(matches)),) if matches is not None else ())))
        box = Participant(self.source.source_id, requestor=False, roles=(Role.DESTINATION,))
        participants = (self._peer(peer, Role.SOURCE), box)
        if reason:
            key = AccessKey("C-FIND", peer.ae_title, "", peer.address, search=sop_class_uid,
                            refused=reason)
            self._web_access(key, _WebEvent(EventID.QUERY, Action.EXECUTE, reason,
                                            participants, partial(tuple, (query,)), reason))
            return
        self._record(EventID.QUERY, Action.EXECUTE, Outcome.SUCCESS, participants,
                     objects=(query,))

    def retrieved(self, assoc: Any, *, action: str, study_uids: Iterable[str],
                  destination: tuple[str, str] | None = None, completed: int = 0,
                  failed: int = 0, reason: str = "") -> None:
        """A C-MOVE (`destination` = (AE title, host)) or C-GET, finished or refused. One
        refused or failed (`reason`) before any study was known is windowed per peer,
        address, action and reason, as a refused C-FIND is; its record names the peer's
        address (a Node ID object, which the summary's count is a detail of)."""
        peer = requestor_of(assoc)
        uids = set(study_uids)
        box = Participant(self.source.source_id, requestor=False, roles=(Role.SOURCE,))
        if destination is None:  # C-GET: the requestor receives
            participants: tuple[Participant, ...] = (self._peer(peer, Role.DESTINATION), box)
        else:
            target = Participant(destination[0], requestor=destination[0] == peer.ae_title,
                                 roles=(Role.DESTINATION,), address=destination[1])
            participants = (box, target)
            if destination[0] != peer.ae_title:
                participants += (self._peer(peer),)
        if reason and not uids:
            node = ParticipantObject(peer.address or "unknown", ObjectIDType.NODE_ID,
                                     ObjectType.SYSTEM_OBJECT,
                                     ObjectRole.SECURITY_USER_ENTITY)
            key = AccessKey(action, peer.ae_title, "", peer.address, refused=reason)
            self._web_access(key, _WebEvent(EventID.INSTANCES_TRANSFERRED, Action.READ,
                                            reason, participants, partial(tuple, (node,)),
                                            reason))
            return
        description = reason or (f"{action}: completed={completed} failed={failed}"
                                 if failed else "")
        outcome = Outcome.MINOR_FAILURE if reason or failed else Outcome.SUCCESS
        self._record(EventID.INSTANCES_TRANSFERRED, Action.READ, outcome, participants,
                     objects=self._study_objects(uids), description=description,
                     urgent=bool(reason))

    def legacy_queried(self, *, peer_ae: str, address: str, identifier: bytes, queries: int,
                       matches: int, reason: str = "", what: str = "migration listing"
                       ) -> None:
        """The C-FINDs a migration sent a legacy PACS for one phase: listing one day (or
        the studies without a date), or `migrate verify`. One Query record per phase,
        as an inbound C-FIND's but with this box the requestor (Source) and the legacy
        PACS the Destination. `identifier`: the phase's query, encoded, with dates and
        times only (a verify's per-study UID left empty)."""
        query = ParticipantObject(
            STUDY_ROOT_FIND, ObjectIDType.SOP_CLASS_UID, ObjectType.SYSTEM_OBJECT,
            ObjectRole.REPORT, query=identifier,
            details=(("Queries", str(queries)), ("Matches", str(matches))))
        legacy = Participant(peer_ae, requestor=False, roles=(Role.DESTINATION,),
                             address=address)
        self._record(EventID.QUERY, Action.EXECUTE,
                     Outcome.SUCCESS if not reason else Outcome.MINOR_FAILURE,
                     (self._box_as(Role.SOURCE), legacy), objects=(query,),
                     description=reason or what)

    def prefetch_queried(self, *, peer_ae: str, address: str, patient_id: str, issuer: str,
                         studies: int, reason: str = "") -> None:
        """The C-FINDs a prefetch sent its remote archive for one patient's studies (STUDY
        level, and SERIES level for answers without modalities): one Query record per
        request asked, as a migration listing's, with the patient as an object and the
        query as QIDO-RS writes it; outcome 4 (fsync'd at once) when it was not answered."""
        asked = f"PatientID={patient_id}&IssuerOfPatientID={issuer}"
        query = ParticipantObject(
            STUDY_ROOT_FIND, ObjectIDType.SOP_CLASS_UID, ObjectType.SYSTEM_OBJECT,
            ObjectRole.REPORT, query=asked.encode("utf-8"),
            details=(("QueryLevel", "STUDY"),
                     *(() if reason else (("Matches", str(studies)),))))
        archive = Participant(peer_ae, requestor=False, roles=(Role.DESTINATION,),
                              address=address)
        self._record(EventID.QUERY, Action.EXECUTE,
                     Outcome.MINOR_FAILURE if reason else Outcome.SUCCESS,
                     (self._box_as(Role.SOURCE), archive),
                     objects=(query, patient_object(patient_id)),
                     description=reason or "prefetch query", urgent=bool(reason))

    def legacy_retrieved(self, *, peer_ae: str, address: str, action: str, study_uid: str,
                         completed: int = 0, failed: int = 0, reason: str = "",
                         purpose: str = "") -> None:
        """A migration's (or, with `purpose` "prefetch", a prefetch's) C-MOVE or C-GET of
        one study from another archive, answered or failed: one record per study and
        attempt (the instances themselves are audited as they are stored), this box the
        requestor and Destination, the other archive Source."""
        legacy = Participant(peer_ae, requestor=False, roles=(Role.SOURCE,), address=address)
        counts = f"{purpose} {action}" if purpose else action
        counts += f": completed={completed} failed={failed}"
        self._record(EventID.INSTANCES_TRANSFERRED, Action.CREATE,
                     Outcome.MINOR_FAILURE if reason or failed else Outcome.SUCCESS,
                     (legacy, self._box_as(Role.DESTINATION)),
                     objects=self._study_objects([study_uid]),
                     description=f"{reason} ({counts})" if reason else counts)

    def commitment_answered(self, *, peer_ae: str, address: str, study_uids: Iterable[str],
                            committed: int, failed: int, reason: str = "") -> None:
        """A Storage Commitment report was delivered to `peer_ae`: the box took responsibility
        for `committed` instances of these studies; with `reason`, it gave up delivering."""
        peer = Participant(peer_ae, requestor=True, roles=(Role.DESTINATION,), address=address)
        box = Participant(self.source.source_id, requestor=False, roles=(Role.SOURCE,))
        counts = f"storage commitment: committed={committed} failed={failed}"
        outcome = (Outcome.SERIOUS_FAILURE if reason
                   else Outcome.MINOR_FAILURE if failed else Outcome.SUCCESS)
        self._record(EventID.INSTANCES_ACCESSED, Action.READ, outcome, (peer, box),
                     objects=self._study_objects(study_uids),
                     description=f"{reason} ({counts})" if reason else counts,
                     urgent=True)

    def procedure_step(self, assoc: Any, *, created: bool, state: str, patient_id: str,
                       study_uids: Iterable[str], accession_numbers: Iterable[str] = (),
                       reason: str = "", read: bool = False) -> None:
        """An MPPS N-CREATE (`created`) or N-SET, committed or refused with `reason`, or
        an N-GET (`read`) (PS3.15 A.5.3.9 Procedure Record). Written before the
        response: a few per exam."""
        peer = requestor_of(assoc)
        box = Participant(self.source.source_id, requestor=False, roles=(Role.DESTINATION,))
        accessions = tuple(a for a in accession_numbers if a)
        objects = tuple(replace(study_object(uid, {}), accession_numbers=accessions)
                        for uid in sorted({u for u in study_uids if u}))
        if patient_id:
            objects += (patient_object(patient_id),)
        action = Action.READ if read else Action.CREATE if created else Action.UPDATE
        self._record(EventID.PROCEDURE_RECORD, action,
                     Outcome.MINOR_FAILURE if reason else Outcome.SUCCESS,
                     (self._peer(peer, Role.SOURCE), box), objects=objects,
                     description=reason or f"procedure step {state}", urgent=True)

    def node_authentication_failed(self, address: str, reason: str) -> None:
        """A TLS handshake or certificate check failed (for the TLS listener)."""
        remote = Participant(address or "unknown", requestor=True, address=address)
        self._record(EventID.SECURITY_ALERT, Action.EXECUTE, Outcome.MINOR_FAILURE,
                     (remote, self.box), event_types=(EventType.NODE_AUTHENTICATION,),
                     description=reason, urgent=True)

    # --- events: HL7 orders and patients ------------------------------------------------

    def order_recorded(self, sender: str, address: str, effect: OrderFacts, *,
                       refusal: str = "") -> None:
        """An HL7 order was created, changed, cancelled or discontinued (Order Record);
        with `refusal`, the change a message asked for and why the box refused it
        (outcome 4, fsync'd at once). A refused order may name no study yet: then the
        accession number is a detail of the patient object."""
        action = {"create": Action.CREATE, "cancel": Action.DELETE,
                  "discontinue": Action.DELETE}.get(effect.action, Action.UPDATE)
        patient = patient_object(effect.patient.patient_id, effect.patient_name)
        if effect.study_uid:
            objects = (study_object(effect.study_uid, {}, effect.accession_number), patient)
        else:
            objects = (replace(patient, details=(("AccessionNumber", effect.accession_number),)
                               if effect.accession_number else ()),)
        self._record(EventID.ORDER_RECORD, action,
                     Outcome.MINOR_FAILURE if refusal else Outcome.SUCCESS,
                     self._hl7_participants(sender, address), objects=objects,
                     description=f"order {effect.action}"
                     + (f" refused: {refusal}" if refusal else ""), urgent=bool(refusal))

    def patient_recorded(self, sender: str, address: str, effect: OrderFacts, *,
                         refusal: str = "") -> None:
        """An HL7 ADT registered, updated or merged a patient (Patient Record); with
        `refusal`, the change asked for and why the box refused it (outcome 4)."""
        objects: tuple[ParticipantObject, ...] = (
            patient_object(effect.patient.patient_id, effect.patient_name),)
        if effect.prior is not None:
            prior = replace(patient_object(effect.prior.patient_id),
                            details=(("MergedInto", effect.patient.patient_id),))
            objects += (prior,)
        action = Action.CREATE if effect.action == "register" else Action.UPDATE
        self._record(EventID.PATIENT_RECORD, action,
                     Outcome.MINOR_FAILURE if refusal else Outcome.SUCCESS,
                     self._hl7_participants(sender, address), objects=objects,
                     description=f"patient {effect.action}"
                     + (f" refused: {refusal}" if refusal else ""), urgent=bool(refusal))

    def hl7_connection_refused(self, address: str, reason: str) -> None:
        """An MLLP connection from a host that may not send HL7; repeated refusals from
        one address are counted, as rejected associations are (rejections.py)."""
        if not self._rejections.note(address, "HL7", reason):
            return
        remote = Participant(address or "unknown", requestor=True, address=address)
        self._record(EventID.SECURITY_ALERT, Action.EXECUTE, Outcome.MINOR_FAILURE,
                     (remote, self.box), event_types=(EventType.NODE_AUTHENTICATION,),
                     description=reason, urgent=True)

    def hl7_message_rejected(self, rejected: Hl7Rejection) -> None:
        """A message from an hl7 peer rejected (AR or AE) before any order in it was
        understood. Windowed per sender, address, reason and message type, as refused
        web accesses are: the first is written at once (before the ACK), the rest of the
        window is one summary, so a sender resending a bad message cannot flood the log.
        An ADT is a Patient Record, anything else an Order Record."""
        key = AccessKey("hl7", rejected.sender, "", rejected.address,
                        search=rejected.message_type, refused=rejected.reason)
        node = ParticipantObject(
            rejected.address or "unknown", ObjectIDType.NODE_ID, ObjectType.SYSTEM_OBJECT,
            ObjectRole.SECURITY_USER_ENTITY,
            details=(("MessageType", rejected.message_type),) if rejected.message_type else ())
        event_id = (EventID.PATIENT_RECORD if rejected.message_type.startswith("ADT")
                    else EventID.ORDER_RECORD)
        label = f"HL7 message rejected: {rejected.reason}"
        self._web_access(key, _WebEvent(
            event_id, Action.UPDATE, f"{label}: {rejected.text}",
            self._hl7_participants(rejected.sender, rejected.address),
            partial(tuple, (node,)), label))

    def _hl7_participants(self, sender: str, address: str) -> tuple[Participant, ...]:
        peer = Participant(sender or address, requestor=True, roles=(Role.SOURCE,),
                           address=address)
        box = Participant(self.source.source_id, requestor=False, roles=(Role.DESTINATION,))
        return peer, box

    # --- events: ingest from files ----------------------------------------------------

    def imported(self, source: str, instance: InstanceFacts) -> None:
        """One instance ingested from files (`import`, the drop folder); per study and window."""
        with self._lock:
            batch = self._imports.get(source)
            if batch is None:
                importers = ((Participant(source, requestor=True, roles=(Role.SOURCE,),
                                          user_name=source),)
                             if source == "dropfolder"
                             else operators(roles=(Role.SOURCE,), user_name=source))
                box = Participant(self.source.source_id, requestor=False,
                                  roles=(Role.DESTINATION,))
                batch = self._imports[source] = _Batch(EventID.IMPORT, (*importers, box))
            batch.add(instance)

    # --- events: DICOMweb (appliance/http) ------------------------------------------------
    # One record per user, role, address, study and kind of access per window, written
    # at the first access; what follows in the window is counted into one summary
    # (web_access.py). Refusals are windowed per user, address and reason.

    def web_queried(self, user: WebUser, address: str, *, level: str, query: str,
                    matches: int | None, reason: str = "", study_uid: str = "") -> None:
        """A QIDO-RS search by a web user: the query string is the participant object,
        and the study too when the search is under one (its series or instances)."""
        key = AccessKey("query", user.name, str(user.role), address,
                        study_uid="" if reason else study_uid,
                        search="" if reason or study_uid else query, refused=reason)
        # Identified like a C-FIND: by the Study Root FIND SOP class.
        search = ParticipantObject(STUDY_ROOT_FIND, ObjectIDType.SOP_CLASS_UID,
                                   ObjectType.SYSTEM_OBJECT, ObjectRole.REPORT,
                                   query=query.encode("utf-8"),
                                   details=(("Protocol", "QIDO-RS"), ("QueryLevel", level),
                                            *((("Matches", str(matches)),)
                                              if matches is not None else ())))
        objects = (search, study_object(study_uid)) if study_uid else (search,)
        self._web_access(key, _WebEvent(
            EventID.QUERY, Action.EXECUTE, reason or "QIDO-RS search",
            (self._web_user(user, address, Role.SOURCE), self._web_box(Role.DESTINATION)),
            partial(tuple, objects), reason or "QIDO-RS"), study_uid=study_uid)

    def web_retrieved(self, user: WebUser, address: str, *, what: str,
                      study_uids: Iterable[str], instances: int = 0,
                      reason: str = "") -> None:
        """A WADO-RS read by a web user (`what`: instances, metadata, frames, bulkdata) of
        `instances` instances, or its refusal (`reason`). The first of a window names
        the studies and their patients, read from the index: blocking, call it off the
        event loop."""
        uids = sorted(set(study_uids))
        participants = (self._web_box(Role.SOURCE),
                        self._web_user(user, address, Role.DESTINATION))
        for uid in uids:
            key = AccessKey("retrieve", user.name, str(user.role), address,
                            study_uid="" if reason else uid, refused=reason)
            self._web_access(key, _WebEvent(
                EventID.INSTANCES_TRANSFERRED, Action.READ, reason or f"WADO-RS {what}",
                participants, partial(self._study_objects, [uid]), reason or "WADO-RS"),
                what=what, instances=instances, study_uid=uid)

    def web_stored(self, user: WebUser, address: str, instances: Iterable[InstanceFacts]) -> None:
        """Instances a STOW-RS request stored, per study: the first upload of a window is
        recorded at once with its SOP classes, later ones are counted."""
        batch = _Batch(EventID.INSTANCES_TRANSFERRED, (self._web_user(user, address, Role.SOURCE),
                                                      self._web_box(Role.DESTINATION)))
        for instance in instances:
            batch.add(instance)
        for uid, study in batch.studies.items():
            objects = (study_object(uid, dict(study.sop_classes), study.accession),
                       patient_object(study.patient_id, study.patient_name))
            key = AccessKey("store", user.name, str(user.role), address, study_uid=uid)
            self._web_access(key, _WebEvent(
                EventID.INSTANCES_TRANSFERRED, Action.CREATE, "STOW-RS",
                batch.participants, partial(tuple, objects), "STOW-RS"),
                what="stored", instances=sum(study.sop_classes.values()), study_uid=uid)

    def web_store_refused(self, user: WebUser, address: str, *, reason: str,
                          study_uid: str = "") -> None:
        """A STOW-RS upload refused before a byte was stored (the user's role may not
        store), the study the URL named if any: windowed per user, address and reason,
        as refused reads are."""
        key = AccessKey("store", user.name, str(user.role), address, refused=reason)
        objects = (study_object(study_uid),) if study_uid else ()
        self._web_access(key, _WebEvent(
            EventID.INSTANCES_TRANSFERRED, Action.CREATE, reason,
            (self._web_user(user, address, Role.SOURCE), self._web_box(Role.DESTINATION)),
            partial(tuple, objects), reason), what="refused", study_uid=study_uid)

    def _web_access(self, key: AccessKey, event: _WebEvent, *, what: str = "",
                    instances: int = 0, study_uid: str = "") -> None:
        """Record the first access of `key`'s window at once (fsync'd), count the rest."""
        if not self._web_windows.note(key, what=what, instances=instances,
                                      study_uid=study_uid, context=event):
            return
        objects = event.objects = event.lookup()  # the summary names the same ones
        self._record(event.event_id, event.action,
                     Outcome.MINOR_FAILURE if key.refused else Outcome.SUCCESS,
                     event.participants, objects=_with_details(objects, (
                         ("Requests", "1"), ("Instances", str(instances)),
                         ("AccessWindowSeconds", f"{self._web_windows.window_seconds:g}"))),
                     event_types=event.event_types, description=event.description, urgent=True)

    def _web_summary(self, window: Window) -> None:
        """What a window counted beyond its first access, as one record."""
        event: _WebEvent = window.context
        first = _iso(window.first or datetime.now(UTC))
        last = _iso(window.last or datetime.now(UTC))
        details = [("Requests", str(window.requests)), ("Instances", str(window.instances)),
                   ("FirstTime", first), ("LastTime", last)]
        if window.what:
            details.append(("Accessed", ",".join(f"{k}={n}" for k, n in
                                                 sorted(window.what.items()))))
        if window.key.refused and window.studies:
            details.append(("StudyInstanceUIDs", ",".join(window.studies)))
        if window.key.kind == "login":
            objects: tuple[ParticipantObject, ...] = (ParticipantObject(
                window.key.address, ObjectIDType.NODE_ID, ObjectType.SYSTEM_OBJECT,
                ObjectRole.SECURITY_USER_ENTITY, details=tuple(details)),)
        else:
            objects = _with_details(event.objects or event.lookup(), tuple(details))
        self._record(event.event_id, event.action,
                     Outcome.MINOR_FAILURE if window.key.refused else Outcome.SUCCESS,
                     event.participants, objects=objects, event_types=event.event_types,
                     description=f"{event.label}: {window.requests} more"
                                 f" {'attempt' if window.key.kind == 'login' else 'request'}(s)"
                                 f" between {first} and {last}",
                     when=window.last)

    def _web_user(self, user: WebUser, address: str, role: Code) -> Participant:
        return Participant(user.name, requestor=True, roles=(role, web_role(str(user.role))),
                           address=address, user_name=f"web user {user.name} ({user.role})")

    def _web_box(self, role: Code) -> Participant:
        return Participant(self.source.source_id, requestor=False, roles=(role,))

    # --- events: the sync agent ----------------------------------------------------------

    def exported(self, study: StudyFacts, count: int) -> None:
        """A study version was replicated (encrypted) to the cloud."""
        self._cloud_transfer(EventID.EXPORT, Action.READ, study, count, to_cloud=True)

    def recalled(self, study: StudyFacts, count: int, *, error: str = "",
                 tampered: bool = False) -> None:
        """Evicted instances were brought back from the cloud, or the recall failed; a
        blob that failed authentication is also a security alert."""
        self._cloud_transfer(EventID.INSTANCES_TRANSFERRED, Action.CREATE, study, count,
                             to_cloud=False, error=error)
        if tampered:
            self.integrity_failure(study, error)

    def evicted(self, study: StudyFacts, count: int) -> None:
        """Local copies deleted; the verified cloud copy remains."""
        self._record(EventID.INSTANCES_ACCESSED, Action.DELETE, Outcome.SUCCESS,
                     (self._box_requestor(),), objects=self._objects(study, count),
                     description="local copies evicted; cloud copy kept")

    def deleted(self, study: StudyFacts, count: int) -> None:
        """A study was deleted from the box (an operator action)."""
        self._record(EventID.STUDY_DELETED, Action.DELETE, Outcome.SUCCESS,
                     (*operators(), self.box), objects=self._objects(study, count), urgent=True)

    def integrity_failure(self, study: StudyFacts, reason: str) -> None:
        """A cloud blob failed authentication (tampered or damaged): a security alert."""
        cloud = Participant(self.cloud or "cloud", requestor=False, roles=(Role.SOURCE,))
        self._record(EventID.SECURITY_ALERT, Action.EXECUTE, Outcome.SERIOUS_FAILURE,
                     (self._box_requestor(), cloud), objects=self._objects(study, 0),
                     event_types=(EventType.INTEGRITY_FAILURE,), description=reason,
                     urgent=True)

    # --- writing -------------------------------------------------------------------------

    def flush(self) -> None:
        """Append everything buffered, in order, with one write and one fsync."""
        with self._write_lock:
            with self._lock:
                pending, self._pending = self._pending, []
            if not pending:
                return
            try:
                self.log.append(pending)
            except AuditLogError as exc:
                # Imported here: the CLI imports this module before `serve` and `sync`
                # point prometheus-client at the data home's folder (metrics_dir.py).
                from appliance.base.metrics import AUDIT_WRITE_FAILURES

                AUDIT_WRITE_FAILURES.inc()
                with self._lock:
                    self._last_error = exc.message
                    self._pending[:0] = pending
                    excess = len(self._pending) - MAX_PENDING
                    if excess > 0:
                        del self._pending[:excess]
                        self._dropped += excess
                log.error("audit records not written; kept in memory pending=%d dropped=%d"
                          " error=%s", len(self._pending), self._dropped, exc.message)
                return
        self.on_flush()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            now = time.monotonic()
            with self._lock:
                due = [k for k, b in self._imports.items()
                       if now - b.started >= self.batch_seconds]
                batches = [self._imports.pop(k) for k in due]
            for batch in batches:
                self._emit_batch(batch)
            for tally in self._rejections.due():
                self._rejection_summary(tally)
            for window in self._web_windows.due():
                self._web_summary(window)
            with contextlib.suppress(Exception):  # the flusher must outlive any bug
                self.flush()

    def _emit_batch(self, batch: _Batch) -> None:
        for study_uid, study in batch.studies.items():
            objects = (study_object(study_uid, dict(study.sop_classes), study.accession),
                       patient_object(study.patient_id, study.patient_name))
            self._record(batch.event_id, Action.CREATE, Outcome.SUCCESS, batch.participants,
                         objects=objects)
        for status, failures in batch.failures.items():
            count = sum(failures.sop_classes.values())
            classes = tuple(ParticipantObject(
                sop_class, ObjectIDType.SOP_CLASS_UID, ObjectType.SYSTEM_OBJECT,
                ObjectRole.REPORT, details=(("NumberOfInstances", str(n)),))
                for sop_class, n in sorted(failures.sop_classes.items()))
            self._record(batch.event_id, Action.CREATE, Outcome.MINOR_FAILURE,
                         batch.participants, objects=classes,
                         description=f"C-STORE failed {status}: {count} instance(s);"
                                     f" first: {failures.first_reason}")

    def _record(self, event_id: Code, action: Action, outcome: Outcome,
                participants: tuple[Participant, ...], *,
                objects: tuple[ParticipantObject, ...] = (), event_types: tuple[Code, ...] = (),
                description: str = "", urgent: bool = False,
                when: datetime | None = None) -> None:
        record = AuditRecord(event_id, action, outcome, participants, self.source, objects,
                             event_types, description,
                             **({"time": when} if when is not None else {}))
        with self._lock:
            self._pending.append(record.to_dict())
        if urgent or self._thread is None:
            self.flush()

    # --- helpers -------------------------------------------------------------------------

    def _peer(self, peer: Requestor, role: Code | None = None) -> Participant:
        return Participant(peer.ae_title, requestor=True, roles=(role,) if role else (),
                           address=peer.address)

    def _box_as(self, role: Code) -> Participant:
        """This box's process as the requestor of an outbound request, in `role`."""
        return Participant(self.box.user_id, requestor=True, roles=(role,),
                           alternative_user_id=self.box.alternative_user_id,
                           user_name=self.box.user_name)

    def _box_requestor(self) -> Participant:
        return Participant(self.box.user_id, requestor=True, roles=self.box.roles,
                           alternative_user_id=self.box.alternative_user_id,
                           user_name=self.box.user_name)

    def _operator_alert(self, event_type: Code, subject: ParticipantObject, *,
                        failure: str = "") -> None:
        self._record(EventID.SECURITY_ALERT, Action.EXECUTE,
                     Outcome.MINOR_FAILURE if failure else Outcome.SUCCESS,
                     (*operators(), self.box), objects=(subject,), event_types=(event_type,),
                     description=failure, urgent=True)

    def _cloud_transfer(self, event_id: Code, action: Action, study: StudyFacts, count: int,
                        *, to_cloud: bool, error: str = "") -> None:
        cloud = Participant(self.cloud or "cloud", requestor=False,
                            roles=(Role.DESTINATION if to_cloud else Role.SOURCE,))
        box = Participant(self.box.user_id, requestor=True,
                          roles=(Role.SOURCE if to_cloud else Role.DESTINATION,),
                          alternative_user_id=self.box.alternative_user_id,
                          user_name=self.box.user_name)
        self._record(event_id, action, Outcome.SERIOUS_FAILURE if error else Outcome.SUCCESS,
                     (box, cloud), objects=self._objects(study, count), description=error,
                     urgent=bool(error))

    @staticmethod
    def _objects(study: StudyFacts, count: int) -> tuple[ParticipantObject, ...]:
        about = study_object(study.study_uid, {}, study.accession_number)
        if count:
            about = replace(about, details=(("NumberOfInstances", str(count)),))
        return about, patient_object(study.patient_id, study.patient_name)

    def _study_objects(self, study_uids: Iterable[str]) -> tuple[ParticipantObject, ...]:
        """Study and patient objects for retrieved studies (patients read from the index)."""
        uids = sorted(set(study_uids))
        known = self._lookup(uids)
        objects: list[ParticipantObject] = []
        patients: dict[str, str] = {}
        for uid in uids:
            subject = known.get(uid)
            objects.append(study_object(uid, {}, subject.accession_number if subject else ""))
            if subject is not None and subject.patient_id:
                patients.setdefault(subject.patient_id, subject.patient_name)
        objects += [patient_object(pid, name) for pid, name in patients.items()]
        return tuple(objects)

    def _lookup(self, study_uids: list[str]) -> dict[str, StudySubject]:
        """Patient and accession per study, read from the index (read-only, bounded wait);
        nothing when the index cannot say: the record is written without them."""
        if self.index_path is None:
            return {}
        try:
            return study_subjects(self.index_path, study_uids)
        except IndexUnavailable as exc:
            log.warning("audit: patients of retrieved studies not found error=%s",
                        type(exc.__cause__).__name__)
            return {}


def _with_details(objects: tuple[ParticipantObject, ...], details: tuple[tuple[str, str], ...]
                  ) -> tuple[ParticipantObject, ...]:
    """`objects` with `details` added to the first (the study, or the query)."""
    if not objects:
        return objects
    head = objects[0]
    return (replace(head, details=head.details + details), *objects[1:])


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds")
