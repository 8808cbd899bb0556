"""`pacs-edge audit export`: records in a time window, as JSON Lines or DICOM audit XML.

- json: one JSON object per line, the log entry as stored (seq, time,
  prev_hash, hash, record), so a reviewer can re-check the chain on the copy.
- dicom-xml: each record as a PS3.15 A.5.1 `AuditMessage` element, inside
  one `<AuditMessages>` root element (the schema's root is a single message;
  a file of many needs a wrapper). Element order follows the schema:
  EventIdentification, ActiveParticipant+, AuditSourceIdentification,
  ParticipantObjectIdentification*. ParticipantObjectDetail values and the
  ParticipantObjectQuery are base64, as the schema requires.

The window is on EventDateTime (when the event happened): since inclusive,
until exclusive. `audit_message_xml` is also what syslog forwarding sends.
Characters XML 1.0 cannot carry (a control character in the user name a
failed login typed, say) are written as U+FFFD. ElementTree writes them as
they are: the message was not well-formed XML, and a collector that parses
it rejected it, so a client could keep its failed logins out of the SIEM.
The log and the JSON export keep the exact value.
Exports hold PHI: they are written 0600 when `--out` names a file.
"""

from __future__ import annotations

import base64
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from appliance.audit.log import AuditLog, Entry

# Not a Char of XML 1.0 (2.2): C0 controls but tab, LF, CR; surrogates; U+FFFE, U+FFFF.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def parse_when(text: str) -> datetime:
    """An ISO date or date-time; naive values are UTC."""
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def entries_between(audit_log: AuditLog, since: datetime | None, until: datetime | None,
                    *, unreadable: list[int] | None = None) -> Iterator[Entry]:
    """The readable records of the window; the line numbers of lines that cannot be
    read go to `unreadable` (`audit verify` says what is wrong with them)."""
    for number, _offset, line in audit_log.entries():
        try:
            entry = Entry.parse(line)
            when = datetime.fromisoformat(entry.record["EventIdentification"]["EventDateTime"])
        except (ValueError, KeyError, TypeError):
            if unreadable is not None:
                unreadable.append(number)
            continue
        if (since is None or when >= since) and (until is None or when < until):
            yield entry


def export_json(entries: Iterator[Entry]) -> Iterator[str]:
    for entry in entries:
        yield json.dumps({"seq": entry.seq, "time": entry.time, "prev_hash": entry.prev_hash,
                          "hash": entry.hash, "record": entry.record},
                         ensure_ascii=False, sort_keys=True) + "\n"


def export_xml(entries: Iterator[Entry]) -> Iterator[str]:
    yield '<?xml version="1.0" encoding="UTF-8"?>\n<AuditMessages>\n'
    for entry in entries:
        yield ET.tostring(audit_message_xml(entry.record), encoding="unicode") + "\n"
    yield "</AuditMessages>\n"


def audit_message_xml(record: dict[str, Any]) -> ET.Element:
    """One record (records.AuditRecord.to_dict()) as a PS3.15 AuditMessage element."""
    root = ET.Element("AuditMessage")
    event = record["EventIdentification"]
    ident = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": event["EventActionCode"],
        "EventDateTime": event["EventDateTime"],
        "EventOutcomeIndicator": str(event["EventOutcomeIndicator"]),
    })
    _code(ident, "EventID", event["EventID"])
    for code in event.get("EventTypeCode", ()):
        _code(ident, "EventTypeCode", code)
    if event.get("EventOutcomeDescription"):
        ET.SubElement(ident, "EventOutcomeDescription").text = event["EventOutcomeDescription"]
    for participant in record["ActiveParticipant"]:
        attrs = {"UserID": participant["UserID"],
                 "UserIsRequestor": "true" if participant["UserIsRequestor"] else "false"}
        for key in ("AlternativeUserID", "UserName", "NetworkAccessPointID"):
            if participant.get(key):
                attrs[key] = participant[key]
        if "NetworkAccessPointTypeCode" in participant:
            attrs["NetworkAccessPointTypeCode"] = str(participant["NetworkAccessPointTypeCode"])
        element = ET.SubElement(root, "ActiveParticipant", attrs)
        for role in participant.get("RoleIDCode", ()):
            _code(element, "RoleIDCode", role)
    source = record["AuditSourceIdentification"]
    attrs = {"AuditSourceID": source["AuditSourceID"]}
    if source.get("AuditEnterpriseSiteID"):
        attrs["AuditEnterpriseSiteID"] = source["AuditEnterpriseSiteID"]
    element = ET.SubElement(root, "AuditSourceIdentification", attrs)
    for code in source.get("AuditSourceTypeCode", ()):
        ET.SubElement(element, "AuditSourceTypeCode", {"csd-code": code["csd-code"]})
    for obj in record.get("ParticipantObjectIdentification", ()):
        _participant_object(root, obj)
    for node in root.iter():
        if node.text:
            node.text = _NOT_XML.sub("\ufffd", node.text)
        for key, value in node.attrib.items():
            node.set(key, _NOT_XML.sub("\ufffd", value))
    return root


def _participant_object(root: ET.Element, obj: dict[str, Any]) -> None:
    attrs = {"ParticipantObjectID": obj["ParticipantObjectID"],
             "ParticipantObjectTypeCode": str(obj["ParticipantObjectTypeCode"])}
    if "ParticipantObjectTypeCodeRole" in obj:
        attrs["ParticipantObjectTypeCodeRole"] = str(obj["ParticipantObjectTypeCodeRole"])
    element = ET.SubElement(root, "ParticipantObjectIdentification", attrs)
    _code(element, "ParticipantObjectIDTypeCode", obj["ParticipantObjectIDTypeCode"])
    if obj.get("ParticipantObjectName"):
        ET.SubElement(element, "ParticipantObjectName").text = obj["ParticipantObjectName"]
    elif obj.get("ParticipantObjectQuery"):
        ET.SubElement(element, "ParticipantObjectQuery").text = obj["ParticipantObjectQuery"]
    for detail in obj.get("ParticipantObjectDetail", ()):
        value = base64.b64encode(detail["value"].encode("utf-8")).decode("ascii")
        ET.SubElement(element, "ParticipantObjectDetail", {"type": detail["type"],
                                                           "value": value})
    description = obj.get("ParticipantObjectDescription")
    if description:
        desc = ET.SubElement(element, "ParticipantObjectDescription")
        for number in description.get("Accession", ()):
            ET.SubElement(desc, "Accession", {"Number": number})
        for sop in description.get("SOPClass", ()):
            ET.SubElement(desc, "SOPClass", {"UID": sop["UID"],
                                             "NumberOfInstances": str(sop["NumberOfInstances"])})


def _code(parent: ET.Element, tag: str, code: dict[str, str]) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code["csd-code"],
                                       "codeSystemName": code["codeSystemName"],
                                       "originalText": code["originalText"]})
