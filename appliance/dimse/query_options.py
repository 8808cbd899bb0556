"""C-FIND's SOP Class Extended Negotiation (PS3.4 C.5.1.1): what the box answers, and
what a C-FIND on the association then gets.

A requestor may propose, per SOP class, a few bytes of service class application
information (Table C.5-1, one option a byte, 1 asks for it); the acceptor answers
those it supports with 1 and the others with 0 (Table C.5-2). For Patient Root and
Study Root FIND the box answers:

    byte 1  relational-queries                       1 when asked (it always matches so:
                                                     services/query/find.py)
    byte 2  combined date-time matching              1 when asked, then applied
    byte 3  fuzzy semantic matching of person names  0
    byte 4  timezone query adjustment                0
    byte 5  enhanced multi-frame image conversion    0

one answer byte per byte proposed, none past byte 5 (no later byte is defined): an
SCU reads a byte it did not get as the option not performed. Other SOP classes
(C-MOVE, C-GET, the worklist) get no answer, and their defaults hold.

What was answered is not kept here: pynetdicom keeps the A-ASSOCIATE-AC it sent
(`assoc.acceptor.primitive`), whose items `assoc.acceptor.sop_class_extended` reads
back; `combined_datetime` asks it once per C-FIND request.
"""

from __future__ import annotations

from typing import Any

from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

FIND_CLASSES = frozenset(str(uid) for uid in (PatientRootQueryRetrieveInformationModelFind,
                                              StudyRootQueryRetrieveInformationModelFind))
# Per byte of Table C.5-1, in order: whether the box performs the option.
SUPPORTED = (True, True, False, False, False)
COMBINED_DATETIME = 1  # the byte's index (byte 2)


def on_sop_extended(event: Any) -> dict[str, bytes]:
    """EVT_SOP_EXTENDED handler: the answers to the requestor's proposals
    (`event.app_info`, {SOP class UID: bytes}) for the FIND SOP classes."""
    return {str(sop_class): bytes(int(asked == 1 and ours)
                                  for asked, ours in zip(info, SUPPORTED, strict=False))
            for sop_class, info in event.app_info.items()
            if str(sop_class) in FIND_CLASSES and info}


def combined_datetime(assoc: Any, sop_class: str) -> bool:
    """Whether the box answered combined date-time matching performed for `sop_class`
    (a presentation context's abstract syntax) on this association."""
    info = assoc.acceptor.sop_class_extended.get(sop_class, b"")
    return len(info) > COMBINED_DATETIME and info[COMBINED_DATETIME] == 1
