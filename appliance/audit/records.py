"""Audit records: the content of a DICOM audit message (PS3.15 A.5) as typed values.

One AuditRecord is one PS3.15 AuditMessage: an EventIdentification (event ID,
optional event type codes, action, outcome, time), one or more
ActiveParticipants (who: an AE title or an operator, where from, in which role,
whether they asked for it), the AuditSourceIdentification (this box), and
ParticipantObjects (what: a patient, a study, a query, a peer entry).

PHI is allowed here and nowhere else outside the store and the index:
ParticipantObject IDs and names carry patient IDs, patient names, study UIDs
and query identifiers, because an audit trail that cannot say whose record
was touched is useless to a privacy officer. Log lines never show a record.

Records serialise to plain JSON-able dicts (`to_dict`/`from_dict`) whose keys
are the schema's own field names, so the hash-chained log, the JSON export and
the DICOM XML export (export.py) all read the same structure.

Codes: event IDs are CID 400 (DCM 1101xx), event types CID 401-403, role IDs
CID 402, participant object ID types CID 404 and RFC 3881. DICOM has no code
for "a stored object failed its integrity check"; that alert uses a private
code (scheme 99PACSEDGE), as PS3.16 allows for extensible context groups; so
does a web user's role (admin, radiologist, referring).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True)
class Code:
    """A coded value (PS3.15 CodedValueType): csd-code, codeSystemName, originalText."""

    code: str
    scheme: str
    meaning: str

    def to_dict(self) -> dict[str, str]:
        return {"csd-code": self.code, "codeSystemName": self.scheme,
                "originalText": self.meaning}

    @classmethod
    def from_dict(cls, raw: dict[str, str]) -> Code:
        return cls(raw["csd-code"], raw["codeSystemName"], raw["originalText"])


def _dcm(code: str, meaning: str) -> Code:
    return Code(code, "DCM", meaning)


class EventID:
    """CID 400 Audit Event ID."""

    APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
    AUDIT_LOG_USED = _dcm("110101", "Audit Log Used")
    INSTANCES_ACCESSED = _dcm("110103", "DICOM Instances Accessed")
    INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
    PROCEDURE_RECORD = _dcm("110109", "Procedure Record")
    STUDY_DELETED = _dcm("110105", "DICOM Study Deleted")
    EXPORT = _dcm("110106", "Export")
    IMPORT = _dcm("110107", "Import")
    ORDER_RECORD = _dcm("110109", "Order Record")
    PATIENT_RECORD = _dcm("110110", "Patient Record")
    QUERY = _dcm("110112", "Query")
    SECURITY_ALERT = _dcm("110113", "Security Alert")
    USER_AUTHENTICATION = _dcm("110114", "User Authentication")


class EventType:
    """CID 401 (application activity), 402-403 (authentication, security alert) types."""

    APPLICATION_START = _dcm("110120", "Application Start")
    APPLICATION_STOP = _dcm("110121", "Application Stop")
    LOGIN = _dcm("110122", "Login")
    LOGOUT = _dcm("110123", "Logout")
    NODE_AUTHENTICATION = _dcm("110126", "Node Authentication")
    SECURITY_CONFIGURATION = _dcm("110129", "Security Configuration")
    SOFTWARE_CONFIGURATION = _dcm("110131", "Software Configuration")
    USE_OF_RESTRICTED_FUNCTION = _dcm("110132", "Use of Restricted Function")
    SECURITY_ROLES_CHANGED = _dcm("110136", "Security Roles Changed")
    USER_SECURITY_ATTRIBUTES_CHANGED = _dcm("110137", "User Security Attributes Changed")
    INTEGRITY_FAILURE = Code("PE001", "99PACSEDGE", "Stored Object Integrity Failure")


class Role:
    """CID 402 Audit Active Participant Role ID Codes."""

    APPLICATION = _dcm("110150", "Application")
    APPLICATION_LAUNCHER = _dcm("110151", "Application Launcher")
    DESTINATION = _dcm("110152", "Destination Role ID")
    SOURCE = _dcm("110153", "Source Role ID")


class ObjectIDType:
    """Participant object ID type codes (RFC 3881 and CID 404)."""

    PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
    STUDY_INSTANCE_UID = _dcm("110180", "Study Instance UID")
    SOP_CLASS_UID = _dcm("110181", "SOP Class UID")
    NODE_ID = _dcm("110182", "Node ID")
    USER_IDENTIFIER = Code("11", "RFC-3881", "User Identifier")
    URI = Code("12", "RFC-3881", "URI")


class Action(enum.StrEnum):
    """EventActionCode."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class Outcome(enum.IntEnum):
    """EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4  # refused or partly failed; the requester may retry
    SERIOUS_FAILURE = 8  # the action was stopped (e.g. tampered data)
    MAJOR_FAILURE = 12  # the application became unavailable


class ObjectType(enum.IntEnum):
    """ParticipantObjectTypeCode."""

    PERSON = 1
    SYSTEM_OBJECT = 2
    ORGANIZATION = 3
    OTHER = 4


class ObjectRole(enum.IntEnum):
    """ParticipantObjectTypeCodeRole (the values this box uses)."""

    PATIENT = 1
    REPORT = 3
    SECURITY_USER_ENTITY = 11
    SECURITY_RESOURCE = 13
    DATA_DESTINATION = 16
    DATA_REPOSITORY = 17
    QUERY = 24


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: an AE (UserID = AE title), this box, or an operator."""

    user_id: str
    requestor: bool
    roles: tuple[Code, ...] = ()
    address: str = ""  # NetworkAccessPointID: an IP address or a host name
    alternative_user_id: str = ""  # e.g. the process id of this box's application
    user_name: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"UserID": self.user_id, "UserIsRequestor": self.requestor}
        if self.alternative_user_id:
            out["AlternativeUserID"] = self.alternative_user_id
        if self.user_name:
            out["UserName"] = self.user_name
        if self.address:
            out["NetworkAccessPointID"] = self.address
            out["NetworkAccessPointTypeCode"] = 2 if _is_ip(self.address) else 1
        if self.roles:
            out["RoleIDCode"] = [r.to_dict() for r in self.roles]
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Participant:
        return cls(user_id=raw["UserID"], requestor=bool(raw["UserIsRequestor"]),
                   roles=tuple(Code.from_dict(r) for r in raw.get("RoleIDCode", ())),
                   address=raw.get("NetworkAccessPointID", ""),
                   alternative_user_id=raw.get("AlternativeUserID", ""),
                   user_name=raw.get("UserName", ""))


