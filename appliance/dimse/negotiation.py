"""Which transfer syntax to accept in each presentation context.

pynetdicom accepts the first syntax in the *acceptor's* list that the
requestor offered. The appliance decides differently, per context:

- storage from a modality (the requestor keeps the SCU role): the
  requestor's order wins, it knows what its data is in; pynetdicom's order
  would make a modality offering [Explicit VR LE, Implicit VR LE] re-encode
  its dataset as Implicit;
- storage contexts for C-GET (the requestor asks for the SCP role, we send):
  the syntax most of our stored instances of that SOP class are in wins,
  since we never transcode and an instance whose syntax was not accepted
  fails; ties keep the requestor's order.

The counts come from the index through a small cache (refreshed at most every
STORED_REFRESH seconds): negotiation must stay cheap.

Which SOP classes the box stores is decided here too: the standard storage
classes and `[dicom] extra_storage_classes` (private classes a modality or a legacy
PACS sends), carried by the AE (StoringAE) so that every check of a context for
storage (negotiation, the spool hook, the C-STORE receiver) reads the same set.

Who may store is decided here too (restrict_storage): a peer without the
`store` permission is offered no storage context in which it would send, so
it cannot push a single dataset byte; with `get` it keeps the storage
contexts it proposes in the SCP role (C-GET's role reversal: we send).
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pynetdicom import AE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    ModalityPerformedProcedureStepRetrieve,
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from appliance.base.config import DicomConfig
from appliance.base.errors import PacsEdgeError

STORED_REFRESH = 30.0
STANDARD_STORAGE_CLASSES = tuple(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
QUERY_RETRIEVE_CONTEXTS = (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
)
# Workflow services (docs/workflow.md), in the default uncompressed transfer syntaxes.
WORKFLOW_CONTEXTS = (StorageCommitmentPushModel, ModalityPerformedProcedureStep,
                     ModalityPerformedProcedureStepRetrieve, ModalityWorklistInformationFind)
SERVICE_CLASSES = frozenset(str(uid) for uid in (Verification, *QUERY_RETRIEVE_CONTEXTS,
                                                 *WORKFLOW_CONTEXTS))


def check_extra_storage_classes(config: DicomConfig) -> None:
    """Refuse extra storage classes that are services of this box (serve's start and
    `config check`, so that the Ansible role's validate step refuses them too)."""
    clash = sorted(SERVICE_CLASSES.intersection(config.extra_storage_classes))
    if clash:
        raise PacsEdgeError(
            f"[dicom] extra_storage_classes lists {', '.join(clash)}, a service of this"
            " box, not a storage class", hint="list only the SOP classes to store")


def storage_classes(config: DicomConfig) -> tuple[str, ...]:
    """The SOP classes this box stores: the standard ones, then the configured extras."""
    return tuple(dict.fromkeys([*STANDARD_STORAGE_CLASSES, *config.extra_storage_classes]))


class StoringAE(AE):
    """A pynetdicom AE that knows which SOP classes the box stores (`storage_classes`)."""

    def __init__(self, ae_title: str, storage_classes: Sequence[str]) -> None:
        super().__init__(ae_title)
        self.storage_classes = frozenset(storage_classes)

StoredCounts = Callable[[], Mapping[tuple[str, str], int]]


class StoredSyntaxes:
    """A cached view of (SOP class, transfer syntax) -> stored instance count."""

    def __init__(self, load: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        self._load = load
        self._lock = threading.Lock()
        self._counts: Mapping[tuple[str, str], int] = {}
        self._loaded_at = float("-inf")

    def __call__(self) -> Mapping[tuple[str, str], int]:
        with self._lock:
            if time.monotonic() - self._loaded_at > STORED_REFRESH:
                self._counts = self._load()
                self._loaded_at = time.monotonic()
            return self._counts


def order_syntaxes(event: Any, stored: StoredCounts | None) -> None:
    """EVT_REQUESTED handler: before negotiation, give each supported context that the
    requestor proposed the syntaxes it offered, in the order the appliance prefers (see
    the module docstring).

    The contexts are shared by every association (transport.SupportedContexts): a
    changed one replaces the original in this association's list. Only the offered
    syntaxes are kept, since negotiation can pick no other: a handful of UIDs to
    validate per context instead of the 45 the appliance supports."""
    assoc = event.assoc
    scp_role = {str(uid) for uid, item in assoc.requestor.role_selection.items()
                if item.scp_role}
    # Every syntax offered for a SOP class, in the order offered: a requestor may
    # propose one SOP class in several contexts (one per syntax, as storescu does).
    offered: dict[str, dict[str, None]] = {}
    for proposed in assoc.requestor.primitive.presentation_context_definition_list:
        offered.setdefault(str(proposed.abstract_syntax), {}).update(
            dict.fromkeys(str(ts) for ts in proposed.transfer_syntax))
    counts = stored() if stored is not None and scp_role else {}
    contexts = assoc.acceptor.supported_contexts
    for i, context in enumerate(contexts):
        sop_class = str(context.abstract_syntax)
        wanted = offered.get(sop_class)
        if not wanted:
            continue
        ours = set(context.transfer_syntax)
        kept = [ts for ts in wanted if ts in ours]
        if not kept:
            continue  # negotiation refuses it as before: no syntax in common
        if sop_class in scp_role:
            kept.sort(key=lambda ts: -counts.get((sop_class, ts), 0))
        changed = copy.copy(context)
        changed.transfer_syntax = kept
        contexts[i] = changed


def restrict_storage(assoc: Any, *, may_store: bool, may_get: bool) -> int:
    """EVT_REQUESTED: for a peer that may not store, drop (this association's copy of)
    the storage contexts it could send in; returns how many it proposed that way.

    With `may_get`, a storage context the peer proposes in the SCP role is kept
    with our roles set to (requestor SCU: no, requestor SCP: yes), so pynetdicom
    accepts it only with the roles inverted (we send, it receives)."""
    if may_store:
        return 0
    scp_role = {str(uid) for uid, item in assoc.requestor.role_selection.items()
                if item.scp_role}
    proposed = {str(cx.abstract_syntax)
                for cx in assoc.requestor.primitive.presentation_context_definition_list}
    stored = assoc.ae.storage_classes
    kept = []
    for context in assoc.acceptor.supported_contexts:
        sop_class = str(context.abstract_syntax)
        if sop_class not in stored:
            kept.append(context)
        elif may_get and sop_class in scp_role:
            changed = copy.copy(context)  # shared by every association: change a copy
            changed.scu_role, changed.scp_role = False, True
            kept.append(changed)
    assoc.acceptor.supported_contexts[:] = kept
    return len((proposed & stored) - (scp_role if may_get else set()))
