"""Which failures of a migration's requests to the legacy PACS a retry can change, and
which it cannot: C-MOVE and C-GET (PS3.4 C.4.2.1.5, C.4.3.1.4), C-FIND (C.4.1.1.4),
and the general statuses 0x0122 and 0x0124 of PS3.7 C.

A retry helps when the cause may pass: the legacy PACS out of resources, busy,
restarting. It cannot help when the status says the request itself is refused:
- for the whole run (RUN): every study would get the same answer, so the run is
  paused at once with what to fix (a move destination the legacy PACS does not
  know, a query or retrieve this box is not authorized for, a SOP class it does
  not support, a listing query it does not take); `migrate resume` goes on once
  it is fixed;
- for one study (STUDY): that study fails at once with the reason, the run goes
  on (the identifier does not match the SOP class; every sub-operation of a C-GET
  refused by this box with a status that will not change, e.g. an invalid UID).
Anything else (RETRY), including the "unable to process" range 0xCxxx whose cause
nobody can tell, is retried up to max_attempts. docs/operator-guide.md has the table.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Verdict(enum.StrEnum):
    RETRY = "retry"
    STUDY = "study"
    RUN = "run"


@dataclass(frozen=True)
class StatusRule:
    verdict: Verdict
    meaning: str


RETRIEVE_STATUSES: dict[int, StatusRule] = {
    0xA801: StatusRule(Verdict.RUN, "Refused: Move Destination unknown"),
    0x0124: StatusRule(Verdict.RUN, "Refused: Not Authorized"),
    0x0122: StatusRule(Verdict.RUN, "Refused: SOP Class not supported"),
    0xA900: StatusRule(Verdict.STUDY, "Identifier does not match SOP Class"),
    0xA701: StatusRule(Verdict.RETRY, "Refused: Out of Resources - Unable to calculate"
                                      " number of matches"),
    0xA702: StatusRule(Verdict.RETRY, "Refused: Out of Resources - Unable to perform"
                                      " sub-operations"),
    0xFE00: StatusRule(Verdict.RETRY, "Cancel"),
    0xB000: StatusRule(Verdict.RETRY, "Sub-operations complete - one or more failures"),
}

# Every C-FIND of a run has one of a few shapes (a day's studies, a study's series or
# instances): one the legacy PACS refuses for what it is, it refuses for every study.
FIND_STATUSES: dict[int, StatusRule] = {
    0x0124: StatusRule(Verdict.RUN, "Refused: Not Authorized"),
    0x0122: StatusRule(Verdict.RUN, "Refused: SOP Class not supported"),
    0xA900: StatusRule(Verdict.RUN, "Identifier does not match SOP Class"),
    0xA700: StatusRule(Verdict.RETRY, "Refused: Out of Resources"),
}
_UNABLE_TO_PROCESS = StatusRule(Verdict.RETRY, "Unable to process")

# C-STORE statuses this box answers a C-GET's sub-operation with that the same
# instance would get again (PS3.4 B.2.3): the data set cannot be parsed or is not
# the instance announced. Out of resources (0xA700: disk full, inflate limit) may pass.
PERMANENT_STORE_REFUSALS = frozenset({0xC000, 0xA900})


def retrieve_rule(status: int) -> StatusRule:
    """The rule of a C-MOVE or C-GET final failure status."""
    return RETRIEVE_STATUSES.get(status, _UNABLE_TO_PROCESS)


def find_rule(status: int) -> StatusRule:
    """The rule of a C-FIND's final failure status."""
    return FIND_STATUSES.get(status, _UNABLE_TO_PROCESS)
