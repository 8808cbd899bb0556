"""docs/conformance.md says what the box does, and cannot drift from it unnoticed.

The statement is what a hospital's integration engineer reads before connecting a
modality. Its tables are checked here against the code's own lists (SOP classes,
transfer syntaxes, the statuses each service module sends, the C-FIND and worklist
keys) and against a running box (what it answers in association negotiation, the
association limit, every SOP class it lists).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pynetdicom
import pytest
from conftest import HOST, TEST_AE, EdgeServer
from pydicom.datadict import tag_for_keyword
from pydicom.uid import JPEGBaseline8Bit
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, DEFAULT_TRANSFER_SYNTAXES, build_context
from pynetdicom.pdu_primitives import (
    AsynchronousOperationsWindowNegotiation,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    ModalityPerformedProcedureStep,
    StudyRootQueryRetrieveInformationModelFind,
)

from appliance.base import compat
from appliance.dimse.dicom_status import Status
from appliance.dimse.handlers import QUERY_STATUS, REJECTION_STATUS
from appliance.dimse.move_get import MAX_CONTEXTS, REFUSAL_STATUS
from appliance.dimse.negotiation import SERVICE_CLASSES, STANDARD_STORAGE_CLASSES
from appliance.store.cfind.attributes import KEYS, Match
from appliance.store.worklist_rows import COLUMNS as WORKLIST_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
STATEMENT = (ROOT / "docs" / "conformance.md").read_text(encoding="utf-8")
DIMSE = ROOT / "appliance" / "dimse"
_UID = re.compile(r"^\d+(?:\.\d+)+$")
_STATUS_USE = re.compile(r"\bStatus\.([A-Z_]+)\b")
_STATUS_ROW = re.compile(r"^\| (0x[0-9A-F]{4})\b", re.MULTILINE)
# Result/Reason of a rejected presentation context (PS3.8 9.3.3.2)
ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 3, 4

# The module that sends a service's responses -> the statement's sections for it.
SENDERS = {
    "store_receiver.py": ("Storage SCP statuses",),
    "handlers.py": ("Association acceptance", "Storage SCP statuses", "Query (C-FIND SCP)"),
    "find_scp.py": ("Query (C-FIND SCP)",),
    "move_get.py": ("Retrieve (C-MOVE and C-GET SCP)",),
    "worklist_scp.py": ("Modality Worklist (C-FIND SCP, PS3.4 K)",),
    "mpps_scp.py": (
        "Modality Performed Procedure Step (N-CREATE, N-SET, N-GET SCP, PS3.4 F.7, F.8)",),
    "commitment_scp.py": ("Storage Commitment Push Model (SCP, PS3.4 J)",),
}


def section(title: str) -> str:
    """The text of `## title` up to the next `## ` heading."""
    start = STATEMENT.index(f"\n## {title}\n")
    end = STATEMENT.find("\n## ", start + 1)
    return STATEMENT[start:end if end != -1 else len(STATEMENT)]


def table_rows(text: str) -> Iterator[list[str]]:
    """The cells of each body row of the Markdown tables in `text`."""
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            yield [cell.strip() for cell in line.strip("|").split(" | ")]


def test_the_sop_class_table_is_the_list_the_box_negotiates() -> None:
    rows = [cells for cells in table_rows(section("SOP classes")) if _UID.match(cells[1])]
    scp = {uid for _, uid, _, role in rows if role.startswith("yes")}
    assert scp == set(SERVICE_CLASSES)
    listed_storage = {uid for _, uid in table_rows(section("Appendix: storage SOP classes"))
                      if _UID.match(uid)}
    assert listed_storage == set(STANDARD_STORAGE_CLASSES)
    assert f"the {len(STANDARD_STORAGE_CLASSES)} classes pynetdicom {pynetdicom.__version__}" \
        in STATEMENT


def test_the_transfer_syntax_table_is_pynetdicoms_list_in_order() -> None:
    listed = [uid for _, uid in table_rows(section("Transfer syntaxes")) if _UID.match(uid)]
    assert listed == [str(ts) for ts in ALL_TRANSFER_SYNTAXES]
    # The workflow contexts take pynetdicom's default syntaxes: "the first four".
    assert listed[:4] == [str(ts) for ts in DEFAULT_TRANSFER_SYNTAXES]
    assert f"all\n{len(listed)} transfer syntaxes pynetdicom {pynetdicom.__version__}" in STATEMENT


@pytest.mark.parametrize("module", sorted(SENDERS))
def test_every_status_a_service_sends_is_in_its_section_of_the_statement(module: str) -> None:
    text = "".join(section(title) for title in SENDERS[module])
    used = {Status[name] for name in _STATUS_USE.findall((DIMSE / module).read_text())
            if name in Status.__members__}
    missing = sorted(f"0x{status:04X} ({status.name})" for status in used
                     if f"0x{status:04X}" not in text)
    assert not missing, f"{module} sends statuses {SENDERS[module]} does not list: {missing}"


@pytest.mark.parametrize(("table", "title"), [
    (REJECTION_STATUS, "Storage SCP statuses"),
    (QUERY_STATUS, "Query (C-FIND SCP)"),
    (REFUSAL_STATUS, "Retrieve (C-MOVE and C-GET SCP)"),
], ids=["store", "find", "move-get"])
def test_every_refusal_status_is_in_its_section(table: dict[object, Status], title: str) -> None:
    text = section(title)
    assert all(f"0x{status:04X}" in text for status in table.values())


# How the statement's C-FIND key table words each kind of matching (matching.py's rules).
MATCHING = {
    Match.TEXT: "single value, wildcards (case-sensitive)",
    Match.PERSON_NAME: "single value, wildcards (case-insensitive, padding ignored)",
    Match.DATE: "single value, range",
    Match.TIME: "single value, range",
    Match.UID: "UID list",
    Match.INTEGER: "single value (as a number)",
    Match.RETURN_ONLY: "return key only",
}
MULTI = "; the study matches when one of its values does"


def test_the_c_find_key_table_is_the_index_key_table() -> None:
    listed = [tuple(cells) for cells in table_rows(section("Query (C-FIND SCP)"))
              if len(cells) == 4 and cells[0] != "RetrieveAETitle"
              and re.fullmatch(r"\([0-9A-F]{4},[0-9A-F]{4}\)", cells[1])]
    assert listed == [
        (key.keyword, f"({key.tag.group:04X},{key.tag.element:04X})", key.level.name,
         MATCHING[key.match] + (MULTI if key.multi else ""))
        for key in KEYS
    ]


def test_every_status_the_statement_lists_is_a_named_status() -> None:
    listed = {int(code, 16) for code in _STATUS_ROW.findall(STATEMENT)}
    assert listed, "no status rows found in docs/conformance.md"
    assert listed <= {int(status) for status in Status}, sorted(
        hex(code) for code in listed - {int(status) for status in Status})


def _associate(edge: EdgeServer, contexts: list[object], *, calling: str = TEST_AE,
               called: str = "", ext_neg: list[object] | None = None) -> pynetdicom.Association:
    """pynetdicom as the peer. A rejection its reader thread took in (closing the socket)
    before its ACSE looked, which a loaded machine allows, is read as one, as the box's
    own SCUs read it (compat.recover_rejection)."""
    ae = AE(calling)
    ae.requested_contexts = contexts
    assoc = ae.associate(HOST, edge.port, ae_title=called or edge.ae_title, ext_neg=ext_neg)
    compat.recover_rejection(assoc)
    return assoc


def test_negotiation_answers_as_the_statement_says(edge_server: EdgeServer) -> None:
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = window.maximum_number_operations_performed = 8
    identity = UserIdentityNegotiation()
    identity.user_identity_type, identity.primary_field = 1, b"someone"
    identity.positive_response_requested = True
    relational = SOPClassExtendedNegotiation()
    relational.sop_class_uid = StudyRootQueryRetrieveInformationModelFind
    relational.service_class_application_information = b"\x01\x01\x01\x01"
    common = SOPClassCommonExtendedNegotiation()
    common.sop_class_uid = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT: as CT, if it were taken
    common.service_class_uid = "1.2.840.10008.4.2"
    common.related_general_sop_class_identification = [CTImageStorage]
    assoc = _associate(edge_server, [
        build_context(StudyRootQueryRetrieveInformationModelFind),
        build_context(CTImageStorage, ["1.2.840.10008.1.2.4.9999"]),
        build_context("1.2.3.4.5.6.7.8.9"),
        build_context(ModalityPerformedProcedureStep, [JPEGBaseline8Bit]),
    ], ext_neg=[window, identity, relational, common])
    try:
        assert assoc.is_established
        acceptor = assoc.acceptor
        assert f"`{acceptor.implementation_class_uid}`" in STATEMENT
        assert f"`{acceptor.implementation_version_name}`" in STATEMENT
        assert acceptor.maximum_length == 1_048_576  # dicom.max_pdu's default, 1 MiB
        # Asynchronous operations and user identity: not answered. SOP class extended
        # negotiation for FIND: relational-queries and combined date-time matching
        # performed, fuzzy semantic matching and timezone query adjustment not.
        answered = {type(item).__name__ for item in acceptor.primitive.user_information}
        assert answered == {"MaximumLengthNotification", "ImplementationClassUIDNotification",
                            "ImplementationVersionNameNotification",
                            "SOPClassExtendedNegotiation"}
        assert acceptor.sop_class_extended == {
            StudyRootQueryRetrieveInformationModelFind: b"\x01\x01\x00\x00"}
        assert acceptor.asynchronous_operations == (1, 1)
        rejected = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts}
        assert rejected == {
            str(CTImageStorage): TRANSFER_SYNTAXES_NOT_SUPPORTED,
            "1.2.3.4.5.6.7.8.9": ABSTRACT_SYNTAX_NOT_SUPPORTED,
            str(ModalityPerformedProcedureStep): TRANSFER_SYNTAXES_NOT_SUPPORTED,  # workflow
        }
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.mark.parametrize(("calling", "called", "reason"), [
    (TEST_AE.lower(), "", 0x03),  # calling AE title not recognised: case is significant
    (TEST_AE, "edge", 0x07),  # called AE title not recognised
], ids=["calling", "called"])
def test_ae_titles_are_case_sensitive(edge_server: EdgeServer, calling: str, called: str,
                                      reason: int) -> None:
    assoc = _associate(edge_server, [build_context(StudyRootQueryRetrieveInformationModelFind)],
                       calling=calling, called=called)
    assert assoc.is_rejected
    assert (assoc.acceptor.primitive.result, assoc.acceptor.primitive.result_source,
            assoc.acceptor.primitive.diagnostic) == (0x01, 0x01, reason)


def test_every_sop_class_the_statement_lists_is_accepted(edge_server: EdgeServer) -> None:
    rows = [cells for cells in table_rows(section("SOP classes")) if _UID.match(cells[1])]
    listed = [uid for _, uid, _, role in rows if role.startswith("yes")]
    listed += [uid for _, uid in table_rows(section("Appendix: storage SOP classes"))
               if _UID.match(uid)]
    not_accepted = []
    for start in range(0, len(listed), MAX_CONTEXTS):
        chunk = listed[start:start + MAX_CONTEXTS]
        assoc = _associate(edge_server, [build_context(uid) for uid in chunk])
        assert assoc.is_established
        try:
            accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            not_accepted += [uid for uid in chunk if uid not in accepted]
        finally:
            assoc.release()
    assert not not_accepted


def test_an_association_beyond_max_associations_is_rejected_as_the_statement_says(
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    """Transient, service provider (presentation), local limit exceeded: (2, 3, 2)."""
    server = edge_server_factory(start=False)
    server.configure(dicom={"max_associations": 1})
    server.start()
    context = build_context(StudyRootQueryRetrieveInformationModelFind)
    holder = _associate(server, [context])
    assert holder.is_established
    try:
        extra = _associate(server, [context])
        assert extra.is_rejected
        primitive = extra.acceptor.primitive
        assert (primitive.result, primitive.result_source, primitive.diagnostic) == (2, 3, 2)
    finally:
        holder.release()
    server.wait_for_log("reason=association limit reached")


def test_the_worklist_key_table_lists_every_key_the_worklist_matches() -> None:
    text = section("Modality Worklist (C-FIND SCP, PS3.4 K)")
    rows = [cells for cells in table_rows(text) if len(cells) == 3]
    listed = {int(group + element, 16) for _, tags, _ in rows
              for group, element in re.findall(r"\(([0-9A-F]{4}),([0-9A-F]{4})\)", tags)}
    assert listed == {tag_for_keyword(keyword) for keyword in WORKLIST_COLUMNS}
