"""The audit trail: who touched which patient's data, when, from where (PS3.15 A.5).

    records.py   audit message content as typed records (PHI lives here only)
    log.py       the append-only, hash-chained log file `<home>/audit/audit.log`
    auditor.py   the facade every call site uses: one method per event
    operators.py who ran a command: the login user beside the account (runuser, sudo)
    rejections.py  repeated association rejections counted per source (scans)
    anchor.py    chain-head anchors in the cloud container (truncation, rewrites)
    verify.py    `pacs-edge audit verify`: the first bad record and why
    export.py    `pacs-edge audit export`: JSON Lines or DICOM audit XML
    syslog.py    RFC 5424 over TLS (RFC 5425) to a collector, spooled in the log

Errors::

    PacsEdgeError
    ├── AuditLogError    the log cannot be appended to or read
    └── AnchorError      an anchor cannot be written/read, or contradicts the log
"""

from appliance.audit.auditor import Auditor, requestor_of
from appliance.audit.log import AuditLog, AuditLogError

__all__ = ["AuditLog", "AuditLogError", "Auditor", "requestor_of"]
