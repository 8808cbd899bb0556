"""DICOM status codes by name (PS3.4 and PS3.7 Annex C). Handlers return these, never bare ints."""

from __future__ import annotations

import enum

from appliance.base.errors import QueryRefusal


class Status(enum.IntEnum):
    SUCCESS = 0x0000
    # General (PS3.7 C)
    REFUSED_NOT_AUTHORIZED = 0x0124
    PROCESSING_FAILURE = 0x0110
    # DIMSE-N (PS3.7 C.5, 10.1): N-ACTION, N-CREATE, N-SET, N-EVENT-REPORT
    ATTRIBUTE_LIST_ERROR = 0x0107  # a Warning: applied, but for the attributes it lists
    INVALID_ATTRIBUTE_VALUE = 0x0106
    DUPLICATE_SOP_INSTANCE = 0x0111
    NO_SUCH_SOP_INSTANCE = 0x0112  # also Failure Reason "no such object instance" (J.3.2.1)
    INVALID_ARGUMENT_VALUE = 0x0115
    NO_SUCH_SOP_CLASS = 0x0118
    CLASS_INSTANCE_CONFLICT = 0x0119  # also a Storage Commitment Failure Reason
    MISSING_ATTRIBUTE = 0x0120
    MISSING_ATTRIBUTE_VALUE = 0x0121
    NO_SUCH_ACTION = 0x0123
    UNRECOGNIZED_OPERATION = 0x0211
    RESOURCE_LIMITATION = 0x0213
    # Storage (PS3.4 B.2.3)
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    # A STOW-RS Failure Reason (PS3.18 Table I.2-2; http/dicomweb_stow.py), no DIMSE status:
    # a C-STORE's transfer syntax is that of a context the box accepted
    REFERENCED_TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
    # Query/Retrieve (PS3.4 C.4)
    OUT_OF_RESOURCES_MATCHES = 0xA701
    OUT_OF_RESOURCES_SUBOPERATIONS = 0xA702
    MOVE_DESTINATION_UNKNOWN = 0xA801
    UNABLE_TO_PROCESS = 0xC001
    # pynetdicom's "unable to process" codes, kept where the appliance answers instead
    HANDLER_FAILED = 0xC311
    IDENTIFIER_NOT_ENCODED = 0xC312
    SUBOPERATIONS_COMPLETE_WITH_FAILURES = 0xB000
    CANCEL = 0xFE00
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01


# Responses that are not final: C-FIND matches, C-MOVE/C-GET progress.
PENDING_CODES = frozenset({Status.PENDING, Status.PENDING_WARNING})


# Why a C-FIND (or a worklist query) is refused -> the failure status it answers.
QUERY_STATUS = {
    QueryRefusal.NOT_IN_MODEL: Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    # C-FIND's "unable to process" (0xC000) shares its code with Storage's. The request
    # the box cannot understand is 0xC000; 0xC001 is a failure of the box's own.
    QueryRefusal.MALFORMED_KEY: Status.CANNOT_UNDERSTAND,
    QueryRefusal.UNDECODABLE: Status.CANNOT_UNDERSTAND,
}


def status_label(status: Status) -> str:
    """A status as the audit trail names it: `0xA700 out of resources`."""
    return f"0x{int(status):04X} {status.name.lower().replace('_', ' ')}"
