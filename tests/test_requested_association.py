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
                               refused=lambda assoc, why: RuntimeError("refused")) as assoc:
        sock = assoc.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert assoc.send_c_echo().Status == 0x0000


def test_a_host_that_cannot_be_resolved_is_a_refusal_not_an_os_error() -> None:
    """pynetdicom resolves the peer's host before it connects: an unknown name raised
    socket.gaierror through migration and prefetch."""
    peer = Peer("remote", "REMOTE", "nosuchhost.invalid", 104, frozenset({"find"}))
    seen: list[tuple[object, str]] = []

    def refused(assoc: object, unreachable: str) -> Exception:
        seen.append((assoc, unreachable))
        return RuntimeError(unreachable)

    with pytest.raises(RuntimeError, match=r"host 'nosuchhost\.invalid' not found"), \
            requested_association(DicomConfig(), peer, [(Verification, None)],
                                  tls_client=None, refused=refused):
        pytest.fail("an association to an unknown host was established")
    assert [assoc for assoc, _ in seen] == [None]
