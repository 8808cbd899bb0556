"""Why a C-FIND could not be answered, as the DICOM status the SCU receives.

Tree::

    PacsEdgeError            (appliance.base.errors)
    └── QueryError           the identifier cannot be answered; `.status` is the
                             C-FIND failure status (PS3.4 C.4.1.1.4)

Messages name the attribute or level at fault, never a value from the
identifier: the DIMSE edge logs them, and values can be patient data.
"""

from __future__ import annotations

import enum

from appliance.base.errors import PacsEdgeError


class QueryStatus(enum.IntEnum):
    """The C-FIND failure statuses this package reports."""

    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    UNABLE_TO_PROCESS = 0xC000


class QueryError(PacsEdgeError):
    """A C-FIND identifier the appliance refuses; PHI-free message, DICOM status."""

    def __init__(self, status: QueryStatus, message: str) -> None:
        super().__init__(
            message,
            hint="the querying application sent an identifier outside the appliance's "
            "conformance; check its query settings",
        )
        self.status = status
