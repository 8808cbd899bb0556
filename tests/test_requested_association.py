"""The associations the box requests itself (migration's legacy PACS, prefetch's
remote archive): their sockets send small messages at once, as the accepted ones do."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from appliance.base.config import DicomConfig
from appliance.dimse.scu import requested_association
from appliance.services.peers import Peer


@pytest.fixture
def verification_scp() -> Iterator[int]:
    """A pynetdicom Verification SCP on 127.0.0.1 and a port the OS picks."""
    ae = AE(ae_title="REMOTE")
    ae.add_supported_context(Verification)
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 5
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def test_a_requested_association_turns_nagle_off(verification_scp: int) -> None:
    config = DicomConfig(acse_timeout=5, dimse_timeout=5, network_timeout=5)
    peer = Peer("remote", "REMOTE", "127.0.0.1", verification_scp, frozenset({"find"}))
    with requested_association(config, peer, [(Verification, None)], tls_client=None,
                               refused=lambda assoc: RuntimeError("refused")) as assoc:
        sock = assoc.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert assoc.send_c_echo().Status == 0x0000
