"""The associations the box requests itself (migration's legacy PACS, prefetch's
remote archive): their sockets send small messages at once, as the accepted ones do."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from legacypacs import LegacyPacs
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from appliance.base.config import DicomConfig
from appliance.dimse.scu import rejected_for_good, requested_association
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



def test_a_peer_that_rejects_at_once_is_seen_rejecting_every_time(tmp_path: Path) -> None:
    """dcmqrscp rejects a calling AE title it does not know and closes at once. About one
    association in five, pynetdicom had read the rejection and closed the socket before
    its ACSE looked, and reported an abort: a migration then took an AE title error
    for an archive that was away (compat.recover_rejection)."""
    legacy = LegacyPacs(tmp_path / "legacy", {SecondaryCaptureImageStorage: ExplicitVRLittleEndian})
    legacy.callers = ("SOMEONE",)
    legacy.start()
    config = DicomConfig(acse_timeout=5, dimse_timeout=5, network_timeout=5)
    peer = Peer("legacy", legacy.ae_title, "127.0.0.1", legacy.port, frozenset({"find"}))
    reasons: list[str] = []

    def refused(assoc: object, unreachable: str) -> Exception:
        reasons.append(rejected_for_good(assoc) or unreachable or "aborted")
        return RuntimeError(reasons[-1])

    try:
        for _ in range(40):
            with pytest.raises(RuntimeError), requested_association(
                    config, peer, [(Verification, None)], tls_client=None, refused=refused):
                pytest.fail("dcmqrscp accepted an AE title it does not know")
    finally:
        legacy.stop()
    assert Counter(reasons) == {"called AE title not recognized": 40}