@dataclass(frozen=True)
class ParticipantObject:
    """A ParticipantObjectIdentification: what the event touched (may hold PHI).

    `sop_classes` maps SOP Class UID -> number of instances (the DICOM
    ParticipantObjectDescription of a study); `query` is the raw, encoded
    query identifier (ParticipantObjectQuery, base64 in every output);
    `details` are ParticipantObjectDetail type/value pairs.
    """

    object_id: str
    id_type: Code
    type: ObjectType
    role: ObjectRole | None = None
    name: str = ""
    query: bytes = b""
    details: tuple[tuple[str, str], ...] = ()
    sop_classes: tuple[tuple[str, int], ...] = ()
    accession_numbers: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        import base64

        out: dict[str, Any] = {"ParticipantObjectID": self.object_id,
                               "ParticipantObjectIDTypeCode": self.id_type.to_dict(),
                               "ParticipantObjectTypeCode": int(self.type)}
        if self.role is not None:
            out["ParticipantObjectTypeCodeRole"] = int(self.role)
        if self.name:
            out["ParticipantObjectName"] = self.name
        if self.query:
            out["ParticipantObjectQuery"] = base64.b64encode(self.query).decode("ascii")
        if self.details:
            out["ParticipantObjectDetail"] = [{"type": t, "value": v} for t, v in self.details]
        if self.sop_classes or self.accession_numbers:
            out["ParticipantObjectDescription"] = {
                "Accession": list(self.accession_numbers),
                "SOPClass": [{"UID": uid, "NumberOfInstances": n}
                             for uid, n in self.sop_classes]}
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ParticipantObject:
        import base64

        description = raw.get("ParticipantObjectDescription", {})
        role = raw.get("ParticipantObjectTypeCodeRole")
        return cls(
            object_id=raw["ParticipantObjectID"],
            id_type=Code.from_dict(raw["ParticipantObjectIDTypeCode"]),
            type=ObjectType(raw["ParticipantObjectTypeCode"]),
            role=None if role is None else ObjectRole(role),
            name=raw.get("ParticipantObjectName", ""),
            query=base64.b64decode(raw.get("ParticipantObjectQuery", "")),
            details=tuple((d["type"], d["value"]) for d in raw.get("ParticipantObjectDetail", ())),
            sop_classes=tuple((s["UID"], int(s["NumberOfInstances"]))
                              for s in description.get("SOPClass", ())),
            accession_numbers=tuple(description.get("Accession", ())),
        )


