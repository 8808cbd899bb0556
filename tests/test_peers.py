"""The allowlist: edits keep comments, a running reader sees changes without restart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import run_pacs_edge

from appliance.base.errors import ConfigError, NotAuthorized, PeerError
from appliance.services.peers import (
    PEERS_HEADER,
    Allowlist,
    CertificateIdentity,
    Peer,
    parse_permissions,
)


def _peer(name: str = "ct1", title: str = "CT1") -> Peer:
    return Peer(name, title, "10.0.0.5", 104, frozenset({"store"}))


def test_added_peer_is_seen_by_an_existing_reader(tmp_path: Path) -> None:
    path = tmp_path / "peers.toml"
    path.write_text(PEERS_HEADER + "# site note: keep this\n")
    reader = Allowlist(path)
    assert reader.peers() == {}
    Allowlist(path).add(_peer())
    assert reader.by_ae_title("CT1") == _peer()
    assert "# site note: keep this" in path.read_text()
    Allowlist(path).remove("ct1")
    assert reader.by_ae_title("CT1") is None


def test_duplicate_and_unknown_names_are_explained(tmp_path: Path) -> None:
    allowlist = Allowlist(tmp_path / "peers.toml")
    allowlist.add(_peer())
    with pytest.raises(PeerError, match="already exists"):
        allowlist.add(_peer())
    with pytest.raises(PeerError, match="no peer named"):
        allowlist.remove("ghost")


def test_authorize_returns_the_calling_peer_when_it_holds_the_permission(
        tmp_path: Path) -> None:
    allowlist = Allowlist(tmp_path / "peers.toml")
    allowlist.add(_peer())
    assert allowlist.authorize("CT1  ", "store") == _peer()


@pytest.mark.parametrize(("ae_title", "permission"), [("CT1", "find"), ("GHOST", "store")])
def test_authorize_refuses_a_missing_permission_or_an_unlisted_ae_with_its_fields(
        tmp_path: Path, ae_title: str, permission: str) -> None:
    allowlist = Allowlist(tmp_path / "peers.toml")
    allowlist.add(_peer())
    with pytest.raises(NotAuthorized) as caught:
        allowlist.authorize(ae_title, permission)
    assert (caught.value.ae_title, caught.value.permission) == (ae_title, permission)
    assert caught.value.message == f"peer lacks permission {permission!r}"
    assert f"--allow {permission}" in (caught.value.hint or "")


@pytest.mark.parametrize("text", ["", "store,delete", "everything"])
def test_unknown_permissions_are_refused(text: str) -> None:
    with pytest.raises(PeerError):
        parse_permissions(text)


def test_permissions_parse_case_and_spaces() -> None:
    assert parse_permissions(" Store, FIND ") == frozenset({"store", "find"})


@pytest.mark.parametrize(
    "peer",
    [
        Peer("bad name", "CT1", "h", 104, frozenset({"store"})),
        Peer("ct", "A" * 17, "h", 104, frozenset({"store"})),
        Peer("ct", "CT", "h", 0, frozenset({"store"})),
        Peer("ct", "CT", " ", 104, frozenset({"store"})),
    ],
)
def test_invalid_peers_are_refused(tmp_path: Path, peer: Peer) -> None:
    with pytest.raises(PeerError):
        Allowlist(tmp_path / "peers.toml").add(peer)


def test_tls_only_and_other_flags_survive_a_reload(tmp_path: Path) -> None:
    path = tmp_path / "peers.toml"
    peer = Peer("ws2", "WS2", "127.0.0.1", 104, frozenset({"find"}), bind_host=True, tls=True,
                tls_only=True)
    Allowlist(path).add(peer)
    assert Allowlist(path).by_ae_title("WS2") == peer
    assert "tls_only = true" in path.read_text()


_CT1 = CertificateIdentity("ct1")


@pytest.mark.parametrize(
    ("tls_only", "over_tls", "certificate", "refused"),
    [
        (False, False, None, None),  # plain port, no certificate: the AE title (and host)
        (False, True, None, None),  # TLS without mutual authentication
        (False, True, _CT1, None),  # its own certificate
        (False, True, CertificateIdentity("box", frozenset({"ct1"})), None),  # a DNS SAN
        (False, True, CertificateIdentity("CT1"), "may not call as peer 'ct1'"),  # exact
        (False, True, CertificateIdentity("ws1"), "may not call as peer 'ct1'"),
        (True, False, None, "called on the plain port"),
        (True, True, None, "presented no client certificate"),
        (True, True, _CT1, None),
        (True, True, CertificateIdentity("ws1"), "may not call as peer 'ct1'"),
    ],
)
def test_refusal_binds_certificate_transport_and_peer(
    tls_only: bool, over_tls: bool, certificate: CertificateIdentity | None,
    refused: str | None,
) -> None:
    peer = Peer("ct1", "CT1", "127.0.0.1", 104, frozenset({"store"}), tls_only=tls_only)
    why = peer.refusal(address="127.0.0.1", over_tls=over_tls, certificate=certificate)
    assert (why is None) if refused is None else (why is not None and refused in why)


def test_hl7_sender_needs_no_port_but_a_dicom_peer_does(tmp_path: Path) -> None:
    allowlist = Allowlist(tmp_path / "peers.toml")
    allowlist.add(Peer("ris", "RIS", "127.0.0.1", 0, frozenset({"hl7"})))
    with pytest.raises(PeerError, match="invalid port 0"):
        allowlist.add(Peer("ct", "CT", "127.0.0.1", 0, frozenset({"store", "hl7"})))
    assert Allowlist(tmp_path / "peers.toml").peers()["ris"].port == 0


def test_hl7_sender_is_found_by_host_and_only_with_permission_hl7(tmp_path: Path) -> None:
    allowlist = Allowlist(tmp_path / "peers.toml")
    allowlist.add(Peer("ct", "CT", "127.0.0.3", 104, frozenset({"store"})))
    allowlist.add(Peer("ris", "RIS", "localhost", 0, frozenset({"hl7"})))
    sender = allowlist.hl7_sender("127.0.0.1")  # localhost resolves to it
    assert sender is not None and sender.name == "ris"
    assert allowlist.hl7_sender("127.0.0.3") is None  # a DICOM peer may not send HL7
    assert allowlist.hl7_sender("127.0.0.2") is None


def _break(path: Path, how: str) -> None:
    if how == "not-utf8":
        path.write_bytes(PEERS_HEADER.encode() + b"# caf\xe9\n")
    elif how == "folder":
        path.unlink()
        path.mkdir()
    else:
        path.unlink()
        os.mkfifo(path)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how, why", [("not-utf8", "is not UTF-8"), ("folder", "<a folder>"),
                                      ("fifo", "<not a regular file>")])
def test_unreadable_peers_file_is_one_error_naming_it(tmp_path: Path, how: str,
                                                      why: str) -> None:
    home = tmp_path / "home"
    run_pacs_edge("init", "--home", str(home), "--dicom-port", "0", "--tls-port", "0",
                  "--hl7-port", "0", "--http-port", "0", "--metrics-port", "0")
    _break(home / "peers.toml", how)
    # A FIFO would block the read: the timeouts turn a hang into a failure.
    listed = run_pacs_edge("peers", "list", "--home", str(home), check=False, timeout=60)
    lines = listed.stderr.strip().splitlines()
    assert listed.returncode == 2, listed.stdout + listed.stderr
    assert len(lines) == 2 and lines[1].startswith("hint: "), listed.stderr
    assert lines[0].startswith("error: ") and "peers.toml" in lines[0] and why in lines[0]
    checked = run_pacs_edge("config", "check", "--home", str(home), check=False, timeout=60)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert "Traceback" not in checked.stderr
    assert any(line.startswith("error  peer allowlist: ") and "peers.toml" in line
               and why in line for line in checked.stderr.splitlines()), checked.stderr
    with pytest.raises(ConfigError) as caught:
        Allowlist(home / "peers.toml").peers()
    assert "peers.toml" in caught.value.message and why in caught.value.message
