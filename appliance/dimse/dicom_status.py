"""DICOM status codes by name (PS3.4 and PS3.7 Annex C). Handlers return these, never bare ints."""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
    SUCCESS = 0x0000
    # General (PS3.7 C)
    REFUSED_NOT_AUTHORIZED = 0x0124
    PROCESSING_FAILURE = 0x0110
    # Storage (PS3.4 B.2.3)
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    # Query/Retrieve (PS3.4 C.4)
    OUT_OF_RESOURCES_MATCHES = 0xA701
    OUT_OF_RESOURCES_SUBOPERATIONS = 0xA702
    MOVE_DESTINATION_UNKNOWN = 0xA801
    UNABLE_TO_PROCESS = 0xC001
    SUBOPERATIONS_COMPLETE_WITH_FAILURES = 0xB000
    CANCEL = 0xFE00
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01