@dataclass(frozen=True)
class AuditSource:
    """AuditSourceIdentification: this box (its AE title) and its site."""

    source_id: str
    site_id: str = ""
    type_code: str = "4"  # application server process

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"AuditSourceID": self.source_id,
                               "AuditSourceTypeCode": [{"csd-code": self.type_code}]}
        if self.site_id:
            out["AuditEnterpriseSiteID"] = self.site_id
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AuditSource:
        codes = raw.get("AuditSourceTypeCode") or [{"csd-code": "4"}]
        return cls(raw["AuditSourceID"], raw.get("AuditEnterpriseSiteID", ""),
                   codes[0]["csd-code"])


@dataclass(frozen=True)
class AuditRecord:
    """One audit message. `time` is when the event happened (UTC), not when it was logged."""

    event_id: Code
    action: Action
    outcome: Outcome
    participants: tuple[Participant, ...]
    source: AuditSource
    objects: tuple[ParticipantObject, ...] = ()
    event_types: tuple[Code, ...] = ()
    outcome_description: str = ""
    time: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_dict(self) -> dict[str, Any]:
        event: dict[str, Any] = {
            "EventID": self.event_id.to_dict(),
            "EventActionCode": str(self.action),
            "EventDateTime": self.time.astimezone(UTC).isoformat(timespec="microseconds"),
            "EventOutcomeIndicator": int(self.outcome),
        }
        if self.event_types:
            event["EventTypeCode"] = [c.to_dict() for c in self.event_types]
        if self.outcome_description:
            event["EventOutcomeDescription"] = self.outcome_description
        return {
            "EventIdentification": event,
            "ActiveParticipant": [p.to_dict() for p in self.participants],
            "AuditSourceIdentification": self.source.to_dict(),
            "ParticipantObjectIdentification": [o.to_dict() for o in self.objects],
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AuditRecord:
        event = raw["EventIdentification"]
        return cls(
            event_id=Code.from_dict(event["EventID"]),
            action=Action(event["EventActionCode"]),
            outcome=Outcome(event["EventOutcomeIndicator"]),
            participants=tuple(Participant.from_dict(p) for p in raw["ActiveParticipant"]),
            source=AuditSource.from_dict(raw["AuditSourceIdentification"]),
            objects=tuple(ParticipantObject.from_dict(o)
                          for o in raw.get("ParticipantObjectIdentification", ())),
            event_types=tuple(Code.from_dict(c) for c in event.get("EventTypeCode", ())),
            outcome_description=event.get("EventOutcomeDescription", ""),
            time=datetime.fromisoformat(event["EventDateTime"]),
        )


# --- participant objects the box uses -------------------------------------------------

def patient_object(patient_id: str, patient_name: str = "") -> ParticipantObject:
    return ParticipantObject(patient_id, ObjectIDType.PATIENT_NUMBER, ObjectType.PERSON,
                             ObjectRole.PATIENT, name=patient_name)


def web_role(role: str) -> Code:
    """A web user's role (admin, radiologist, referring) as an extra RoleIDCode of their
    ActiveParticipant: CID 402 has no codes for clinical roles, so a private scheme."""
    return Code(role, "99PACSEDGE", f"Web user role: {role}")


def study_object(study_uid: str, sop_classes: dict[str, int] | None = None,
                 accession_number: str = "") -> ParticipantObject:
    return ParticipantObject(
        study_uid, ObjectIDType.STUDY_INSTANCE_UID, ObjectType.SYSTEM_OBJECT, ObjectRole.REPORT,
        sop_classes=tuple(sorted((sop_classes or {}).items())),
        accession_numbers=(accession_number,) if accession_number else ())


def _is_ip(address: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True
