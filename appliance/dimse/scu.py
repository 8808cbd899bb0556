"""An association the box requests from a peer (migrate's legacy PACS, prefetch's
remote archive): one AE with the box's timeouts and PDU size, released and shut down
however the work on it ends."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from appliance.base import compat
from appliance.base.config import DicomConfig
from appliance.dimse.negotiation import StoringAE, storage_classes
from appliance.services.peers import Peer

# An abstract syntax, with the transfer syntaxes to propose (None: pynetdicom's default).
Requested = tuple[Any, Sequence[str] | None]

# A-ASSOCIATE-RJ reasons of a service user (PS3.8 9.3.4) that name an AE title: given
# with "rejected-permanent", the peer refuses this box as configured, until someone edits
# a configuration. dcmtk answers "called" also for a calling AE title it does not know.
AE_TITLE_REJECTIONS = {3: "calling AE title not recognized", 7: "called AE title not recognized"}


def rejected_for_good(assoc: Any) -> str:
    """Why `assoc` was rejected for good for an AE title (AE_TITLE_REJECTIONS); "" when
    it was not rejected, or rejected for now (busy) or for another reason."""
    rsp = assoc.acceptor.primitive if assoc is not None and assoc.is_rejected else None
    if rsp is None or rsp.result != 0x01 or rsp.result_source != 0x01:
        return ""
    return AE_TITLE_REJECTIONS.get(rsp.diagnostic, "")


@contextmanager
def requested_association(
    config: DicomConfig, peer: Peer, requested: Sequence[Requested], *,
    tls_client: ssl.SSLContext | None, refused: Callable[[Any, str], Exception],
    roles: Sequence[Any] = (), handlers: Sequence[tuple[Any, Any]] = (),
) -> Iterator[Any]:
    """An established association to `peer` (over TLS with `tls_client` when given);
    raises `refused(assoc, "")` when it was rejected, aborted or not answered, and
    `refused(None, why)` when the peer's host cannot be resolved at all."""
    ae = StoringAE(config.ae_title, storage_classes(config))  # C-GET: we store
    ae.acse_timeout = config.acse_timeout
    ae.dimse_timeout = config.dimse_timeout
    ae.network_timeout = config.network_timeout
    ae.connection_timeout = config.connect_timeout
    ae.maximum_pdu_size = config.max_pdu
    for abstract, syntaxes in requested:
        if syntaxes is None:
            ae.add_requested_context(abstract)
        else:
            ae.add_requested_context(abstract, list(syntaxes))
    compat.close_requestor_reactor_race()
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title,
                             max_pdu=config.max_pdu,
                             tls_args=(tls_client, None) if tls_client is not None else None,
                             ext_neg=list(roles) or None, evt_handlers=list(handlers) or None)
    except OSError as exc:  # pynetdicom resolves the host first: gaierror for an unknown name
        ae.shutdown()
        raise refused(None, f"host {peer.host!r} not found ({exc.strerror or exc})") from exc
    if not assoc.is_established:
        compat.recover_rejection(assoc)
        ae.shutdown()
        raise refused(assoc, "")
    compat.set_nodelay(assoc)  # a C-FIND or C-GET waits on each small response: no Nagle delay
    compat.ack_after_sends(assoc)  # a peer with Nagle on waits for our ACKs (C-GET stores)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
